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

`--stream-s S` measures a stream instead of a backlog: the worker starts idle, and
tasks arrive at `--stream-over` x the ideal rate for S seconds (paced every 0.1 s). Starts
and finishes are then spread as a serving worker's are, where a backlog starts C tasks
in one burst and ends them in another, 10 s later, every wave. Arriving faster than
the ideal keeps every thread busy once C calls are in flight: "steady" is then the rate
the worker sustains, and "mean in flight" says how many calls it held over that time.

`llm.max_connections` (default: one per pool thread) caps the worker's HTTP
connections; `--max-connections N` sets it, to see calls wait for a connection.

    python bench/bench_inflight.py --concurrency 250 500 1000 --latency-ms 10000 --waves 3
    python bench/bench_inflight.py --concurrency 1000 --latency-ms 10000 --stream-s 45
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


def submit_backlog(client: SwarmClient, count: int) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 1000):
        items = [
            {"prompt": f"inflight task {i}", "priority": "P1"}
            for i in range(start, min(count, start + 1000))
        ]
        ids += [h.id for h in client.submit_many(items)]
    return ids


def submit_stream(client: SwarmClient, rate: float, seconds: float) -> list[str]:
    """`rate` tasks a second for `seconds`, a batch every 0.1 s on a fixed schedule (a
    late tick catches up: the count at each tick is what the schedule says by then)."""
    ids: list[str] = []
    start = time.monotonic()
    tick = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(rate * elapsed)
        if due > len(ids):
            items = [{"prompt": f"stream task {i}", "priority": "P1"} for i in range(len(ids), due)]
            ids += [h.id for h in client.submit_many(items)]
        tick += 1
        time.sleep(max(0.0, start + tick * 0.1 - time.monotonic()))
    return ids


def mean_in_flight(results: list[TaskResult], since: float, until: float) -> float:
    """Calls in flight averaged over [since, until] (epoch seconds), from start and
    finish times: the integral of (started - finished) over the window, over its length."""
    if until <= since:
        return float("nan")
    events = sorted(
        [(max(since, r.timings.started_at.timestamp()), 1) for r in results]
        + [(max(since, r.timings.finished_at.timestamp()), -1) for r in results]
    )
    area, level, at = 0.0, 0, since
    for t, step in events:
        t = min(t, until)
        area += level * (t - at)
        level, at = level + step, t
    return (area + level * (until - at)) / (until - since)


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
    # At 0 ms nothing bounds the ideal: the rate is then all the CPU allows.
    ideal = concurrency / (args.latency_ms / 1000) if args.latency_ms > 0 else float("inf")
    stream = args.stream_s is not None
    with SwarmClient(settings=file_settings(config)) as client:
        ids = [] if stream else submit_backlog(client, args.waves * concurrency)
        worker = start_worker(
            group,
            WorkerSpec(concurrency=concurrency, loglevel="WARNING", heartbeat_interval_s=None),
            name=f"inflight-{concurrency}",
            workdir=workdir,
            config=config,
            ready_timeout=None,
        )
        with ProcWatch(worker.process.pid) as watch:
            if stream:
                worker.wait_ready(60)
                ids = submit_stream(client, ideal * args.stream_over, args.stream_s)
            results: list[TaskResult] = [client.result(ids[0], timeout=args.timeout)]
            # The first wave is in flight and answered: profile from here on.
            spy = profile(worker.process.pid, concurrency, args)
            results += [client.result(i, timeout=args.timeout) for i in ids[1:]]
        if spy is not None:
            spy.wait(timeout=args.py_spy_s + 60)
        worker.stop()
    count = len(ids)
    failed = [r for r in results if not r.ok]
    first = min(r.timings.started_at for r in results)
    last = max(r.timings.finished_at for r in results)
    span = (last - first).total_seconds()
    rate = count / span
    runs = [r.timings.run_s for r in results]
    starts = sorted(r.timings.started_at for r in results)
    filled = starts[min(concurrency, count) - 1]
    fill = (filled - starts[0]).total_seconds()
    tail = (starts[-1] - filled).total_seconds()
    steady = (count - concurrency) / tail if count > concurrency and tail > 0 else float("nan")
    return {
        "mode": f"stream {args.stream_s:g} s at {args.stream_over:g}x" if stream else "backlog",
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
        "steady_mean_in_flight": mean_in_flight(
            results, filled.timestamp(), starts[-1].timestamp()
        ),
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
    parser.add_argument(
        "--stream-s", type=float, help="a stream of this many seconds instead of a backlog"
    )
    parser.add_argument(
        "--stream-over", type=float, default=1.1, help="the stream's rate over the ideal"
    )
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
    arrival = (
        f"a stream for {args.stream_s:g} s at {args.stream_over:g}x the ideal"
        if args.stream_s is not None
        else f"backlog {args.waves} x concurrency"
    )
    print(f"\none worker process, provider latency {args.latency_ms / 1000:g} s, {arrival}")
    print(
        table(
            [
                "concurrency",
                "tasks",
                "tasks/s",
                "ideal",
                "of ideal",
                "steady (of ideal)",
                "mean in flight, steady",
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
                    f"{r['steady_mean_in_flight']:.0f}",
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
