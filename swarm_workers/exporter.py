"""Queue depth for Prometheus, from one small process instead of every worker.

N workers each exporting the same LLEN would be scraped N times and disagree; one
exporter reads every role x priority list in a single pipeline per interval.
"""

from __future__ import annotations

import logging
import threading

import redis

from swarm_workers import metrics
from swarm_workers.config import Settings
from swarm_workers.models import Priority
from swarm_workers.queues import ALL_PRIORITIES, queue_name

__all__ = ["queue_depths", "run_exporter"]

log = logging.getLogger(__name__)


def queue_depths(client: redis.Redis, roles: list[str]) -> dict[tuple[str, Priority], int]:
    """LLEN of every queue of `roles`, in one round trip."""
    keys = [(role, p) for role in roles for p in ALL_PRIORITIES]
    pipe = client.pipeline(transaction=False)
    for role, p in keys:
        pipe.llen(queue_name(p, role))
    return {key: int(depth) for key, depth in zip(keys, pipe.execute(), strict=True)}


def run_exporter(
    settings: Settings, client: redis.Redis, *, port: int, interval_s: float, stop: threading.Event
) -> None:
    """Serve /metrics on `port` and refresh the depth gauges until `stop` is set."""
    metrics.serve(port)
    roles = list(settings.roles)
    while not stop.is_set():
        try:
            for (role, p), depth in queue_depths(client, roles).items():
                metrics.QUEUE_DEPTH.labels(role, p.value).set(depth)
        except redis.RedisError as exc:  # keep serving the last values; say why
            log.warning("exporter: cannot read queue depths: %s", exc)
        stop.wait(interval_s)
