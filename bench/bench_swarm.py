"""A model-directed swarm: one supervisor spawning sub-agents on real workers.

The shipped fake provider plays the models (`SPAWN n roles=research,summarize`): the
supervisor's first turn calls `swarm__spawn` with n sub-tasks, each sub-agent makes one
model call, and the supervisor's second turn synthesises. Every call takes the fake's
fixed latency. Measured, all in the same run:

- the root's wall time (its first start to its recorded end) against the critical path
  (its own model time plus its slowest sub-agent, queue wait included) and against the
  sequential time (its own model time plus every sub-agent's run, one after another);
- worker threads held by the supervisor while it waits: sampled every 20 ms from the
  moment it released its lease to the moment its sub-agents had all recorded, as the
  supervisor's lease (a run in some thread) plus its delivered, unacknowledged messages.

    python bench/bench_swarm.py --agents 50 --latency-ms 1000 --concurrency 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from swarm_workers.client import SwarmClient
from swarm_workers.keys import KOMBU_UNACKED
from swarm_workers.localfleet import FakeLLMSpec, FleetSpec, LocalFleet, WorkerSpec
from swarm_workers.models import TaskState

ROLES = ("boss", "research", "summarize")


def _held(client: SwarmClient, root: str) -> int:
    """Threads the supervisor holds now: a leased run, or its messages unacknowledged."""
    held = int(client.status(root).state is TaskState.RUNNING)
    for raw in client.redis.hvals(KOMBU_UNACKED):
        message: Any = json.loads(raw)[0]
        task_id = str(message.get("headers", {}).get("id", ""))
        if task_id == root or task_id.startswith(f"{root}.cont"):
            held += 1
    return held


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=50, help="sub-agents spawned")
    parser.add_argument("--latency-ms", type=float, default=1000.0, help="fake LLM latency")
    parser.add_argument("--concurrency", type=int, default=64, help="threads of the worker")
    args = parser.parse_args()

    spec = FleetSpec(
        config={
            "ratelimit": {"enabled": False},
            "roles": {
                "boss": {"spawn": {"max_per_spawn": 100}, "concurrency": args.concurrency},
                "research": {"concurrency": args.concurrency},
                "summarize": {"concurrency": args.concurrency},
            },
        },
        llm=FakeLLMSpec(("--latency-ms", str(args.latency_ms))),
    )
    worker = WorkerSpec(
        roles=ROLES,
        concurrency=args.concurrency,
        hostname="bench@%h",
        loglevel="WARNING",
        heartbeat_interval_s=None,
    )
    samples: list[int] = []
    with tempfile.TemporaryDirectory() as tmp, LocalFleet(spec, Path(tmp)) as fleet:
        fleet.add_workers([worker])
        with SwarmClient(settings=fleet.settings()) as client:
            prompt = f"SPAWN {args.agents} roles=research,summarize"
            handle = client.submit(prompt, role="boss", priority="P1")
            stop = threading.Event()

            def sample() -> None:
                waiting = False
                while not stop.is_set():
                    tree = client.tree(handle.id)
                    if tree is not None and tree.total_agents == args.agents:
                        if not waiting and client.status(handle.id).state is TaskState.WAITING:
                            waiting = True  # released: from here on it must hold nothing
                        if all(a.status in ("succeeded", "failed") for a in tree.children):
                            return
                        if waiting:
                            samples.append(_held(client, handle.id))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            result = handle.result(timeout=600)
            stop.set()
            sampler.join(5)
    tree = result.swarm
    assert tree is not None and tree.wall_s is not None, result
    longest = max((a.run_s or 0.0) + (a.queue_wait_s or 0.0) for a in tree.children)
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "sub_agents": tree.total_agents,
        "succeeded": sum(a.status == "succeeded" for a in tree.children),
        "latency_ms": args.latency_ms,
        "concurrency": args.concurrency,
        "root_wall_s": round(tree.wall_s, 3),
        "critical_path_s": round(tree.critical_path_s, 3),
        "wall_over_critical_path": round(tree.wall_s / tree.critical_path_s, 3),
        "supervisor_model_s": round(tree.own_model_s, 3),
        "longest_sub_agent_s": round(longest, 3),
        "sequential_s": round(tree.sequential_s, 3),
        "speedup_vs_sequential": round(tree.sequential_s / tree.wall_s, 2),
        "sub_agents_sum_run_s": round(tree.sequential_s - tree.own_model_s, 3),
        "children_phase_speedup": round((tree.sequential_s - tree.own_model_s) / longest, 2),
        "held_thread_samples": len(samples),
        "threads_held_while_waiting_max": max(samples, default=0),
    }
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(report))
    ok = (
        report["succeeded"] == args.agents
        and tree.wall_s <= 1.5 * tree.critical_path_s
        and report["threads_held_while_waiting_max"] == 0
        and report["held_thread_samples"] > 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
