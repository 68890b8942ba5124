"""A submitted DAG: per-node status (and why), waiting, and each node's result.

Usage::

    dag = client.submit_dag([Node("a", "Find X"), Node("s", "Sum", deps=["a"])])
    status = dag.wait(timeout=600)
    status.state, status.outputs["s"]
    # -> ('succeeded', '...')
    [(n.node, n.reason) for n in status.failed]
    # -> []
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict

from swarm_workers.cancellation import Canceller, CancelReport
from swarm_workers.dag.outcome import NodeState, Outcome, blocked
from swarm_workers.dag.store import DagRecord, DagStore
from swarm_workers.errors import ResultTimeout
from swarm_workers.models import Priority, TaskResult, TaskState
from swarm_workers.results import ResultStore

__all__ = ["DagHandle", "DagState", "DagStatus", "NodeStatus"]

DagState = Literal["running", "succeeded", "failed", "cancelled"]


class NodeStatus(BaseModel):
    """One node: `state` is pending, running, done, failed or skipped; `reason` says why.

    `origin` names the node whose failure this one follows (itself for its own).
    """

    model_config = ConfigDict(frozen=True)

    node: str
    task_id: str
    role: str
    priority: Priority
    state: NodeState
    reason: str | None = None
    origin: str | None = None
    result: TaskResult | None = None


class DagStatus(BaseModel):
    """The whole DAG at one moment.

    `state` is `running` until every node is done, failed, skipped or cancelled; then
    `failed` if a node failed under `on_failure: fail` (or downstream of one), else
    `cancelled` if a node was cancelled, else `succeeded` (failures under `skip` and the
    nodes they skipped do not fail the DAG).
    """

    model_config = ConfigDict(frozen=True)

    dag_id: str
    name: str | None = None
    state: DagState
    nodes: dict[str, NodeStatus]

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"

    @property
    def failed(self) -> list[NodeStatus]:
        return [n for n in self.nodes.values() if n.state is NodeState.FAILED]

    @property
    def skipped(self) -> list[NodeStatus]:
        return [n for n in self.nodes.values() if n.state is NodeState.SKIPPED]

    @property
    def outputs(self) -> dict[str, str]:
        """The output of every node that is done."""
        return {
            n.node: n.result.output or ""
            for n in self.nodes.values()
            if n.state is NodeState.DONE and n.result is not None
        }


class DagHandle:
    """A DAG that was submitted: `status()`, `wait(timeout)`, `result(node)`.

    Usage::

        dag = client.submit_dag(nodes)
        dag.wait(600).ok
        # -> True
        client.dag(dag.id).status()
    """

    def __init__(
        self, record: DagRecord, store: DagStore, results: ResultStore, canceller: Canceller
    ) -> None:
        self.record = record
        self._store = store
        self._results = results
        self._canceller = canceller
        self._recorded: dict[str, TaskResult] = {}  # results never change once stored

    @classmethod
    def attach(
        cls, dag_id: str, store: DagStore, results: ResultStore, canceller: Canceller
    ) -> DagHandle:
        """A handle for a DAG submitted earlier, maybe by another process
        (`SwarmClient.dag(dag_id)` calls this)."""
        return cls(store.record(dag_id), store, results, canceller)

    def cancel(self) -> dict[str, CancelReport]:
        """Cancel every node not yet done: queued nodes never run, running ones stop at
        their next step, and the chords waiting on them still complete."""
        status = self.status()
        return {
            node: self._canceller.cancel(found.task_id, known=True)
            for node, found in status.nodes.items()
            if not found.state.terminal
        }

    @property
    def id(self) -> str:
        return self.record.dag_id

    def task_id(self, node: str) -> str:
        return self.record.nodes[node].task_id

    def result(self, node: str, timeout: float = 300.0) -> TaskResult:
        """Wait for one node's recorded result."""
        return self._results.wait(self.task_id(node), timeout=timeout)

    def wait(self, timeout: float = 600.0, interval: float = 0.2) -> DagStatus:
        """Poll until every node is done, failed or skipped; raises ResultTimeout."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status.finished:
                return status
            if time.monotonic() >= deadline:
                raise ResultTimeout(f"DAG {self.id}", timeout)
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 1.5, 2.0)

    def status(self) -> DagStatus:
        """Each node's state; a node downstream of a failure shows it at once."""
        unknown = [n.task_id for n in self.record.nodes.values() if n.task_id not in self._recorded]
        running: set[str] = set()
        for found in self._results.statuses(unknown):
            if found.result is not None:
                self._recorded[found.task_id] = found.result
            elif found.state in (TaskState.RUNNING, TaskState.WAITING):  # a supervisor
                running.add(found.task_id)

        outcomes: dict[str, Outcome] = {}
        nodes: dict[str, NodeStatus] = {}
        for node, spec in self.record.nodes.items():  # topological: deps come first
            result = self._recorded.get(spec.task_id)
            stop = blocked([(dep, outcomes[dep]) for dep in spec.deps])
            if result is not None and (result.ok or result.was_cancelled or stop is None):
                outcome = Outcome.of_result(node, result, spec.on_failure)
            elif stop is not None:
                outcome = stop
            else:
                outcome = Outcome(
                    NodeState.RUNNING if spec.task_id in running else NodeState.PENDING
                )
            outcomes[node] = outcome
            nodes[node] = NodeStatus(
                node=node,
                task_id=spec.task_id,
                role=spec.role,
                priority=spec.priority,
                state=outcome.state,
                reason=outcome.reason,
                origin=outcome.origin,
                result=result,
            )
        state: DagState = "running"
        if all(o.state.terminal for o in outcomes.values()):
            if any(o.fatal for o in outcomes.values()):
                state = "failed"
            elif any(o.state is NodeState.CANCELLED for o in outcomes.values()):
                state = "cancelled"
            else:
                state = "succeeded"
        return DagStatus(dag_id=self.id, name=self.record.name, state=state, nodes=nodes)

    def __repr__(self) -> str:
        return f"DagHandle(id={self.id}, nodes={len(self.record.nodes)})"
