"""Token bucket calls per second on a real Redis: one client, threads, processes.

Every call is one EVALSHA of `bucket.lua` over a requests and a tokens bucket. The
bucket is sized so that takes always succeed (we measure the call, not the limit).
A PING loop on the same connection gives the round-trip floor; the server's own time
per EVALSHA (from INFO commandstats, before and after) is what the script costs Redis.

    python bench/bench_bucket.py --redis-url redis://127.0.0.1:6379/0 --seconds 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

from swarm_workers.config import ModelLimit, RateLimitSettings
from swarm_workers.localfleet import ProcessGroup
from swarm_workers.models import Priority
from swarm_workers.ratelimit.bucket import TokenBucketLimiter

BENCH = Path(__file__).resolve().parent
HUGE = ModelLimit(rpm=10**9, tpm=10**12)


def limiter(url: str, prefix: str) -> TokenBucketLimiter:
    settings = RateLimitSettings(models={"m": HUGE})
    return TokenBucketLimiter(redis.Redis.from_url(url), settings, prefix=prefix)


def count_calls(call: Callable[[], object], seconds: float) -> int:
    calls, until = 0, time.perf_counter() + seconds
    while time.perf_counter() < until:
        call()
        calls += 1
    return calls


def loop(url: str, prefix: str, kind: str, seconds: float, threads: int) -> float:
    """Calls per second of `kind` from `threads` threads of this process."""
    lim = limiter(url, prefix)
    bucket = lim.bucket_for("m")
    assert bucket is not None
    conn = redis.Redis.from_url(url)
    calls = {
        "ping": conn.ping,
        "take": lambda: bucket.try_take([1, 100], 0.3),
        "acquire+reconcile": lambda: lim.acquire("m", Priority.P2, 100).reconcile(60),
    }[kind]
    counts: list[int] = []
    workers = [
        threading.Thread(target=lambda: counts.append(count_calls(calls, seconds)))
        for _ in range(threads)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def in_processes(url: str, prefix: str, kind: str, seconds: float, procs: int) -> float:
    """Calls per second of `kind` summed over `procs` processes, one thread each."""
    code = (
        f"import sys, json; sys.path.insert(0, {str(BENCH)!r}); import bench_bucket as b; "
        "print(json.dumps(b.loop(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), 1)))"
    )
    with tempfile.TemporaryDirectory() as tmp, ProcessGroup(log_dir=Path(tmp)) as group:
        children = [
            group.spawn(f"loop-{i}", [sys.executable, "-c", code, url, prefix, kind, str(seconds)])
            for i in range(procs)
        ]
        for child in children:
            child.wait(seconds + 60)
        # Each child's last line is its rate (its log holds any warnings too).
        return sum(float(child.output().split()[-1]) for child in children)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"  # own keys; they expire by themselves
    conn = redis.Redis.from_url(args.redis_url)
    before = evalsha_stats(conn)
    rows = []
    for kind in ("ping", "take", "acquire+reconcile"):
        one = loop(args.redis_url, prefix, kind, args.seconds, 1)
        threaded = loop(args.redis_url, prefix, kind, args.seconds, args.threads)
        spread = in_processes(args.redis_url, prefix, kind, args.seconds, args.procs)
        rows.append((kind, one, threaded, spread))
    print(
        f"| call | 1 client, 1 thread | 1 process, {args.threads} threads | "
        f"{args.procs} processes |"
    )
    print("|---|---:|---:|---:|")
    for kind, one, threaded, spread in rows:
        print(f"| {kind} | {one:,.0f}/s | {threaded:,.0f}/s | {spread:,.0f}/s |")
    after = evalsha_stats(conn)
    calls, usec = after[0] - before[0], after[1] - before[1]
    print(
        f"\nserver time per EVALSHA of bucket.lua: {usec / max(calls, 1):.1f} us ({calls:,} calls)"
    )
    return 0


def evalsha_stats(conn: redis.Redis) -> tuple[int, int]:
    """(calls, total microseconds) of EVALSHA since the server started."""
    stats = conn.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


if __name__ == "__main__":
    raise SystemExit(main())
