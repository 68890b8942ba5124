"""Redis commands, bytes and CPU per task, and the ceiling they imply for one Redis.

One redis-server of our own, the fake provider at 0 ms, one `swarm worker` (16
threads) per scenario:

- `plain`: `--tasks` tasks, `SwarmClient.submit` one by one, P1.
- `dag node`: `--dags` DAGs, each a fan-in: `--fan-in` leaves then one node depending
  on all of them (a Celery chord); figures per node.
- `bucketed`: as plain, with `ratelimit.models` set (limits far above the load) so
  every model call takes from and reconciles with the token bucket.

Counts are `INFO commandstats` deltas (and `total_net_input_bytes` /
`total_net_output_bytes`, `used_cpu_sys + used_cpu_user`) over a run, less what the
idle worker does in the same time (measured for `--idle-s` first: BRPOP timeouts, task
events, heartbeats), less the bench's own INFO/DBSIZE and completion polls (LLEN, HLEN).
The producer's share is measured apart by submitting the same work to a role no worker
serves (`parked`). The ceiling: this Redis' measured ops/s (redis-benchmark, 50
clients, no pipelining) / commands per task, and 1 CPU-second / Redis CPU per task.

    python bench/bench_redis_cost.py --tasks 1000 --dags 20 --fan-in 20
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
from benchlib import RedisCounters, machine, scratch, table, write_json

from swarm_workers.client import SwarmClient
from swarm_workers.dag import Node
from swarm_workers.keys import KOMBU_UNACKED
from swarm_workers.localfleet import (
    FakeProvider,
    ProcessGroup,
    WorkerSpec,
    start_fake_llm,
    start_redis,
    start_worker,
    wait_until,
)
from swarm_workers.localfleet.fleet import file_settings
from swarm_workers.localfleet.toml import write_toml

OWN = {"info", "dbsize", "flushdb", "ping", "client|setname", "client|list", "hello"}
QUEUES = ("p0.default", "p1.default", "p2.default")


def completions(fake: FakeProvider) -> int:
    stats = fake.stats()
    return int(stats.get("completions", stats.get("counts", {}).get("completions", 0)))


class Meter:
    """Counter deltas with the idle worker's rate and the bench's own commands taken out."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.idle: RedisCounters | None = None
        self.polls = 0

    def measure_idle(self, seconds: float) -> None:
        before = RedisCounters.read(self.redis)
        time.sleep(seconds)
        self.idle = RedisCounters.read(self.redis) - before

    def run(self, work: Callable[[], None]) -> dict[str, Any]:
        self.polls = 0
        before = RedisCounters.read(self.redis)
        work()
        delta = RedisCounters.read(self.redis) - before
        assert self.idle is not None
        scale = delta.at / self.idle.at
        calls: dict[str, float] = {}
        for name, count in delta.calls.items():
            if name in OWN:
                continue
            own = self.polls * (len(QUEUES) if name == "llen" else 1 if name == "hlen" else 0)
            calls[name] = max(0.0, count - own - self.idle.calls.get(name, 0) * scale)
        usec = sum(max(0.0, delta.usec.get(n, 0) - self.idle.usec.get(n, 0) * scale) for n in calls)
        return {
            "seconds": delta.at,
            "calls": {n: c for n, c in calls.items() if c >= 0.5},
            "commands": sum(calls.values()),
            "usec": usec,
            "net_in": max(0.0, delta.net_in - self.idle.net_in * scale),
            "net_out": max(0.0, delta.net_out - self.idle.net_out * scale),
            "cpu_s": max(0.0, delta.cpu_s - self.idle.cpu_s * scale),
            "keys": delta.keys,
        }

    def wait_done(self, fake: FakeProvider, calls: int, timeout: float) -> None:
        """Until the provider has answered `calls` and the queues and unacked are empty."""
        wait_until(lambda: completions(fake) >= calls, timeout, f"{calls} model calls", 0.2)

        def drained() -> bool:
            self.polls += 1
            pipe = self.redis.pipeline(transaction=False)
            for queue in QUEUES:
                pipe.llen(queue)
            pipe.hlen(KOMBU_UNACKED)
            return not any(pipe.execute())

        wait_until(drained, timeout, "the queues to drain", 0.2)
        time.sleep(1.0)  # the last task events and acks


def trace(url: str, work: Callable[[], None]) -> list[str]:
    """Every command Redis runs while `work` runs (MONITOR): `[lua]` marks a script's own."""
    lines: list[str] = []
    listening = threading.Event()
    stop = threading.Event()

    def listen() -> None:
        with redis.Redis.from_url(url).monitor() as monitor:
            listening.set()
            for command in monitor.listen():
                if stop.is_set():
                    return
                where = (
                    "[lua]" if command.get("client_type") == "lua" else command.get("client_port")
                )
                text = str(command["command"])
                lines.append(f"{where} {text[:110]}{'...' if len(text) > 110 else ''}")

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    listening.wait(5)
    time.sleep(0.2)
    work()
    stop.set()
    redis.Redis.from_url(url).ping()  # wakes the listener
    thread.join(5)
    return lines


def scenario(
    name: str,
    group: ProcessGroup,
    workdir: Path,
    server_url: str,
    fake: FakeProvider,
    args: argparse.Namespace,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "redis_url": server_url,
        "llm": {"base_url": fake.base_url},
        "roles": {"default": {"concurrency": 16}, "parked": {"concurrency": 1}},
    }
    if name == "bucketed":
        body["ratelimit"] = {"models": {"fake-gpt": {"rpm": 10_000_000, "tpm": 10_000_000_000}}}
    else:
        body["ratelimit"] = {"enabled": False}
    config = write_toml(workdir / f"swarm-{name.replace(' ', '-')}.toml", body)
    flush = redis.Redis.from_url(server_url)
    flush.flushdb()
    fake.reset()
    meter = Meter(flush)
    worker = start_worker(
        group,
        WorkerSpec(concurrency=16, loglevel="WARNING", heartbeat_interval_s=1.0),
        name=f"cost-{name.replace(' ', '-')}",
        workdir=workdir,
        config=config,
        ready_timeout=90,
    )
    time.sleep(2.0)
    meter.measure_idle(args.idle_s)
    with SwarmClient(settings=file_settings(config)) as client:
        if name == "dag node":
            units = args.dags * (args.fan_in + 1)

            def dags(role: str) -> Callable[[], None]:
                def submit() -> None:
                    for d in range(args.dags):
                        leaves = [
                            Node(f"leaf{i}", f"dag {d} leaf {i}", role=role)
                            for i in range(args.fan_in)
                        ]
                        join = Node("join", f"dag {d} join", role=role, deps=[n.id for n in leaves])
                        client.submit_dag([*leaves, join])

                return submit

            producer = meter.run(dags("parked"))
            flush.delete("p0.parked", "p1.parked", "p2.parked")
            fake.reset()

            def run() -> None:
                dags("default")()
                meter.wait_done(fake, units, args.timeout)

        else:
            units = args.tasks

            def tasks(role: str) -> Callable[[], None]:
                def submit() -> None:
                    for i in range(args.tasks):
                        client.submit(f"cost task {i}", role=role, priority="P1")

                return submit

            producer = meter.run(tasks("parked"))
            flush.delete("p0.parked", "p1.parked", "p2.parked")

            def run() -> None:
                tasks("default")()
                meter.wait_done(fake, units, args.timeout)

        total = meter.run(run)
        traced: list[str] = []
        if args.trace:
            fake.reset()

            def one() -> None:
                if name == "dag node":
                    join = Node("join", "traced join", deps=["a", "b"])
                    client.submit_dag([Node("a", "traced a"), Node("b", "traced b"), join]).wait(60)
                else:
                    client.submit("traced", priority="P1").result(60)

            traced = trace(server_url, one)
    worker.stop()
    flush.close()
    return {
        "scenario": name,
        "units": units,
        "producer": producer,
        "total": total,
        "trace": traced,
    }


def redis_ops_per_s(port: int, args: argparse.Namespace) -> dict[str, float]:
    """redis-benchmark against our Redis: 50 clients, no pipelining, simple commands."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {}
    out = subprocess.run(
        [
            *(binary, "-h", "127.0.0.1", "-p", str(port), "-c", "50", "-n", str(args.bench_n)),
            *("-t", "set,get,lpush,rpop,incr", "--csv"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rates: dict[str, float] = {}
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 2 and cells[0] != "test":
            try:
                rates[cells[0]] = float(cells[1])
            except ValueError:
                continue
    return rates


def per_day(rate: float) -> str:
    return f"{rate:,.0f}/s = {rate * 86400 / 1e6:,.0f} M/day"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--dags", type=int, default=20)
    parser.add_argument("--fan-in", type=int, default=20)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--bench-n", type=int, default=100_000, help="redis-benchmark requests")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--scenarios", nargs="+", default=["plain", "dag node", "bucketed"], metavar="NAME"
    )
    parser.add_argument(
        "--trace", action="store_true", help="also MONITOR one task (DAG: 2 leaves + join)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    print(f"machine: {machine()}", flush=True)
    results: list[dict[str, Any]] = []
    with scratch() as (workdir, group):
        server = start_redis(group, workdir)
        fake = start_fake_llm(group, "--latency-ms", "0")
        httpx.get(f"{fake.root}/_fake/stats", timeout=5).raise_for_status()
        for name in args.scenarios:
            result = scenario(name, group, workdir, server.url, fake, args)
            results.append(result)
            units = result["units"]
            print(
                f"{name}: {result['total']['commands'] / units:.1f} commands/unit, "
                f"producer {result['producer']['commands'] / units:.1f}",
                flush=True,
            )
        redis.Redis.from_url(server.url).flushdb()
        ops = redis_ops_per_s(server.port, args)
    print(f"\nredis-benchmark (50 clients, no pipelining): {ops}")
    ops_median = sorted(ops.values())[len(ops) // 2] if ops else float("nan")

    rows = []
    for r in results:
        n, t, p = r["units"], r["total"], r["producer"]
        per_task = t["commands"] / n
        cpu = t["cpu_s"] / n
        r["per_unit"] = {
            "commands": per_task,
            "producer_commands": p["commands"] / n,
            "worker_commands": per_task - p["commands"] / n,
            "bytes_in": t["net_in"] / n,
            "bytes_out": t["net_out"] / n,
            "redis_usec": t["usec"] / n,
            "redis_cpu_ms": cpu * 1000,
            "ceiling_ops_per_s": ops_median / per_task,
            "ceiling_cpu_per_s": 1 / cpu if cpu else float("inf"),
        }
        u = r["per_unit"]
        rows.append(
            [
                r["scenario"],
                f"{u['commands']:.1f}",
                f"{u['producer_commands']:.1f} / {u['worker_commands']:.1f}",
                f"{u['bytes_in']:,.0f} / {u['bytes_out']:,.0f}",
                f"{u['redis_usec']:.0f} µs",
                f"{u['redis_cpu_ms']:.2f} ms",
                per_day(u["ceiling_ops_per_s"]),
                per_day(u["ceiling_cpu_per_s"]),
            ]
        )
    print(f"per task (DAG: per node); this Redis: {ops_median:,.0f} ops/s (median of the tests)")
    print(
        table(
            [
                "scenario",
                "commands",
                "producer / worker",
                "bytes in / out",
                "Redis time (commandstats)",
                "Redis CPU",
                "ceiling by ops/s",
                "ceiling by CPU",
            ],
            rows,
        )
    )
    for r in results:
        top = sorted(r["total"]["calls"].items(), key=lambda kv: -kv[1])
        print(
            f"{r['scenario']}: "
            + ", ".join(f"{name} {count / r['units']:.2f}" for name, count in top[:14])
        )
    for r in results:
        if r["trace"]:
            lua = sum(line.startswith("[lua]") for line in r["trace"])
            print(
                f"\n{r['scenario']}: MONITOR of one (DAG: 2 leaves + join), "
                f"{len(r['trace']) - lua} client commands, {lua} inside scripts"
            )
            print("\n".join(r["trace"]))
    write_json(
        args.json,
        {"args": vars(args) | {"json": None}, "ops_per_s": ops, "scenarios": results},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
