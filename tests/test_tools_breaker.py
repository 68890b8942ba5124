"""The fleet circuit breaker on a real Redis: transitions, the single half-open probe."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot

from swarm_workers.config import BreakerSettings
from swarm_workers.metrics import REGISTRY
from swarm_workers.tools.breaker import CircuitBreaker

Pair = tuple[CircuitBreaker, CircuitBreaker]
FAST = BreakerSettings(failures=3, window_s=5.0, slow_call_ms=200.0, cooldown_s=0.3)


@pytest.fixture
def breakers(redis_url: str) -> Iterator[Pair]:
    """Two workers' breakers: separate clients, the same Redis state."""
    first, second = redis.Redis.from_url(redis_url), redis.Redis.from_url(redis_url)
    yield (
        CircuitBreaker(first, "swarm", FAST, probe_lease_s=1.0),
        CircuitBreaker(second, "swarm", FAST, probe_lease_s=1.0),
    )
    first.close()
    second.close()


def _fail(breaker: CircuitBreaker, server: str, times: int) -> None:
    for _ in range(times):
        permit = breaker.allow(server)
        assert permit.allowed
        breaker.record(permit, ok=False, reason="boom")


def test_opens_after_failures_and_every_worker_fails_fast(breakers: Pair) -> None:
    a, b = breakers
    _fail(a, "search", 2)
    assert b.state("search").state == "closed"
    assert b.state("search").recent_failures == 2
    _fail(a, "search", 1)
    permit = b.allow("search")  # the other worker learns it without trying
    assert not permit.allowed
    assert permit.state == "open"
    assert 0 < permit.retry_after_s <= FAST.cooldown_s
    assert b.state("search").reason == "boom"
    assert a.allow("other").allowed  # per server
    gauge = "swarm_breaker_state"
    assert REGISTRY.get_sample_value(gauge, {"server": "search"}) == 2.0  # open
    assert REGISTRY.get_sample_value(gauge, {"server": "other"}) == 0.0  # closed


def test_slow_calls_count_as_failures(breakers: Pair) -> None:
    a, _ = breakers
    for _ in range(3):
        permit = a.allow("slow")
        a.record(permit, ok=True, latency_s=0.25)  # 250 ms > 200 ms
    state = a.state("slow")
    assert state.state == "open"
    assert "slow call" in (state.reason or "")


def test_fast_successes_do_not_count(breakers: Pair) -> None:
    a, _ = breakers
    for _ in range(10):
        a.record(a.allow("ok"), ok=True, latency_s=0.01)
    assert a.state("ok").recent_failures == 0


def test_half_open_admits_exactly_one_probe_across_workers(breakers: Pair) -> None:
    a, b = breakers
    _fail(a, "flaky", 3)
    time.sleep(FAST.cooldown_s + 0.05)
    permits = []
    lock = threading.Lock()

    def ask(breaker: CircuitBreaker) -> None:
        permit = breaker.allow("flaky")
        with lock:
            permits.append(permit)

    threads = [threading.Thread(target=ask, args=(a if i % 2 else b,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    probes = [p for p in permits if p.is_probe]
    assert len(probes) == 1
    assert sum(p.allowed for p in permits) == 1
    assert all(p.state == "half_open" for p in permits)


def test_probe_success_closes_for_everyone(breakers: Pair) -> None:
    a, b = breakers
    _fail(a, "s", 3)
    time.sleep(FAST.cooldown_s + 0.05)
    probe = b.allow("s")
    assert probe.is_probe
    assert b.record(probe, ok=True, latency_s=0.01) == "closed"
    assert a.allow("s").allowed
    assert a.state("s").recent_failures == 0


def test_probe_failure_reopens_for_a_new_cooldown(breakers: Pair) -> None:
    a, b = breakers
    _fail(a, "s", 3)
    time.sleep(FAST.cooldown_s + 0.05)
    probe = a.allow("s")
    assert a.record(probe, ok=False, reason="still down") == "open"
    denied = b.allow("s")
    assert not denied.allowed
    assert denied.retry_after_s > FAST.cooldown_s / 2
    # A slow probe also re-opens.
    time.sleep(FAST.cooldown_s + 0.05)
    probe = b.allow("s")
    assert b.record(probe, ok=True, latency_s=0.5) == "open"


def test_a_dead_probe_lease_lets_another_worker_probe(breakers: Pair) -> None:
    a, b = breakers
    _fail(a, "s", 3)
    time.sleep(FAST.cooldown_s + 0.05)
    assert a.allow("s").is_probe  # this worker dies without recording
    assert not b.allow("s").allowed
    time.sleep(1.1)  # the 1 s lease runs out
    assert b.allow("s").is_probe


def test_late_outcomes_do_not_move_the_breaker(breakers: Pair) -> None:
    a, b = breakers
    early = a.allow("s")  # a call that started while closed...
    _fail(b, "s", 3)  # ...while others trip the breaker
    time.sleep(FAST.cooldown_s + 0.05)
    probe = b.allow("s")
    assert a.record(early, ok=True, latency_s=0.01) == "half_open"  # only the probe decides
    assert a.record(early, ok=False) == "half_open"
    assert b.record(probe, ok=True) == "closed"


def test_failures_outside_the_window_expire(redis_conn: redis.Redis) -> None:
    breaker = CircuitBreaker(
        redis_conn, "swarm", BreakerSettings(failures=2, window_s=0.3, cooldown_s=1.0)
    )
    _fail(breaker, "s", 1)
    time.sleep(0.4)
    _fail(breaker, "s", 1)
    assert breaker.state("s").state == "closed"


def test_a_breakers_keys_share_one_hash_slot(breakers: Pair, redis_conn: redis.Redis) -> None:
    """The script touches all three keys: on Redis Cluster they must sit in one slot."""
    a, _ = breakers
    _fail(a, "docs", 1)
    keys = [k.decode() for k in redis_conn.keys("*breaker*")]
    assert keys == ["{swarm:breaker:docs}:failures"]
    assert len({key_slot(k.encode()) for k in a._keys("docs")}) == 1


def test_release_frees_the_probe_and_judges_nothing(breakers: Pair) -> None:
    a, b = breakers
    _fail(a, "s", 3)
    time.sleep(FAST.cooldown_s + 0.05)
    probe = a.allow("s")
    assert probe.is_probe
    a.release(probe)  # the call never went out
    state = b.state("s")
    assert (state.state, state.probe_pending) == ("half_open", False)
    assert b.allow("s").is_probe  # another worker may probe at once
