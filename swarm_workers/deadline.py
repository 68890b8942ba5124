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

import time
from dataclasses import dataclass

from swarm_workers.errors import TimeLimitExceeded

__all__ = ["Deadline"]


@dataclass(frozen=True)
class Deadline:
    """A task's wall-clock limit on the `time.monotonic()` clock."""

    limit_s: float
    at: float

    @classmethod
    def start(cls, limit_s: float) -> Deadline:
        return cls(limit_s=limit_s, at=time.monotonic() + limit_s)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def cap(self, wait_s: float) -> float:
        """`wait_s`, or what is left of the deadline if that is shorter (never negative)."""
        return max(0.0, min(wait_s, self.remaining()))

    def check(self, during: str) -> None:
        """Raise TimeLimitExceeded, naming what the task was doing, once time is up."""
        if self.remaining() <= 0:
            raise TimeLimitExceeded(self.limit_s, during)
