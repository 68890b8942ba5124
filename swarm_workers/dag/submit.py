"""Validate a DAG, store it, and enqueue it as one Celery canvas.

Everything that can be wrong is checked before anything is written or sent: the
structure and templates (`compile.validate`), then every node as a task
(`SwarmClient.build_task`: role, priority, budget, payload size).

>>> submit_dag(client, [Node("a", "Find X"), Node("s", "Sum up", deps=["a"])])  # doctest: +SKIP
DagHandle(id=..., nodes=2)
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from swarm_workers.dag.compile import DAG_NODE, plan, to_canvas, topological_order, validate
from swarm_workers.dag.handle import DagHandle
from swarm_workers.dag.model import DagSpec, Node, OnFailure
from swarm_workers.dag.store import DagRecord, DagStore, NodeRecord, node_task_id
from swarm_workers.errors import InvalidTask
from swarm_workers.models import AgentTask
from swarm_workers.queues import queue_name

if TYPE_CHECKING:
    from swarm_workers.client import SwarmClient

__all__ = ["submit_dag"]


def submit_dag(
    client: SwarmClient,
    nodes: Sequence[Node] | DagSpec,
    *,
    on_failure: OnFailure | None = None,
    name: str | None = None,
) -> DagHandle:
    """Validate, store and enqueue; nothing is stored or sent if anything is invalid."""
    fields: dict[str, Any] = {}
    if on_failure is not None:
        fields["on_failure"] = on_failure
    if name is not None:
        fields["name"] = name
    spec = DagSpec.of(nodes, **fields)
    deps = validate(spec, client.settings.limits.max_dag_nodes)
    dag_id = uuid.uuid4().hex
    tasks = {node.id: _task(client, dag_id, node, deps[node.id]) for node in spec.nodes}
    for queue in sorted({queue_name(t.priority, t.role) for t in tasks.values()}):
        client.admission.check(queue)  # Backpressure: a DAG is refused whole, not in part
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
    DagStore(client.app.backend.client, client.settings).save(record, tasks)

    def signature(node: str) -> Any:
        task = tasks[node]
        return client.app.signature(
            DAG_NODE,
            args=(dag_id, node),
            immutable=True,
            task_id=task.id,
            queue=queue_name(task.priority, task.role),
        )

    to_canvas(steps.step, signature).apply_async()
    _stop_tracking(client.app, [task.id for task in tasks.values()])
    return DagHandle(client, record)


def _stop_tracking(app: Any, task_ids: Sequence[str]) -> None:
    """Drop what Celery's client holds for results nobody will wait on through it.

    Applying a group builds a `GroupResult` whose barrier keeps every header result
    pending (a strong reference, and a subscribed pubsub channel on the Redis
    backend) until a `get()` drains it. A `DagHandle` reads Redis keys instead, so a
    long-lived producer would otherwise grow both with every DAG it submits.
    """
    backend = app.backend
    for mapping in getattr(backend, "_pending_results", ()):
        for task_id in task_ids:
            mapping.pop(task_id, None)
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:
        for task_id in task_ids:
            consumer.cancel_for(task_id)


def _task(client: SwarmClient, dag_id: str, node: Node, deps: Sequence[str]) -> AgentTask:
    try:
        return client.build_task(
            node.prompt,
            role=node.role,
            priority=node.priority,
            budget=node.budget,
            deps=[node_task_id(dag_id, dep) for dep in deps],
            metadata={**node.metadata, "dag_id": dag_id, "node": node.id},
            task_id=node_task_id(dag_id, node.id),
        )
    except InvalidTask as exc:
        # Same error type, its field and message now naming the node.
        exc.field = f"nodes.{node.id}.{exc.field}"
        exc.args = (f"node {node.id!r}: {exc.args[0]}",)
        raise
