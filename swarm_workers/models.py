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
from functools import cached_property
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "WIRE_VERSION",
    "AgentTask",
    "ChatMessage",
    "ErrorInfo",
    "LLMCall",
    "Priority",
    "RoleName",
    "SubAgent",
    "SwarmTree",
    "TaskId",
    "TaskResult",
    "TaskState",
    "TaskStatus",
    "Timings",
    "ToolCallRecord",
    "Usage",
    "new_task_id",
    "text_problem",
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

# Ids become Redis hash tags (`{<id>}`) and Celery task ids: no braces, no spaces.
TaskId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")]

# Text a producer hands us travels as UTF-8 JSON through Redis to the provider: it must
# be a real `str` (bytes are not decoded for the caller), and valid Unicode.
Text = Annotated[str, Field(strict=True)]
MetadataValue = (
    Annotated[str, Field(strict=True)]
    | Annotated[int, Field(strict=True)]
    | Annotated[float, Field(strict=True, allow_inf_nan=False)]
    | Annotated[bool, Field(strict=True)]
    | None
)


def text_problem(text: str) -> str | None:
    r"""Why `text` cannot be sent, or None: a NUL character, or a lone surrogate (what
    Python makes of undecodable bytes with `surrogateescape`), which UTF-8 cannot encode.

    >>> text_problem("caf\u00e9"), text_problem("a\x00b")
    (None, 'contains a NUL character (at index 1)')
    >>> text_problem("\udcff")
    'contains a lone surrogate U+DCFF (at index 0): not valid Unicode, so not valid UTF-8'
    """
    nul = text.find("\x00")
    if nul >= 0:
        return f"contains a NUL character (at index {nul})"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"contains a lone surrogate U+{ord(text[exc.start]):04X} (at index {exc.start}): "
            "not valid Unicode, so not valid UTF-8"
        )
    return None


def _unsendable(field: str, problem: str) -> PydanticCustomError:
    """A validation error whose context names the submit field (`messages.2.content`)."""
    return PydanticCustomError(
        "unsendable_text", "{field}: {problem}", {"field": field, "problem": problem}
    )


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
    content: Text


class AgentTask(_Wire):
    """One unit of agent work: a prompt (or messages) for a role at a priority."""

    id: TaskId = Field(default_factory=new_task_id)
    role: RoleName
    priority: Priority
    prompt: Text | None = None
    messages: tuple[ChatMessage, ...] | None = None
    output_budget: int = Field(
        gt=0, strict=True, description="Completion tokens the whole loop may spend."
    )
    deps: tuple[TaskId, ...] = ()
    metadata: dict[Text, MetadataValue] = Field(default_factory=dict)
    submitted_at: datetime = Field(default_factory=utcnow)

    @cached_property
    def wire_json(self) -> str:
        """`to_wire()` as JSON text, encoded once: a producer's size check and the message
        it sends share it (the task is frozen, so it cannot go stale; pydantic leaves a
        cached property out of equality and of the dump)."""
        return self.model_dump_json()

    @model_validator(mode="after")
    def _has_input(self) -> AgentTask:
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt is empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages is empty")
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    @model_validator(mode="after")
    def _sendable_text(self) -> AgentTask:
        """No NUL, no lone surrogate anywhere a producer put text: the worker, Redis and
        the provider all need valid UTF-8. The error names the field (see `_unsendable`)."""
        texts: list[tuple[str, str]] = []
        if self.prompt is not None:
            texts.append(("prompt", self.prompt))
        for i, message in enumerate(self.messages or ()):
            texts.append((f"messages.{i}.content", message.content))
        for key, value in self.metadata.items():
            if (problem := text_problem(key)) is not None:
                raise _unsendable("metadata", f"a key {problem}")
            if isinstance(value, str):
                texts.append((f"metadata.{key}", value))
        for field, text in texts:
            if (problem := text_problem(text)) is not None:
                raise _unsendable(field, problem)
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


class SubAgent(BaseModel):
    """One sub-agent of a swarm, as its supervisor's result (or `swarm tree`) shows it."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    role: str
    parent: str
    round: int
    depth: int
    status: Literal["queued", "running", "waiting", "succeeded", "failed", "cancelled"]
    error: ErrorInfo | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    queue_wait_s: float | None = None
    run_s: float | None = None
    children: tuple[SubAgent, ...] = ()


class SwarmTree(BaseModel):
    """A supervisor's sub-agents and what they cost, with the parallel speed-up.

    `wall_s`: the supervisor's first start to its end; `sequential_s`: its own model
    time plus every sub-agent's run time, as one agent doing it all in turn would spend;
    `critical_path_s`: its own model time plus, per spawn round, the slowest sub-agent
    (queue wait and run). `speedup` = sequential_s / wall_s.
    """

    model_config = ConfigDict(frozen=True)

    rounds: int = 0
    children: tuple[SubAgent, ...] = ()
    total_agents: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    wall_s: float | None = None
    own_model_s: float = 0.0
    sequential_s: float = 0.0
    critical_path_s: float = 0.0

    @property
    def speedup(self) -> float | None:
        return None if not self.wall_s else self.sequential_s / self.wall_s


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
    steps_resumed: int = 0  # model turns restored from a checkpoint, not paid for again
    swarm: SwarmTree | None = None  # a supervisor's sub-agents

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
    def cancelled_before_run(
        cls, task: AgentTask, *, worker: str | None = None, why: str = "cancelled before it ran"
    ) -> TaskResult:
        """The outcome of a task cancelled before it ran: no model call, no usage."""
        now = utcnow()
        return cls(
            task_id=task.id,
            role=task.role,
            priority=task.priority,
            status="cancelled",
            stop_reason="cancelled",
            error=ErrorInfo(type="TaskCancelled", message=why),
            attempts=0,
            worker=worker,
            timings=Timings(submitted_at=task.submitted_at, started_at=now, finished_at=now),
        )


class TaskState(StrEnum):
    """Where a task is, read from the fleet's own keys (see `results.ResultStore.status`)."""

    QUEUED = "queued"  # also the answer for an id nobody has recorded (yet)
    RUNNING = "running"
    WAITING = "waiting"  # a supervisor between runs: its sub-agents run, it holds no thread
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
