"""A prepared DAG as one Celery canvas, and sending it: the only DAG module that
knows Celery.

`to_canvas(step, signature)`: `Leaf` -> the node's signature, `Parallel` -> `group`,
`Series` -> `chain`, where a `Parallel` followed by a step becomes a `chord` (header:
the group, body: that step). That is the fan-in.

Every node signature is immutable and carries only `(dag_id, node)`: results are
never passed along the canvas; a node reads exactly its deps' outputs from the result
store. Messages carry no prompt and no output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, chain, chord, group
from kombu.exceptions import OperationalError

from swarm_workers.dag.compile import Leaf, Parallel, Series, Step
from swarm_workers.dag.prepare import PreparedDag
from swarm_workers.errors import BrokerUnavailable
from swarm_workers.queues import DAG_NODE, queue_name

__all__ = ["send_dag", "to_canvas"]


def send_dag(app: Celery, dag: PreparedDag) -> None:
    """Send the DAG's canvas; keep nothing on this side (a `DagHandle` reads Redis)."""

    def signature(node: str) -> Any:
        task = dag.tasks[node]
        return app.signature(
            DAG_NODE,
            args=(dag.dag_id, node),
            immutable=True,
            task_id=task.id,
            queue=queue_name(task.priority, task.role),
            ignore_result=True,
        )

    try:
        to_canvas(dag.plan.step, signature).apply_async()
    except (OperationalError, redis.ConnectionError, redis.TimeoutError) as exc:
        # The graph is stored; its head may or may not have been sent.
        reason = str(exc) or type(exc).__name__
        raise BrokerUnavailable("send", reason, task_id=dag.dag_id, maybe_sent=True) from exc
    _forget(app, list(dag.tasks.values()))


def _forget(app: Celery, tasks: list[Any]) -> None:
    """Drop what Celery's client side holds for results nobody waits on through it.

    Applying a group builds a barrier that registers every header result as pending (a
    strong reference, and a pub/sub subscription on the Redis backend) until a `get()`
    drains it; the registered objects are not the ones `apply_async` returns, so they
    are found by task id. A `DagHandle` reads the result store instead, and a
    long-lived producer would otherwise grow both with every DAG it submits.
    """
    backend = app.backend
    ids = [task.id for task in tasks]
    for mapping in getattr(backend, "_pending_results", ()):
        for task_id in ids:
            mapping.pop(task_id, None)
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:
        for task_id in ids:
            consumer.cancel_for(task_id)


def to_canvas(step: Step, signature: Callable[[str], Any]) -> Any:
    """The Celery canvas for a step; `signature(node)` gives a node's immutable signature.

    A group followed by a step is a chord whose body is that step; when that step is
    a group too, the body is the next chord. What follows goes on in a chain, which
    Celery's `chain()` folds into the last chord's body, as `|` does. Shapes:
    fan-in `chord([a, b], s)`, diamond `chain(a, chord([b, c], d))`,
    `[g1, g2, x]` -> `chord(g1, chord(g2, x))`, `[g1, x, y]` -> `chord(g1, chain(x, y))`.
    """
    if isinstance(step, Leaf):
        return signature(step.node)
    if isinstance(step, Parallel):
        return group([to_canvas(branch, signature) for branch in step.branches])
    parts: list[Any] = []
    for part in reversed(_flat(step)):
        canvas = to_canvas(part, signature)
        if isinstance(part, Parallel) and parts:
            canvas = chord(canvas, body=parts.pop(0))  # fan-in
        parts.insert(0, canvas)
    return chain(*parts) if len(parts) > 1 else parts[0]


def _flat(series: Series) -> list[Step]:
    """A series' steps with nested series spliced in (running one after another anyway)."""
    steps: list[Step] = []
    for part in series.steps:
        steps.extend(_flat(part) if isinstance(part, Series) else [part])
    return steps
