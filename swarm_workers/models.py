"""Tasks and results as they travel: pydantic models with a versioned JSON wire format.

Celery carries `AgentTask.to_wire()` as the task's single argument; the worker stores
`TaskResult` JSON in the result store. Both plain JSON (never pickle). The `v` field
lets a newer worker refuse, loudly, a payload it does not understand.

>>> task = AgentTask(role="research", priority=Priority.P0, prompt="Find X", output_budget=8000)
>>> AgentTask.from_wire(task.to_wire()) == task
True
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

__all__ = [
    "WIRE_VERSION",
    "AgentTask",
    "ChatMessage",
    "ErrorInfo",
    "LLMCall",
    "Priority",
    "RoleName",
    "TaskResult",
    "TaskState",
    "TaskStatus",
    "Timings",
    "ToolCallRecord",
    "Usage",
    "new_task_id",
    "utcnow",
]

WIRE_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_task_id() -> str:
    return str(uuid.uuid4())


class Priority(StrEnum):
    """P0 > P1 > P2. Accepts any case ("p0") on input."""

    P0 = "P0"
    P1 = "P1"
    P2 = "P2"

    @classmethod
    def _missing_(cls, value: object) -> Priority | None:
        if isinstance(value, str):
            upper = value.strip().upper()
            for member in cls:
                if member.value == upper:
                    return member
        return None

    @property
    def queue_prefix(self) -> str:
        """Lower-case prefix of this level's queues: `p0`, `p1`, `p2`."""
        return self.value.lower()


RoleName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = WIRE_VERSION

    @field_validator("v")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != WIRE_VERSION:
            raise ValueError(
                f"wire version {v} is not supported (this build speaks {WIRE_VERSION})"
            )
        return v

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Self:
        return cls.model_validate(data)


class ChatMessage(BaseModel):
    """One OpenAI-style chat message supplied by the producer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class AgentTask(_Wire):
    """One unit of agent work: a prompt (or messages) for a role at a priority."""

    # Ids become Redis hash tags (`{<id>}`) and Celery task ids: no braces, no spaces.
    id: str = Field(default_factory=new_task_id, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
    role: RoleName
    priority: Priority
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    output_budget: int = Field(gt=0, description="Completion tokens the whole loop may spend.")
    deps: tuple[str, ...] = ()
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    submitted_at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _has_input(self) -> AgentTask:
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt is empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages is empty")
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    @property
    def input_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(m.content) for m in self.messages or ())

    def redacted(self) -> str:
        """What logs and Flower may show: never the prompt text."""
        return (
            f"AgentTask(id={self.id}, role={self.role}, priority={self.priority.value}, "
            f"input_chars={self.input_chars}, budget={self.output_budget})"
        )


class ToolCallRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    arguments: str
    latency_s: float
    ok: bool
    error: str | None = None


class LLMCall(BaseModel):
    """Usage of one chat-completions call."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str | None = None


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: tuple[LLMCall, ...] = ()

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: str
    message: str


class Timings(BaseModel):
    model_config = ConfigDict(frozen=True)

    submitted_at: datetime
    started_at: datetime
    finished_at: datetime

    @property
    def queue_wait_s(self) -> float:
        return max(0.0, (self.started_at - self.submitted_at).total_seconds())

    @property
    def run_s(self) -> float:
        return max(0.0, (self.finished_at - self.started_at).total_seconds())


StopReason = Literal["final", "max_steps", "budget", "error", "cancelled"]


class TaskResult(_Wire):
    """The recorded outcome of an `AgentTask`.

    Stored once, by task id, in the result store (`results.ResultStore`). The Celery
    task that ran it always returns normally, whatever `status` says, so a chord counts
    a failed node instead of hanging.
    """

    task_id: str
    role: str
    priority: Priority
    status: Literal["succeeded", "failed", "cancelled"]
    output: str | None = None
    error: ErrorInfo | None = None
    stop_reason: StopReason = "final"
    model: str | None = None
    steps: int = 0
    usage: Usage = Usage()
    tool_calls: tuple[ToolCallRecord, ...] = ()
    cost_usd: float = 0.0
    attempts: int = 1
    worker: str | None = None
    timings: Timings

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @property
    def was_cancelled(self) -> bool:
        return self.status == "cancelled"

    @classmethod
    def failure(
        cls,
        kind: str,
        message: str,
        *,
        task: AgentTask | None = None,
        task_id: str | None = None,
        worker: str | None = None,
        attempts: int = 1,
        started_at: datetime | None = None,
    ) -> TaskResult:
        """A failed outcome decided without (or after) the agent: the one way to build one.

        With `task`, it names the task's role and priority; without (a payload nobody can
        read, say) only `task_id` is known and the role shows as `?`.

        >>> TaskResult.failure("InvalidPayload", "v: unsupported", task_id="t1").error.type
        'InvalidPayload'
        """
        now = utcnow()
        started = started_at or now
        if task is None and task_id is None:
            raise ValueError("a failure names its task or its task id")
        return cls(
            task_id=task.id if task is not None else str(task_id),
            role=task.role if task is not None else "?",
            priority=task.priority if task is not None else Priority.P2,
            status="failed",
            stop_reason="error",
            error=ErrorInfo(type=kind, message=message),
            attempts=attempts,
            worker=worker,
            timings=Timings(
                submitted_at=task.submitted_at if task is not None else started,
                started_at=started,
                finished_at=now,
            ),
        )

    @classmethod
    def cancelled_before_run(cls, task: AgentTask, *, worker: str | None = None) -> TaskResult:
        """The outcome of a task cancelled before it ran: no model call, no usage."""
        now = utcnow()
        return cls(
            task_id=task.id,
            role=task.role,
            priority=task.priority,
            status="cancelled",
            stop_reason="cancelled",
            error=ErrorInfo(type="TaskCancelled", message="cancelled before it ran"),
            attempts=0,
            worker=worker,
            timings=Timings(submitted_at=task.submitted_at, started_at=now, finished_at=now),
        )


class TaskState(StrEnum):
    """Where a task is, read from the fleet's own keys (see `results.ResultStore.status`)."""

    QUEUED = "queued"  # also the answer for an id nobody has recorded (yet)
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def of(cls, result: TaskResult) -> TaskState:
        """The state a recorded result stands for."""
        return cls(result.status)


class TaskStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: str
    state: TaskState
    result: TaskResult | None = None
