"""Which limiter a worker process uses: the Redis token bucket, or none.

The interface the agent loop calls lives in `ratelimit/limiter.py`; this module only
chooses an implementation, so the bucket can depend on the interface without a circle
(limiter <- bucket <- base).
"""

from __future__ import annotations

import redis

from swarm_workers.config import Settings
from swarm_workers.ratelimit.bucket import TokenBucketLimiter
from swarm_workers.ratelimit.limiter import Limiter, Reservation, Unlimited

__all__ = ["Limiter", "Reservation", "Unlimited", "build_limiter"]


def build_limiter(settings: Settings, client: redis.Redis) -> Limiter:
    """The limiter a worker process uses: the Redis token bucket for every model with a
    `ratelimit.models` entry (or under a `"*"` entry), `Unlimited` when disabled or empty.
    """
    if not settings.ratelimit.enabled or not settings.ratelimit.models:
        return Unlimited()
    return TokenBucketLimiter(client, settings.ratelimit, prefix=settings.key_prefix)
