"""The cluster-wide token bucket: one Lua script, Redis' clock, every worker shares it.

Each limited model has two buckets, requests and tokens per minute, taken together in
one atomic call of `bucket.lua` (all or nothing). A model named `"*"` in
`ratelimit.models` is a global limit taken in the same call as every model's own.

Refill is continuous, and sized for providers that count a sliding 60-second window:
a bucket of `limit` per minute holds `capacity = limit * burst_s / 60` and refills at
`(limit - capacity) / 60.25` per second, so capacity plus a minute of refill never
exceeds the limit in any 60 s window, even with a quarter second of skew between our
admission and the provider's count. The price: steady throughput is about
`1 - burst_s / 60` of the limit (94.6 % at `burst_s = 3`, 89.6 % at 6); a cold bucket
still gets the whole limit in its first minute. (Refilling at `limit / 60` instead would
let a full bucket plus a minute of refill through: `limit + capacity` per window, and
the provider's 429s.)

Priorities: after a take every bucket must still hold the priority's reserve
(`ratelimit.reserve`: P2 30 %, P1 10 %, P0 nothing) so that under a saturated provider
P0 work still flows. The reserve is capped at `capacity - amount`: any request that fits
the bucket at all fits a full one. A request larger than a bucket's capacity can never
fit and raises `RequestTooLarge` at once.

When the bucket says wait, the calling thread sleeps (the returned wait plus a little
jitter) and asks again, for at most `ratelimit.max_wait_s[priority]`, then raises
`RateLimited`. We do not re-queue the task instead: a task put back at the tail loses
its place (FIFO within a priority is a promise), one put back at the head jumps ahead
of tasks that waited longer on other workers, and a re-publish of a message that is
then acked late can run the task twice. Sleeping holds one pool thread; the thread was
going to wait for the provider anyway.

>>> limits = RateLimitSettings(models={"m": ModelLimit(rpm=600, tpm=90_000)})
>>> limiter = TokenBucketLimiter(redis.Redis(), limits)
>>> reservation = limiter.acquire("m", Priority.P1, tokens=4_000)
>>> reservation.reconcile(used_tokens=1_250)
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import redis
from redis.cluster import RedisCluster

from swarm_workers.config import ModelLimit, RateLimitSettings, Settings
from swarm_workers.deadline import Deadline
from swarm_workers.errors import ConfigError, RateLimited, RequestTooLarge
from swarm_workers.keys import Keys
from swarm_workers.metrics import BUCKET_WAIT
from swarm_workers.models import Priority
from swarm_workers.ratelimit.limiter import Reservation, Unlimited

__all__ = [
    "ALL_MODELS",
    "Bucket",
    "BucketReservation",
    "RedisTokenBucket",
    "RequestTooLarge",
    "TakeResult",
    "TokenBucketLimiter",
    "bucket_levels",
    "buckets_for",
]

log = logging.getLogger(__name__)

ALL_MODELS = "*"  # `ratelimit.models["*"]`: a limit shared by every model
WINDOW_S = 60.0  # the provider counts requests and tokens over this window
SKEW_S = 0.25  # allowed skew between our admission and the provider's count
JITTER = 0.1  # a sleeping thread wakes up to 10 % (+5 ms) after the bucket's hint
_SCRIPT = resources.files(__package__).joinpath("bucket.lua").read_text()

RedisClient = redis.Redis | RedisCluster  # both run the script; keys share one slot


@dataclass(frozen=True)
class Bucket:
    """One refilling limit: holds up to `capacity` units, gains `rate_per_s` each second.

    >>> Bucket("{swarm:rl:m}:rpm", capacity=60, rate_per_s=9.0)
    Bucket(key='{swarm:rl:m}:rpm', capacity=60, rate_per_s=9.0)
    """

    key: str
    capacity: float
    rate_per_s: float


@dataclass(frozen=True)
class TakeResult:
    """What one take answered: `ok`, else the seconds to wait and the bucket that waits.

    >>> TakeResult("wait", 0.25, "{swarm:rl:m}:tpm").ok
    False
    """

    status: Literal["ok", "wait", "too_large"]
    wait_s: float = 0.0
    bucket: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class RedisTokenBucket:
    """Several buckets taken together, all or nothing, in one Lua call on Redis' clock.

    The buckets' keys must share a hash tag (Redis Cluster runs a script on one slot).

    >>> pair = [Bucket("{rl:m}:rpm", 10, 1.5), Bucket("{rl:m}:tpm", 1000, 150)]
    >>> bucket = RedisTokenBucket(redis.Redis(), pair)
    >>> bucket.try_take([1, 300], reserve=0.3).ok
    True
    """

    def __init__(self, client: RedisClient, buckets: Sequence[Bucket]) -> None:
        if not buckets:
            raise ValueError("at least one bucket")
        for b in buckets:
            if b.capacity <= 0 or b.rate_per_s <= 0:
                raise ValueError(f"{b.key}: capacity and rate must be > 0, got {b}")
        self.buckets = tuple(buckets)
        self.keys = [b.key for b in buckets]
        self._script = client.register_script(_SCRIPT)  # EVALSHA, reloaded on NOSCRIPT

    def _call_raw(
        self, op: str, amounts: Sequence[float], reserve: float = 0.0
    ) -> list[bytes | str | int]:
        if len(amounts) != len(self.buckets):
            raise ValueError(f"{len(amounts)} amounts for {len(self.buckets)} buckets")
        args: list[str | float] = [op]
        for b, amount in zip(self.buckets, amounts, strict=True):
            args += [b.capacity, b.rate_per_s, reserve * b.capacity, amount]
        return list(self._script(keys=self.keys, args=args))

    def _call(self, op: str, amounts: Sequence[float], reserve: float = 0.0) -> list[int]:
        return [int(x) for x in self._call_raw(op, amounts, reserve)]

    def try_take(self, amounts: Sequence[float], reserve: float = 0.0) -> TakeResult:
        """Take `amounts[i]` from bucket i, leaving each at least `reserve` of its capacity."""
        status, wait_us, index = self._call("take", amounts, reserve)
        if status == 1:
            return TakeResult("ok")
        key = self.keys[index - 1]
        if status == -1:
            return TakeResult("too_large", 0.0, key)
        return TakeResult("wait", wait_us / 1e6, key)

    def take(
        self,
        amounts: Sequence[float],
        *,
        reserve: float = 0.0,
        max_wait_s: float = 60.0,
        deadline: Deadline | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Take, sleeping while the bucket says wait; returns the seconds waited.

        Raises `RequestTooLarge` at once for an amount above a capacity, `RateLimited`
        once `max_wait_s` has passed without a successful take, and TimeLimitExceeded
        when `deadline` runs out first (a task never outwaits its own time limit).
        """
        started = time.monotonic()
        while True:
            result = self.try_take(amounts, reserve)
            waited = time.monotonic() - started
            if result.ok:
                return waited
            assert result.bucket is not None
            if result.status == "too_large":
                index = self.keys.index(result.bucket)
                raise RequestTooLarge(result.bucket, amounts[index], self.buckets[index].capacity)
            if deadline is not None:
                deadline.check("waiting for the token bucket")  # the task's limit comes first
            remaining = max_wait_s - waited
            if remaining <= 0:
                raise RateLimited(result.bucket, waited, max_wait_s)
            if deadline is not None:
                remaining = min(remaining, deadline.remaining())
            nap = result.wait_s * (1 + JITTER * rand()) + 0.005 * rand()
            sleep(min(nap, remaining))

    def levels(self) -> list[float]:
        """Each bucket's level now, as a fraction of its capacity (< 0: in debt)."""
        reply = self._call_raw("peek", [0] * len(self.buckets))
        return [float(x) / b.capacity for x, b in zip(reply, self.buckets, strict=True)]

    def adjust(self, amounts: Sequence[float]) -> None:
        """Give back (> 0, dropped while blocked) or charge (< 0, may go into debt)."""
        self._call("adjust", amounts)

    def block(self, seconds: Sequence[float]) -> None:
        """Drain bucket i and refuse every take for `seconds[i]` (0 leaves it alone)."""
        self._call("block", [max(0, math.ceil(s * 1e6)) for s in seconds])


def buckets_for(
    key: str, limit: ModelLimit, burst_s: float, *, name: str = "?"
) -> tuple[Bucket, Bucket]:
    """The requests and tokens buckets of one limit: `<key>:rpm` and `<key>:tpm`.

    `name` is the model, for the error a bad limit raises.

    >>> rpm, tpm = buckets_for("{swarm:rl:m}", ModelLimit(rpm=600, tpm=60_000), 3.0)
    >>> rpm.key, rpm.capacity, round(rpm.rate_per_s, 4)
    ('{swarm:rl:m}:rpm', 30.0, 9.4606)
    """

    def one(kind: str, per_minute: int, minimum: float) -> Bucket:
        capacity = max(minimum, per_minute * burst_s / WINDOW_S)
        if capacity >= per_minute:
            raise ConfigError(
                f"a bucket of {capacity:g} leaves no refill inside a {per_minute}/minute limit; "
                "lower ratelimit.burst_s below 60 s or raise the limit",
                key=f"ratelimit.models.{name}.{kind}",
            )
        rate = (per_minute - capacity) / (WINDOW_S + SKEW_S)
        return Bucket(f"{key}:{kind}", capacity, rate)

    # One request must always fit the requests bucket.
    return one("rpm", limit.rpm, 1.0), one("tpm", limit.tpm, 0.0)


def bucket_levels(client: RedisClient, settings: Settings, model: str) -> dict[str, float]:
    """How full `model`'s buckets are now, 0 to 1; `{}` when it is not limited.

    The global (`"*"`) pair, when there is one, is named `*:rpm` and `*:tpm`.

    Usage::

        bucket_levels(redis.Redis(), settings, "kimi-k2-0905")  # {'rpm': 0.83, 'tpm': 0.41}
    """
    if not settings.ratelimit.enabled or not settings.ratelimit.models:
        return {}
    limiter = TokenBucketLimiter(client, settings.ratelimit, prefix=settings.key_prefix)
    bucket = limiter.bucket_for(model)
    if bucket is None:
        return {}
    names = [b.key.rsplit(":", 1)[1] for b in bucket.buckets]
    if limiter.global_limit is not None:  # the global pair comes last
        names[-2:] = [f"{ALL_MODELS}:{name}" for name in names[-2:]]
    levels = bucket.levels()
    return {name: min(1.0, max(0.0, level)) for name, level in zip(names, levels, strict=True)}


class BucketReservation:
    """One admitted request: settle it once, with `reconcile` or `cancel`.

    Usage::

        reservation = limiter.acquire("m", Priority.P2, tokens=3_000)
        reservation.reconcile(used_tokens=2_100)  # gives 900 tokens back
    """

    def __init__(self, bucket: RedisTokenBucket, tokens: int, waited_s: float = 0.0) -> None:
        self.bucket = bucket
        self.tokens = tokens
        self.waited_s = waited_s
        self._settled = False
        self._lock = threading.Lock()

    def _settle(self, requests: int, tokens: int) -> None:
        with self._lock:
            if self._settled:
                return
            self._settled = True
        if requests == 0 and tokens == 0:
            return
        # Buckets come in (rpm, tpm) pairs: the model's, then the global one.
        amounts = [requests, tokens] * (len(self.bucket.buckets) // 2)
        try:
            self.bucket.adjust(amounts)
        except redis.RedisError as exc:  # the buckets refill anyway; never fail a done call
            log.warning("rate limit: could not settle %s: %s", self.bucket.keys, exc)

    def reconcile(self, used_tokens: int) -> None:
        """Give back what was reserved but not used, or charge the overrun."""
        self._settle(0, self.tokens - used_tokens)

    def cancel(self) -> None:
        """The call produced no usage: give back the request and every token."""
        self._settle(1, self.tokens)


class TokenBucketLimiter:
    """The fleet's `Limiter`: per-model (and optional global) buckets in Redis.

    Models without a configured limit (and no `"*"` limit) are not limited.

    Usage::

        limiter = TokenBucketLimiter(redis.Redis(), settings.ratelimit, prefix="swarm")
        reservation = limiter.acquire("kimi-k2-0905", Priority.P0, tokens=9_000)
    """

    def __init__(
        self,
        client: RedisClient,
        settings: RateLimitSettings,
        *,
        prefix: str = "swarm",
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.client = client
        self.settings = settings
        self.prefix = prefix
        self._keys = Keys(prefix)
        self._sleep = sleep
        self._rand = rand
        self._buckets: dict[str, RedisTokenBucket | None] = {}
        self.global_limit = settings.models.get(ALL_MODELS)
        for model in settings.models:
            self.bucket_for(model)  # a bad limit fails at start, not on the first call

    def bucket_for(self, model: str) -> RedisTokenBucket | None:
        """The buckets one request for `model` takes from; None when it is not limited."""
        if model in self._buckets:
            return self._buckets[model]
        own = self.settings.models.get(model)
        burst = self.settings.burst_s
        found: list[Bucket] = []
        if self.global_limit is None:
            if own is not None:
                found += buckets_for(self._keys.bucket_tag(model), own, burst, name=model)
        else:
            # One hash tag for every key, since the global keys go in every call.
            tag = self._keys.bucket_tag(None)
            if own is not None and model != ALL_MODELS:
                found += buckets_for(f"{tag}:{model}", own, burst, name=model)
            found += buckets_for(f"{tag}:{ALL_MODELS}", self.global_limit, burst, name=ALL_MODELS)
        bucket = RedisTokenBucket(self.client, found) if found else None
        self._buckets[model] = bucket
        return bucket

    def acquire(
        self, model: str, priority: Priority, tokens: int, deadline: Deadline | None = None
    ) -> Reservation:
        """Wait until the fleet may send it, at most the priority's `max_wait_s` and never
        past `deadline` (TimeLimitExceeded)."""
        bucket = self.bucket_for(model)
        if bucket is None:
            return Unlimited().acquire(model, priority, tokens)
        tokens = max(0, tokens)
        waited = bucket.take(
            [1, tokens] * (len(bucket.buckets) // 2),
            reserve=self.settings.reserve.get(priority, 0.0),
            max_wait_s=self.settings.max_wait_s.get(priority, 60.0),
            deadline=deadline,
            sleep=self._sleep,
            rand=self._rand,
        )
        BUCKET_WAIT.labels(model, priority.value).observe(waited)
        return BucketReservation(bucket, tokens, waited)

    def penalize(self, model: str, retry_after_s: float) -> None:
        """Drain the model's buckets and block them fleet-wide for `retry_after_s`.

        Only the model's own pair is blocked; a model limited only by `"*"` blocks that.
        """
        bucket = self.bucket_for(model)
        if bucket is None or retry_after_s <= 0:
            return
        # The model's own pair comes first, the global pair (if any) after it.
        pairs = len(bucket.buckets) // 2
        bucket.block([retry_after_s, retry_after_s] + [0.0, 0.0] * (pairs - 1))
