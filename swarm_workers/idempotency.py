"""Idempotent submits: one task (or DAG) per idempotency key within a window.

A producer that retries a submit after a timeout passes the same key; the first submit
claims the key (`SET NX`, atomic, so racing producers agree on one winner) with what
it made, and every later one within `limits.idempotency_window_s` gets a handle to
that instead of enqueueing again. Keys are hashed: any string a producer has (an order
id, a request id) is a safe key name.

A submit that fails after its claim (backpressure, Redis down) gives the key back, so
the retry can go through. The one window left: a producer that dies between its claim
and its send leaves the key naming a task that was never sent; later submits with that
key get a handle that stays `queued`. Submit again with a new key in that case.

Usage::

    keys = IdempotencyKeys(redis.Redis(), settings)
    keys.claim("order-1234", "task:3f2a...")
"""

from __future__ import annotations

import hashlib

import redis

from swarm_workers.config import Settings
from swarm_workers.errors import InvalidTask

__all__ = ["IdempotencyKeys"]

_MAX_KEY_CHARS = 512
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class IdempotencyKeys:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.keys = settings.keys
        self.window_s = settings.limits.idempotency_window_s
        self._release = client.register_script(_RELEASE)

    def _key(self, key: str) -> str:
        if not isinstance(key, str) or not key or len(key) > _MAX_KEY_CHARS:
            raise InvalidTask(
                "idempotency_key", f"must be a non-empty string of at most {_MAX_KEY_CHARS} chars"
            )
        try:
            raw = key.encode()
        except UnicodeEncodeError:
            raise InvalidTask("idempotency_key", "must be valid Unicode text") from None
        return self.keys.idempotency(hashlib.sha256(raw).hexdigest()[:40])

    def claim(self, key: str, made: str) -> str | None:
        """Claim `key` for `made`; None when claimed, else what the key already names."""
        name = self._key(key)
        if self.redis.set(name, made, nx=True, ex=self.window_s):
            return None
        first = self.redis.get(name)
        if first is None:  # expired between the two calls: take it now
            return self.claim(key, made)
        return first.decode() if isinstance(first, bytes) else str(first)

    def release(self, key: str, made: str) -> None:
        """Give `key` back, if it still names `made` (the submit that claimed it failed)."""
        self._release(keys=[self._key(key)], args=[made])
