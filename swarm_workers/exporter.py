"""The fleet's load for Prometheus and for KEDA, from one small process.

N workers each exporting the same LLEN would be scraped N times and disagree; one
exporter reads every role x priority list and kombu's running set (inflight.py) once
per interval and serves the last reading two ways:

- `/metrics`: `swarm_queue_depth`, `swarm_tasks_running` and
  `swarm_queue_oldest_age_seconds`, per role and priority;
- `/load?role=research&priorities=p1,p2`: `{"queued": .., "running": .., "load": ..}`
  for one pool, what KEDA's `metrics-api` trigger reads (deploy/k8s/base/workers/
  scaledobjects.yaml). A reading older than three intervals answers 503, so KEDA
  counts a failure and its fallback holds the current size instead of scaling on
  stale numbers.
"""

from __future__ import annotations

import json
import logging
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import Gauge, make_wsgi_app

from swarm_workers import metrics
from swarm_workers.config import Settings
from swarm_workers.inflight import LoadSnapshot, read_load
from swarm_workers.models import Priority
from swarm_workers.queues import ALL_PRIORITIES

__all__ = ["OLDEST_AGE", "TASKS_RUNNING", "LoadExporter", "queue_depths", "run_exporter"]

log = logging.getLogger(__name__)

TASKS_RUNNING = Gauge(
    "swarm_tasks_running",
    "Tasks delivered to a worker and not yet acked (running now; exporter only).",
    ["role", "priority"],
    registry=metrics.REGISTRY,
)
OLDEST_AGE = Gauge(
    "swarm_queue_oldest_age_seconds",
    "Age of the oldest task waiting in a queue, 0 when empty (exporter only).",
    ["role", "priority"],
    registry=metrics.REGISTRY,
)

# A reading is served to KEDA for this many intervals, then refused.
STALE_AFTER_INTERVALS = 3

_StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def queue_depths(client: redis.Redis, roles: list[str]) -> dict[tuple[str, Priority], int]:
    """LLEN of every queue of `roles`, in one round trip (`swarm status` uses it)."""
    return read_load(client, roles).queued


class LoadExporter:
    """Reads the load every `interval_s` and serves it.

    Usage::

        exporter = LoadExporter(settings, client, interval_s=5.0)
        exporter.refresh(); exporter.snapshot.load("research", [Priority.P1])
    """

    def __init__(self, settings: Settings, client: redis.Redis, *, interval_s: float) -> None:
        self.roles = list(settings.roles)
        self.client = client
        self.interval_s = interval_s
        self.snapshot: LoadSnapshot | None = None
        self._metrics_app = make_wsgi_app(metrics.REGISTRY)

    def refresh(self) -> None:
        snapshot = read_load(self.client, self.roles)
        for (role, p), depth in snapshot.queued.items():
            metrics.QUEUE_DEPTH.labels(role, p.value).set(depth)
            TASKS_RUNNING.labels(role, p.value).set(snapshot.running[(role, p)])
            OLDEST_AGE.labels(role, p.value).set(snapshot.oldest_age_s.get((role, p), 0.0))
        self.snapshot = snapshot

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.refresh()
            except redis.RedisError as exc:  # keep the last values; /load turns 503
                log.warning("exporter: cannot read the fleet's load: %s", exc)
            stop.wait(self.interval_s)

    # ------------------------------------------------------------------ HTTP

    def wsgi(self, environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/load":
            status, body = self._load(parse_qs(environ.get("QUERY_STRING", "")))
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(body).encode()]
        result: Iterable[bytes] = self._metrics_app(environ, start_response)
        return result

    def _load(self, query: dict[str, list[str]]) -> tuple[str, dict[str, Any]]:
        role = query.get("role", [""])[0]
        if role not in self.roles:
            return "404 Not Found", {"error": f"unknown role {role!r}", "roles": self.roles}
        try:
            text = query.get("priorities", ["p0,p1,p2"])[0]
            levels = [Priority(p) for p in text.split(",") if p.strip()] or list(ALL_PRIORITIES)
        except ValueError:
            return "400 Bad Request", {"error": "priorities: a comma list of p0, p1, p2"}
        snapshot = self.snapshot
        age = None if snapshot is None else time.time() - snapshot.taken_at
        if snapshot is None or age is None or age > STALE_AFTER_INTERVALS * self.interval_s:
            return "503 Service Unavailable", {"error": "no recent reading of Redis", "age_s": age}
        queued = sum(snapshot.queued.get((role, p), 0) for p in levels)
        running = sum(snapshot.running.get((role, p), 0) for p in levels)
        return "200 OK", {
            "role": role,
            "priorities": [p.value for p in levels],
            "queued": queued,
            "running": running,
            "load": queued + running,
            "age_s": round(age, 3),
        }


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


def run_exporter(
    settings: Settings, client: redis.Redis, *, port: int, interval_s: float, stop: threading.Event
) -> None:
    """Serve /metrics and /load on `port` and refresh the readings until `stop` is set."""
    exporter = LoadExporter(settings, client, interval_s=interval_s)
    server = make_server("0.0.0.0", port, exporter.wsgi, _Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="exporter-http", daemon=True)
    thread.start()
    try:
        exporter.run(stop)
    finally:
        server.shutdown()
        server.server_close()
