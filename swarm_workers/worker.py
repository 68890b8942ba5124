"""Start a role's worker: its queues in priority order, a threads pool, a heartbeat.

    swarm worker --role research                 # p0.research, p1.research, p2.research
    swarm worker --role research --priorities p0 # an express worker: P0 only

SIGTERM is Celery's warm shutdown: stop consuming, finish running tasks, exit 0. A
fatal error at start exits non-zero. Liveness is "the consumer loop runs" (health.py):
a timer on the consumer's event loop ticks, a watchdog thread touches the heartbeat
file, so a broker outage shorter than `OUTAGE_GRACE_S` restarts nothing while a stuck
loop does. The probe (`swarm healthcheck`) reads file ages only: no `celery inspect`,
no config.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import click
import redis
from celery import bootsteps, signals

from swarm_workers import metrics, tasks
from swarm_workers.celery_app import SwarmCelery, create_app
from swarm_workers.config import DEFAULT_LLM_BASE_URL, Settings
from swarm_workers.health import Liveness, broker_file
from swarm_workers.models import Priority
from swarm_workers.queues import ALL_PRIORITIES, worker_queues

__all__ = [
    "DRAIN_MARGIN_S",
    "Heartbeat",
    "MetricsEndpoint",
    "ProcessRuntime",
    "run_worker",
    "termination_grace_s",
    "worker_argv",
]

log = logging.getLogger(__name__)


# Liveness bounds (docs/operations.md, "Liveness"). A broker outage shorter than
# OUTAGE_GRACE_S restarts nothing; after it the consumer has RECONNECT_GRACE_S to resume
# (kombu sleeps up to 30 s between connection attempts).
OUTAGE_GRACE_S = 300.0
RECONNECT_GRACE_S = 60.0
# The loop may miss this many timer ticks (5 s each by default: 30 s) before it counts
# as stuck.
LOOP_STALL_TICKS = 6


# After SIGTERM a task may still run its whole deadline (task_time_limit_s bounds every
# wait it does), then it records its result and acks, and the process closes its
# clients. The margin covers that tail, with Redis retries on the way.
DRAIN_MARGIN_S = 120


def termination_grace_s(settings: Settings) -> int:
    """The grace a worker needs on SIGTERM to finish every running task: what
    `terminationGracePeriodSeconds` and compose's `stop_grace_period` are set to."""
    return settings.worker.task_time_limit_s + DRAIN_MARGIN_S


class Heartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """Ticks `Liveness` from a timer on the consumer's event loop.

    The timer runs on the hub only while the loop runs, so a tick proves the loop is
    alive; it does no I/O, so it cannot stall the loop. The files are written by the
    watchdog thread (`_Watchdog`), which also checks the broker off the loop.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer: Any = None

    def start(self, parent: Any) -> None:
        watchdog = _Watchdog.of(parent.app)
        watchdog.liveness.tick()
        self._timer = parent.timer.call_repeatedly(
            watchdog.interval_s, self._tick, (parent, watchdog.liveness), priority=10
        )

    @staticmethod
    def _tick(consumer: Any, liveness: Liveness) -> None:
        # A loop that runs without a connection (between a loss and the restart of the
        # consumer's steps) is not consuming.
        if consumer.connection is not None and consumer.blueprint.state == bootsteps.RUN:
            liveness.tick()

    def stop(self, parent: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Watchdog:
    """One thread per worker process: judges `Liveness`, touches the probe files."""

    def __init__(self, settings: Settings) -> None:
        # Read once, at start: nothing here re-reads the config file.
        worker = settings.worker
        self.interval_s = worker.heartbeat_interval_s
        self.path = worker.heartbeat_file
        self.broker_path = broker_file(self.path)
        self.liveness = Liveness(
            loop_stall_s=LOOP_STALL_TICKS * self.interval_s,
            outage_grace_s=OUTAGE_GRACE_S,
            reconnect_grace_s=RECONNECT_GRACE_S,
        )
        # Its own client with short timeouts: a hung Redis must not hang the judgement.
        timeout = min(2.0, self.interval_s)
        self._redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._thread = threading.Thread(target=self._run, name="swarm-liveness", daemon=True)
        signals.worker_shutting_down.connect(self._on_shutdown, weak=False)

    @classmethod
    def of(cls, app: Any) -> _Watchdog:
        """The app's watchdog, started on first use (consumer restarts reuse it)."""
        watchdog: _Watchdog | None = getattr(app, "_swarm_watchdog", None)
        if watchdog is None:
            watchdog = cls(app.swarm_settings)
            app._swarm_watchdog = watchdog
            watchdog.path.parent.mkdir(parents=True, exist_ok=True)
            watchdog._thread.start()
        return watchdog

    def _on_shutdown(self, **_: Any) -> None:
        self.liveness.draining()

    def _run(self) -> None:
        while True:
            try:
                self._judge()
            except Exception:  # the thread must outlive any one bad check
                log.exception("liveness watchdog")
            time.sleep(self.interval_s)

    def _judge(self) -> None:
        try:
            ok = bool(self._redis.ping())
        except redis.RedisError as exc:
            ok = False
            log.warning("heartbeat: broker did not answer PING: %s", exc)
        self.liveness.broker_seen(ok)
        if ok:
            self.broker_path.touch()
        if self.liveness.alive():
            self.path.touch()
        else:
            log.error("heartbeat: the consumer loop has stopped; liveness will fail")


class ProcessRuntime(bootsteps.StartStopStep):  # type: ignore[misc]
    """Builds the process's clients at start, so MCP discovery happens at boot and not
    in the first task. They are closed on `worker_shutdown`, which Celery sends after
    the pool has finished its tasks (a step's stop() would run before the pool's)."""

    requires = ("celery.worker.components:Pool",)

    def start(self, parent: Any) -> None:
        app = parent.app
        threads = parent.concurrency
        runtime = tasks.runtime_for(app, parent.hostname, threads=threads)
        _warn_short_of_connections(runtime.settings, threads)

        def close(**_: Any) -> None:
            tasks.close_runtime(app)

        signals.worker_shutdown.connect(close, weak=False)


def _warn_short_of_connections(settings: Settings, threads: int) -> None:
    """`llm.max_connections` below the pool size holds model calls back, silently but for this."""
    connections = settings.llm.max_connections
    if connections is not None and connections < threads:
        log.warning(
            "llm.max_connections = %d for %d pool threads: up to %d model calls will wait "
            "for a connection; unset it to have one per thread",
            connections,
            threads,
            threads - connections,
        )


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
    task_events: bool = False,
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
        # Flower's view of the tasks (`worker.task_events`; bench/README.md says what
        # they cost a task).
        *(["--task-events"] if task_events else []),
        # Mingle and gossip cost a broadcast round per worker start; with many workers
        # on Redis they are the noise, not the signal.
        "--without-mingle",
        "--without-gossip",
    ]


def build_worker_app(settings: Settings, roles: Sequence[str]) -> SwarmCelery:
    for role in roles:
        settings.role(role)  # UnknownRole before anything starts
    app = create_app(settings)
    tasks.register(app)  # the task bodies: a worker's, a producer sends by name
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
) -> int:
    """Run a worker in this process until it stops (blocks); returns its exit code."""
    app = build_worker_app(settings, roles)
    # Every LLM and MCP request would be an INFO line: keep the worker's log readable.
    for chatty in ("httpx", "httpx2", "mcp"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if settings.redact_prompts:
        # Celery logs every task's return value at INFO ("succeeded in 0.1s: {...}"):
        # agent outputs may quote private prompts. Failures still log at ERROR.
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    threads = concurrency or max(settings.role(r).concurrency for r in roles)
    _announce_endpoint(settings, roles)
    argv = worker_argv(
        roles,
        priorities,
        concurrency=threads,
        loglevel=loglevel,
        hostname=hostname,
        task_events=settings.worker.task_events,
    )
    return _celery_main(app, argv)


def _announce_endpoint(settings: Settings, roles: Sequence[str]) -> None:
    """Say which provider and models this worker will call; loudly when it is the
    default, the shipped fake provider's address, which no production fleet means."""
    models = ", ".join(sorted({settings.model_for(role) for role in roles}))
    if settings.llm.base_url == DEFAULT_LLM_BASE_URL:
        log.warning(
            "NO LLM ENDPOINT CONFIGURED: calling %s (the shipped fake provider's default "
            "address) for model(s) %s; set llm.base_url or SWARM_LLM_BASE_URL",
            DEFAULT_LLM_BASE_URL,
            models,
        )
    else:
        log.warning("LLM endpoint %s, model(s) %s", settings.llm.base_url, models)


def _celery_main(app: SwarmCelery, argv: list[str]) -> int:
    """Run Celery's command line and return its exit code.

    `app.worker_main` and `app.start` drop it: in click's non-standalone mode the
    worker's `ctx.exit(code)` comes back as main's return value, which they ignore, so
    an "Unrecoverable error" used to exit 0 and a supervisor saw success.
    """
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app
    try:
        code = celery_command.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    finally:
        celery_command.params[0].default = None
    return code if isinstance(code, int) else 0
