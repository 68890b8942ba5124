"""Admission control for producers: refuse a submit while its queue is too deep.

Each priority has a high-water mark (`admission.high_water`; P0 has none by default).
`check(queue)` reads the depth of the queue's Redis list (with kombu's
`priority_steps=[0]` the list key is the queue name, `p2.research`) and raises
`Backpressure` when the queue already holds `mark` tasks or more, with a suggested
retry delay: the tasks above the mark divided by `drain_rate_per_s`, between
`MIN_RETRY_S` and `MAX_RETRY_S`. Nothing is enqueued when it raises.

The mark is soft: the depth is read, then the task is sent, so producers racing at
the mark can overshoot it by how many of them submit at once. A producer reads a
queue's depth at most every `REFRESH_S` while it stays well below the mark (it counts
its own sends meanwhile), so a submit costs no extra round trip most of the time.

>>> admission = AdmissionControl(redis.Redis(), AdmissionSettings())
>>> admission.check("p2.research")  # raises Backpressure above 20 000 tasks
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

from swarm_workers.config import AdmissionSettings, Settings
from swarm_workers.errors import Backpressure
from swarm_workers.queues import parse_queue
from swarm_workers.redis_client import redis_client

__all__ = ["MAX_RETRY_S", "MIN_RETRY_S", "REFRESH_S", "AdmissionControl", "retry_delay"]

MIN_RETRY_S = 1.0
MAX_RETRY_S = 300.0
REFRESH_S = 0.1
_FAR_BELOW = 0.9  # a depth under this share of the mark may be reused for REFRESH_S


def retry_delay(depth: int, mark: int, drain_rate_per_s: float) -> float:
    """Seconds until the queue is likely back under its mark.

    >>> retry_delay(20_500, 20_000, 50.0)
    10.02
    """
    over = depth - mark + 1
    return min(MAX_RETRY_S, max(MIN_RETRY_S, over / drain_rate_per_s))


class AdmissionControl:
    """Checks a queue's depth against its priority's high-water mark before a submit.

    Usage::

        AdmissionControl.from_settings(load_settings(None)).check("p1.default")
    """

    def __init__(
        self,
        client: redis.Redis,
        settings: AdmissionSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.settings = settings
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # queue -> (read at, depth + sent since)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> AdmissionControl:
        """A checker on the broker's Redis (no connection is made until the first check)."""
        return cls(redis_client(settings.redis_url), settings.admission)

    def mark(self, queue: str) -> int | None:
        """The high-water mark of `queue` (`p<N>.<role>`); None: unbounded."""
        priority, _ = parse_queue(queue)
        return self.settings.high_water.get(priority)

    def check(self, queue: str, count: int = 1) -> None:
        """Raise `Backpressure` if `queue` holds `mark` tasks or more, or would go past
        its mark with `count` more (a batch is admitted whole or not at all)."""
        mark = self.mark(queue)
        if mark is None:
            return
        now = self._clock()
        with self._lock:
            seen = self._seen.get(queue)
            if seen is not None and now - seen[0] < REFRESH_S:
                estimate = seen[1] + count
                if estimate < mark * _FAR_BELOW:
                    self._seen[queue] = (seen[0], estimate)
                    return
        depth = int(self.client.llen(queue))
        if depth >= mark or (count > 1 and depth + count > mark):
            delay = retry_delay(depth + count - 1, mark, self.settings.drain_rate_per_s)
            raise Backpressure(queue, depth, mark, delay)
        with self._lock:
            self._seen[queue] = (now, depth + count)

    def close(self) -> None:
        self.client.close()
