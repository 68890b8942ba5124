"""From a wire payload to a recorded `TaskResult`: the body of every agent task.

Plain Python, no Celery: decode, count the delivery, run the agent, time it, and
store the outcome under the task id before returning it. A redelivered task whose
outcome is already stored returns that very outcome without calling the model again;
that is what makes chord header tasks idempotent (the Redis backend's ordered chord
set then sees the same member twice and counts it once).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import redis
from pydantic import ValidationError
from redis.exceptions import LockError

from swarm_workers.agent.loop import run_agent
from swarm_workers.errors import SwarmError
from swarm_workers.metrics import observe_result
from swarm_workers.models import AgentTask, ErrorInfo, Priority, TaskResult, Timings, utcnow
from swarm_workers.runtime import Runtime

__all__ = ["execute"]

log = logging.getLogger(__name__)

_TWIN_POLL_S = 0.5


def execute(payload: dict[str, Any], runtime: Runtime) -> dict[str, Any]:
    """Run one task payload and return its wire result (never raises for agent errors).

    Raises redis.RedisError when Redis fails: the task body puts the message back.
    """
    try:
        task = AgentTask.from_wire(payload)
    except ValidationError as exc:
        return _undecodable(payload, runtime, exc).to_wire()

    result_key = runtime.key("result", task.id)
    lease = runtime.redis.lock(
        runtime.key("running", task.id),
        # As long as the loop may run (it enforces this limit itself) and shorter than
        # the visibility timeout (config checks): so a delivery restored after its
        # worker died never finds the dead worker's lease still held.
        timeout=runtime.settings.worker.task_time_limit_s,
        thread_local=False,
    )
    while True:
        stored = runtime.redis.get(result_key)
        if stored is not None:
            log.info("task %s: already recorded, returning the stored result", task.id)
            return TaskResult.model_validate_json(stored).to_wire()
        if lease.acquire(blocking=False):
            break
        # Another delivery of this very task is running (redelivered after a broker
        # reconnect, say): wait for its outcome, or for its lease to lapse if it died.
        time.sleep(_TWIN_POLL_S)
    try:
        return _run_once(task, runtime)
    finally:
        with contextlib.suppress(LockError):
            lease.release()


def _run_once(task: AgentTask, runtime: Runtime) -> dict[str, Any]:
    attempts = _count_attempt(runtime, task)
    started = utcnow()
    if attempts > runtime.settings.worker.max_attempts:
        result = _failed(
            task,
            runtime,
            started,
            attempts,
            "TooManyAttempts",
            f"delivered {attempts} times; the worker running it died each time",
        )
    else:
        log.info("start %s attempt=%d", task.redacted(), attempts)
        try:
            result = _run(task, runtime, started, attempts)
        except SwarmError as exc:
            result = _failed(task, runtime, started, attempts, type(exc).__name__, str(exc))
        except redis.RedisError:
            raise
        except Exception as exc:  # a bug of ours: recorded, so a chord still completes
            log.exception("task %s: internal error", task.id)
            message = f"{type(exc).__name__} in the worker (see its log)"
            result = _failed(task, runtime, started, attempts, "InternalError", message)
    recorded = _record(runtime, result)
    if recorded == result:  # a racing twin's outcome was counted by its own worker
        observe_result(result)
    return recorded.to_wire()


def _undecodable(payload: Any, runtime: Runtime, exc: ValidationError) -> TaskResult:
    """A payload this build cannot read is recorded as failed, not retried forever."""
    started = utcnow()
    fields = payload if isinstance(payload, dict) else {}
    task_id = str(fields.get("id", "unknown"))
    first = exc.errors()[0]
    problem = f"{'.'.join(str(p) for p in first['loc']) or 'payload'}: {first['msg']}"
    log.error("task %s: undecodable payload: %s", task_id, problem)
    return TaskResult(
        task_id=task_id,
        role=str(fields.get("role", "?")),
        priority=Priority.P2,
        status="failed",
        stop_reason="error",
        error=ErrorInfo(type="InvalidPayload", message=problem),
        worker=runtime.worker_name,
        timings=Timings(submitted_at=started, started_at=started, finished_at=started),
    )


def _run(task: AgentTask, runtime: Runtime, started: Any, attempts: int) -> TaskResult:
    """Run the agent loop; a provider failure is a failed result that keeps its usage."""
    outcome = run_agent(task, runtime)
    if outcome.error is not None:
        log.warning("task %s failed: %s: %s", task.id, outcome.error.type, outcome.error.message)
    return TaskResult(
        task_id=task.id,
        role=task.role,
        priority=task.priority,
        status="succeeded" if outcome.ok else "failed",
        output=outcome.output,
        error=outcome.error,
        stop_reason=outcome.stop_reason,
        model=outcome.model,
        steps=outcome.steps,
        usage=outcome.usage,
        tool_calls=outcome.tool_calls,
        cost_usd=outcome.cost_usd,
        attempts=attempts,
        worker=runtime.worker_name,
        timings=Timings(submitted_at=task.submitted_at, started_at=started, finished_at=utcnow()),
    )


def _failed(
    task: AgentTask, runtime: Runtime, started: Any, attempts: int, kind: str, message: str
) -> TaskResult:
    log.warning("task %s failed: %s: %s", task.id, kind, message)
    return TaskResult(
        task_id=task.id,
        role=task.role,
        priority=task.priority,
        status="failed",
        stop_reason="error",
        error=ErrorInfo(type=kind, message=message),
        attempts=attempts,
        worker=runtime.worker_name,
        timings=Timings(submitted_at=task.submitted_at, started_at=started, finished_at=utcnow()),
    )


def _count_attempt(runtime: Runtime, task: AgentTask) -> int:
    key = runtime.key("attempts", task.id)
    ttl = runtime.settings.worker.visibility_timeout_s * (runtime.settings.worker.max_attempts + 1)
    pipe = runtime.redis.pipeline()
    pipe.incr(key)
    pipe.expire(key, ttl)
    count, _ = pipe.execute()
    return int(count)


def _record(runtime: Runtime, result: TaskResult) -> TaskResult:
    """Store first, then return what is stored: a racing twin returns the same bytes."""
    key = runtime.key("result", result.task_id)
    pipe = runtime.redis.pipeline()
    pipe.set(key, result.model_dump_json(), nx=True, ex=runtime.settings.limits.result_ttl_s)
    pipe.get(key)
    _, stored = pipe.execute()
    return TaskResult.model_validate_json(stored)
