"""Run one DAG node on a worker: plain Python, the body of the `swarm.dag_node` task.

1. A node whose result is stored returns it: a redelivered chord header task (its
   worker died after recording) neither calls the model again nor returns anything
   different, so the chord counts it once.
2. A node whose deps failed or were skipped is recorded as failed or skipped
   (`dag.outcome`), naming the node where the failure started; no model call.
3. Otherwise its prompt is rendered with exactly its deps' outputs (`dag.template`),
   read from Redis by their task ids, and the task runs through `execution.execute`
   like any other: attempts, the agent loop, the stored result.

It never raises for anything it can record, so Celery's state stays SUCCESS and a
chord always completes; `TaskResult.status` says what happened.

>>> run_node("3f2a...", "s", runtime)["status"]       # doctest: +SKIP
'succeeded'
"""

from __future__ import annotations

import logging
from typing import Any

from swarm_workers.dag import outcome, template
from swarm_workers.dag.outcome import UPSTREAM_FAILED, UPSTREAM_SKIPPED, NodeState, Outcome
from swarm_workers.dag.store import DagStore, node_task_id
from swarm_workers.execution import execute
from swarm_workers.models import AgentTask, ErrorInfo, Priority, TaskResult, Timings, utcnow
from swarm_workers.runtime import Runtime

__all__ = ["run_node"]

log = logging.getLogger(__name__)


def run_node(dag_id: str, node: str, runtime: Runtime) -> dict[str, Any]:
    """Run (or decide) one node and return its wire result; see the module doc."""
    store = DagStore(runtime.redis, runtime.settings)
    try:
        return _run_node(store, dag_id, node, runtime)
    except Exception as exc:  # recorded, never raised: a raising header errors its chord
        log.exception("DAG %s node %s: internal error", dag_id, node)
        now = utcnow()
        failed = TaskResult(
            task_id=node_task_id(dag_id, node),
            role="?",
            priority=Priority.P2,
            status="failed",
            stop_reason="error",
            error=ErrorInfo(type="InternalError", message=f"{type(exc).__name__}: {exc}"),
            worker=runtime.worker_name,
            timings=Timings(submitted_at=now, started_at=now, finished_at=now),
        )
        return store.put_result(failed).to_wire()


def _run_node(store: DagStore, dag_id: str, node: str, runtime: Runtime) -> dict[str, Any]:
    task = store.task(dag_id, node)
    (stored,) = store.results([task.id])
    if stored is not None:
        log.info("DAG %s node %s: already recorded, returning the stored result", dag_id, node)
        return stored.to_wire()

    record = store.record(dag_id)
    deps = record.nodes[node].deps
    results = store.results([record.nodes[d].task_id for d in deps])
    outcomes = [
        (
            dep,
            Outcome.of_result(dep, result, record.nodes[dep].on_failure)
            if result is not None
            else Outcome.failed(dep, "no recorded result (crashed, or expired)", "fail"),
        )
        for dep, result in zip(deps, results, strict=True)
    ]
    stop = outcome.blocked(outcomes)
    if stop is not None:
        kind = UPSTREAM_FAILED if stop.state is NodeState.FAILED else UPSTREAM_SKIPPED
        log.info("DAG %s node %s: %s (%s)", dag_id, node, stop.state.value, stop.reason)
        return store.put_result(_unrun(task, runtime, kind, stop.reason or kind)).to_wire()

    outputs = {dep: r.output or "" for dep, r in zip(deps, results, strict=True) if r is not None}
    prompt = template.render(task.prompt or "", outputs)
    return execute(task.model_copy(update={"prompt": prompt}).to_wire(), runtime)


def _unrun(task: AgentTask, runtime: Runtime, kind: str, message: str) -> TaskResult:
    """A result for a node decided without running the model."""
    now = utcnow()
    return TaskResult(
        task_id=task.id,
        role=task.role,
        priority=task.priority,
        status="failed",
        stop_reason="error",
        error=ErrorInfo(type=kind, message=message),
        worker=runtime.worker_name,
        timings=Timings(submitted_at=task.submitted_at, started_at=now, finished_at=now),
    )
