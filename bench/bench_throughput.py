"""Fleet throughput: tasks/s through real workers, real Redis, the fake provider.

Each task is one agent loop with one chat-completions call to the fake provider at a
fixed latency; workers are `swarm worker` processes with a threads pool. The whole
backlog is submitted first (the submit rate), then the workers start and drain it (the
drain rate: from the first task start to the last task finish, from the results).

    python bench/bench_throughput.py --tasks 5000 --workers 1 --concurrency 500 --latency-ms 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from swarm_workers.client import SwarmClient
from swarm_workers.localfleet import FakeLLMSpec, FleetSpec, LocalFleet, WorkerSpec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=500, help="threads per worker")
    parser.add_argument("--latency-ms", type=float, default=1000.0, help="fake LLM latency")
    parser.add_argument("--producers", type=int, default=8, help="submitting threads")
    args = parser.parse_args()

    spec = FleetSpec(
        config={"ratelimit": {"enabled": False}},  # the tests measure the bucket, not this
        llm=FakeLLMSpec(("--latency-ms", str(args.latency_ms))),
    )
    workers = [
        WorkerSpec(
            concurrency=args.concurrency,
            hostname=f"bench{i}@%h",
            loglevel="WARNING",
            heartbeat_interval_s=None,
        )
        for i in range(args.workers)
    ]
    with tempfile.TemporaryDirectory() as tmp, LocalFleet(spec, Path(tmp)) as fleet:
        with SwarmClient(settings=fleet.settings()) as client:
            # The backlog is queued first, so the producer does not share the CPU with
            # the workers while they drain: the two rates are measured apart.
            tasks = [client.build_task(f"bench task {i}", priority="P1") for i in range(args.tasks)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.producers) as pool:
                list(pool.map(client.enqueue, tasks))
            submit_s = time.perf_counter() - t0
            fleet.add_workers(workers)
            results = [client.result(t.id, timeout=900) for t in tasks]
        failed = sum(not r.ok for r in results)
        first = min(r.timings.started_at for r in results)
        last = max(r.timings.finished_at for r in results)
        span = (last - first).total_seconds()
        waits = sorted(r.timings.queue_wait_s for r in results)
        print(
            f"tasks={args.tasks} workers={args.workers} threads/worker={args.concurrency} "
            f"llm_latency_ms={args.latency_ms:g}"
        )
        print(f"  submit: {args.tasks / submit_s:8.0f} tasks/s  ({submit_s:.2f} s)")
        print(f"  drain:  {args.tasks / span:8.0f} tasks/s  ({span:.2f} s, failed={failed})")
        p50, p99 = waits[len(waits) // 2], waits[int(len(waits) * 0.99)]
        print(f"  queue wait p50={p50:.2f}s p99={p99:.2f}s")
        print(f"  = {args.tasks / span * 86400 / 1e6:.1f} M tasks/day")
        return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
