"""Many model calls in flight in one worker process: tasks/s against the ideal, RSS, threads.

One `swarm worker --role default` process (threads pool, `--concurrency C`), the fake
provider at 10 s latency, a backlog of `--waves` x C tasks queued before the worker
starts. With every thread waiting on the provider the ideal drain rate is C / 10 s; the
measured rate is the backlog over the span from the first task start to the last task
finish (from the stored results), which includes the cold start: the worker starting
its first C tasks at once. "Steady" is the rate once C calls are in flight (see
`one_run`), the figure a worker serving a steady stream sustains. The worker's RSS
(VmRSS sampled every 0.25 s, and VmHWM, the kernel's peak) and thread count are read
from /proc/<pid>/status.

`llm.max_connections` (default: one per pool thread) caps the worker's HTTP
connections; `--max-connections N` sets it, to see calls wait for a connection.

    python bench/bench_inflight.py --concurrency 250 500 1000 --latency-ms 10000 --waves 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from benchlib import ProcWatch, empty, machine, scratch, table, write_json

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


def profile(pid: int, concurrency: int, args: argparse.Namespace) -> subprocess.Popen[bytes] | None:
    """`py-spy record --gil` on the worker for `--py-spy-s` s (collapsed stacks), if asked."""
    if args.py_spy is None:
        return None
    args.py_spy.mkdir(parents=True, exist_ok=True)
    out = args.py_spy / f"inflight-{concurrency}.txt"
    argv = ["py-spy", "record", "--gil", "--pid", str(pid), "--format", "raw", "--rate", "50"]
    argv += ["--duration", str(int(args.py_spy_s)), "--output", str(out), "--nonblocking"]
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("py-spy")), *argv[1:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def one_run(
    group: ProcessGroup,
    workdir: Path,
    redis_url: str,
    llm_url: str,
    concurrency: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    llm: dict[str, Any] = {"base_url": llm_url, "timeout_s": args.latency_ms / 1000 + 60}
    if args.max_connections is not None:
        llm["max_connections"] = args.max_connections
    config = write_toml(
        workdir / f"swarm-{concurrency}.toml",
        {"redis_url": redis_url, "llm": llm, "roles": {"default": {"concurrency": concurrency}}},
    )
    count = args.waves * concurrency
    with SwarmClient(settings=file_settings(config)) as client:
        ids: list[str] = []
        for start in range(0, count, 1000):
            items = [
                {"prompt": f"inflight task {i}", "priority": "P1"}
                for i in range(start, min(count, start + 1000))
            ]
            ids += [h.id for h in client.submit_many(items)]
        worker = start_worker(
            group,
            WorkerSpec(concurrency=concurrency, loglevel="WARNING", heartbeat_interval_s=None),
            name=f"inflight-{concurrency}",
            workdir=workdir,
            config=config,
            ready_timeout=None,
        )
        with ProcWatch(worker.process.pid) as watch:
            results: list[TaskResult] = [client.result(ids[0], timeout=args.timeout)]
            # The first wave is in flight and answered: profile from here on.
            spy = profile(worker.process.pid, concurrency, args)
            results += [client.result(i, timeout=args.timeout) for i in ids[1:]]
        if spy is not None:
            spy.wait(timeout=args.py_spy_s + 60)
        worker.stop()
    failed = [r for r in results if not r.ok]
    first = min(r.timings.started_at for r in results)
    last = max(r.timings.finished_at for r in results)
    span = (last - first).total_seconds()
    rate = count / span
    # At 0 ms nothing bounds the ideal: the rate is then all the CPU allows.
    ideal = concurrency / (args.latency_ms / 1000) if args.latency_ms > 0 else float("inf")
    runs = [r.timings.run_s for r in results]
    starts = sorted(r.timings.started_at for r in results)
    filled = starts[min(concurrency, count) - 1]
    fill = (filled - starts[0]).total_seconds()
    tail = (starts[-1] - filled).total_seconds()
    steady = (count - concurrency) / tail if count > concurrency and tail > 0 else float("nan")
    return {
        "concurrency": concurrency,
        "tasks": count,
        "failed": len(failed),
        "errors": [r.error for r in failed][:3],
        "span_s": span,
        "tasks_per_s": rate,
        "ideal_per_s": ideal,
        "of_ideal": rate / ideal,
        "run_s_median": statistics.median(runs),
        "run_s_max": max(runs),
        # How long the worker took to start its first C tasks (all queued before it
        # started): CPU, each start's share of a task's work (bench/README.md).
        "fill_s": fill,
        # Once C calls are in flight: the tasks started from then to the last start,
        # over that time. Every thread is busy throughout, so this is the rate the
        # worker sustains with C calls in flight (Little's law: C / latency at best).
        "steady_per_s": steady,
        "steady_of_ideal": steady / ideal,
        "peak_rss_mb": watch.peak_rss_mb,
        "worker_cpu_s": watch.cpu_s,
        "cpu_ms_per_task": watch.cpu_s * 1000 / count,
        "worker_cpu_share": watch.cpu_s / span,
        "peak_threads": watch.peak_threads,
        "samples": watch.samples,
        "max_connections": llm.get("max_connections", "one per thread"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[250, 500, 1000])
    parser.add_argument("--latency-ms", type=float, default=10_000.0)
    parser.add_argument("--waves", type=int, default=3, help="backlog = waves x concurrency")
    parser.add_argument("--timeout", type=float, default=600.0, help="per result, seconds")
    parser.add_argument(
        "--max-connections", type=int, help="set llm.max_connections (default: one per thread)"
    )
    parser.add_argument("--py-spy", type=Path, help="py-spy the worker into DIR (collapsed)")
    parser.add_argument("--py-spy-s", type=float, default=30.0, help="seconds of py-spy")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    print(f"machine: {machine()}", flush=True)
    runs: list[dict[str, Any]] = []
    with scratch() as (workdir, group):
        server = start_redis(group, workdir)
        fake = start_fake_llm(group, "--latency-ms", str(args.latency_ms))
        flush = redis.Redis.from_url(server.url)
        for concurrency in args.concurrency:
            empty(flush)
            t0 = time.monotonic()
            run = one_run(group, workdir, server.url, fake.base_url, concurrency, args)
            run["wall_s"] = time.monotonic() - t0
            runs.append(run)
            print(
                f"C={concurrency}: {run['tasks_per_s']:.1f} tasks/s "
                f"({run['of_ideal']:.0%} of {run['ideal_per_s']:.0f}), "
                f"RSS {run['peak_rss_mb']:.0f} MB, {run['peak_threads']} threads, "
                f"failed {run['failed']}",
                flush=True,
            )
        flush.close()
    print(
        f"\none worker process, provider latency {args.latency_ms / 1000:g} s, "
        f"backlog {args.waves} x concurrency"
    )
    print(
        table(
            [
                "concurrency",
                "tasks",
                "tasks/s",
                "ideal",
                "of ideal",
                "steady (of ideal)",
                "task run p50 / max",
                "first C started in",
                "peak RSS",
                "threads",
                "worker CPU / task",
                "worker CPU use",
                "failed",
            ],
            [
                [
                    r["concurrency"],
                    r["tasks"],
                    f"{r['tasks_per_s']:.1f}",
                    f"{r['ideal_per_s']:.0f}",
                    f"{r['of_ideal']:.0%}",
                    f"{r['steady_per_s']:.1f} ({r['steady_of_ideal']:.0%})",
                    f"{r['run_s_median']:.1f} / {r['run_s_max']:.1f} s",
                    f"{r['fill_s']:.1f} s",
                    f"{r['peak_rss_mb']:.0f} MB",
                    r["peak_threads"],
                    f"{r['cpu_ms_per_task']:.1f} ms",
                    f"{r['worker_cpu_share']:.0%} of a core",
                    r["failed"],
                ]
                for r in runs
            ],
        )
    )
    write_json(
        args.json, {"args": vars(args) | {"json": None, "py_spy": str(args.py_spy)}, "runs": runs}
    )
    return 1 if any(r["failed"] for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
