"""A circuit breaker per MCP server whose state lives in Redis, so the whole fleet sees it.

Why in Redis: one worker that watches a server time out five times has learned
something every worker needs; a per-process breaker would make each of fifty workers
pay for the lesson again. Transitions run in one Lua script (`breaker.lua`) on Redis'
clock:

    closed ──N failures within window_s──▶ open ──cooldown_s──▶ half_open
       ▲                                    ▲                      │
       └───────── the probe succeeds ───────┼──── the probe fails ─┘

A failure is an error reaching the server, a timeout, or a call slower than
`slow_call_ms` (the field report's 800 ms). In half_open exactly one caller in the
fleet gets the probe (SET NX with a lease, so a probe whose worker dies is retried);
everyone else fails fast until the probe's outcome closes or re-opens the breaker.

Usage::

    breaker = CircuitBreaker(redis.Redis(), "swarm", BreakerSettings())
    permit = breaker.allow("search")
    breaker.record(permit, ok=True, latency_s=0.12)
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import redis

from swarm_workers.config import BreakerSettings
from swarm_workers.keys import Keys
from swarm_workers.metrics import BREAKER_STATE

__all__ = ["BreakerState", "CircuitBreaker", "Permit"]

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]
_GAUGE: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}  # swarm_breaker_state
_SCRIPT = resources.files(__package__).joinpath("breaker.lua").read_text()


@dataclass(frozen=True)
class Permit:
    """The breaker's answer for one call: go, go as the fleet's probe, or fail fast."""

    server: str
    allowed: bool
    state: State
    probe_token: str | None = None
    retry_after_s: float = 0.0

    @property
    def is_probe(self) -> bool:
        return self.probe_token is not None


@dataclass(frozen=True)
class BreakerState:
    """What `swarm tools` shows for one server."""

    server: str
    state: State
    reason: str | None
    opened_for_s: float | None
    recent_failures: int
    probe_pending: bool


class CircuitBreaker:
    """Per-server breakers in Redis, shared by every worker using the same key prefix.

    Usage::

        CircuitBreaker(client, "swarm", BreakerSettings()).allow("search").allowed
        # -> True
    """

    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str,
        settings: BreakerSettings,
        *,
        probe_lease_s: float = 30.0,
    ) -> None:
        self._redis = client
        self._keys_of = Keys(key_prefix)
        self._settings = settings
        self._probe_lease_ms = max(1, int(probe_lease_s * 1000))
        self._script = client.register_script(_SCRIPT)

    def _keys(self, server: str) -> list[str]:
        # One hash tag for the three keys: the script touches them together (Cluster).
        return list(self._keys_of.breaker(server))

    def allow(self, server: str) -> Permit:
        """May a call to `server` go now? Never raises: a Redis outage fails open, logged."""
        token = uuid.uuid4().hex
        try:
            decision, state, wait_ms = self._script(
                keys=self._keys(server),
                args=[
                    "allow",
                    int(self._settings.cooldown_s * 1000),
                    self._probe_lease_ms,
                    token,
                ],
            )
        except redis.RedisError as exc:
            log.warning("breaker %s: Redis unavailable, letting the call through: %s", server, exc)
            return Permit(server, True, "closed")
        state_name = _state(state)
        BREAKER_STATE.labels(server).set(_GAUGE[state_name])
        if int(decision) == 2:
            log.info("breaker %s: half-open, this worker sends the probe", server)
            return Permit(server, True, state_name, probe_token=token)
        return Permit(server, int(decision) == 1, state_name, retry_after_s=int(wait_ms) / 1000)

    def record(
        self, permit: Permit, *, ok: bool, latency_s: float | None = None, reason: str = ""
    ) -> State:
        """Count one call's outcome; a slow success counts as a failure. Returns the state."""
        latency_ms = None if latency_s is None else latency_s * 1000
        slow = latency_ms is not None and latency_ms > self._settings.slow_call_ms
        failed = not ok or slow
        if slow and ok:
            reason = f"slow call: {latency_ms:.0f} ms > {self._settings.slow_call_ms:.0f} ms"
        try:
            state, changed = self._script(
                keys=self._keys(permit.server),
                args=[
                    "record",
                    "fail" if failed else "ok",
                    permit.probe_token or "",
                    uuid.uuid4().hex,
                    self._settings.failures,
                    int(self._settings.window_s * 1000),
                    reason[:200],
                ],
            )
        except redis.RedisError as exc:
            log.warning("breaker %s: could not record an outcome: %s", permit.server, exc)
            return permit.state
        new_state = _state(state)
        BREAKER_STATE.labels(permit.server).set(_GAUGE[new_state])
        if int(changed):
            why = f" ({reason})" if failed else ""
            log.warning("breaker %s: now %s%s", permit.server, new_state, why)
        return new_state

    def release(self, permit: Permit) -> None:
        """The call never reached the server: free a probe lease, judge nothing."""
        if not permit.is_probe:
            return
        try:
            self._script(keys=self._keys(permit.server), args=["release", permit.probe_token or ""])
        except redis.RedisError as exc:  # the lease expires on its own
            log.warning("breaker %s: could not release the probe: %s", permit.server, exc)

    def state(self, server: str) -> BreakerState:
        """The breaker as the next caller would find it (an elapsed cooldown reads half_open)."""
        keys = self._keys(server)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(keys[0])
        pipe.exists(keys[1])
        pipe.zcard(keys[2])
        pipe.time()
        fields, probe, failures, (seconds, micros) = pipe.execute()
        values = {_text(k): _text(v) for k, v in fields.items()}
        state = _state(values.get("state", "closed"))
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        opened_for = None
        if state != "closed" and "opened_at" in values:
            opened_for = max(0.0, (now_ms - int(values["opened_at"])) / 1000)
            if state == "open" and opened_for >= self._settings.cooldown_s:
                state = "half_open"
        return BreakerState(
            server=server,
            state=state,
            reason=values.get("reason") if state != "closed" else None,
            opened_for_s=opened_for,
            recent_failures=int(failures),
            probe_pending=bool(probe),
        )

    def reset(self, server: str) -> None:
        """Forget everything about `server` (operators and tests)."""
        self._redis.delete(*self._keys(server))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _state(value: bytes | str) -> State:
    text = _text(value)
    if text == "open":
        return "open"
    if text == "half_open":
        return "half_open"
    return "closed"
