"""The producer's API: validate, route, enqueue, and wait for results.

>>> client = SwarmClient("redis://127.0.0.1:6379/0")          # doctest: +SKIP
>>> handle = client.submit("Summarise X", role="default", priority="P0")  # doctest: +SKIP
>>> handle.result(timeout=60).output                           # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from swarm_workers.cancellation import Canceller, CancelReport
from swarm_workers.celery_app import SwarmCelery, create_app, send_agent_task
from swarm_workers.config import Settings, load_settings
from swarm_workers.dag import DagHandle, DagSpec, Node, OnFailure
from swarm_workers.dag.canvas import send_dag
from swarm_workers.dag.prepare import prepare_dag
from swarm_workers.dag.store import DagStore
from swarm_workers.deadletters import DeadLetter, DeadLetterStore
from swarm_workers.errors import InvalidTask, PayloadTooLarge
from swarm_workers.idempotency import IdempotencyKeys
from swarm_workers.models import AgentTask, Priority, TaskResult, TaskStatus, new_task_id, utcnow
from swarm_workers.queues import queue_name
from swarm_workers.ratelimit.admission import AdmissionControl
from swarm_workers.redis_client import redis_client
from swarm_workers.results import ResultStore

__all__ = ["Replayed", "SwarmClient", "TaskHandle"]


class Replayed(BaseModel):
    """A dead letter replayed (`task_id`: the new task) or not found (`task_id` None:
    replayed or purged already, or never a dead letter)."""

    model_config = ConfigDict(frozen=True)

    replay_of: str
    task_id: str | None


class TaskHandle:
    """A submitted task: its id, and a way to wait for its result.

    >>> handle = client.submit("Summarise X")      # doctest: +SKIP
    >>> handle.result(timeout=60).status           # doctest: +SKIP
    'succeeded'
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
        """Validate everything a submit needs; raises InvalidTask naming the field."""
        role = role or next(iter(self.settings.roles))
        role_settings = self.settings.role(role)  # UnknownRole
        try:
            level = Priority(priority) if priority is not None else role_settings.default_priority
        except ValueError:
            raise InvalidTask("priority", f"{priority!r} is not one of P0, P1, P2") from None
        if budget is not None and budget <= 0:
            raise InvalidTask("budget", f"must be > 0, got {budget}")
        fields: dict[str, Any] = {
            "role": role,
            "priority": level,
            "prompt": prompt,
            "messages": None if messages is None else [dict(m) for m in messages],
            "output_budget": budget if budget is not None else role_settings.budget_for(level),
            "deps": tuple(deps),
            "metadata": dict(metadata or {}),
        }
        if task_id is not None:
            fields["id"] = task_id
        try:
            task = AgentTask(**fields)
        except (ValidationError, TypeError) as exc:
            raise _invalid(exc) from None
        size = len(json.dumps(task.to_wire()).encode())
        if size > self.settings.limits.max_payload_bytes:
            raise PayloadTooLarge(size, self.settings.limits.max_payload_bytes)
        return task

    def submit(
        self, prompt: str | None = None, *, idempotency_key: str | None = None, **options: Any
    ) -> TaskHandle:
        """Validate and enqueue one task on `p<N>.<role>`. Nothing is sent if invalid.

        With `idempotency_key`, a submit with a key used within the window
        (`limits.idempotency_window_s`) enqueues nothing and returns a handle to the
        task the first one made, whatever its state.
        """
        task = self.build_task(prompt, **options)
        made = f"task:{task.id}"
        if idempotency_key is not None:
            first = self.idempotency.claim(idempotency_key, made)
            if first is not None:
                return TaskHandle(self, _made_id(first, "task", idempotency_key))
        try:
            self.admission.check(queue_name(task.priority, task.role))  # Backpressure
            self.enqueue(task)
        except BaseException:
            if idempotency_key is not None:
                self.idempotency.release(idempotency_key, made)
            raise
        return TaskHandle(self, task.id, task)

    def enqueue(self, task: AgentTask) -> None:
        """Send a task built by `build_task`, skipping the admission check."""
        send_agent_task(self.app, task)

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
            DagSpec.of(nodes, **fields),
            self.build_task,
            max_nodes=self.settings.limits.max_dag_nodes,
        )
        made = f"dag:{dag.dag_id}"
        if idempotency_key is not None:
            first = self.idempotency.claim(idempotency_key, made)
            if first is not None:
                return self.dag(_made_id(first, "dag", idempotency_key))
        store = DagStore(self.redis, self.settings)
        try:
            for queue in dag.queues:
                self.admission.check(queue)  # Backpressure: a DAG is refused whole
            store.save(dag.record, dag.tasks)
            send_dag(self.app, dag)
        except BaseException:
            if idempotency_key is not None:
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
        """queued, running, succeeded, failed or cancelled (with the result once recorded)."""
        return self.results.status(task_id)

    def cancel(self, task_id: str) -> CancelReport:
        """Cancel a task: see `cancellation.Canceller.cancel` for the four answers."""
        return self.canceller.cancel(task_id)

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


def _invalid(exc: ValidationError | TypeError) -> InvalidTask:
    if isinstance(exc, TypeError):
        return InvalidTask("messages", str(exc))
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or _field_from_message(first["msg"])
    return InvalidTask(field, first["msg"].removeprefix("Value error, "))


def _field_from_message(message: str) -> str:
    for name in ("prompt", "messages"):
        if name in message:
            return name
    return "task"
