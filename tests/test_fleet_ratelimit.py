"""A fleet of processes shares one bucket in front of the fake provider (60 s windows).

Members are plain Python processes, each running threads that loop: acquire from the
Redis bucket -> a real `openai` SDK call to the fake provider -> reconcile with the
usage it reports (a 429 would cancel and penalize). The fake enforces the same limits
over a sliding 60 s window; the fleet must never trip it.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis

from swarm_workers.client import SwarmClient
from swarm_workers.config import ModelLimit, RateLimitSettings, load_settings
from swarm_workers.errors import RateLimited
from swarm_workers.models import Priority
from swarm_workers.ratelimit.bucket import TokenBucketLimiter

from .conftest import ROOT, FakeLLM, WorkerFactory, spawn_fake_llm

MODEL = "fake-model"
RPM, TPM = 300, 24_000
MAX_TOKENS = 200
RUN_S = 70.0


def member(argv: Sequence[str]) -> None:
    """One fleet process: `redis_url base_url priority threads start_at run_s pause_s`."""
    url, base_url, level, threads, start_at, run_s, pause_s = argv
    limits = RateLimitSettings(models={MODEL: ModelLimit(rpm=RPM, tpm=TPM)})
    limiter = TokenBucketLimiter(redis.Redis.from_url(url), limits)
    llm = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    priority, pause = Priority(level), float(pause_s)
    # A member that is ready late (its imports took long on a loaded machine) still runs
    # for run_s: a deadline fixed before the imports could pass before its first request.
    until = max(float(start_at), time.time()) + float(run_s)
    records: list[dict[str, object]] = []
    lock = threading.Lock()

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        time.sleep(max(0.0, float(start_at) - time.time()))
        while time.time() < until:
            content = f"REPLY_LEN {rng.randint(40, 160)} " + "x" * rng.randint(0, 200)
            prompt = 3 + 4 + math.ceil(len(content) / 4)  # the fake's count, exactly
            asked = time.time()
            try:
                reservation = limiter.acquire(MODEL, priority, prompt + MAX_TOKENS)
            except RateLimited:
                with lock:
                    records.append({"t": asked, "wait": time.time() - asked, "status": "bound"})
                continue
            admitted = time.time()
            try:
                reply = llm.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": content}],
                    max_tokens=MAX_TOKENS,
                )
            except openai.RateLimitError:
                reservation.cancel()
                limiter.penalize(MODEL, 1.0)
                status, used = "429", 0
            else:
                assert reply.usage is not None
                used = reply.usage.total_tokens
                reservation.reconcile(used)
                status = "ok"
            with lock:
                records.append(
                    {"t": admitted, "wait": admitted - asked, "tokens": used, "status": status}
                )
            time.sleep(pause)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(int(threads))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps(records), flush=True)


@dataclass
class Record:
    t: float
    wait: float
    status: str
    tokens: int = 0


def spawn_member(redis_url: str, base_url: str, *args: object) -> subprocess.Popen[str]:
    code = "import sys; from tests.test_fleet_ratelimit import member; member(sys.argv[1:])"
    return subprocess.Popen(
        [sys.executable, "-c", code, redis_url, base_url, *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def window_max(times: list[float], amounts: list[int], window: float) -> int:
    """The most any `window`-second span of (sorted) `times` holds."""
    prefix = [0]
    for amount in amounts:
        prefix.append(prefix[-1] + amount)
    return max(
        prefix[bisect.bisect_left(times, t + window)] - prefix[i] for i, t in enumerate(times)
    )


class ProviderSampler:
    """The provider's own counters, read every 0.25 s by a thread while in the block."""

    def __init__(self, fake: FakeLLM) -> None:
        self.fake = fake
        self.at: list[float] = []
        self.requests: list[int] = []
        self.tokens: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll)

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            stats = self.fake.stats()
            self.at.append(time.time())
            self.requests.append(stats["completions"])
            self.tokens.append(stats["prompt_tokens"] + stats["completion_tokens"])

    def __enter__(self) -> ProviderSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def window_max(self, counter: list[int], window: float = 60.0) -> int:
        """The most the provider served in any `window` seconds (to a sample's precision)."""
        return max(
            counter[bisect.bisect_right(self.at, t + window) - 1] - counter[i]
            for i, t in enumerate(self.at)
        )


@pytest.mark.slow
def test_the_fleet_never_trips_the_provider_and_p0_still_flows(redis_url: str) -> None:
    fake = spawn_fake_llm(
        "--rpm", str(RPM), "--tpm", str(TPM), "--latency-uniform", "20", "80", "--model", MODEL
    )
    start_at = time.time() + 8  # members import meanwhile
    procs = [spawn_member(redis_url, fake.base_url, "P2", 8, start_at, RUN_S, 0) for _ in range(4)]
    # The P0 probe starts once P2 traffic has saturated the bucket.
    procs.append(spawn_member(redis_url, fake.base_url, "P0", 1, start_at + 10, RUN_S - 10, 2.0))
    try:
        with ProviderSampler(fake) as provider:
            outputs = [json.loads(proc.communicate(timeout=RUN_S + 120)[0]) for proc in procs]
        stats = fake.stats()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        fake.stop()

    p2 = [Record(**r) for out in outputs[:-1] for r in out]
    p0 = [Record(**r) for r in outputs[-1]]
    assert stats["rate_limited"]["limit"] == 0, stats  # the provider never refused us
    assert all(r.status == "ok" for r in p2 + p0 if r.status != "bound")

    done = sorted((r for r in p2 + p0 if r.status == "ok"), key=lambda r: r.t)
    times = [r.t for r in done]
    assert window_max(times, [1] * len(done), 60.0) <= RPM * 1.01
    assert window_max(times, [r.tokens for r in done], 60.0) <= TPM * 1.01
    # The provider's view agrees.
    assert provider.window_max(provider.requests) <= RPM * 1.01
    assert provider.window_max(provider.tokens) <= TPM * 1.01
    # Saturated from cold: the first minute uses (almost) all of it.
    first = sum(r.tokens for r in done if r.t < times[0] + 60)
    assert first >= 0.9 * TPM, first

    p0_waits = [r.wait for r in p0 if r.status == "ok"]
    p2_waits = sorted(r.wait for r in p2 if r.t > start_at + 10)
    print(
        f"\nfleet: {len(done)} requests, first minute {first} tokens ({first / TPM:.1%} of tpm), "
        f"429s {stats['rate_limited']['limit']}, P0 max wait {max(p0_waits):.3f}s, "
        f"P2 median wait {p2_waits[len(p2_waits) // 2]:.2f}s, "
        f"P2 over the bound {sum(r.status == 'bound' for r in p2)}"
    )
    assert len(p0_waits) >= 20
    # P0 still flows while P2 queues at the bucket: relative, as how long either waits
    # depends on the machine's load.
    assert p2_waits[len(p2_waits) // 2] > max(0.2, 10 * max(p0_waits)), (p0_waits, p2_waits)


def test_member_runs_once_against_the_fake(redis_url: str) -> None:
    """The fleet member itself, in-process and briefly: the slow test's plumbing works."""
    fake = spawn_fake_llm("--model", MODEL)
    now = time.time() + 2  # after the member's imports
    try:
        code = "import sys; from tests.test_fleet_ratelimit import member; member(sys.argv[1:])"
        out = subprocess.run(
            [sys.executable, "-c", code, redis_url, fake.base_url, "P1", "2", str(now), "1", "0"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=True,
        )
        records = json.loads(out.stdout)
        assert records
        assert all(r["status"] == "ok" and r["tokens"] > 0 for r in records)
        assert httpx.get(f"{fake.base_url}/models").status_code == 200
    finally:
        fake.stop()


@pytest.mark.slow
def test_a_celery_worker_fleet_shares_the_bucket(
    redis_url: str, swarm_config: Callable[..., Path], start_worker: WorkerFactory
) -> None:
    """Real `swarm worker` processes, a P2 backlog, then P0 tasks: no 429, P0 jumps it."""
    rpm, tpm = 600, 12_000
    fake = spawn_fake_llm("--rpm", str(rpm), "--tpm", str(tpm), "--latency-uniform", "20", "80")
    try:
        config = swarm_config(
            roles={
                "default": {
                    "concurrency": 16,
                    "system_prompt": "Be brief.",
                    "budgets": {"P2": 120, "P0": 120},
                }
            },
            ratelimit={"models": {"fake-gpt": {"rpm": rpm, "tpm": tpm}}},
        )
        env = {"SWARM_LLM_BASE_URL": fake.base_url, "SWARM_TOKENIZER": "estimate"}
        for _ in range(2):
            start_worker(config=config, env=env)
        settings = load_settings(config, redis_url=redis_url)
        with SwarmClient(settings=settings) as client, ProviderSampler(fake) as provider:
            started = time.time()
            backlog = [
                client.submit(f"Task {i}. REPLY_LEN {40 + i % 60}", priority="P2")
                for i in range(180)  # ~90 s of the provider's tpm: over a whole window
            ]
            time.sleep(20)  # the bucket is saturated by now
            urgent = [client.submit(f"Urgent {i}. REPLY_LEN 30", priority="P0") for i in range(3)]
            p0 = [handle.result(timeout=60) for handle in urgent]
            p0_done = time.time()
            p2 = [handle.result(timeout=300) for handle in backlog]
        stats = fake.stats()
    finally:
        fake.stop()

    assert stats["rate_limited"]["limit"] == 0, stats
    assert all(result.ok for result in p0), [r.error for r in p0]
    p0_latency = max((r.timings.finished_at - r.timings.submitted_at).total_seconds() for r in p0)
    p2_ok = [r for r in p2 if r.ok]
    p2_after = [r for r in p2_ok if r.timings.finished_at.timestamp() > p0_done]
    tokens = stats["prompt_tokens"] + stats["completion_tokens"]
    elapsed = max(r.timings.finished_at.timestamp() for r in p2_ok) - started
    print(
        f"\ncelery fleet: {len(p2_ok)}/{len(p2)} P2 ok in {elapsed:.0f}s, {tokens} tokens "
        f"({tokens / (tpm * elapsed / 60):.1%} of the limit over the run), 429s 0, "
        f"P0 submit-to-result {p0_latency:.2f}s with {len(p2_after)} P2 tasks still behind"
    )
    assert len(p2_after) > 50  # the P0 tasks did not wait for the backlog
    # ...and waited a small part of what the P2 tasks they overtook waited: relative, as
    # any latency here depends on the machine's load (a fixed 5 s bound once failed).
    overtaken = sorted(
        (r.timings.finished_at - r.timings.submitted_at).total_seconds() for r in p2_after
    )
    assert p0_latency < overtaken[len(overtaken) // 2] / 4, (p0_latency, overtaken)
    assert elapsed > 60  # the backlog kept the bucket saturated for a whole window
    assert provider.window_max(provider.tokens) <= tpm * 1.01
    assert provider.window_max(provider.requests) <= rpm * 1.01
