"""Celery task bodies: a few lines each, the work is in `execution`."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from swarm_workers.execution import execute
from swarm_workers.runtime import Runtime

if TYPE_CHECKING:
    from swarm_workers.celery_app import SwarmCelery

__all__ = ["register", "runtime_for"]

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime_for(app: SwarmCelery) -> Runtime:
    """The process's Runtime, built by the first task that needs it."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                _runtime = Runtime.build(app.swarm_settings)
    return _runtime


def register(app: SwarmCelery) -> None:
    from swarm_workers.celery_app import RUN_AGENT

    @app.task(name=RUN_AGENT, acks_late=True, reject_on_worker_lost=True, typing=False)
    def run_agent(payload: dict[str, Any]) -> dict[str, Any]:
        return execute(payload, runtime_for(app))
