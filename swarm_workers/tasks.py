"""The Celery task bodies: a few lines each, the work is in `execution`.

Both tasks ignore their Celery result: the outcome is stored once, in the result
store, before the body returns, and the body returns a pointer of a few bytes (task
id and status) which is all a chord counts and all Flower shows. A supervisor that
suspends to wait for its sub-agents records nothing and raises `Ignore`: acknowledged,
but not done, so no chord counts it and no chain goes on until its continuation (sent
in its place, `CelerySender`) records.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Ignore, Reject
from kombu.utils import json

from swarm_workers.dag.canvas import send_dag
from swarm_workers.dag.prepare import PreparedDag
from swarm_workers.dag.store import node_task_id
from swarm_workers.execution import Requeue, Runtime, Suspended, execute, run_node
from swarm_workers.models import AgentTask, TaskResult
from swarm_workers.queues import DAG_NODE, RUN_AGENT, queue_name
from swarm_workers.results import pointer

__all__ = ["CelerySender", "close_runtime", "register", "runtime_for"]

log = logging.getLogger(__name__)

_build_lock = threading.Lock()


def runtime_for(
    app: Celery, worker_name: str | None = None, *, threads: int | None = None
) -> Runtime:
    """This app's Runtime: built at worker start (see worker.py), else on first use;
    `threads`, the pool's size, sizes its provider connections."""
    runtime: Runtime | None = getattr(app, "swarm_runtime", None)
    if runtime is None:
        with _build_lock:
            runtime = getattr(app, "swarm_runtime", None)
            if runtime is None:
                runtime = Runtime.build(app.swarm_settings, worker_name, threads=threads)
                runtime.sender = CelerySender(app)
                app.swarm_runtime = runtime
    return runtime


def close_runtime(app: Celery) -> None:
    with _build_lock:
        runtime: Runtime | None = getattr(app, "swarm_runtime", None)
        app.swarm_runtime = None
    if runtime is not None:
        runtime.close()


class CelerySender:
    """What a swarm sends on the broker: a spawn round's children (a DAG canvas) and a
    supervisor's continuation (an ordinary `swarm.run_agent` message of its task)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send_children(self, dag: PreparedDag) -> None:
        send_dag(self.app, dag)

    def position(self) -> str | None:
        """The canvas options of the delivery running in this thread (Celery's request is
        per thread): its chord, group, chain and links, as JSON; None outside a canvas."""
        current = self.app.current_task
        request = current.request if current is not None else None
        if request is None or not (
            request.chord or request.group or request.chain or request.callbacks
        ):
            return None
        return str(
            json.dumps(
                {
                    "chord": request.chord,
                    "group_id": request.group,
                    "group_index": request.group_index,
                    "chain": request.chain,
                    "link": request.callbacks,
                    "link_error": request.errbacks,
                    "root_id": request.root_id,
                }
            )
        )

    def send_continuation(self, task: AgentTask, message_id: str, position: str | None) -> None:
        """In the suspended delivery's place (`position`), as `Task.replace` would: its
        chord counts this delivery, its chain goes on after it."""
        self.app.send_task(
            RUN_AGENT,
            args=[task.to_wire()],
            task_id=message_id,
            queue=queue_name(task.priority, task.role),
            argsrepr=task.redacted(),
            kwargsrepr="{}",
            ignore_result=True,
            **(json.loads(position) if position else {}),
        )


def _recorded(run: Callable[[], TaskResult], runtime: Runtime, task_id: str) -> dict[str, Any]:
    redact = runtime.settings.redact_prompts
    try:
        return pointer(run(), redact=redact)
    except Suspended as exc:
        # Waiting for sub-agents: acknowledged now, and not done: a chord does not count
        # it, a chain does not go on. The last child sends a continuation in its place.
        raise Ignore(str(exc)) from exc
    except redis.RedisError as exc:
        # Redis is the broker too: put the message back rather than record a failure
        # for a task that never had its chance.
        raise Reject(f"Redis unavailable: {type(exc).__name__}", requeue=True) from exc
    except Requeue as exc:
        raise Reject(str(exc), requeue=True) from exc
    except Exception as exc:
        # A bug outside the run itself: recorded all the same, so a producer waiting on
        # the task, or a chord on it, gets an answer instead of waiting for ever.
        log.exception("task %s: internal error outside its run", task_id)
        failed = TaskResult.failure(
            "InternalError",
            f"{type(exc).__name__} in the worker (see its log)",
            task_id=task_id,
            worker=runtime.worker_name,
        )
        try:
            return pointer(runtime.results.put(failed), redact=redact)
        except redis.RedisError as down:
            raise Reject(f"Redis unavailable: {type(down).__name__}", requeue=True) from down


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
        task_id = str(payload.get("id") if isinstance(payload, dict) else self.request.id)
        return _recorded(lambda: execute(payload, runtime), runtime, task_id)

    @app.task(name=DAG_NODE, **_OPTIONS)
    def run_dag_node(self: Any, dag_id: str, node: str) -> dict[str, Any]:
        runtime = runtime_for(app, self.request.hostname)
        task_id = node_task_id(dag_id, node)
        return _recorded(lambda: run_node(dag_id, node, runtime), runtime, task_id)
