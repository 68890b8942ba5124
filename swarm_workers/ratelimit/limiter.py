"""The limiter interface the agent loop calls before and after each LLM request.

Reserve then reconcile: `acquire` takes the estimated tokens (prompt + max_tokens)
and one request; after the call, `reconcile` charges or returns the difference from
the real usage, `cancel` returns everything for a call that produced no usage.
"""

from __future__ import annotations

from typing import Protocol

from swarm_workers.deadline import Deadline
from swarm_workers.models import Priority

__all__ = ["Limiter", "Reservation", "Unlimited"]


class Reservation(Protocol):
    def reconcile(self, used_tokens: int) -> None: ...

    def cancel(self) -> None: ...


class Limiter(Protocol):
    def acquire(
        self, model: str, priority: Priority, tokens: int, deadline: Deadline | None = None
    ) -> Reservation:
        """Block until the fleet may send one request of `tokens`.

        Raises RateLimited past the priority's longest wait, TimeLimitExceeded when
        `deadline` (the task's) runs out first.
        """
        ...

    def penalize(self, model: str, retry_after_s: float) -> None:
        """The provider answered 429: make the whole fleet back off for this long."""
        ...


class _Nothing:
    def reconcile(self, used_tokens: int) -> None:
        return None

    def cancel(self) -> None:
        return None


class Unlimited:
    """No limit: for a model with no configured limit, or with the bucket disabled."""

    def acquire(
        self, model: str, priority: Priority, tokens: int, deadline: Deadline | None = None
    ) -> Reservation:
        return _Nothing()

    def penalize(self, model: str, retry_after_s: float) -> None:
        return None
