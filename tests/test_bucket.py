"""The Redis token bucket: exactness, atomicity, priorities, settling, penalties, TTLs.

Almost every test runs against a real redis-server (conftest starts one); the last
ones run the same script on fakeredis and on a one-node Redis Cluster.
"""

from __future__ import annotations

import bisect
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from swarm_workers.config import ModelLimit, RateLimitSettings, load_settings
from swarm_workers.deadline import Deadline
from swarm_workers.errors import ConfigError, RateLimited, TimeLimitExceeded
from swarm_workers.localfleet import ProcessGroup, start_redis
from swarm_workers.models import Priority
from swarm_workers.ratelimit import (
    Bucket,
    BucketReservation,
    RedisTokenBucket,
    RequestTooLarge,
    TokenBucketLimiter,
    Unlimited,
    build_limiter,
)
from swarm_workers.ratelimit.bucket import bucket_levels, buckets_for

from .conftest import free_port, wait_until

SLOW = 1e-3  # a refill rate so slow that levels do not move during a test


def level(conn: redis.Redis, key: str) -> float:
    value = conn.hget(key, "lvl")
    assert value is not None, f"{key} has no level"
    return float(value)


def pair(
    conn: redis.Redis, cap_r: float = 10, cap_t: float = 100, rate: float = SLOW
) -> RedisTokenBucket:
    return RedisTokenBucket(
        conn, [Bucket("{t:m}:rpm", cap_r, rate), Bucket("{t:m}:tpm", cap_t, rate)]
    )


def limits(**models: ModelLimit) -> RateLimitSettings:
    return RateLimitSettings(
        models=models,
        burst_s=30.0,
        max_wait_s={Priority.P0: 5.0, Priority.P1: 5.0, Priority.P2: 0.2},
    )


# --------------------------------------------------------------------------- the script


def test_a_missing_key_is_a_full_bucket_and_an_empty_one_says_how_long(
    redis_conn: redis.Redis,
) -> None:
    bucket = RedisTokenBucket(redis_conn, [Bucket("{t}:rpm", 10, 2.0)])
    assert all(bucket.try_take([1]).ok for _ in range(10))
    result = bucket.try_take([1])
    assert result.status == "wait"
    assert result.bucket == "{t}:rpm"
    assert 0.2 < result.wait_s <= 0.5  # one unit at 2/s, minus the refill since


def test_all_or_nothing_across_the_requests_and_tokens_buckets(redis_conn: redis.Redis) -> None:
    bucket = pair(redis_conn)
    assert bucket.try_take([1, 100]).ok
    refused = bucket.try_take([1, 1])
    assert refused.status == "wait"
    assert refused.bucket == "{t:m}:tpm"
    assert level(redis_conn, "{t:m}:rpm") == pytest.approx(9, abs=0.01)  # untouched
    too_large = bucket.try_take([1, 101])
    assert too_large.status == "too_large"
    assert too_large.bucket == "{t:m}:tpm"
    assert level(redis_conn, "{t:m}:rpm") == pytest.approx(9, abs=0.01)


def test_refill_is_continuous(redis_conn: redis.Redis) -> None:
    bucket = RedisTokenBucket(redis_conn, [Bucket("{t}:tpm", 100, 100.0)])
    assert bucket.try_take([100]).ok
    time.sleep(0.25)
    assert bucket.try_take([20]).ok  # ~25 refilled, not a whole-second step
    result = bucket.try_take([30])
    assert result.status == "wait"
    assert 0.0 < result.wait_s < 0.3  # the 10 missing, at 100/s, less any late wake-up


def test_reserve_per_priority(redis_conn: redis.Redis) -> None:
    bucket = RedisTokenBucket(redis_conn, [Bucket("{t}:tpm", 100, SLOW)])
    assert bucket.try_take([60], reserve=0.0).ok  # 40 left
    assert not bucket.try_take([11], reserve=0.3).ok  # P2 would leave 29 < 30
    assert bucket.try_take([10], reserve=0.3).ok  # P2 leaves exactly 30
    assert not bucket.try_take([21], reserve=0.1).ok  # P1 would leave 9 < 10
    assert bucket.try_take([20], reserve=0.1).ok  # P1 leaves 10
    assert bucket.try_take([10], reserve=0.0).ok  # P0 may take the last token
    assert level(redis_conn, "{t}:tpm") == pytest.approx(0, abs=0.01)


def test_any_request_that_fits_the_bucket_fits_a_full_one(redis_conn: redis.Redis) -> None:
    bucket = RedisTokenBucket(redis_conn, [Bucket("{t}:tpm", 100, SLOW)])
    assert bucket.try_take([95], reserve=0.3).ok  # the reserve is capped at capacity - amount


def test_adjust_gives_back_up_to_capacity_and_charges_into_debt(redis_conn: redis.Redis) -> None:
    bucket = RedisTokenBucket(redis_conn, [Bucket("{t}:tpm", 100, SLOW)])
    assert bucket.try_take([50]).ok
    bucket.adjust([500])
    assert level(redis_conn, "{t}:tpm") == pytest.approx(100, abs=0.01)
    bucket.adjust([-130])
    assert level(redis_conn, "{t}:tpm") == pytest.approx(-30, abs=0.01)
    assert bucket.try_take([1]).wait_s > 30 / SLOW * 0.99


def test_keys_expire_once_they_would_be_full_again(redis_conn: redis.Redis) -> None:
    bucket = RedisTokenBucket(redis_conn, [Bucket("{t}:rpm", 10, 100.0)])
    assert bucket.try_take([10]).ok
    ttl = redis_conn.pttl("{t}:rpm")
    assert 1000 < ttl <= 1100  # 100 ms to refill + 1 s
    slow = RedisTokenBucket(redis_conn, [Bucket("{t}:slow", 100, 1.0)])
    assert slow.try_take([40]).ok
    assert 40_000 < redis_conn.pttl("{t}:slow") <= 41_000
    slow.block([30.0])
    assert 130_000 < redis_conn.pttl("{t}:slow") <= 131_100  # 30 s blocked + 100 s refill
    wait_until(lambda: not redis_conn.exists("{t}:rpm"), 3, "the idle key to expire")


def test_bucket_levels_reads_how_full_without_writing(redis_conn: redis.Redis) -> None:
    settings = load_settings(
        None,
        redis_url="redis://127.0.0.1:1/0",
        ratelimit={"models": {"m": {"rpm": 600, "tpm": 1200}}, "burst_s": 30},
    )
    assert bucket_levels(redis_conn, settings, "m") == {"rpm": 1.0, "tpm": 1.0}
    assert redis_conn.keys("*") == []  # a peek writes nothing
    assert bucket_levels(redis_conn, settings, "unlimited-model") == {}
    limiter = TokenBucketLimiter(redis_conn, settings.ratelimit)
    limiter.acquire("m", Priority.P0, 450)  # of 600
    levels = bucket_levels(redis_conn, settings, "m")
    assert levels["tpm"] == pytest.approx(0.25, abs=0.01)
    assert levels["rpm"] == pytest.approx(299 / 300, abs=0.01)
    limiter.penalize("m", 5.0)
    assert bucket_levels(redis_conn, settings, "m") == {"rpm": 0.0, "tpm": 0.0}


def test_noscript_fallback_reloads_the_script(redis_conn: redis.Redis) -> None:
    bucket = pair(redis_conn)
    assert bucket.try_take([1, 1]).ok
    redis_conn.script_flush()
    assert bucket.try_take([1, 1]).ok
    assert level(redis_conn, "{t:m}:tpm") == pytest.approx(98, abs=0.01)


def test_concurrent_threads_never_take_more_than_capacity_plus_refill(
    redis_conn: redis.Redis,
) -> None:
    capacity, rate, duration = 50.0, 200.0, 2.0
    bucket = RedisTokenBucket(redis_conn, [Bucket("{t}:rpm", capacity, rate)])
    taken: list[int] = []
    stop = time.monotonic() + duration
    start = time.monotonic()

    def hammer() -> None:
        mine = 0
        while time.monotonic() < stop:
            mine += bucket.try_take([1]).ok
        taken.append(mine)

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    allowed = capacity + rate * elapsed
    assert sum(taken) <= allowed * 1.01
    assert sum(taken) >= allowed * 0.9  # the hammering saturates it


HAMMER = """
import json, sys, time
import redis
from swarm_workers.ratelimit.bucket import Bucket, RedisTokenBucket
conn = redis.Redis.from_url(sys.argv[1])
pair = [Bucket("{p:m}:rpm", 20, 150.0), Bucket("{p:m}:tpm", 200, 1000.0)]
bucket = RedisTokenBucket(conn, pair)
print("ready", flush=True)
sys.stdin.readline()
until, admitted = time.time() + float(sys.argv[2]), []
while time.time() < until:
    if bucket.try_take([1, 7]).ok:
        admitted.append(time.time())
print(json.dumps(admitted), flush=True)
"""


def test_processes_never_exceed_the_limit_in_any_window(redis_url: str) -> None:
    """4 processes: every window of w seconds holds <= capacity + rate * w."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, redis_url, "3.0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        times = sorted(t for proc in procs for t in json.loads(proc.communicate(timeout=60)[0]))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert times, "nothing was admitted"

    # Per second: requests 150 (+20 at once), tokens 1000 (+200) at 7 a request.
    def allowed(seconds: float) -> float:
        return min(20 + 150 * seconds, (200 + 1000 * seconds) / 7)

    for window in (0.1, 0.5, 1.0, 2.0):
        most = max(bisect.bisect_left(times, t + window) - i for i, t in enumerate(times))
        assert most <= allowed(window + 0.005) * 1.01, window  # 5 ms for the clocks
    assert len(times) >= 1000 / 7 * 2.5  # saturated for most of the 3 s


# --------------------------------------------------------------------------- the limiter


def test_build_limiter_uses_the_bucket_only_for_limited_models(redis_conn: redis.Redis) -> None:
    base = {"redis_url": "redis://127.0.0.1:1/0"}
    assert isinstance(build_limiter(load_settings(None, **base), redis_conn), Unlimited)
    limited = {"models": {"m": {"rpm": 60, "tpm": 6000}}}
    off = load_settings(None, ratelimit={**limited, "enabled": False}, **base)
    assert isinstance(build_limiter(off, redis_conn), Unlimited)
    on = load_settings(None, ratelimit=limited, **base)
    limiter = build_limiter(on, redis_conn)
    assert isinstance(limiter, TokenBucketLimiter)
    limiter.acquire("other-model", Priority.P2, 10**9).reconcile(5)  # not limited: free
    assert redis_conn.keys("*") == []
    limiter.acquire("m", Priority.P2, 100).reconcile(50)
    assert sorted(redis_conn.keys("*")) == [b"{swarm:rl:m}:rpm", b"{swarm:rl:m}:tpm"]


def test_a_burst_without_room_for_refill_is_a_config_error(redis_conn: redis.Redis) -> None:
    settings = RateLimitSettings(models={"m": ModelLimit(rpm=60, tpm=6000)}, burst_s=60)
    with pytest.raises(ConfigError, match=r"ratelimit\.models\.m\.rpm"):
        TokenBucketLimiter(redis_conn, settings)


def test_capacity_and_refill_fit_the_provider_window() -> None:
    rpm, tpm = buckets_for("{x}", ModelLimit(rpm=600, tpm=90_000), 6.0)
    assert rpm.capacity == 60
    assert tpm.capacity == 9000
    for bucket, limit in ((rpm, 600), (tpm, 90_000)):
        assert bucket.capacity + 60 * bucket.rate_per_s <= limit  # any 60 s window
        assert bucket.capacity + 60 * bucket.rate_per_s >= limit * 0.99


def test_a_request_larger_than_the_bucket_fails_at_once(redis_conn: redis.Redis) -> None:
    limiter = TokenBucketLimiter(redis_conn, limits(m=ModelLimit(rpm=600, tpm=1200)))
    started = time.monotonic()
    with pytest.raises(RequestTooLarge, match="exceeds the bucket's capacity of 600") as info:
        limiter.acquire("m", Priority.P0, 601)
    assert isinstance(info.value, RateLimited)
    assert info.value.key == "{swarm:rl:m}:tpm"
    assert time.monotonic() - started < 0.5
    assert redis_conn.keys("*") == []  # nothing taken


def _recording_sleep(naps: list[float]) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        naps.append(seconds)
        time.sleep(seconds)

    return sleep


def test_p2_is_held_back_while_p0_still_flows(redis_conn: redis.Redis) -> None:
    naps: list[float] = []
    limiter = TokenBucketLimiter(
        redis_conn, limits(m=ModelLimit(rpm=60_000, tpm=1200)), sleep=_recording_sleep(naps)
    )
    # tpm: capacity 600, refill ~10/s; P2 keeps 180 (30 %) back
    admitted = 0
    while True:
        try:
            limiter.acquire("m", Priority.P2, 50)
        except RateLimited:
            break
        admitted += 1
    assert admitted in (8, 9)  # 420 of 600, plus what refilled meanwhile
    naps.clear()
    for _ in range(3):
        limiter.acquire("m", Priority.P0, 50)
    assert naps == []  # P0 took from the reserve without waiting


def test_reconcile_gives_tokens_back_for_immediate_use(redis_conn: redis.Redis) -> None:
    naps: list[float] = []
    limiter = TokenBucketLimiter(
        redis_conn, limits(m=ModelLimit(rpm=60_000, tpm=1200)), sleep=_recording_sleep(naps)
    )
    reservation = limiter.acquire("m", Priority.P2, 400)
    with pytest.raises(RateLimited):
        limiter.acquire("m", Priority.P2, 300)  # 200 left, P2 must keep 180
    reservation.reconcile(100)  # 300 back
    naps.clear()
    limiter.acquire("m", Priority.P2, 300)
    assert naps == []  # usable at once


def test_reconcile_charges_an_overrun_and_settles_once(redis_conn: redis.Redis) -> None:
    bucket = pair(redis_conn)
    assert bucket.try_take([1, 40]).ok
    reservation = BucketReservation(bucket, 40)
    reservation.reconcile(70)
    reservation.reconcile(0)
    reservation.cancel()
    assert level(redis_conn, "{t:m}:tpm") == pytest.approx(30, abs=0.01)
    assert level(redis_conn, "{t:m}:rpm") == pytest.approx(9, abs=0.01)


def test_cancel_gives_back_the_request_and_every_token(redis_conn: redis.Redis) -> None:
    bucket = pair(redis_conn)
    assert bucket.try_take([1, 40]).ok
    BucketReservation(bucket, 40).cancel()
    assert level(redis_conn, "{t:m}:tpm") == pytest.approx(100, abs=0.01)
    assert level(redis_conn, "{t:m}:rpm") == pytest.approx(10, abs=0.01)


def test_the_waiting_thread_sleeps_and_retries(redis_conn: redis.Redis) -> None:
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        time.sleep(seconds)

    settings = limits(m=ModelLimit(rpm=60_000, tpm=1200))
    limiter = TokenBucketLimiter(redis_conn, settings, sleep=sleep)
    limiter.acquire("m", Priority.P0, 600)
    reservation = limiter.acquire("m", Priority.P0, 5)  # ~10 tokens/s: half a second
    assert isinstance(reservation, BucketReservation)
    assert 0.45 < reservation.waited_s < 1.0
    assert 0.3 < naps[0] < 0.6  # the bucket's hint (0.5 s less time passed) + <= 10 % + 5 ms


def test_penalize_makes_every_client_back_off(redis_url: str) -> None:
    settings = limits(m=ModelLimit(rpm=60_000, tpm=60_000))
    one, two = redis.Redis.from_url(redis_url), redis.Redis.from_url(redis_url)
    first, second = TokenBucketLimiter(one, settings), TokenBucketLimiter(two, settings)
    held = first.acquire("m", Priority.P0, 1000)
    first.penalize("m", 1.0)
    with pytest.raises(RateLimited):
        second.acquire("m", Priority.P2, 1)  # P2 may wait 0.2 s only
    held.cancel()  # a refund while blocked is dropped: the provider said we are over
    assert level(two, "{swarm:rl:m}:tpm") <= 0
    started = time.monotonic()
    second.acquire("m", Priority.P0, 1)
    assert 0.7 < time.monotonic() - started < 2.0


def test_the_task_deadline_bounds_the_wait_before_max_wait(redis_conn: redis.Redis) -> None:
    naps: list[float] = []
    settings = limits(m=ModelLimit(rpm=60_000, tpm=60_000))
    limiter = TokenBucketLimiter(redis_conn, settings, sleep=_recording_sleep(naps))
    limiter.penalize("m", 60.0)
    deadline = Deadline.start(0.5)
    with pytest.raises(TimeLimitExceeded, match="waiting for the token bucket"):
        limiter.acquire("m", Priority.P0, 1, deadline)
    assert naps  # it did wait...
    assert sum(naps) <= deadline.limit_s  # ...only as long as the deadline allowed
    assert sum(naps) < settings.max_wait_s[Priority.P0] / 2
    naps.clear()
    with pytest.raises(TimeLimitExceeded):  # an expired deadline does not wait at all
        limiter.acquire("m", Priority.P0, 1, deadline)
    assert naps == []


def test_a_global_limit_is_shared_by_every_model(redis_conn: redis.Redis) -> None:
    settings = limits(a=ModelLimit(rpm=60_000, tpm=60_000), **{"*": ModelLimit(rpm=600, tpm=1200)})
    limiter = TokenBucketLimiter(redis_conn, settings)
    limiter.acquire("a", Priority.P0, 400)
    limiter.acquire("b", Priority.P0, 200)  # no own limit, only the global one
    with pytest.raises(RateLimited):
        limiter.acquire("b", Priority.P2, 100)  # the global bucket holds ~0: P2 refused
    keys = sorted(k.decode() for k in redis_conn.keys("*"))
    assert keys == ["{swarm:rl}:*:rpm", "{swarm:rl}:*:tpm", "{swarm:rl}:a:rpm", "{swarm:rl}:a:tpm"]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    limiter.penalize("a", 5.0)  # blocks a's own buckets, not every model
    limiter.acquire("b", Priority.P0, 1)
    with pytest.raises(RateLimited):
        limiter.acquire("a", Priority.P2, 1)


# --------------------------------------------------------------------------- other Redises


def test_the_script_runs_on_fakeredis() -> None:
    conn = fakeredis.FakeRedis()
    bucket = pair(conn)
    assert bucket.try_take([1, 60]).ok
    assert bucket.try_take([1, 41]).status == "wait"
    BucketReservation(bucket, 60).reconcile(20)
    assert bucket.try_take([1, 80]).ok
    assert bucket.try_take([1, 101]).status == "too_large"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[RedisCluster, redis.Redis]]:
    """A one-node Redis Cluster: it refuses scripts whose keys span hash slots."""
    port = _cluster_port()
    cluster_args = (
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(tmp_path / "nodes.conf"),
    )
    with ProcessGroup() as group:
        start_redis(group, tmp_path, port=port, extra_args=cluster_args)
        node = redis.Redis(port=port)
        node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_until(
            lambda: b"cluster_state:ok" in node.execute_command("CLUSTER", "INFO"),
            30,
            "the cluster to be ok",
        )
        client = RedisCluster(host="127.0.0.1", port=port)
        yield client, node
        client.close()
        node.close()


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and below 65536 too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def test_one_call_stays_in_one_hash_slot_on_redis_cluster(
    cluster: tuple[RedisCluster, redis.Redis],
) -> None:
    client, node = cluster
    settings = limits(m=ModelLimit(rpm=600, tpm=1200), **{"*": ModelLimit(rpm=900, tpm=9000)})
    limiter = TokenBucketLimiter(client, settings)
    limiter.acquire("m", Priority.P1, 100).reconcile(80)
    limiter.penalize("m", 0.1)
    plain = TokenBucketLimiter(client, limits(m=ModelLimit(rpm=600, tpm=1200)))
    plain.acquire("m", Priority.P1, 100).cancel()
    # The server itself refuses keys in two slots, so the calls above proved something.
    spread = RedisTokenBucket(node, [Bucket("{a}:rpm", 10, 1.0), Bucket("{b}:rpm", 10, 1.0)])
    with pytest.raises(redis.ResponseError, match="same slot"):
        spread.try_take([1, 1])
