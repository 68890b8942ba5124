"""From a wire payload to a recorded `TaskResult`: the body of every agent task.

Plain Python, no Celery. One delivery:

1. starts the task's deadline (`worker.task_time_limit_s`): it bounds every wait
   that follows, the twin wait, the bucket, the model and the tools;
2. decodes the payload (one that this build cannot read is recorded as failed);
3. begins a run (`claims.Claims.begin`): a stored outcome is returned as it is, with
   no model call (what makes redelivered chord header tasks idempotent); a lease held
   by a twin delivery is waited out (the twin records, or its lease lapses); else the
   lease is ours and the run is counted;
4. a run beyond `worker.max_attempts` (the earlier ones were cut short by dying
   workers) is recorded as failed, `TooManyAttempts`, instead of killing another;
5. runs the agent loop (`prepare` may rewrite the task first: a DAG node's prompt);
6. records the outcome and releases the lease in one step, and returns what is stored;
7. keeps a task that failed for good as a dead letter (`deadletters`), with the task
   as it ran and each run's error.

A task whose earlier run was cut short runs in a child process (`isolation`), so a
poison task that kills its process takes no neighbour with it.

Redis errors are retried with backoff for a bounded time; past that a `RedisError`
leaves here, the run's count is given back (a blip costs no attempt), and the task
body puts the message back on its queue. `Requeue` asks for the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import redis
from pydantic import ValidationError

from swarm_workers.agent.budget import cost_usd
from swarm_workers.agent.loop import run_agent
from swarm_workers.deadletters import DeadLetter, is_dead
from swarm_workers.deadline import Deadline
from swarm_workers.errors import LeaseLost, SwarmError, TaskCancelled
from swarm_workers.execution.claims import Claim
from swarm_workers.execution.failpoints import check_failpoints
from swarm_workers.execution.isolation import RunCrashed, RunDeferred, run_isolated
from swarm_workers.execution.runtime import Runtime
from swarm_workers.metrics import DEAD_LETTERS, observe_result
from swarm_workers.models import AgentTask, ErrorInfo, SwarmTree, TaskResult, Timings, utcnow
from swarm_workers.swarm import Lineage
from swarm_workers.swarm.tree import build_tree

__all__ = ["Requeue", "Suspended", "execute", "undecodable"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Requeue(Exception):
    """This delivery ends unrecorded and its message goes back on the queue."""


class Suspended(Exception):
    """The run ended waiting for its sub-agents: nothing is recorded, the message is
    acknowledged, and the last sub-agent to record sends the task's continuation."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id}: waiting for its sub-agents")
        self.task_id = task_id


Prepare = Callable[[AgentTask], "AgentTask | TaskResult"]
"""Turns a task into the task to run, or into an outcome decided without running it."""


def execute(
    payload: Any,
    runtime: Runtime,
    *,
    decode: Callable[[Any], AgentTask] = AgentTask.from_wire,
    prepare: Prepare | None = None,
) -> TaskResult:
    """Run one delivery of a task and return its recorded outcome (see the module doc).

    Raises redis.RedisError when Redis stays unavailable, `Requeue` when the run was
    cut short without an outcome: the caller puts the message back either way.
    `Suspended` when a supervisor's run ended waiting for its sub-agents.

    A sub-agent's recorded outcome (on every delivery, so a redelivered one finishes
    what a dead worker began) is counted in its supervisor's ledger; the last one of a
    spawn round sends the supervisor's continuation.
    """
    deadline = Deadline.start(runtime.settings.worker.task_time_limit_s)
    try:
        task = decode(payload)
    except ValidationError as exc:
        return runtime.results.put(undecodable(payload, exc, runtime.worker_name))
    recorded = _deliver(task, runtime, deadline, prepare)
    if Lineage.of(task).parent is not None:
        _with_retries(lambda: _notify_parent(task, recorded, runtime), runtime)
    return recorded


def _deliver(
    task: AgentTask, runtime: Runtime, deadline: Deadline, prepare: Prepare | None
) -> TaskResult:
    claim = _claim(task, runtime, deadline)
    if isinstance(claim, TaskResult):
        return claim
    try:
        result, ran = _run(task, claim, runtime, deadline, prepare)
        if result is None:
            _dispatch(task, runtime)
    except redis.RedisError:
        runtime.claims.abandon(claim)
        raise
    except RunDeferred as exc:
        log.warning("%s; back on the queue", exc)
        runtime.claims.abandon(claim)  # it never ran: not counted
        raise Requeue(str(exc)) from exc
    except RunCrashed as exc:
        log.error("%s", exc)
        runtime.claims.release(claim)  # counted: this run was cut short
        raise Requeue(str(exc)) from exc
    except BaseException:
        runtime.claims.release(claim)
        raise
    if claim.lost:
        # Someone else may own the task now; our outcome is not to be recorded.
        runtime.claims.abandon(claim)
        raise Requeue(f"task {task.id}: lease lost during the run")
    if result is None:  # waiting: no attempt spent, no outcome; the children finish it
        runtime.claims.abandon(claim)
        raise Suspended(task.id)
    try:
        recorded = _with_retries(lambda: runtime.claims.finish(claim, result), runtime)
    except redis.RedisError:
        # The outcome could not be stored: the run goes back on the queue uncounted and
        # its lease lapses within one TTL, so the redelivery is not held up for long.
        runtime.claims.abandon(claim)
        raise
    if recorded == result:  # a racing twin's outcome was counted by its own worker
        observe_result(result)
        if is_dead(result):
            _bury(ran, result, runtime)
    return recorded


def _dispatch(task: AgentTask, runtime: Runtime) -> None:
    """Send every spawn round of `task` not sent yet (a resumed run sends what a dead
    worker recorded but did not send; sending twice is harmless: runs are claimed)."""
    spawner = runtime.spawner
    for record in spawner.rounds(task.id):
        if spawner.flag(task.id, f"sent:{record.round}"):
            continue
        if runtime.sender is None:
            raise RuntimeError("this process cannot send sub-agents (no broker sender)")
        # Before any child can finish: its continuation takes this delivery's place.
        spawner.hold(task.id, runtime.sender.position())
        runtime.sender.send_children(spawner.prepared(record.dag_id))
        spawner.mark(task.id, f"sent:{record.round}")


def _notify_parent(task: AgentTask, result: TaskResult, runtime: Runtime) -> None:
    """Count a sub-agent's outcome; the round's last one continues its supervisor."""
    due = runtime.spawner.child_done(task, result)
    if due is None:
        return
    parent_id, number = due
    checkpoint = runtime.checkpoints.load(parent_id)
    if checkpoint is None:
        log.warning("task %s: supervisor %s has no checkpoint to continue", task.id, parent_id)
        return
    if runtime.sender is None:
        raise RuntimeError("this process cannot continue a supervisor (no broker sender)")
    position = runtime.spawner.position(parent_id)
    # In a canvas the continuation is the task's own id, as `Task.replace` does, so a
    # chord counts the task once however many deliveries it takes.
    message_id = parent_id if position else f"{parent_id}.cont{number}"
    runtime.sender.send_continuation(checkpoint.task, message_id, position)
    runtime.spawner.mark(parent_id, f"cont:{number}")
    log.info("task %s: last of round %d; supervisor %s continued", task.id, number, parent_id)


def _bury(task: AgentTask, result: TaskResult, runtime: Runtime) -> None:
    """Keep a dead letter. Its outcome is stored already: if Redis stays away, the letter
    is what is lost (logged), not the task."""
    letter = DeadLetter.of(task, result)
    try:
        dropped = _with_retries(partial(runtime.deadletters.add, letter), runtime)
    except redis.RedisError as exc:
        log.error("task %s: failed for good, but its dead letter was not kept: %s", task.id, exc)
        return
    DEAD_LETTERS.labels(task.role, letter.error.type).inc()
    if dropped:
        log.warning("dead letters of role %s at their cap: %d oldest dropped", task.role, dropped)


def _claim(task: AgentTask, runtime: Runtime, deadline: Deadline) -> Claim | TaskResult:
    """A claim to run `task`, or its outcome (stored, or cancelled before it ran); waits
    while a twin holds the lease."""
    while True:
        begun = _with_retries(lambda: runtime.claims.begin(task.id, deadline), runtime)
        if begun.result is not None:
            log.info("task %s: already recorded, returning the stored result", task.id)
            return begun.result
        if begun.kind == "cancelled":
            log.info("task %s: cancelled before this delivery ran", task.id)
            unrun = _cancelled(task, runtime)
            return _with_retries(partial(runtime.claims.record, unrun), runtime)
        if begun.claim is not None:
            return begun.claim
        # Another delivery of this very task runs (redelivered after a broker reconnect,
        # say): it records soon, or its lease lapses within one TTL if its worker died.
        if deadline.expired():
            raise Requeue(f"task {task.id}: a twin delivery still holds its lease")
        deadline.sleep(min(0.5, max(0.05, begun.busy_for_s)))


def _cancelled(task: AgentTask, runtime: Runtime) -> TaskResult:
    """The outcome of a task cancelled between deliveries. One that ran before (a
    supervisor cancelled while it waited) reports what its checkpoint says it spent, and
    its tree, cancelled sub-agents included; else nothing was spent."""
    unrun = TaskResult.cancelled_before_run(task, worker=runtime.worker_name)
    state = runtime.checkpoints.load(task.id)
    if state is None:
        return unrun
    model = runtime.settings.model_for(task.role)
    usage = state.usage
    return unrun.model_copy(
        update={
            "error": ErrorInfo(
                type="TaskCancelled", message=f"cancelled after {state.steps} step(s)"
            ),
            "model": model,
            "steps": state.steps,
            "steps_resumed": state.steps,
            "usage": usage,
            "tool_calls": state.tools,
            "cost_usd": cost_usd(
                runtime.settings.llm.prices, model, usage.prompt_tokens, usage.completion_tokens
            ),
            "timings": _timings(task, state.started_at),
            "swarm": _tree(task, state.started_at, state.own_model_s, runtime),
        }
    )


def _run(
    task: AgentTask,
    claim: Claim,
    runtime: Runtime,
    deadline: Deadline,
    prepare: Prepare | None,
) -> tuple[TaskResult | None, AgentTask]:
    """The run's outcome (None: waiting for sub-agents), and the task as it ran (a DAG
    node's prompt rendered)."""
    started = utcnow()
    ran = task

    def failed(kind: str, message: str) -> tuple[TaskResult, AgentTask]:
        log.warning("task %s failed: %s: %s", task.id, kind, message)
        result = TaskResult.failure(
            kind,
            message,
            task=task,
            worker=runtime.worker_name,
            attempts=claim.runs,
            started_at=started,
        )
        return result, ran

    if claim.runs > runtime.settings.worker.max_attempts:
        return failed(
            "TooManyAttempts",
            f"started {claim.runs} times; each run before was cut short by its worker dying",
        )
    log.info("start %s run=%d", task.redacted(), claim.runs)
    try:
        ready = prepare(task) if prepare is not None else task
        if isinstance(ready, TaskResult):
            return ready, ran
        ran = ready
        if claim.runs > 1 and runtime.settings.worker.isolate_suspects:
            outcome = run_isolated(ran, runtime, deadline, claim.token)
        else:
            check_failpoints(ran, runtime.settings)
            outcome = run_agent(
                ran,
                runtime,
                deadline,
                durable=runtime.checkpoints.writer(
                    task.id, claim.token, fresh=not claim.has_checkpoint
                ),
                spawner=runtime.spawner,
            )
    except SwarmError as exc:
        kind, message = type(exc).__name__, str(exc)
    except (redis.RedisError, RunCrashed, RunDeferred):
        raise
    except Exception as exc:  # a bug of ours: recorded, so a chord still completes
        log.exception("task %s: internal error", task.id)
        kind, message = "InternalError", f"{type(exc).__name__} in the worker (see its log)"
    else:
        if outcome.waiting is not None:
            return None, ran
        if outcome.error is not None and outcome.error.type == LeaseLost.__name__:
            claim.lost = True  # a checkpoint was refused: another run holds the task
        cancelled = claim.cancelled or (
            outcome.error is not None and outcome.error.type == TaskCancelled.__name__
        )
        if outcome.error is not None and not cancelled:
            log.warning(
                "task %s failed: %s: %s", task.id, outcome.error.type, outcome.error.message
            )
        done = TaskResult(
            task_id=task.id,
            role=task.role,
            priority=task.priority,
            status="cancelled" if cancelled else "succeeded" if outcome.ok else "failed",
            output=outcome.output,
            error=outcome.error,
            stop_reason="cancelled" if cancelled else outcome.stop_reason,
            model=outcome.model,
            steps=outcome.steps,
            usage=outcome.usage,
            tool_calls=outcome.tool_calls,
            cost_usd=outcome.cost_usd,
            attempts=claim.runs,
            worker=runtime.worker_name,
            timings=_timings(task, outcome.started_at or started),
            steps_resumed=outcome.steps_resumed,
            swarm=_tree(task, outcome.started_at or started, outcome.own_model_s, runtime),
        )
        return done, ran
    return failed(kind, message)


def _tree(
    task: AgentTask, started: datetime, own_model_s: float, runtime: Runtime
) -> SwarmTree | None:
    """A supervisor's tree of sub-agents, finished; None for a task that never spawned."""
    if runtime.settings.role(task.role).spawn is None or not runtime.spawner.rounds(task.id):
        return None
    return build_tree(
        runtime.spawner, task.id, started_at=started, own_model_s=own_model_s, finished_at=utcnow()
    )


def _timings(task: AgentTask, started: datetime) -> Timings:
    return Timings(submitted_at=task.submitted_at, started_at=started, finished_at=utcnow())


def undecodable(payload: Any, exc: ValidationError, worker: str | None) -> TaskResult:
    """A payload this build cannot read is recorded as failed, not retried forever."""
    fields = payload if isinstance(payload, dict) else {}
    task_id = str(fields.get("id") or "unknown")
    first = exc.errors()[0]
    problem = f"{'.'.join(str(p) for p in first['loc']) or 'payload'}: {first['msg']}"
    log.error("task %s: undecodable payload: %s", task_id, problem)
    return TaskResult.failure("InvalidPayload", problem, task_id=task_id, worker=worker)


_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 2.0


def _with_retries(call: Callable[[], T], runtime: Runtime) -> T:
    """`call()`, retried on Redis errors with backoff for up to `worker.redis_retry_s`:
    a failover or a dropped connection is not the task's failure."""
    give_up = time.monotonic() + runtime.settings.worker.redis_retry_s
    pause = _RETRY_FIRST_S
    while True:
        try:
            return call()
        except redis.RedisError as exc:
            if time.monotonic() + pause > give_up:
                raise
            log.warning("Redis unavailable (%s); retrying in %.1fs", type(exc).__name__, pause)
            time.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX_S)
