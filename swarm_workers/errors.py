"""Every error swarm_workers raises, in one tree.

Two branches matter: errors for the *operator or producer* (bad config, a rejected
submit, a provider that refuses us) and errors for the *model* (`ToolError`): those
are turned into a tool message the model reads and can correct, never a crash.

    SwarmError
    ├── ConfigError                 invalid swarm.toml / environment (key, line)
    ├── InvalidTask                 rejected at submit, nothing enqueued (field)
    │   ├── UnknownRole
    │   └── PayloadTooLarge
    ├── Backpressure                queue above its high-water mark (depth, retry_after)
    ├── BrokerUnavailable           Redis did not answer a submit in time (task_id)
    ├── DagError                    rejected DAG, nothing enqueued
    │   ├── InvalidDag              the spec itself: nodes, on_failure, name (field)
    │   ├── DagCycle
    │   ├── UnknownDependency
    │   ├── UnknownReference        a prompt template names no dep: {{ x.output }}
    │   ├── DuplicateNode
    │   └── DagTooLarge
    ├── ResultTimeout               waited for a result longer than asked
    ├── ProviderError               the LLM endpoint failed us (status, message)
    │   ├── ProviderRejected        400/401/403/404: fails at once, not retried
    │   ├── ProviderUnavailable     429/5xx/network still failing after our retries
    │   └── ContextOverflow         the prompt cannot fit the model's context
    ├── RateLimited                 the cluster bucket made us wait past the bound
    │   └── RequestTooLarge         bigger than the bucket can ever hold
    ├── TimeLimitExceeded           the task ran past worker.task_time_limit_s
    ├── LeaseLost                   a run lost its lease on the task id: it stops, unrecorded
    ├── TaskCancelled               a run stopped because its task was cancelled
    └── ToolError                   shown to the model as the tool's result
        ├── UnknownTool
        ├── ToolNotAllowed
        ├── InvalidToolArguments
        ├── ToolUnavailable         breaker open, server down or too slow
        ├── ToolFailed              the server answered isError
        └── SpawnRefused            a `swarm__spawn` over a limit (count, depth, budget)
"""

from __future__ import annotations

__all__ = [
    "Backpressure",
    "BrokerUnavailable",
    "ConfigError",
    "ContextOverflow",
    "DagCycle",
    "DagError",
    "DagTooLarge",
    "DuplicateNode",
    "InvalidDag",
    "InvalidTask",
    "InvalidToolArguments",
    "LeaseLost",
    "PayloadTooLarge",
    "ProviderError",
    "ProviderRejected",
    "ProviderUnavailable",
    "RateLimited",
    "RequestTooLarge",
    "ResultTimeout",
    "SpawnRefused",
    "SwarmError",
    "TaskCancelled",
    "TimeLimitExceeded",
    "ToolError",
    "ToolFailed",
    "ToolNotAllowed",
    "ToolUnavailable",
    "UnknownDependency",
    "UnknownReference",
    "UnknownRole",
    "UnknownTool",
]


class SwarmError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(SwarmError):
    """The configuration is invalid; names the key and, for a file, the line."""

    def __init__(self, message: str, *, key: str | None = None, line: int | None = None) -> None:
        where = ""
        if key is not None:
            where = f"{key}: "
        if line is not None:
            where = f"line {line}: {where}"
        super().__init__(f"{where}{message}")
        self.key = key
        self.line = line


class InvalidTask(SwarmError):
    """A task was rejected at submit time; `field` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownRole(InvalidTask):
    def __init__(self, role: str, known: list[str]) -> None:
        super().__init__("role", f"unknown role {role!r}; configured roles: {', '.join(known)}")
        self.role = role


class PayloadTooLarge(InvalidTask):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__("payload", f"{size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


class Backpressure(SwarmError):
    """A queue is above its high-water mark; retry after `retry_after` seconds."""

    def __init__(self, queue: str, depth: int, limit: int, retry_after: float) -> None:
        super().__init__(
            f"queue {queue} holds {depth} tasks (high-water mark {limit}); "
            f"retry in {retry_after:.1f}s"
        )
        self.queue = queue
        self.depth = depth
        self.limit = limit
        self.retry_after = retry_after


class BrokerUnavailable(SwarmError):
    """Redis, the broker, failed or did not answer while a task was being submitted.

    Raised within the client's bound (README, *Using it from Python*): at once for a
    refused connection, after at most the connect and read timeouts for a Redis that
    accepts connections but does not answer. When `maybe_sent` is true the send itself
    failed part way, so the task may have been enqueued: look it up by `task_id` (or
    submit again with the same `task_id`) rather than assume it was not.

    >>> BrokerUnavailable("send", "Connection refused", task_id="t1").maybe_sent
    False
    """

    def __init__(
        self, during: str, reason: str, *, task_id: str | None = None, maybe_sent: bool = False
    ) -> None:
        what = f"task {task_id}: " if task_id else ""
        outcome = "it may have been enqueued" if maybe_sent else "nothing was enqueued"
        super().__init__(f"{what}Redis unavailable during {during} ({reason}); {outcome}")
        self.during = during
        self.reason = reason
        self.task_id = task_id
        self.maybe_sent = maybe_sent


class DagError(SwarmError):
    """A DAG was rejected at submit time; nothing was enqueued."""


class InvalidDag(DagError):
    """The DAG spec itself is malformed (not a node, a bad policy, a bad name); `field`
    names what was wrong.

    >>> InvalidDag("on_failure", "must be fail or skip").field
    'on_failure'
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class DagCycle(DagError):
    def __init__(self, cycle: list[str]) -> None:
        super().__init__("dependency cycle: " + " -> ".join(cycle))
        self.cycle = cycle


class UnknownDependency(DagError):
    def __init__(self, node: str, dep: str) -> None:
        super().__init__(f"node {node!r} depends on unknown node {dep!r}")
        self.node = node
        self.dep = dep


class UnknownReference(DagError):
    def __init__(self, node: str, problem: str) -> None:
        super().__init__(f"node {node!r}: prompt template: {problem}")
        self.node = node
        self.problem = problem


class DuplicateNode(DagError):
    def __init__(self, node: str) -> None:
        super().__init__(f"node id {node!r} appears more than once")
        self.node = node


class DagTooLarge(DagError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"DAG has {size} nodes; the limit is {limit}")
        self.size = size
        self.limit = limit


class ResultTimeout(SwarmError):
    def __init__(self, task_id: str, timeout: float) -> None:
        super().__init__(f"task {task_id} did not finish within {timeout}s")
        self.task_id = task_id
        self.timeout = timeout


class ProviderError(SwarmError):
    """The LLM endpoint failed; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message if status is None else f"HTTP {status}: {message}")
        self.status = status
        self.provider_message = message


class ProviderRejected(ProviderError):
    """400/401/403/404: retrying cannot help, the task fails at once."""


class ProviderUnavailable(ProviderError):
    """429/5xx/connection errors that outlasted the retry policy."""


class ContextOverflow(ProviderError):
    def __init__(self, model: str, prompt_tokens: int, max_tokens: int, context: int) -> None:
        super().__init__(
            f"prompt of ~{prompt_tokens} tokens plus max_tokens {max_tokens} does not fit "
            f"the {context}-token context of {model}"
        )
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.context = context


class RateLimited(SwarmError):
    """The cluster-wide bucket asked us to wait longer than this priority may."""

    def __init__(
        self, key: str, waited: float, bound: float, *, message: str | None = None
    ) -> None:
        super().__init__(
            message
            or f"rate limit {key}: waited {waited:.1f}s, more than the {bound:.1f}s this "
            "priority may"
        )
        self.key = key
        self.waited = waited
        self.bound = bound


class RequestTooLarge(RateLimited):
    """The request needs more than a bucket can ever hold: waiting would never end."""

    def __init__(self, key: str, amount: float, capacity: float) -> None:
        super().__init__(
            key,
            0.0,
            0.0,
            message=f"rate limit {key}: a request of {amount:g} exceeds the bucket's capacity "
            f"of {capacity:g}; raise ratelimit.burst_s or the limit, or send a smaller request",
        )
        self.amount = amount
        self.capacity = capacity


class TimeLimitExceeded(SwarmError):
    """The agent loop's own deadline: Celery's threads pool enforces no time limit."""

    def __init__(self, limit_s: float, during: str) -> None:
        super().__init__(f"task exceeded its time limit of {limit_s:g}s ({during})")
        self.limit_s = limit_s
        self.during = during


class LeaseLost(SwarmError):
    """A run could not renew its lease on the task id in time (Redis unreachable for
    longer than the lease, or another delivery took the task over). It stops at its next
    step without recording anything, and its message goes back on the queue."""

    def __init__(self, task_id: str, why: str) -> None:
        super().__init__(f"task {task_id}: lease lost ({why})")
        self.task_id = task_id


class TaskCancelled(SwarmError):
    """The task was cancelled (`SwarmClient.cancel`): its run stops at its next step or
    tool call, and its result says `cancelled`, with the usage so far."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} was cancelled")
        self.task_id = task_id


class ToolError(SwarmError):
    """An error the model sees as the tool's result, so it can correct itself."""

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(f"{tool}: {message}")
        self.tool = tool


class UnknownTool(ToolError):
    def __init__(self, tool: str) -> None:
        super().__init__(tool, "unknown tool")


class ToolNotAllowed(ToolError):
    def __init__(self, tool: str, role: str) -> None:
        super().__init__(tool, f"tool is not allowed for role {role!r}")
        self.role = role


class InvalidToolArguments(ToolError):
    def __init__(self, tool: str, problem: str) -> None:
        super().__init__(tool, f"invalid arguments: {problem}")
        self.problem = problem


class ToolUnavailable(ToolError):
    def __init__(self, tool: str, server: str, reason: str) -> None:
        super().__init__(tool, f"server {server} unavailable: {reason}")
        self.server = server


class ToolFailed(ToolError):
    """The tool ran and reported an error (MCP `isError`)."""


class SpawnRefused(ToolError):
    """`swarm__spawn` asked for more than the supervisor may have: the model reads why."""

    def __init__(self, message: str) -> None:
        super().__init__("swarm__spawn", message)
