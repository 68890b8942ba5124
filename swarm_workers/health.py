"""Worker liveness: what "alive" means, and the files the probes read.

Kept free of Celery and of the config: a probe runs `swarm healthcheck` every few
seconds, and a bad config edit must not fail liveness on every worker at once.

Alive means *the consumer loop runs*, not *Redis answered*. The worker's event loop
ticks a timer (`Liveness.tick`); a watchdog thread judges every few seconds and touches
the heartbeat file while the worker is alive:

- the loop ticked within `loop_stall_s`: alive;
- the broker is unreachable: Celery is in its reconnect loop, not stuck. Alive for up
  to `outage_grace_s` of outage, then not (a reconnect that never ends is a restart);
- the broker came back: the consumer has `reconnect_grace_s` to resume (kombu sleeps
  up to 30 s between connection attempts) before a silent loop counts as stuck;
- a warm shutdown is draining running tasks: alive (the grace period bounds it).

Broker reachability is recorded apart, in `<heartbeat>.broker`, for readiness.

>>> live = Liveness(loop_stall_s=30, outage_grace_s=300, reconnect_grace_s=60, now=0.0)
>>> live.tick(now=10.0); live.alive(now=35.0)
True
>>> live.alive(now=45.0)
False
>>> live.broker_seen(False, now=45.0); live.alive(now=200.0)
True
>>> live.alive(now=400.0)
False
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Liveness", "broker_file", "file_age"]


def broker_file(heartbeat: Path) -> Path:
    """The file touched while the broker answers, next to the heartbeat file."""
    return heartbeat.with_name(heartbeat.name + ".broker")


def file_age(path: Path) -> float | None:
    """Seconds since `path` was touched, or None if there is no such file."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


@dataclass
class Liveness:
    """The judgement behind the heartbeat; thread-safe, clock passed in for tests."""

    loop_stall_s: float
    outage_grace_s: float
    reconnect_grace_s: float
    now: float = field(default_factory=time.monotonic)
    _last_tick: float = field(init=False)
    _outage_start: float | None = field(init=False, default=None)
    _outage_end: float | None = field(init=False, default=None)
    _outage_len: float = field(init=False, default=0.0)
    _draining: bool = field(init=False, default=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._last_tick = self.now  # start-up counts as a tick: the loop is starting

    def tick(self, now: float | None = None) -> None:
        """The consumer's event loop ran (called from a timer on that loop)."""
        with self._lock:
            self._last_tick = time.monotonic() if now is None else now

    def broker_seen(self, ok: bool, now: float | None = None) -> None:
        """Record one reachability check of the broker."""
        t = time.monotonic() if now is None else now
        with self._lock:
            if not ok and self._outage_start is None:
                self._outage_start = t
            elif ok and self._outage_start is not None:
                self._outage_end, self._outage_len = t, t - self._outage_start
                self._outage_start = None

    def draining(self) -> None:
        """A warm shutdown began: running tasks finish, the loop no longer consumes."""
        with self._lock:
            self._draining = True

    def alive(self, now: float | None = None) -> bool:
        t = time.monotonic() if now is None else now
        with self._lock:
            if self._draining or t - self._last_tick <= self.loop_stall_s:
                return True
            if self._outage_start is not None:
                return t - self._outage_start <= self.outage_grace_s
            return (
                self._outage_end is not None
                and self._outage_len <= self.outage_grace_s
                and t - self._outage_end <= self.reconnect_grace_s
            )
