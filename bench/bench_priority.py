"""Head-of-line blocking: P0 queue wait behind a P2 backlog, strict priority vs one FIFO queue.

One `swarm worker` (threads pool, `--concurrency`), the fake provider at `--latency-ms`.
`--p2` P2 tasks are queued (`submit_many`), the worker starts, and once it is busy
`--p0` P0 tasks arrive at `--p0-rate` a second. Strict: each P0 is enqueued as the
client does (`p0.default`, read before `p1`/`p2`). FIFO: the same P0 task is sent to
`p2.default` behind the backlog (`app.send_task(..., queue="p2.default")`, as
tests/test_worker.py's contrast does). Both runs drain everything; the drain rate is all
tasks over first start -> last finish. P0 wait is `TaskResult.timings.queue_wait_s`
(started - submitted; a P0 task is built the moment it is sent). The goal: P0 p99 wait
<= one task runtime (the P2 tasks' median run time, printed).

    python bench/bench_priority.py --p2 5000 --p0 100 --p0-rate 2 --concurrency 8 --latency-ms 200
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import redis
from benchlib import empty, machine, percentile, scratch, table, write_json

from swarm_workers.client import SwarmClient
from swarm_workers.localfleet import (
    ProcessGroup,
    WorkerSpec,
    start_fake_llm,
    start_redis,
    start_worker,
)
from swarm_workers.localfleet.fleet import file_settings
from swarm_workers.localfleet.toml import write_toml
from swarm_workers.models import TaskResult
from swarm_workers.queues import RUN_AGENT

MODES = ("strict", "fifo")


def send_p0(client: SwarmClient, mode: str, args: argparse.Namespace, ids: list[str]) -> None:
    """P0 tasks at a steady rate; each built (timestamped) the moment it is sent."""
    period = 1 / args.p0_rate
    start = time.monotonic()
    for i in range(args.p0):
        time.sleep(max(0.0, start + i * period - time.monotonic()))
        task = client.build_task(f"urgent {i}", priority="P0")
        if mode == "strict":
            client.enqueue(task)
        else:
            client.app.send_task(
                RUN_AGENT,
                args=[task.to_wire()],
                task_id=task.id,
                queue="p2.default",
                ignore_result=True,
            )
        ids.append(task.id)


def one_run(
    group: ProcessGroup, workdir: Path, config: Path, mode: str, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    with SwarmClient(settings=file_settings(config)) as client:
        p2_ids: list[str] = []
        for start in range(0, args.p2, 1000):
            batch = range(start, min(args.p2, start + 1000))
            p2_ids += [
                h.id
                for h in client.submit_many(
                    [{"prompt": f"bulk {i}", "priority": "P2"} for i in batch]
                )
            ]
        worker = start_worker(
            group,
            WorkerSpec(concurrency=args.concurrency, loglevel="WARNING", heartbeat_interval_s=None),
            name=f"prio-{mode}-{n}",
            workdir=workdir,
            config=config,
            ready_timeout=None,
        )
        # Busy: the first P2 results are in, the worker's threads are all taken.
        client.result(p2_ids[args.concurrency * 2], timeout=args.timeout)
        p0_ids: list[str] = []
        sender = threading.Thread(target=send_p0, args=(client, mode, args, p0_ids))
        sender.start()
        sender.join()
        p0 = [client.result(i, timeout=args.timeout) for i in p0_ids]
        p2 = [client.result(i, timeout=args.timeout) for i in p2_ids]
        worker.stop()
    everything: list[TaskResult] = p0 + p2
    failed = [r for r in everything if not r.ok]
    first = min(r.timings.started_at for r in everything)
    last = max(r.timings.finished_at for r in everything)
    waits = [r.timings.queue_wait_s for r in p0]
    runtime = statistics.median(r.timings.run_s for r in p2)
    last_p0_sent = max(r.timings.submitted_at for r in p0)
    return {
        "mode": mode,
        "round": n,
        "p2": len(p2),
        "p0": len(p0),
        "failed": len(failed),
        "drain_per_s": len(everything) / (last - first).total_seconds(),
        "p0_wait_p50_s": percentile(waits, 50),
        "p0_wait_p99_s": percentile(waits, 99),
        "p0_wait_max_s": max(waits),
        "task_run_p50_s": runtime,
        "p2_left_when_last_p0_sent": sum(r.timings.started_at > last_p0_sent for r in p2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p2", type=int, default=5000, help="P2 backlog (the issue: 5,000)")
    parser.add_argument("--p0", type=int, default=100, help="P0 tasks arriving")
    parser.add_argument("--p0-rate", type=float, default=2.0, help="P0 tasks a second")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--rounds", type=int, default=1, help="each round runs both, alternated")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    print(f"machine: {machine()}", flush=True)
    runs: list[dict[str, Any]] = []
    with scratch() as (workdir, group):
        server = start_redis(group, workdir)
        fake = start_fake_llm(group, "--latency-ms", str(args.latency_ms))
        config = write_toml(
            workdir / "swarm.toml",
            {
                "redis_url": server.url,
                "llm": {"base_url": fake.base_url},
                "roles": {"default": {"concurrency": args.concurrency}},
            },
        )
        flush = redis.Redis.from_url(server.url)
        for n in range(args.rounds):
            for mode in MODES if n % 2 == 0 else MODES[::-1]:
                empty(flush)
                run = one_run(group, workdir, config, mode, n, args)
                runs.append(run)
                print(
                    f"round {n + 1} {mode:6s}: drain {run['drain_per_s']:.1f} tasks/s, "
                    f"P0 wait p50 {run['p0_wait_p50_s']:.2f} s p99 {run['p0_wait_p99_s']:.2f} s, "
                    f"task run {run['task_run_p50_s']:.2f} s, failed {run['failed']}",
                    flush=True,
                )
        flush.close()

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["mode"] == mode)

    print(
        f"\n{args.p2} P2 queued, then {args.p0} P0 at {args.p0_rate:g}/s; one worker x "
        f"{args.concurrency} threads, provider {args.latency_ms:g} ms; medians of {args.rounds}"
    )
    print(
        table(
            ["queues", "P0 wait p50", "P0 wait p99", "P0 wait max", "task run p50", "drain"],
            [
                [
                    "strict (p0/p1/p2)" if mode == "strict" else "one FIFO (p2)",
                    f"{med(mode, 'p0_wait_p50_s'):.2f} s",
                    f"{med(mode, 'p0_wait_p99_s'):.2f} s",
                    f"{med(mode, 'p0_wait_max_s'):.2f} s",
                    f"{med(mode, 'task_run_p50_s'):.2f} s",
                    f"{med(mode, 'drain_per_s'):.1f} tasks/s",
                ]
                for mode in MODES
            ],
        )
    )
    ratio = med("strict", "drain_per_s") / med("fifo", "drain_per_s")
    goal = med("strict", "p0_wait_p99_s") <= med("strict", "task_run_p50_s")
    print(f"strict / FIFO drain = {ratio:.3f}; P0 p99 wait <= one task runtime: {goal}")
    write_json(
        args.json,
        {"args": vars(args) | {"json": None}, "runs": runs, "drain_ratio": ratio, "goal_met": goal},
    )
    return 1 if any(r["failed"] for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
