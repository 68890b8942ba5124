"""One deadline per task, started when its delivery begins, bounding every wait.

Celery's threads pool enforces no `task_time_limit`, so the task enforces it itself:
the wait for a twin delivery, the token bucket, each model call and its retries, and
each tool call take at most what is left, and the loop checks it between steps.

>>> Deadline.start(30).remaining() > 29
True
>>> Deadline.start(30).cap(120.0) <= 30
True
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from swarm_workers.errors import SwarmError, TimeLimitExceeded

__all__ = ["Deadline"]


@dataclass(frozen=True)
class Deadline:
    """A task's wall-clock limit on the `time.monotonic()` clock.

    `stop(reason)` ends it early from another thread (the run lost its lease, say):
    every wait then ends at once and the next `check` raises `reason`.
    """

    limit_s: float
    at: float
    _stopped: list[SwarmError] = field(default_factory=list, repr=False, compare=False)
    _event: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    _wakers: list[Callable[[], None]] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def start(cls, limit_s: float) -> Deadline:
        return cls(limit_s=limit_s, at=time.monotonic() + limit_s)

    def stop(self, reason: SwarmError) -> None:
        if not self._stopped:
            self._stopped.append(reason)
        self._event.set()
        for wake in list(self._wakers):
            wake()

    def on_stop(self, wake: Callable[[], None]) -> None:
        """Call `wake` when the deadline is stopped (at once if it is already)."""
        self._wakers.append(wake)
        if self._event.is_set():
            wake()

    @property
    def stopped(self) -> SwarmError | None:
        return self._stopped[0] if self._stopped else None

    def remaining(self) -> float:
        if self._event.is_set():
            return 0.0
        return self.at - time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, capped by the deadline; wakes at once when stopped."""
        self._event.wait(self.cap(seconds))

    def expired(self) -> bool:
        return self.remaining() <= 0

    def cap(self, wait_s: float) -> float:
        """`wait_s`, or what is left of the deadline if that is shorter (never negative)."""
        return max(0.0, min(wait_s, self.remaining()))

    def check(self, during: str) -> None:
        """Raise TimeLimitExceeded, naming what the task was doing, once time is up
        (or the reason it was stopped)."""
        if self._stopped:
            raise self._stopped[0]
        if self.remaining() <= 0:
            raise TimeLimitExceeded(self.limit_s, during)
