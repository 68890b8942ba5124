"""Redis memory per completed task: today's code against the code before the restructure.

Issue 12: before it (commit 3a08344) each result was stored twice, under the fleet's
own key and as Celery's `celery-task-meta-<id>`. This bench runs both trees side by
side in one run: the old tree is extracted (`git archive`) into a temporary directory,
and each tree gets its own redis-server, its own `swarm worker` (started with that tree
first on PYTHONPATH and as its cwd) and its own producer, a subprocess importing that
tree's `SwarmClient` (`submit`, `result`: both trees have them). The fake provider is
shared (0 ms). Each round submits `--tasks` tasks per tree (trees alternated), waits for
every result, for the queues and kombu's unacked hash to be empty and the producer to
have exited, and reads `INFO memory` used_memory and the key count before and after.
A warm-up batch first creates the keys that do not grow with the tasks.

    python bench/bench_memory.py --tasks 1000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from benchlib import machine, table, write_json

from swarm_workers.keys import KOMBU_UNACKED
from swarm_workers.localfleet import (
    ProcessGroup,
    RedisServer,
    WorkerSpec,
    child_env,
    start_fake_llm,
    start_redis,
    wait_until,
)
from swarm_workers.localfleet.toml import write_toml

OLD_COMMIT = "3a08344"
REPO = Path(__file__).resolve().parents[1]
QUEUES = ("p0.default", "p1.default", "p2.default")

PRODUCER = """
import json, sys
from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
import swarm_workers
config, count, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with SwarmClient(settings=load_settings(config)) as client:
    handles = [client.submit(f"memory task {tag} {i}", priority="P1") for i in range(count)]
    ok = sum(client.result(h.id, timeout=600).status == "succeeded" for h in handles)
print(json.dumps({"ok": ok, "ids": [h.id for h in handles], "package": swarm_workers.__file__}))
"""


def key_kind(key: str) -> str:
    """A key's family: its name with the task/DAG id cut off."""
    for prefix in ("celery-task-meta-", "swarm:result:", "swarm:attempts:", "swarm:running:"):
        if key.startswith(prefix):
            return prefix + "*"
    return key


class Tree:
    """One source tree with its own Redis and worker."""

    def __init__(self, name: str, root: Path, server: RedisServer, config: Path) -> None:
        self.name = name
        self.root = root
        self.server = server
        self.config = config
        self.redis = redis.Redis.from_url(server.url, decode_responses=True)

    def env(self) -> dict[str, str]:
        # child_env puts this checkout first on PYTHONPATH; the old tree replaces it.
        return child_env({"PYTHONPATH": str(self.root)})

    def produce(self, count: int, tag: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-c", PRODUCER, str(self.config), str(count), tag],
            env=self.env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{self.name} producer failed:\n{done.stderr[-3000:]}")
        report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return report

    def settle(self) -> None:
        def idle() -> bool:
            pipe = self.redis.pipeline(transaction=False)
            for queue in QUEUES:
                pipe.llen(queue)
            pipe.hlen(KOMBU_UNACKED)
            return not any(pipe.execute())

        wait_until(idle, 120, f"{self.name}: queues and unacked empty", 0.2)
        time.sleep(2.0)

    def memory(self) -> int:
        return int(self.redis.info("memory")["used_memory"])

    def census(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for key in self.redis.scan_iter(count=1000):
            kind = key_kind(key)
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def sizes(self, ids: list[str]) -> dict[str, float]:
        """Mean MEMORY USAGE of the per-task keys of the given tasks, by family."""
        found: dict[str, list[int]] = {}
        for task_id in ids[:50]:
            for key in (
                f"celery-task-meta-{task_id}",
                f"swarm:result:{task_id}",
                f"swarm:result:{{{task_id}}}",
            ):
                used = self.redis.memory_usage(key)
                if used is not None:
                    found.setdefault(key_kind(key), []).append(int(used))
        return {kind: statistics.mean(v) for kind, v in found.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm-up", type=int, default=20)
    parser.add_argument("--old", default=OLD_COMMIT, help="the commit before the restructure")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    print(f"machine: {machine()}", flush=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, ProcessGroup(log_dir=Path(tmp)) as group:
        workdir = Path(tmp)
        old_root = workdir / "old-tree"
        old_root.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.old], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old_root)], input=archive.stdout, check=True)
        fake = start_fake_llm(group, "--latency-ms", "0")
        trees: list[Tree] = []
        for name, root in (("old", old_root), ("today", REPO)):
            server = start_redis(group, workdir)
            config = write_toml(
                workdir / f"swarm-{name}.toml",
                {
                    "redis_url": server.url,
                    "llm": {"base_url": fake.base_url},
                    "roles": {"default": {"concurrency": 16}},
                },
            )
            tree = Tree(name, root, server, config)
            spec = WorkerSpec(concurrency=16, loglevel="WARNING")
            group.spawn(
                f"worker-{name}",
                spec.argv(f"mem-{name}@localfleet"),
                env={
                    "PYTHONPATH": str(root),
                    "SWARM_CONFIG": str(config),
                    "SWARM_WORKER_HEARTBEAT_FILE": str(workdir / f"{name}.heartbeat"),
                },
                cwd=root,
            )
            trees.append(tree)
        for tree in trees:
            report = tree.produce(args.warm_up, "warm-up")
            assert report["package"].startswith(str(tree.root)), report["package"]
            print(f"{tree.name}: warm-up {report['ok']}/{args.warm_up} ok from {report['package']}")
            tree.settle()
        for n in range(args.rounds):
            for tree in trees if n % 2 == 0 else trees[::-1]:
                before, keys_before = tree.memory(), tree.redis.dbsize()
                census_before = tree.census()
                report = tree.produce(args.tasks, f"round{n}")
                tree.settle()
                after, keys_after = tree.memory(), tree.redis.dbsize()
                census_after = tree.census()
                grown = {
                    kind: census_after.get(kind, 0) - census_before.get(kind, 0)
                    for kind in census_after
                    if census_after.get(kind, 0) != census_before.get(kind, 0)
                }
                run = {
                    "tree": tree.name,
                    "round": n,
                    "ok": report["ok"],
                    "bytes_per_task": (after - before) / args.tasks,
                    "keys_per_task": (keys_after - keys_before) / args.tasks,
                    "keys_grown": grown,
                    "key_sizes": tree.sizes(report["ids"]),
                }
                runs.append(run)
                print(
                    f"round {n + 1} {tree.name:5s}: {run['bytes_per_task']:,.0f} B/task, "
                    f"{run['keys_per_task']:.2f} keys/task {grown}, "
                    f"{run['ok']}/{args.tasks} ok, sizes {run['key_sizes']}",
                    flush=True,
                )
        for tree in trees:
            tree.redis.close()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["tree"] == name)

    old_b, new_b = med("old", "bytes_per_task"), med("today", "bytes_per_task")
    print(f"\n{args.tasks} completed tasks per round, medians of {args.rounds} rounds")
    print(
        table(
            ["code", "used_memory per task", "keys per task", "per-task keys (MEMORY USAGE)"],
            [
                [
                    f"before the restructure ({args.old})" if name == "old" else "today",
                    f"{med(name, 'bytes_per_task'):,.0f} B",
                    f"{med(name, 'keys_per_task'):.2f}",
                    ", ".join(
                        f"{kind} {size:,.0f} B"
                        for kind, size in next(r for r in runs if r["tree"] == name)[
                            "key_sizes"
                        ].items()
                    ),
                ]
                for name in ("old", "today")
            ],
        )
    )
    print(f"today / before = {new_b / old_b:.2f} (goal: <= 0.50)")
    write_json(
        args.json,
        {"args": vars(args) | {"json": None}, "runs": runs, "ratio": new_b / old_b},
    )
    return 0 if all(r["ok"] == args.tasks for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
