"""Run one DAG node on a worker: the body of the `swarm.dag_node` task, without Celery.

A node's message carries only `(dag_id, node)`; its task is read from the DAG's
records. It then runs through `execute` like any other task (deadline, claim, stored
outcome, attempts), with one step before the agent:

- a node whose deps failed or were skipped is recorded as failed or skipped
  (`dag.outcome`), naming the node where the failure started; no model call;
- otherwise its prompt is rendered with exactly its deps' outputs (`dag.template`).

It never raises for anything it can record, so the chord it belongs to always
completes; `TaskResult.status` says what happened. Redis errors do leave (the task
body puts the message back): a broker blip is not the node's failure.

Usage::

    run_node("3f2a...", "s", runtime).status
    # -> 'succeeded'
"""

from __future__ import annotations

import logging

from swarm_workers.dag import outcome, template
from swarm_workers.dag.outcome import UPSTREAM_FAILED, UPSTREAM_SKIPPED, NodeState, Outcome
from swarm_workers.dag.store import DagStore, node_task_id
from swarm_workers.errors import DagError
from swarm_workers.execution.runtime import Runtime
from swarm_workers.execution.task import execute
from swarm_workers.models import AgentTask, TaskResult

__all__ = ["run_node"]

log = logging.getLogger(__name__)


def run_node(dag_id: str, node: str, runtime: Runtime) -> TaskResult:
    """Run (or decide) one node and return its recorded outcome; see the module doc."""
    store = DagStore(runtime.redis, runtime.settings)
    try:
        task = store.task(dag_id, node)
    except DagError as exc:  # its records expired before it ran: nothing to run
        log.error("DAG %s node %s: %s", dag_id, node, exc)
        failed = TaskResult.failure(
            "DagExpired", str(exc), task_id=node_task_id(dag_id, node), worker=runtime.worker_name
        )
        return runtime.results.put(failed)
    return execute(
        task,
        runtime,
        decode=lambda known: known,
        prepare=lambda t: _prepare(store, dag_id, node, t, runtime),
    )


def _prepare(
    store: DagStore, dag_id: str, node: str, task: AgentTask, runtime: Runtime
) -> AgentTask | TaskResult:
    record = store.record(dag_id)
    deps = record.nodes[node].deps
    results = runtime.results.get_many([record.nodes[d].task_id for d in deps])
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
    if stop is not None and stop.state is NodeState.CANCELLED:
        log.info("DAG %s node %s: cancelled (%s)", dag_id, node, stop.reason)
        return TaskResult.cancelled_before_run(
            task, worker=runtime.worker_name, why=stop.reason or "upstream cancelled"
        )
    if stop is not None:
        kind = UPSTREAM_FAILED if stop.state is NodeState.FAILED else UPSTREAM_SKIPPED
        log.info("DAG %s node %s: %s (%s)", dag_id, node, stop.state.value, stop.reason)
        return TaskResult.failure(kind, stop.reason or kind, task=task, worker=runtime.worker_name)
    outputs = {dep: r.output or "" for dep, r in zip(deps, results, strict=True) if r is not None}
    return task.model_copy(update={"prompt": template.render(task.prompt or "", outputs)})
