"""The one way this package opens a Redis client: pooled, thread-safe, with timeouts."""

from __future__ import annotations

import redis

__all__ = ["redis_client"]


def redis_client(url: str) -> redis.Redis:
    """A thread-safe client with a pool big enough for a threads pool."""
    return redis.Redis.from_url(
        url,
        socket_timeout=30,
        socket_connect_timeout=5,
        health_check_interval=25,
        max_connections=1024,
        decode_responses=False,
    )
