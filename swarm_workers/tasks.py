"""The Celery task bodies: a few lines each, the work is in `execution`.

Both tasks ignore their Celery result: the outcome is stored once, in the result
store, before the body returns, and the body returns a pointer of a few bytes (task
id and status) which is all a chord counts and all Flower shows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Reject

from swarm_workers.execution import Requeue, Runtime, execute, run_node
from swarm_workers.models import TaskResult
from swarm_workers.queues import DAG_NODE, RUN_AGENT
from swarm_workers.results import pointer

__all__ = ["close_runtime", "register", "runtime_for"]

_build_lock = threading.Lock()


def runtime_for(app: Celery, worker_name: str | None = None) -> Runtime:
    """This app's Runtime: built at worker start (see worker.py), else on first use."""
    runtime: Runtime | None = getattr(app, "swarm_runtime", None)
    if runtime is None:
        with _build_lock:
            runtime = getattr(app, "swarm_runtime", None)
            if runtime is None:
                runtime = Runtime.build(app.swarm_settings, worker_name)
                app.swarm_runtime = runtime
    return runtime


def close_runtime(app: Celery) -> None:
    with _build_lock:
        runtime: Runtime | None = getattr(app, "swarm_runtime", None)
        app.swarm_runtime = None
    if runtime is not None:
        runtime.close()


def _recorded(run: Callable[[], TaskResult]) -> dict[str, Any]:
    try:
        return pointer(run())
    except redis.RedisError as exc:
        # Redis is the broker too: put the message back rather than record a failure
        # for a task that never had its chance.
        raise Reject(f"Redis unavailable: {type(exc).__name__}", requeue=True) from exc
    except Requeue as exc:
        raise Reject(str(exc), requeue=True) from exc


_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "ignore_result": True,
    "typing": False,
    # This app only: several apps may live in one process (tests, the demo).
    "shared": False,
}


def register(app: Celery) -> None:
    @app.task(name=RUN_AGENT, **_OPTIONS)
    def run_agent(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
        runtime = runtime_for(app, self.request.hostname)
        return _recorded(lambda: execute(payload, runtime))

    @app.task(name=DAG_NODE, **_OPTIONS)
    def run_dag_node(self: Any, dag_id: str, node: str) -> dict[str, Any]:
        runtime = runtime_for(app, self.request.hostname)
        return _recorded(lambda: run_node(dag_id, node, runtime))
