"""The kombu window: how many messages a SIGKILLed worker loses, measured.

kombu's Redis transport takes a message off its queue with BRPOP and only then, in a
second round trip from the worker (`QoS.append`: ZADD `unacked_index` + HSET
`unacked`), records it as delivered-but-unacknowledged. A worker that dies between the
two has taken the message out of Redis and written it nowhere: no visibility timeout
brings it back. The fleet's transport (`swarm_workers/broker/`) takes and records in one
Lua script instead; this script is how both were measured (docs/reliability.md).

This script kills a worker again and again while it consumes a stream of short tasks,
then lets one worker drain whatever came back, and counts the tasks that never got a
result and are in neither a queue nor the unacked hash: the lost ones.

    python bench/bench_kombu_window.py --kills 50 --tasks 2500 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import redis

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.localfleet import (
    ManagedProcess,
    ProcessGroup,
    free_port,
    redis_server_argv,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "p1.default"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=2500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=5.0, help="fake LLM latency")
    parser.add_argument("--min-life-s", type=float, default=0.2, help="after ready, at least")
    parser.add_argument("--max-life-s", type=float, default=1.5, help="after ready, at most")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp, ProcessGroup(log_dir=Path(tmp)) as group:
        redis_port, llm_port = free_port(), free_port()
        binary = shutil.which("redis-server") or sys.exit("redis-server is not on PATH")
        group.spawn("redis", redis_server_argv(binary, redis_port, Path(tmp)))
        url = f"redis://127.0.0.1:{redis_port}/0"
        conn = redis.Redis.from_url(url)
        wait_until(lambda: _answers(conn), 10, "redis")
        fake = [sys.executable, "-m", "swarm_workers.fakes.llm_server", "--port", str(llm_port)]
        group.spawn("fake-llm", [*fake, "--latency-ms", str(args.latency_ms)])
        base = f"http://127.0.0.1:{llm_port}/v1"
        wait_until(lambda: _http_ok(f"{base}/models"), 20, "the fake provider")
        config = Path(tmp) / "swarm.toml"
        # Short visibility and lease so the final worker gets back everything that is
        # in the unacked hash; many attempts so no task is given up for its kills.
        config.write_text(
            "[roles.default]\nconcurrency = 64\n[worker]\nvisibility_timeout_s = 6\n"
            "task_time_limit_s = 5\nlease_ttl_s = 2\nmax_attempts = 20\n"
        )
        env = {
            "REDIS_URL": url,
            "SWARM_CONFIG": str(config),
            "SWARM_LLM_BASE_URL": base,
            "SWARM_WORKER_HEARTBEAT_FILE": str(Path(tmp) / "heartbeat"),
            "PYTHONUNBUFFERED": "1",
        }
        settings = load_settings(config, redis_url=url)
        with SwarmClient(settings=settings) as client:
            ids = [client.submit(f"window {i}").id for i in range(args.tasks)]
            print(f"submitted {len(ids)} tasks; {args.kills} SIGKILLs follow", flush=True)

            def spawn(n: int) -> ManagedProcess:
                argv = [sys.executable, "-m", "swarm_workers.cli", "worker", "--role", "default"]
                argv += ["--concurrency", str(args.concurrency), "--hostname", f"k{n}@bench"]
                return group.spawn(f"worker-{n}", argv, env=env, cwd=ROOT)

            def ready(proc: ManagedProcess) -> ManagedProcess:
                wait_until(lambda: " ready." in proc.output(), 120, proc.name, interval=0.05)
                return proc

            kills = 0
            popping_at_kill = 0
            started = time.monotonic()
            upcoming = spawn(0)
            for n in range(args.kills):
                if conn.llen(QUEUE) == 0:
                    print("the queue ran dry; stopping the kill loop early")
                    break
                proc = ready(upcoming)
                # The next victim boots while this one consumes: a worker's start is
                # the slow part of the loop, and two consumers only add deliveries.
                upcoming = spawn(n + 1)
                time.sleep(rng.uniform(args.min_life_s, args.max_life_s))
                popping_at_kill += conn.llen(QUEUE) > 0
                proc.proc.send_signal(signal.SIGKILL)
                proc.proc.wait(10)
                kills += 1
                if kills % 10 == 0:
                    print(f"  {kills} kills, {_recorded(client, ids)} tasks recorded", flush=True)
            kill_loop_s = time.monotonic() - started
            before_drain = _recorded(client, ids)
            print(f"{kills} kills in {kill_loop_s:.0f}s; {before_drain} tasks recorded so far")

            drainer = ready(upcoming)
            last_progress, done = time.monotonic(), _recorded(client, ids)
            # Drained when every task is recorded, or nothing moved for long enough for
            # everything in the unacked hash to have come back (visibility + restore).
            while done < len(ids) and time.monotonic() - last_progress < 30:
                time.sleep(1.0)
                now = _recorded(client, ids)
                if now != done:
                    done, last_progress = now, time.monotonic()
            drainer.stop()

            results = client.results.get_many(ids)
            missing = [i for i, r in zip(ids, results, strict=True) if r is None]
            unacked = _text(conn.hvals("unacked"))
            queued = _text(conn.lrange(QUEUE, 0, -1))
            lost = [i for i in missing if i not in unacked and i not in queued]
            cut_short = sum(1 for r in results if r is not None and r.attempts > 1)
            report = {
                "kills": kills,
                "kills_while_queue_nonempty": popping_at_kill,
                "tasks": len(ids),
                "recorded": len(ids) - len(missing),
                "still_held": len(missing) - len(lost),
                "lost": len(lost),
                "lost_per_kill": round(len(lost) / kills, 4) if kills else None,
                "tasks_cut_short": cut_short,
                "concurrency": args.concurrency,
                "latency_ms": args.latency_ms,
                "lost_ids": lost[:20],
            }
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _text(values: Sequence[bytes | str]) -> str:
    return " ".join(v.decode() if isinstance(v, bytes) else v for v in values)


def _recorded(client: SwarmClient, ids: list[str]) -> int:
    return sum(r is not None for r in client.results.get_many(ids))


def _answers(conn: redis.Redis) -> bool:
    try:
        return bool(conn.ping())
    except redis.ConnectionError:
        return False


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
