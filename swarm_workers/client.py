"""The producer's API: validate, route, enqueue, and wait for results.

Usage::

    client = SwarmClient("redis://127.0.0.1:6379/0")
    handle = client.submit("Summarise X", role="default", priority="P0")
    handle.result(timeout=60).output
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, ValidationError

from swarm_workers.agent.budget import context_window
from swarm_workers.agent.checkpoint import CheckpointStore
from swarm_workers.cancellation import Canceller, CancelReport
from swarm_workers.celery_app import SwarmCelery, create_app, send_agent_task, send_agent_tasks
from swarm_workers.config import Settings, load_settings
from swarm_workers.dag import DagHandle, DagSpec, Node, OnFailure
from swarm_workers.dag.canvas import send_dag
from swarm_workers.dag.prepare import prepare_dag
from swarm_workers.dag.store import DagStore
from swarm_workers.deadletters import DeadLetter, DeadLetterStore
from swarm_workers.errors import BrokerUnavailable, InvalidDag, InvalidTask, PayloadTooLarge
from swarm_workers.idempotency import IdempotencyKeys
from swarm_workers.models import (
    AgentTask,
    Priority,
    SwarmTree,
    TaskResult,
    TaskStatus,
    new_task_id,
    text_problem,
    utcnow,
)
from swarm_workers.queues import queue_name
from swarm_workers.ratelimit.admission import AdmissionControl
from swarm_workers.redis_client import redis_client
from swarm_workers.results import ResultStore
from swarm_workers.swarm import Spawner
from swarm_workers.swarm.tree import build_tree, cancel_tree

__all__ = ["Replayed", "SwarmClient", "TaskHandle"]


class Replayed(BaseModel):
    """A dead letter replayed (`task_id`: the new task) or not found (`task_id` None:
    replayed or purged already, or never a dead letter)."""

    model_config = ConfigDict(frozen=True)

    replay_of: str
    task_id: str | None


class TaskHandle:
    """A submitted task: its id, and a way to wait for its result.

    Usage::

        handle = client.submit("Summarise X")
        handle.result(timeout=60).status
        # -> 'succeeded'
    """

    def __init__(self, client: SwarmClient, task_id: str, task: AgentTask | None = None) -> None:
        self.client = client
        self.task = task  # None for a handle made from an id alone (`SwarmClient.task`)
        self._id = task_id

    @property
    def id(self) -> str:
        return self._id

    def result(self, timeout: float = 300.0) -> TaskResult:
        return self.client.result(self.id, timeout=timeout)

    def status(self) -> TaskStatus:
        return self.client.status(self.id)

    def cancel(self) -> CancelReport:
        return self.client.cancel(self.id)

    def __repr__(self) -> str:
        return f"TaskHandle({self.task.redacted() if self.task else self.id})"


class SwarmClient:
    """Submits agent tasks to the role's priority queues and reads their results."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        app: SwarmCelery | None = None,
    ) -> None:
        if settings is None:
            settings = load_settings(None, **({"redis_url": redis_url} if redis_url else {}))
        self.settings = settings
        self.app = app or create_app(settings)
        self.admission = AdmissionControl.from_settings(settings)
        # Short timeouts: a producer must not hang on a Redis that stopped answering.
        self.redis = redis_client(settings.redis_url, max_connections=64)
        self.results = ResultStore.from_settings(settings, self.redis)
        self.canceller = Canceller(self.redis, settings)
        self.idempotency = IdempotencyKeys(self.redis, settings)
        self.deadletters = DeadLetterStore(self.redis, settings)
        self.checkpoints = CheckpointStore(self.redis, settings.keys, settings.limits.result_ttl_s)
        self.spawner = Spawner(self.redis, settings)

    def build_task(
        self,
        prompt: str | None = None,
        *,
        role: str | None = None,
        priority: Priority | str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        budget: int | None = None,
        deps: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        task_id: str | None = None,
    ) -> AgentTask:
        """Validate everything a submit needs; raises InvalidTask naming the field.

        Whatever the arguments, the answer is a task or an `InvalidTask` (`UnknownRole`,
        `PayloadTooLarge`): wrong types, text that is not valid UTF-8 (NUL, lone
        surrogates), and budgets above the model's context window included.
        """
        if role is None:
            role = next(iter(self.settings.roles))
        elif not isinstance(role, str):
            raise InvalidTask("role", f"must be a string, got {type(role).__name__}")
        role_settings = self.settings.role(role)  # UnknownRole
        try:
            level = Priority(priority) if priority is not None else role_settings.default_priority
        except (ValueError, TypeError):
            raise InvalidTask("priority", f"{priority!r} is not one of P0, P1, P2") from None
        model = self.settings.model_for(role)
        fields: dict[str, Any] = {
            "role": role,
            "priority": level,
            "prompt": _checked_prompt(prompt),
            "messages": _checked_messages(messages),
            # A default budget is the role's (config checks the ones it sets); a task's
            # own must fit the model's context window.
            "output_budget": role_settings.budget_for(level)
            if budget is None
            else _checked_budget(budget, model, context_window(self.settings.llm, model)),
            "deps": _checked_deps(deps),
            "metadata": _checked_metadata(metadata),
        }
        if task_id is not None:
            fields["id"] = task_id
        try:
            task = AgentTask(**fields)
        except ValidationError as exc:
            raise _invalid(exc) from None
        size = len(task.wire_json.encode())
        if size > self.settings.limits.max_payload_bytes:
            raise PayloadTooLarge(size, self.settings.limits.max_payload_bytes)
        return task

    def submit(
        self, prompt: str | None = None, *, idempotency_key: str | None = None, **options: Any
    ) -> TaskHandle:
        """Validate and enqueue one task on `p<N>.<role>`. Nothing is sent if invalid.

        Raises `InvalidTask` (and subclasses) for bad input, `Backpressure` above the
        queue's high-water mark, and `BrokerUnavailable` when Redis refuses or does not
        answer (see README, *Using it from Python*, for how long that can take).

        With `idempotency_key`, a submit with a key used within the window
        (`limits.idempotency_window_s`) enqueues nothing and returns a handle to the
        task the first one made, whatever its state.
        """
        task = self.build_task(prompt, **options)
        made = f"task:{task.id}"
        if idempotency_key is not None:
            with _broker_errors("the idempotency check", task.id):
                first = self.idempotency.claim(idempotency_key, made)
            if first is not None:
                return TaskHandle(self, _made_id(first, "task", idempotency_key))
        try:
            with _broker_errors("the admission check", task.id):
                self.admission.check(queue_name(task.priority, task.role))  # Backpressure
            with _broker_errors("send", task.id, writes=True):
                self.enqueue(task)
        except BaseException:
            if idempotency_key is not None:
                with contextlib.suppress(redis.RedisError):
                    self.idempotency.release(idempotency_key, made)
            raise
        return TaskHandle(self, task.id, task)

    def enqueue(self, task: AgentTask) -> None:
        """Send a task built by `build_task`, skipping the admission check."""
        send_agent_task(self.app, task)

    def submit_many(self, items: Sequence[Mapping[str, Any]]) -> list[TaskHandle]:
        """Validate and enqueue a batch of tasks, all or none.

        Each item holds `submit`'s keyword arguments (`prompt`, `role`, `priority`,
        `messages`, `budget`, `metadata`, `task_id`). Every item is validated and every
        queue's high-water mark checked (with the batch's own count) before anything is
        sent; then one MULTI/EXEC sends them all. A bad item raises `InvalidTask` whose
        field starts with its index (`tasks.3.prompt`), and nothing is sent.
        """
        tasks: list[AgentTask] = []
        for index, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise InvalidTask(f"tasks.{index}", "each task is a mapping of submit's options")
            options = dict(item)
            prompt = options.pop("prompt", None)
            try:
                tasks.append(self.build_task(prompt, **options))
            except InvalidTask as exc:
                exc.field = f"tasks.{index}.{exc.field}"
                exc.args = (f"task {index}: {exc.args[0]}",)
                raise
            except TypeError as exc:  # an option submit does not have
                raise InvalidTask(f"tasks.{index}", str(exc)) from None
        counts: dict[str, int] = {}
        for task in tasks:
            queue = queue_name(task.priority, task.role)
            counts[queue] = counts.get(queue, 0) + 1
        if not tasks:
            return []
        batch = f"{tasks[0].id} and {len(tasks) - 1} more"
        with _broker_errors("the admission check", batch):
            for queue, count in sorted(counts.items()):
                self.admission.check(queue, count)  # Backpressure: the batch is refused whole
        with _broker_errors("send", batch, writes=True):
            send_agent_tasks(self.app, tasks)
        return [TaskHandle(self, task.id, task) for task in tasks]

    def submit_dag(
        self,
        nodes: Sequence[Node] | DagSpec,
        *,
        on_failure: OnFailure | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> DagHandle:
        """Validate a DAG of agent tasks and enqueue it as one canvas (see `swarm_workers.dag`).

        Nothing is stored or sent if anything is invalid, or if any of its queues is
        above its high-water mark.
        """
        fields: dict[str, Any] = {}
        if on_failure is not None:
            fields["on_failure"] = on_failure
        if name is not None:
            fields["name"] = name
        dag = prepare_dag(
            _dag_spec(nodes, fields),
            self.build_task,
            max_nodes=self.settings.limits.max_dag_nodes,
        )
        made = f"dag:{dag.dag_id}"
        if idempotency_key is not None:
            with _broker_errors("the idempotency check", dag.dag_id):
                first = self.idempotency.claim(idempotency_key, made)
            if first is not None:
                return self.dag(_made_id(first, "dag", idempotency_key))
        store = DagStore(self.redis, self.settings)
        try:
            with _broker_errors("the admission check", dag.dag_id):
                for queue in dag.queues:
                    self.admission.check(queue)  # Backpressure: a DAG is refused whole
            with _broker_errors("storing the DAG", dag.dag_id, writes=True):
                store.save(dag.record, dag.tasks)
            send_dag(self.app, dag)  # BrokerUnavailable of its own
        except BaseException:
            if idempotency_key is not None:
                with contextlib.suppress(redis.RedisError):
                    self.idempotency.release(idempotency_key, made)
            raise
        return DagHandle(dag.record, store, self.results, self.canceller)

    def dag(self, dag_id: str) -> DagHandle:
        """A handle for a DAG submitted earlier, maybe by another process."""
        return DagHandle.attach(
            dag_id, DagStore(self.redis, self.settings), self.results, self.canceller
        )

    def task(self, task_id: str) -> TaskHandle:
        """A handle for a task submitted earlier, maybe by another process."""
        return TaskHandle(self, task_id)

    def result(self, task_id: str, timeout: float = 300.0) -> TaskResult:
        """Wait for the task's recorded outcome; `ResultTimeout` after `timeout` seconds."""
        return self.results.wait(task_id, timeout=timeout)

    def status(self, task_id: str) -> TaskStatus:
        """queued, running, waiting (a supervisor whose sub-agents run), succeeded, failed or
        cancelled (with the result once recorded)."""
        return self.results.status(task_id)

    def cancel(self, task_id: str) -> CancelReport:
        """Cancel a task: see `cancellation.Canceller.cancel` for the four answers.

        A swarm supervisor's whole tree goes with it: every sub-agent its ledgers name
        is cancelled too. A supervisor waiting for its sub-agents holds no lease and sits
        in no queue; its checkpoint says it exists.
        """
        known = self.checkpoints.load(task_id) is not None
        report = self.canceller.cancel(task_id, known=known)
        cancel_tree(self.spawner, self.canceller, task_id)
        return report

    def tree(self, task_id: str) -> SwarmTree | None:
        """A supervisor's sub-agents: from its result once recorded, else live from its
        ledger; None for a task that has spawned nothing (or an unknown id)."""
        result = self.results.get(task_id)
        if result is not None:
            return result.swarm
        checkpoint = self.checkpoints.load(task_id)
        if checkpoint is None:
            return None
        return build_tree(
            self.spawner,
            task_id,
            started_at=checkpoint.started_at,
            own_model_s=checkpoint.own_model_s,
        )

    # ----------------------------------------------------------------- dead letters

    def dead_letters(
        self,
        *,
        role: str | None = None,
        since: datetime | timedelta | None = None,
        error: str | None = None,
    ) -> list[DeadLetter]:
        """Tasks that failed for good, newest first (`since`: a time, or an age)."""
        if role is not None:
            self.settings.role(role)  # UnknownRole
        if isinstance(since, timedelta):
            since = utcnow() - since
        return self.deadletters.find(role=role, since=since, error=error)

    def dead_letter(self, task_id: str) -> DeadLetter | None:
        return self.deadletters.get(task_id)

    def replay(
        self,
        task_ids: Sequence[str] = (),
        *,
        everything: bool = False,
        role: str | None = None,
        error: str | None = None,
    ) -> list[Replayed]:
        """Submit dead letters again, as new tasks whose metadata says `replay_of`.

        Either `task_ids`, or `everything=True` with the optional `role` / `error`
        filters. Each letter is taken out of the set as it is replayed, atomically, so
        replaying the same id twice enqueues it once (the second says `not_found`).
        """
        wanted = self._dead_ids(task_ids, everything, role, error)
        taken = {letter.task.id: letter for letter in self.deadletters.take(wanted)}
        replayed: list[Replayed] = []
        for task_id in wanted:
            letter = taken.get(task_id)
            if letter is None:
                replayed.append(Replayed(replay_of=task_id, task_id=None))
                continue
            task = letter.task.model_copy(
                update={
                    "id": new_task_id(),
                    "submitted_at": utcnow(),
                    "deps": (),
                    "metadata": {**letter.task.metadata, "replay_of": task_id},
                }
            )
            try:
                self.admission.check(queue_name(task.priority, task.role))
                self.enqueue(task)
            except BaseException:
                self.deadletters.add(letter)  # not replayed: keep it
                raise
            replayed.append(Replayed(replay_of=task_id, task_id=task.id))
        return replayed

    def purge_dead(
        self,
        task_ids: Sequence[str] = (),
        *,
        everything: bool = False,
        role: str | None = None,
        error: str | None = None,
    ) -> int:
        """Drop dead letters for good; returns how many were dropped."""
        return len(self.deadletters.take(self._dead_ids(task_ids, everything, role, error)))

    def _dead_ids(
        self, task_ids: Sequence[str], everything: bool, role: str | None, error: str | None
    ) -> list[str]:
        if bool(task_ids) == everything:
            raise InvalidTask("task_ids", "name dead letters by id, or ask for all of them")
        if task_ids:
            return list(task_ids)
        return [letter.task.id for letter in self.dead_letters(role=role, error=error)]

    def close(self) -> None:
        self.admission.close()
        self.redis.close()
        self.app.close()

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _made_id(made: str, kind: str, key: str) -> str:
    """The id in an idempotency key's value (`task:<id>` or `dag:<id>`), of the kind asked."""
    found, _, made_id = made.partition(":")
    if found != kind:
        raise InvalidTask("idempotency_key", f"{key!r} was used for a {found}, not a {kind}")
    return made_id


# --------------------------------------------------------------------------- input checks
# Each turns what a caller may pass (anything, at run time) into what `AgentTask`
# validates, or an `InvalidTask` naming the argument: never a TypeError or ValueError
# from inside our own code.


def _kind(value: object) -> str:
    return type(value).__name__


def _checked_prompt(prompt: object) -> str | None:
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidTask("prompt", f"must be a string, got {_kind(prompt)}")
    return prompt


def _checked_messages(messages: object) -> list[object] | None:
    if messages is None:
        return None
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise InvalidTask(
            "messages", f"must be a list of {{role, content}} mappings, got {_kind(messages)}"
        )
    checked: list[object] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidTask(
                f"messages.{i}", f"must be a mapping with role and content, got {_kind(message)}"
            )
        checked.append(dict(message))
    return checked


def _checked_budget(budget: object, model: str, context: int) -> int:
    """A positive int (not a bool, not a string of digits) no larger than the context
    window: one call's completion can never exceed it, and a budget is checked against
    the whole loop's spend, so a larger one only hides a typo (`budget=10**9`)."""
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise InvalidTask("budget", f"must be an integer number of tokens, got {_kind(budget)}")
    if budget <= 0:
        raise InvalidTask("budget", f"must be > 0, got {budget}")
    if budget > context:
        raise InvalidTask(
            "budget",
            f"{budget} tokens exceeds the {context}-token context window of model {model} "
            "(llm.context_windows)",
        )
    return budget


def _checked_deps(deps: object) -> tuple[object, ...]:
    if type(deps) is tuple and not deps:  # the default: no Sequence ABC check (costly)
        return ()
    if isinstance(deps, str | bytes) or not isinstance(deps, Sequence):
        raise InvalidTask("deps", f"must be a list of task ids, got {_kind(deps)}")
    for i, dep in enumerate(deps):
        if not isinstance(dep, str):
            raise InvalidTask(f"deps.{i}", f"must be a task id string, got {_kind(dep)}")
    return tuple(deps)


def _checked_metadata(metadata: object) -> dict[object, object]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidTask("metadata", f"must be a mapping, got {_kind(metadata)}")
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise InvalidTask("metadata", f"keys must be strings, got {_kind(key)}")
        scalar = value is None or isinstance(value, str | int | float | bool)
        if not scalar or (isinstance(value, float) and not math.isfinite(value)):
            raise InvalidTask(
                f"metadata.{key}",
                f"must be a string, a finite number, a boolean or None, got {_kind(value)}"
                + (f" {value!r}" if isinstance(value, float) else ""),
            )
    return dict(metadata)


# Model field -> the argument of `build_task` a caller knows it by.
_ARGUMENTS = {"output_budget": "budget", "id": "task_id"}


def _invalid(exc: ValidationError) -> InvalidTask:
    first = exc.errors()[0]
    context = first.get("ctx") or {}
    if "field" in context:  # `AgentTask._sendable_text`: the field is named for us
        return InvalidTask(str(context["field"]), str(context["problem"]))
    loc = [str(p) for p in first["loc"]]
    if loc:
        loc[0] = _ARGUMENTS.get(loc[0], loc[0])
    if loc[:1] == ["metadata"]:
        loc = loc[:2]  # drop the union member pydantic appends (`metadata.k.str`)
    field = ".".join(loc) or _field_from_message(first["msg"])
    return InvalidTask(field, first["msg"].removeprefix("Value error, "))


def _field_from_message(message: str) -> str:
    for name in ("prompt", "messages"):
        if name in message:
            return name
    return "task"


def _dag_spec(nodes: object, fields: dict[str, Any]) -> DagSpec:
    """`DagSpec.of` with every refusal an `InvalidDag` naming the field."""
    if isinstance(nodes, str | bytes) or not isinstance(nodes, Sequence | DagSpec):
        raise InvalidDag("nodes", f"must be a list of Node or a DagSpec, got {_kind(nodes)}")
    try:
        spec = DagSpec.of(nodes, **fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]][:2]  # nodes.<i>: pydantic adds the class name
        raise InvalidDag(".".join(loc) or "dag", first["msg"]) from None
    if spec.name is not None and (problem := text_problem(spec.name)) is not None:
        raise InvalidDag("name", problem)
    return spec


@contextmanager
def _broker_errors(during: str, task_id: str, *, writes: bool = False) -> Iterator[None]:
    """Redis failing under a submit's own reads and writes -> `BrokerUnavailable`.

    With `writes`, a failure after the connection was made ("Timeout reading from
    socket", a dropped connection) may come after the write reached Redis: `maybe_sent`.
    Failing to connect ("Error 111 connecting to ...", "Timeout connecting to server")
    sent nothing.
    """
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        reason = str(exc) or _kind(exc)
        maybe_sent = writes and "connecting" not in reason
        raise BrokerUnavailable(during, reason, task_id=task_id, maybe_sent=maybe_sent) from exc
