"""Redis memory per queued and per finished task, on a private redis-server (docs/operations.md).

    python deploy/tools/measure_redis_memory.py --tasks 1000

Starts redis-server, the fake provider and one worker; every process is stopped at the
end. Queued: INFO memory delta after enqueueing N tasks. Finished: delta (against the
empty server) once the same N tasks have run and their results are stored.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import redis

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.processes import ProcessGroup, free_port, redis_server_argv, wait_until


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--prompt-chars", type=int, default=200)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp())
    port, llm_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{port}/0"
    binary = shutil.which("redis-server") or sys.exit("needs redis-server")
    with ProcessGroup() as group:
        group.spawn("redis", redis_server_argv(binary, port, workdir))
        client = redis.Redis.from_url(url)
        wait_until(lambda: _pings(client), 10, "redis")
        base = used(client)
        settings = load_settings(None, redis_url=url)
        prompt = "x" * args.prompt_chars
        with SwarmClient(settings=settings) as swarm:
            handles = [swarm.submit(prompt, priority="P1") for _ in range(args.tasks)]
            queued = used(client) - base
            group.spawn(
                "fake-llm",
                [
                    sys.executable,
                    "-m",
                    "swarm_workers.fakes.llm_server",
                    "--port",
                    str(llm_port),
                    "--latency-ms",
                    "5",
                ],
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")}
            env.update(
                REDIS_URL=url,
                SWARM_LLM_BASE_URL=f"http://127.0.0.1:{llm_port}/v1",
                SWARM_WORKER_HEARTBEAT_FILE=str(workdir / "hb"),
            )
            group.spawn(
                "worker",
                [
                    sys.executable,
                    "-m",
                    "swarm_workers.cli",
                    "worker",
                    "--role",
                    "default",
                    "--concurrency",
                    "16",
                ],
                env=env,
            )
            for handle in handles:
                handle.result(timeout=600)
            time.sleep(1)
            finished = used(client) - base
    print(f"tasks={args.tasks} prompt_chars={args.prompt_chars}")
    print(f"queued:   {queued} B total, {queued / args.tasks:.0f} B per task")
    print(f"finished: {finished} B total, {finished / args.tasks:.0f} B per task")


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


if __name__ == "__main__":
    main()
