"""The Celery task that runs one DAG node; the work is in `dag.runner`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from swarm_workers.dag.compile import DAG_NODE
from swarm_workers.dag.runner import run_node
from swarm_workers.tasks import runtime_for

if TYPE_CHECKING:
    from swarm_workers.celery_app import SwarmCelery

__all__ = ["register"]


def register(app: SwarmCelery) -> None:
    # shared=False: registered on this app only, so several apps in one process
    # (tests, the embedded demo) do not collide in Celery's global registry.
    @app.task(
        name=DAG_NODE,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        typing=False,
        shared=False,
    )
    def run_dag_node(self: Any, dag_id: str, node: str) -> dict[str, Any]:
        return run_node(dag_id, node, runtime_for(app, self.request.hostname))
