"""Per-task overhead: a swarm worker against a bare Celery task making the same call.

Both sides, in one run, with the sides alternated round by round: one worker process,
threads pool with the same concurrency, acks late, prefetch off, the same redis-server
as broker and result backend, the same fake provider (`swarm fake-llm`) at the same
latency, the same `openai` SDK call. The bare side is `bench/bare_celery.py`; the swarm
side is `swarm worker --role default` with default settings (bucket off: no limits are
configured), twice: as it ships, without task events (as the bare worker, Celery's
default), and with them from the start (`worker.task_events = true`, what a worker does
while Flower runs: Flower turns them on).
Each round queues the backlog first, then starts the worker, and measures the drain
from the first task start to the last task finish. Medians over rounds; the
ratio swarm / bare is printed last.

    python bench/bench_overhead.py --tasks 2000 --rounds 3 --latency-ms 1000 --concurrency 250
    python bench/bench_overhead.py --tasks 2000 --rounds 3 --latency-ms 0 --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import redis
from benchlib import empty, scratch
from celery import Celery

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

HERE = Path(__file__).resolve().parent


def bare_round(
    group: ProcessGroup, redis_url: str, llm_url: str, args: argparse.Namespace
) -> float:
    app = Celery("bare", broker=redis_url, backend=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    results = [app.send_task("bare.ask", args=[f"bench task {i}"]) for i in range(args.tasks)]
    worker = group.spawn(
        "bare-worker",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bare_celery",
            "worker",
            "--pool=threads",
            f"--concurrency={args.concurrency}",
            "--loglevel=WARNING",
            "--without-mingle",
            "--without-gossip",
            "-n",
            "bare@%h",
        ],
        env={"BARE_REDIS_URL": redis_url, "BARE_LLM_URL": llm_url, "PYTHONPATH": str(HERE)},
        cwd=HERE,
    )
    values = [r.get(timeout=900) for r in results]
    for result in results:
        result.forget()  # its result-channel subscription ends now, not at interpreter exit
    del results
    worker.stop()
    app.close()
    return args.tasks / (max(v["finished"] for v in values) - min(v["started"] for v in values))


def swarm_round(
    group: ProcessGroup,
    config: Path,
    workdir: Path,
    args: argparse.Namespace,
    n: int,
    events: bool,
) -> float:
    with SwarmClient(settings=file_settings(config)) as client:
        tasks = [client.build_task(f"bench task {i}", priority="P1") for i in range(args.tasks)]
        for task in tasks:
            client.enqueue(task)
        spec = WorkerSpec(
            concurrency=args.concurrency,
            loglevel="WARNING",
            heartbeat_interval_s=None,
            env={"SWARM_WORKER_TASK_EVENTS": "true"} if events else {},
        )
        worker = start_worker(
            group,
            spec,
            name=f"swarm-worker-{n}-{'events' if events else 'quiet'}",
            workdir=workdir,
            config=config,
            ready_timeout=None,
        )
        results = [client.result(t.id, timeout=900) for t in tasks]
    worker.stop()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    first = min(r.timings.started_at for r in results)
    last = max(r.timings.finished_at for r in results)
    return args.tasks / (last - first).total_seconds()


SIDES = ("bare", "swarm", "swarm-events")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=1000.0)
    parser.add_argument("--concurrency", type=int, default=250)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with scratch() as (workdir, group):
        server = start_redis(group, workdir)
        llm = start_fake_llm(group, "--latency-ms", str(args.latency_ms))
        config = write_toml(
            workdir / "swarm.toml",
            {
                "redis_url": server.url,
                "llm": {"base_url": llm.base_url},
                "roles": {"default": {"concurrency": args.concurrency}},
            },
        )
        flush = redis.Redis.from_url(server.url)
        rates: dict[str, list[float]] = {side: [] for side in SIDES}
        for n in range(args.rounds):
            for side in SIDES if n % 2 == 0 else tuple(reversed(SIDES)):
                empty(flush)
                if side == "bare":
                    rate = bare_round(group, server.url, llm.base_url, args)
                else:
                    rate = swarm_round(group, config, workdir, args, n, side == "swarm-events")
                rates[side].append(rate)
                print(f"round {n + 1} {side:15s} {rate:7.1f} tasks/s", flush=True)
        bare, swarm, events = (statistics.median(rates[side]) for side in SIDES)
        print(
            f"\nlatency {args.latency_ms:g} ms, concurrency {args.concurrency}, "
            f"{args.tasks} tasks x {args.rounds} rounds (medians)"
        )
        print(f"| bare Celery + openai          | {bare:7.1f} tasks/s |")
        print(f"| swarm worker (defaults)       | {swarm:7.1f} tasks/s |")
        print(f"| swarm worker, task events on  | {events:7.1f} tasks/s |")
        print(f"swarm / bare = {swarm / bare:.2f} (with task events: {events / bare:.2f})")
        if args.json:
            figures = {
                "args": vars(args) | {"json": None},
                "rates": rates,
                "ratio": swarm / bare,
                "ratio_with_events": events / bare,
            }
            args.json.write_text(json.dumps(figures, indent=2))
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
