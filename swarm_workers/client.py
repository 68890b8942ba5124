"""The producer's API: validate, route, enqueue, and wait for results.

>>> client = SwarmClient("redis://127.0.0.1:6379/0")          # doctest: +SKIP
>>> handle = client.submit("Summarise X", role="default", priority="P0")  # doctest: +SKIP
>>> handle.result(timeout=60).output                           # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from pydantic import ValidationError

from swarm_workers.celery_app import RUN_AGENT, SwarmCelery, create_app
from swarm_workers.config import Settings, load_settings
from swarm_workers.dag import DagHandle, DagSpec, Node
from swarm_workers.errors import InvalidTask, PayloadTooLarge, ResultTimeout
from swarm_workers.models import (
    AgentTask,
    ErrorInfo,
    Priority,
    TaskResult,
    TaskState,
    TaskStatus,
)
from swarm_workers.queues import queue_name
from swarm_workers.ratelimit.admission import AdmissionControl

__all__ = ["SwarmClient", "TaskHandle"]

_CELERY_STATES = {
    "PENDING": TaskState.QUEUED,
    "RECEIVED": TaskState.QUEUED,
    "RETRY": TaskState.QUEUED,
    "STARTED": TaskState.RUNNING,
}


class TaskHandle:
    """A submitted task: its id, and a way to wait for its result."""

    def __init__(self, client: SwarmClient, task: AgentTask) -> None:
        self.client = client
        self.task = task

    @property
    def id(self) -> str:
        return self.task.id

    def result(self, timeout: float = 300.0) -> TaskResult:
        return self.client.result(self.id, timeout=timeout)

    def status(self) -> TaskStatus:
        return self.client.status(self.id)

    def __repr__(self) -> str:
        return f"TaskHandle({self.task.redacted()})"


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

    def submit(self, prompt: str | None = None, **options: Any) -> TaskHandle:
        """Validate and enqueue one task on `p<N>.<role>`. Nothing is sent if invalid."""
        task = self.build_task(prompt, **options)
        self.admission.check(queue_name(task.priority, task.role))  # Backpressure
        self.enqueue(task)
        return TaskHandle(self, task)

    def submit_dag(self, nodes: Sequence[Node] | DagSpec, **options: Any) -> DagHandle:
        """Validate a DAG of agent tasks and enqueue it as one canvas (see `swarm_workers.dag`).

        Options: `on_failure="fail"|"skip"`, `name`. Nothing is sent if anything is invalid.
        """
        from swarm_workers.dag.submit import submit_dag

        return submit_dag(self, nodes, **options)

    def enqueue(self, task: AgentTask) -> None:
        self.app.send_task(
            RUN_AGENT,
            args=[task.to_wire()],
            task_id=task.id,
            queue=queue_name(task.priority, task.role),
            argsrepr=task.redacted() if self.settings.redact_prompts else None,
            kwargsrepr="{}",
        )

    def handle(self, task_id: str) -> AsyncResult:
        return AsyncResult(task_id, app=self.app)

    def result(self, task_id: str, timeout: float = 300.0) -> TaskResult:
        async_result = self.handle(task_id)
        try:
            value = async_result.get(timeout=timeout, propagate=False, interval=0.2)
        except (CeleryTimeout, TimeoutError):
            raise ResultTimeout(task_id, timeout) from None
        status = self._status_of(task_id, async_result.state, value)
        assert status.result is not None  # a ready state always carries one
        return status.result

    def status(self, task_id: str) -> TaskStatus:
        async_result = self.handle(task_id)
        state = async_result.state
        return self._status_of(
            task_id, state, async_result.result if state in ("SUCCESS", "FAILURE") else None
        )

    def _status_of(self, task_id: str, state: str, value: Any) -> TaskStatus:
        if state == "SUCCESS":
            result = TaskResult.from_wire(value)
            kind = TaskState.SUCCEEDED if result.ok else TaskState.FAILED
            return TaskStatus(task_id=task_id, state=kind, result=result)
        if state in ("FAILURE", "REVOKED"):
            # The task body itself crashed (a bug or the time limit), not the agent.
            return TaskStatus(
                task_id=task_id, state=TaskState.FAILED, result=_crashed(task_id, state, value)
            )
        return TaskStatus(task_id=task_id, state=_CELERY_STATES.get(state, TaskState.QUEUED))

    def close(self) -> None:
        self.admission.close()
        self.app.close()

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _crashed(task_id: str, state: str, value: Any) -> TaskResult:
    from swarm_workers.models import Timings, utcnow

    now = utcnow()
    return TaskResult(
        task_id=task_id,
        role="?",
        priority=Priority.P2,
        status="failed",
        stop_reason="error",
        error=ErrorInfo(
            type=type(value).__name__ if value is not None else state,
            message=str(value) if value is not None else state,
        ),
        timings=Timings(submitted_at=now, started_at=now, finished_at=now),
    )
