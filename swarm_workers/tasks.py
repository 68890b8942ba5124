"""Celery task bodies: a few lines each, the work is in `execution`."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import redis
from celery.exceptions import Reject

from swarm_workers.execution import execute
from swarm_workers.runtime import Runtime

if TYPE_CHECKING:
    from swarm_workers.celery_app import SwarmCelery

__all__ = ["close_runtime", "register", "runtime_for"]

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime_for(app: SwarmCelery, worker_name: str | None = None) -> Runtime:
    """The process's Runtime: built at worker start (see worker.py), else on first use."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                _runtime = Runtime.build(app.swarm_settings, worker_name)
    return _runtime


def close_runtime() -> None:
    global _runtime
    with _runtime_lock:
        if _runtime is not None:
            _runtime.close()
            _runtime = None


def register(app: SwarmCelery) -> None:
    from swarm_workers.celery_app import RUN_AGENT

    @app.task(
        name=RUN_AGENT,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        typing=False,
        shared=False,  # this app only: several apps may live in one process (tests, demo)
    )
    def run_agent(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            return execute(payload, runtime_for(app, self.request.hostname))
        except redis.RedisError as exc:
            # Redis is the broker too: put the message back rather than record a failure
            # for a task that never had its chance (it may wait for the visibility timeout).
            raise Reject(f"Redis unavailable: {type(exc).__name__}", requeue=True) from exc
