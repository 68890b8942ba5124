"""How a node's failure reaches the nodes downstream of it: one rule, used twice.

The worker applies it before running a node (a node whose deps failed is recorded
as failed or skipped, without calling the model); `DagHandle.status()` applies it to
nodes that have not run yet, so a doomed node shows as failed or skipped the moment
its upstream fails instead of when its turn comes.

Rule: a node with a failed, skipped or cancelled dep is *blocked*. It is `failed` if
any such dep failed fatally (an own failure under `on_failure: fail`, or itself
blocked-failed), `cancelled` if every such dep was cancelled, else `skipped`. Its
reason names the node where the failure started:
`upstream node 'a' failed: ContextOverflow: ...`.

Usage::

    a = Outcome.of_result("a", failed_result, policy="skip")
    blocked([("a", a)]).state
    # -> <NodeState.SKIPPED: 'skipped'>
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from swarm_workers.dag.model import OnFailure
from swarm_workers.models import TaskResult

__all__ = ["UPSTREAM_FAILED", "UPSTREAM_SKIPPED", "NodeState", "Outcome", "blocked"]

UPSTREAM_FAILED = "UpstreamFailed"
UPSTREAM_SKIPPED = "UpstreamSkipped"


class NodeState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (NodeState.PENDING, NodeState.RUNNING)


@dataclass(frozen=True)
class Outcome:
    """A node's state, why, and whether it fails the DAG.

    `origin`: the node whose own failure caused this one (itself for an own failure).
    `fatal`: this failure fails the DAG and the nodes downstream (not so under `skip`).
    """

    state: NodeState
    reason: str | None = None
    origin: str | None = None
    fatal: bool = False

    @classmethod
    def of_result(cls, node: str, result: TaskResult, policy: OnFailure) -> Outcome:
        """The outcome a recorded result stands for (blocked results keep their text)."""
        if result.ok:
            return cls(NodeState.DONE)
        if result.status == "cancelled":
            return cls(NodeState.CANCELLED, "cancelled", origin=node)
        kind = result.error.type if result.error else "Failed"
        message = result.error.message if result.error else "failed"
        if kind == UPSTREAM_FAILED:
            return cls(NodeState.FAILED, message, fatal=True)
        if kind == UPSTREAM_SKIPPED:
            return cls(NodeState.SKIPPED, message)
        return cls.failed(node, f"{kind}: {message}", policy)

    @classmethod
    def failed(cls, node: str, reason: str, policy: OnFailure) -> Outcome:
        """The node's own failure."""
        return cls(NodeState.FAILED, reason, origin=node, fatal=policy == "fail")

    def downstream_reason(self, node: str) -> str:
        """Why a node downstream of `node` (which has this outcome) is blocked."""
        if self.origin == node and self.state is NodeState.CANCELLED:
            return f"upstream node {node!r} was cancelled"
        if self.origin == node:
            return f"upstream node {node!r} failed: {self.reason}"
        return self.reason or f"upstream node {node!r} did not succeed"


def blocked(deps: Sequence[tuple[str, Outcome]]) -> Outcome | None:
    """The outcome of a node whose deps have these outcomes, or None if it may run."""
    stopped = (NodeState.FAILED, NodeState.SKIPPED, NodeState.CANCELLED)
    bad = [(node, o) for node, o in deps if o.state in stopped]
    if not bad:
        return None
    fatal = [(node, o) for node, o in bad if o.fatal]
    node, cause = (fatal or bad)[0]
    if fatal:
        state = NodeState.FAILED
    elif all(o.state is NodeState.CANCELLED for _, o in bad):
        state = NodeState.CANCELLED  # what a cancel of the DAG does to the rest of it
    else:
        state = NodeState.SKIPPED
    return Outcome(
        state,
        cause.downstream_reason(node),
        origin=cause.origin,
        fatal=bool(fatal),
    )
