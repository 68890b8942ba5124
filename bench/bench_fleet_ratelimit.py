"""A fleet against the fake provider at a limit well below demand: bucket on vs off.

Member processes run threads that loop like the agent's LLM step: acquire from the
limiter -> one chat completion through the real `openai` SDK (its own retries off) ->
reconcile with the reported usage. A 429 cancels the reservation, penalizes the model
for the provider's `Retry-After` and retries after it, at most 6 times (as
`agent.llm.complete` does). With `--bucket off` the limiter is `Unlimited`.

Utilisation is what the provider served during the run (its own token counters, read
at the start and the end) over what its limit allows (`tpm * seconds / 60`: use whole
minutes); the fleet's own records (calls admitted inside the run) give the same ratio.
Latency is one call as the caller sees it: bucket wait, 429 sleeps and retries included;
calls still waiting when the run ends count with the time they waited so far.

    python bench/bench_fleet_ratelimit.py --seconds 120 --procs 4 --threads 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import redis

from swarm_workers.config import ModelLimit, RateLimitSettings
from swarm_workers.errors import RateLimited
from swarm_workers.localfleet import FakeLLMSpec, FleetSpec, LocalFleet, ManagedProcess
from swarm_workers.models import Priority
from swarm_workers.ratelimit.base import Limiter, Unlimited
from swarm_workers.ratelimit.bucket import TokenBucketLimiter

BENCH = Path(__file__).resolve().parent
MODEL = "fake-model"
MAX_TOKENS = 200
ATTEMPTS = 7


def member(argv: Sequence[str]) -> None:
    """One fleet process; at the end of the run prints its records as JSON and exits."""
    url, base_url, prefix, rpm, tpm, burst, bucket, threads, start_at, seconds = argv
    limiter: Limiter = Unlimited()
    if bucket == "on":
        limits = RateLimitSettings(
            models={MODEL: ModelLimit(rpm=int(rpm), tpm=int(tpm))}, burst_s=float(burst)
        )
        limiter = TokenBucketLimiter(redis.Redis.from_url(url), limits, prefix=prefix)
    llm = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    until = float(start_at) + float(seconds)
    records: list[dict[str, object]] = []  # one per finished call
    running: dict[int, tuple[Priority, float]] = {}  # thread -> the call it is in
    lock = threading.Lock()

    def call(priority: Priority, content: str) -> None:
        prompt = 3 + 4 + math.ceil(len(content) / 4)
        started, attempts_429 = time.time(), 0
        with lock:
            running[threading.get_ident()] = (priority, started)
        outcome, admitted, used = "failed", 0.0, 0
        for _ in range(ATTEMPTS):
            try:
                reservation = limiter.acquire(MODEL, priority, prompt + MAX_TOKENS)
            except RateLimited:
                outcome = "rate_limited"
                break
            admitted = time.time()
            try:
                reply = llm.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": content}],
                    max_tokens=MAX_TOKENS,
                )
            except openai.RateLimitError as exc:
                reservation.cancel()
                hint = float(exc.response.headers.get("retry-after-ms", 1000)) / 1000
                limiter.penalize(MODEL, hint)
                attempts_429 += 1
                time.sleep(hint * (1 + 0.1 * random.random()))
                continue
            assert reply.usage is not None
            used = reply.usage.total_tokens
            reservation.reconcile(used)
            outcome = "ok"
            break
        record = {
            "priority": priority.value,
            "outcome": outcome,
            "admitted": admitted,
            "tokens": used,
            "latency": time.time() - started,
            "429s": attempts_429,
        }
        with lock:
            records.append(record)
            del running[threading.get_ident()]

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        time.sleep(max(0.0, float(start_at) - time.time()))
        while time.time() < until:
            # One thread in 16 is a P0 producer calling every 2 s; the rest is P2 demand.
            priority = Priority.P0 if seed % 16 == 0 else Priority.P2
            content = f"REPLY_LEN {rng.randint(40, 160)} " + "x" * rng.randint(0, 200)
            call(priority, content)
            if priority is Priority.P0:
                time.sleep(2.0)

    for i in range(int(threads)):
        threading.Thread(target=loop, args=(i,), daemon=True).start()
    time.sleep(max(0.0, until + 1.0 - time.time()))
    with lock:  # calls still waiting are cut off: their latency so far is a lower bound
        cut = [
            {"priority": priority.value, "outcome": "unfinished", "latency": until - started}
            for priority, started in running.values()
        ]
        print(json.dumps(records + cut), flush=True)
    sys.stdout.flush()
    os._exit(0)


def run(
    args: argparse.Namespace, fleet: LocalFleet, *, bucket: str, burst: float
) -> dict[str, object]:
    assert fleet.llm is not None
    fake = fleet.llm.root
    fleet.llm.reset()
    start_at = time.time() + 10  # members import meanwhile
    until = start_at + args.seconds
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import bench_fleet_ratelimit as b; "
        "b.member(sys.argv[1:])"
    )
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    member_args = [fleet.redis_url, fleet.llm.base_url, prefix, args.rpm, args.tpm, burst]
    member_args += [bucket, args.threads, start_at, args.seconds]
    children = [
        fleet.group.spawn(f"member-{i}", [sys.executable, "-c", code, *map(str, member_args)])
        for i in range(args.procs)
    ]
    time.sleep(max(0.0, start_at - 0.5 - time.time()))
    before = httpx.get(f"{fake}/_fake/stats").json()  # nobody calls before start_at
    time.sleep(max(0.0, until - time.time()))
    after = httpx.get(f"{fake}/_fake/stats").json()
    records = [r for child in children for r in _records(child, args.seconds + 60)]

    def served(stats: dict[str, int]) -> int:
        return stats["prompt_tokens"] + stats["completion_tokens"]

    inside = [r for r in records if r["outcome"] == "ok" and start_at <= r["admitted"] < until]
    # Latency of calls that finished, or were cut off at the end (their wait so far).
    timed = ("ok", "unfinished")
    p0 = sorted(r["latency"] for r in records if r["priority"] == "P0" and r["outcome"] in timed)
    p2 = sorted(r["latency"] for r in records if r["priority"] == "P2" and r["outcome"] in timed)
    allowed = args.tpm * args.seconds / 60
    provider_tokens = served(after) - served(before)
    return {
        "bucket": f"on, burst_s={burst:g}" if bucket == "on" else "off",
        "sent": after["requests"] - before["requests"],
        "ok": len(inside),
        "gave up": sum(r["outcome"] in ("failed", "rate_limited") for r in records),
        "cut off": sum(r["outcome"] == "unfinished" for r in records),
        "429s": after["rate_limited"]["limit"] - before["rate_limited"]["limit"],
        "tokens": provider_tokens,
        "utilisation": provider_tokens / allowed,
        "fleet utilisation": sum(r["tokens"] for r in inside) / allowed,
        "p0": _spread(p0),
        "p2": _spread(p2),
    }


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} / {values[-1]:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="per run; whole minutes")
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=16, help="per process")
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--tpm", type=int, default=24_000)
    parser.add_argument("--bursts", default="6,3", help="burst_s values to run the bucket with")
    parser.add_argument("--no-off", action="store_true", help="skip the run without the bucket")
    args = parser.parse_args()

    llm_flags = ("--rpm", str(args.rpm), "--tpm", str(args.tpm), "--model", MODEL)
    spec = FleetSpec(llm=FakeLLMSpec((*llm_flags, "--latency-uniform", "20", "80")))
    with tempfile.TemporaryDirectory() as tmp, LocalFleet(spec, Path(tmp)) as fleet:
        runs = [("on", float(b)) for b in args.bursts.split(",") if b]
        if not args.no_off:
            runs.append(("off", 0.0))
        rows = [run(args, fleet, bucket=bucket, burst=burst) for bucket, burst in runs]

    demand = args.procs * args.threads
    print(
        f"\n{args.procs} processes x {args.threads} threads ({demand} callers), "
        f"provider limit {args.rpm} rpm / {args.tpm} tpm, {args.seconds:g} s per run\n"
    )
    print(
        "| bucket | calls sent | ok | gave up | cut off | 429s | tokens served (provider) "
        "| utilisation | utilisation (fleet records) | P0 latency p50 / max "
        "| P2 latency p50 / max |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['bucket']} | {row['sent']:,} | {row['ok']:,} | {row['gave up']:,} "
            f"| {row['cut off']:,} | {row['429s']:,} | {row['tokens']:,} "
            f"| {row['utilisation']:.1%} | {row['fleet utilisation']:.1%} "
            f"| {row['p0']} | {row['p2']} |"
        )
    return 0


def _records(member: ManagedProcess, timeout: float) -> list[dict[str, Any]]:
    """A member's records: the JSON line it prints last (its log holds stderr too)."""
    member.wait(timeout)
    lines = [line for line in member.output().splitlines() if line.startswith("[")]
    if member.proc.returncode != 0 or not lines:
        raise RuntimeError(f"{member.name} failed:\n{member.output()[-2000:]}")
    records: list[dict[str, Any]] = json.loads(lines[-1])
    return records


if __name__ == "__main__":
    raise SystemExit(main())
