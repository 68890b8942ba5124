"""Start a role's worker: its queues in priority order, a threads pool, a heartbeat.

    swarm worker --role research                 # p0.research, p1.research, p2.research
    swarm worker --role research --priorities p0 # an express worker: P0 only

SIGTERM is Celery's warm shutdown: stop consuming, finish running tasks, exit 0. The
heartbeat file is touched from the consumer's event loop after a broker PING, so a
stale file means that loop stopped or the broker stopped answering: the liveness probe
(`swarm healthcheck`) needs no `celery inspect` round trip through the broker.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from celery import bootsteps, signals

from swarm_workers import metrics, tasks
from swarm_workers.celery_app import SwarmCelery, create_app
from swarm_workers.config import Settings
from swarm_workers.models import Priority
from swarm_workers.queues import ALL_PRIORITIES, worker_queues

__all__ = ["Heartbeat", "MetricsEndpoint", "ProcessRuntime", "run_worker", "worker_argv"]

log = logging.getLogger(__name__)


class Heartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """Touches the heartbeat file every few seconds while the broker answers."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer: Any = None
        self._redis: Any = None

    def start(self, parent: Any) -> None:
        settings: Settings = parent.app.swarm_settings
        # Short timeouts: the PING runs on the consumer's event loop and must not stall it.
        self._redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=2, socket_connect_timeout=2
        )
        path = settings.worker.heartbeat_file
        self._beat(path)
        self._timer = parent.timer.call_repeatedly(
            settings.worker.heartbeat_interval_s, self._beat, (path,), priority=10
        )

    def _beat(self, path: Path) -> None:
        try:
            self._redis.ping()
        except Exception as exc:  # the probe goes stale, which is the signal
            log.warning("heartbeat: broker did not answer PING: %s", exc)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def stop(self, parent: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._redis is not None:
            self._redis.close()


class ProcessRuntime(bootsteps.StartStopStep):  # type: ignore[misc]
    """Builds the process's clients at start, so MCP discovery happens at boot and not
    in the first task. They are closed on `worker_shutdown`, which Celery sends after
    the pool has finished its tasks (a step's stop() would run before the pool's)."""

    requires = ("celery.worker.components:Pool",)

    def start(self, parent: Any) -> None:
        app = parent.app
        tasks.runtime_for(app, parent.hostname)

        def close(**_: Any) -> None:
            tasks.close_runtime(app)

        signals.worker_shutdown.connect(close, weak=False)


class MetricsEndpoint(bootsteps.StartStopStep):  # type: ignore[misc]
    """Serves this process's Prometheus metrics when `worker.metrics_port` is set."""

    def start(self, parent: Any) -> None:
        port = parent.app.swarm_settings.worker.metrics_port
        if port is not None:
            metrics.serve(port)
            log.info("metrics on :%d/metrics", port)


def worker_argv(
    roles: Sequence[str],
    priorities: Sequence[Priority] = ALL_PRIORITIES,
    *,
    concurrency: int,
    loglevel: str = "INFO",
    hostname: str | None = None,
) -> list[str]:
    """The `celery worker` argv for these roles; also what the tests inspect."""
    queues = worker_queues(roles, priorities)
    name = hostname or f"{'+'.join(roles)}-{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}",
        f"--hostname={name}",
        f"--loglevel={loglevel}",
        "--task-events",
        # Mingle and gossip cost a broadcast round per worker start; with many workers
        # on Redis they are the noise, not the signal. Flower uses task events.
        "--without-mingle",
        "--without-gossip",
    ]


def build_worker_app(settings: Settings, roles: Sequence[str]) -> SwarmCelery:
    for role in roles:
        settings.role(role)  # UnknownRole before anything starts
    app = create_app(settings)
    app.steps["consumer"].add(Heartbeat)
    app.steps["worker"].add(MetricsEndpoint)
    app.steps["worker"].add(ProcessRuntime)
    return app


def run_worker(
    settings: Settings,
    roles: Sequence[str],
    priorities: Sequence[Priority] = ALL_PRIORITIES,
    *,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    hostname: str | None = None,
) -> None:
    """Run a worker in this process until it is told to stop (blocks)."""
    app = build_worker_app(settings, roles)
    # Every LLM and MCP request would be an INFO line: keep the worker's log readable.
    for chatty in ("httpx", "httpx2", "mcp"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if settings.redact_prompts:
        # Celery logs every task's return value at INFO ("succeeded in 0.1s: {...}"):
        # agent outputs may quote private prompts. Failures still log at ERROR.
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    threads = concurrency or max(settings.role(r).concurrency for r in roles)
    app.worker_main(
        worker_argv(roles, priorities, concurrency=threads, loglevel=loglevel, hostname=hostname)
    )
