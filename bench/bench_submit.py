"""Submit rates: `SwarmClient.submit` one by one vs bare Celery, and batches, side by side.

One producer thread, one redis-server of our own, no worker (the messages stay
queued; Redis is flushed between sides). The sides, alternated round by round, medians
over rounds:

- `swarm submit`: `SwarmClient.submit(prompt, priority="P1")` one by one: validation,
  the admission check, one MULTI/EXEC.
- `bare send_task` / `bare apply_async`: a plain Celery app as in bench/bare_celery.py
  (Redis broker and result backend, JSON), `app.send_task("bare.ask", ...)` and
  `bare.ask.apply_async(...)`, one by one.
- `swarm submit_many`: batches of `--batch` through `SwarmClient.submit_many` (the same
  validation and admission, all or none per batch).

Then `swarm submit --file tasks.jsonl` as a process (interpreter start and imports
included), timed from spawn to exit, `--file-runs` times: the median.

    python bench/bench_submit.py --tasks 2000 --batch-tasks 20000 --batch 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from benchlib import empty, machine, scratch, table, write_json
from celery import Celery

from swarm_workers.client import SwarmClient
from swarm_workers.localfleet import child_env, start_redis
from swarm_workers.localfleet.fleet import file_settings
from swarm_workers.localfleet.toml import write_toml

SIDES = ("swarm submit", "bare send_task", "bare apply_async", "swarm submit_many")


def bare_app(redis_url: str) -> Celery:
    app = Celery("bare", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_transport_options={"queue_order_strategy": "sorted", "priority_steps": [0]},
    )

    @app.task(name="bare.ask")
    def ask(prompt: str) -> str:
        return prompt

    return app


def timed(work: Callable[[], int]) -> float:
    start = time.perf_counter()
    count = work()
    return count / (time.perf_counter() - start)


def side(name: str, config: Path, app: Celery, args: argparse.Namespace) -> float:
    if name.startswith("bare"):
        ask = app.tasks["bare.ask"]
        app.send_task("bare.ask", args=["warm-up"])  # connection and declare, as submit's

        def bare() -> int:
            for i in range(args.tasks):
                if name == "bare send_task":
                    app.send_task("bare.ask", args=[f"bench task {i}"])
                else:
                    ask.apply_async(args=[f"bench task {i}"])
            return args.tasks

        return timed(bare)
    with SwarmClient(settings=file_settings(config)) as client:
        client.submit("warm-up", priority="P1")

        def one_by_one() -> int:
            for i in range(args.tasks):
                client.submit(f"bench task {i}", priority="P1")
            return args.tasks

        def batches() -> int:
            for start in range(0, args.batch_tasks, args.batch):
                client.submit_many(
                    [
                        {"prompt": f"bench task {i}", "priority": "P1"}
                        for i in range(start, min(args.batch_tasks, start + args.batch))
                    ]
                )
            return args.batch_tasks

        work = one_by_one if name == "swarm submit" else batches
        if args.profile is not None:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
            rate = timed(work)
            profiler.stop()
            out = args.profile / f"{name.replace(' ', '_')}.txt"
            out.write_text(profiler.output_text(unicode=False, show_all=False))
            return rate
        return timed(work)


def cli_file(
    group_dir: Path, config: Path, flush: redis.Redis, args: argparse.Namespace
) -> dict[str, Any]:
    """`swarm submit --file` as a process, `--file-runs` times (Redis emptied before
    each), and the same interpreter importing what it imports, as often: medians."""
    tasks = group_dir / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"prompt": f"file task {i}", "priority": "P1"}) + "\n"
            for i in range(args.file_tasks)
        )
    )
    argv = [sys.executable, "-m", "swarm_workers.cli", "submit", "--file", str(tasks)]
    argv += ["--config", str(config)]
    imports = [sys.executable, "-c", "import swarm_workers.cli, swarm_workers.client"]
    process_s: list[float] = []
    import_s: list[float] = []
    failures: list[str] = []
    for _ in range(args.file_runs):
        empty(flush)
        start = time.perf_counter()
        done = subprocess.run(argv, env=child_env(), capture_output=True, timeout=300, check=False)
        process_s.append(time.perf_counter() - start)
        if done.returncode != 0 or len(done.stdout.splitlines()) != args.file_tasks:
            stderr = done.stderr.decode(errors="replace")[-300:]
            failures.append(f"exit {done.returncode}: {stderr}")
        start = time.perf_counter()
        subprocess.run(imports, env=child_env(), check=True, timeout=120)
        import_s.append(time.perf_counter() - start)
    if args.profile is not None:  # the same command again, under pyinstrument
        empty(flush)
        profiled = [sys.executable, "-m", "pyinstrument", "-o"]
        profiled += [str(args.profile / "swarm_submit_file.txt"), "-m", *argv[2:]]
        subprocess.run(profiled, env=child_env(), capture_output=True, timeout=300, check=False)
    process = statistics.median(process_s)
    startup = statistics.median(import_s)
    return {
        "tasks": args.file_tasks,
        "runs": args.file_runs,
        "failures": failures,
        "process_s": process_s,
        "import_s": import_s,
        "tasks_per_s": [args.file_tasks / t for t in process_s],
        "tasks_per_s_median": args.file_tasks / process,
        "tasks_per_s_after_imports": args.file_tasks / max(1e-9, process - startup),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="one-by-one submits a side")
    parser.add_argument("--batch-tasks", type=int, default=20000, help="tasks in batches")
    parser.add_argument("--batch", type=int, default=1000, help="tasks per submit_many")
    parser.add_argument("--file-tasks", type=int, default=10000, help="lines in tasks.jsonl")
    parser.add_argument("--file-runs", type=int, default=5, help="runs of swarm submit --file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="pyinstrument the swarm sides into DIR")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)

    print(f"machine: {machine()}", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in SIDES}
    with scratch() as (workdir, group):
        server = start_redis(group, workdir)
        # Default settings: P1's high-water mark (50,000) is above a round's backlog.
        config = write_toml(workdir / "swarm.toml", {"redis_url": server.url})
        flush = redis.Redis.from_url(server.url)
        app = bare_app(server.url)  # one app: Celery registers a task name once a process
        for n in range(args.rounds):
            order = SIDES if n % 2 == 0 else SIDES[::-1]
            for name in order:
                empty(flush)
                rate = side(name, config, app, args)
                rates[name].append(rate)
                print(f"round {n + 1} {name:18s} {rate:8.0f} tasks/s", flush=True)
        flush.flushdb()
        cli = cli_file(workdir, config, flush, args)
        flush.close()
        app.close()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\none producer thread, medians of {args.rounds} rounds, sides alternated")
    print(
        table(
            ["submit", "tasks a round", "tasks/s (median)", "rounds", "vs bare apply_async"],
            [
                [
                    name,
                    args.batch_tasks if name == "swarm submit_many" else args.tasks,
                    f"{medians[name]:,.0f}",
                    " / ".join(f"{r:,.0f}" for r in rates[name]),
                    f"{medians[name] / medians['bare apply_async']:.2f}",
                ]
                for name in SIDES
            ],
        )
    )
    rates_file = " / ".join(f"{r:,.0f}" for r in cli["tasks_per_s"])
    print(
        f"swarm submit --file ({cli['tasks']} lines, {cli['runs']} runs as a process): "
        f"median {cli['tasks_per_s_median']:,.0f} tasks/s ({rates_file}); imports alone "
        f"{statistics.median(cli['import_s']):.2f} s (median) -> "
        f"{cli['tasks_per_s_after_imports']:,.0f} tasks/s after them; failed runs: "
        f"{len(cli['failures'])}"
    )
    write_json(
        args.json,
        {
            "args": vars(args) | {"json": None, "profile": str(args.profile)},
            "rates": rates,
            "medians": medians,
            "cli_file": cli,
        },
    )
    return 0 if not cli["failures"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
