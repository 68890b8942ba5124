"""Everything a DAG submit checks and builds before anything is written or sent.

The structure and templates (`compile.validate`), then every node as a task (the
caller's `build_task`: role, priority, budget, payload size), then the plan and the
record a worker and a `DagHandle` read. No Redis and no Celery here: the client
stores the result (`DagStore.save`) and sends it (`dag.canvas.send_dag`).

Usage::

    dag = prepare_dag(DagSpec.of([Node("a", "Find X"), Node("s", "Sum", deps=["a"])]),
                      build_task, max_nodes=500)
    dag.record.nodes["s"].deps
    # -> ('a',)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from swarm_workers.dag.compile import Plan, plan, topological_order, validate
from swarm_workers.dag.model import DagSpec, Node
from swarm_workers.dag.store import DagRecord, NodeRecord, node_task_id
from swarm_workers.errors import InvalidTask
from swarm_workers.models import AgentTask
from swarm_workers.queues import queue_name

__all__ = ["BuildTask", "PreparedDag", "prepare_dag"]

BuildTask = Callable[..., AgentTask]
"""`SwarmClient.build_task`: prompt plus keyword options -> a validated task."""


@dataclass(frozen=True)
class PreparedDag:
    """A DAG ready to store and send: its record, one task per node, and its plan."""

    record: DagRecord
    tasks: Mapping[str, AgentTask]
    plan: Plan

    @property
    def dag_id(self) -> str:
        return self.record.dag_id

    @property
    def queues(self) -> list[str]:
        """Every queue a node goes to, for the admission check (a DAG is refused whole)."""
        return sorted({queue_name(t.priority, t.role) for t in self.tasks.values()})


def prepare_dag(
    spec: DagSpec, build_task: BuildTask, *, max_nodes: int, dag_id: str | None = None
) -> PreparedDag:
    """Validate and build; raises a `DagError` or `InvalidTask` naming the node.

    `dag_id`: a deterministic id (a supervisor's spawn, rebuilt the same on a resume).
    """
    deps = validate(spec, max_nodes)
    dag_id = dag_id or uuid.uuid4().hex
    tasks = {node.id: _task(build_task, dag_id, node, deps[node.id]) for node in spec.nodes}
    steps = plan(deps)
    by_id = {node.id: node for node in spec.nodes}
    record = DagRecord(
        dag_id=dag_id,
        name=spec.name,
        nodes={
            node: NodeRecord(
                task_id=tasks[node].id,
                role=tasks[node].role,
                priority=tasks[node].priority,
                deps=deps[node],
                on_failure=spec.policy_of(by_id[node]),
            )
            for node in topological_order(deps)
        },
        extra_waits=steps.extra_waits,
        levels_split=steps.levels_split,
    )
    return PreparedDag(record=record, tasks=tasks, plan=steps)


def _task(build_task: BuildTask, dag_id: str, node: Node, deps: Sequence[str]) -> AgentTask:
    options: dict[str, Any] = {
        "role": node.role,
        "priority": node.priority,
        "budget": node.budget,
        "deps": [node_task_id(dag_id, dep) for dep in deps],
        "metadata": {**node.metadata, "dag_id": dag_id, "node": node.id},
        "task_id": node_task_id(dag_id, node.id),
    }
    try:
        return build_task(node.prompt, **options)
    except InvalidTask as exc:
        # Same error type, its field and message now naming the node.
        exc.field = f"nodes.{node.id}.{exc.field}"
        exc.args = (f"node {node.id!r}: {exc.args[0]}",)
        raise
