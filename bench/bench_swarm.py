"""A model-directed swarm: one supervisor spawning sub-agents on real workers.

The shipped fake provider plays the models (`SPAWN n roles=research,summarize`): the
supervisor's first turn calls `swarm__spawn` with n sub-tasks, each sub-agent makes
`--steps` model calls (steps above one: `TURNS k CALL kb__add`, a tool call on the fake
MCP server per turn, then a final answer), and the supervisor's second turn synthesises.
Every model call takes the fake's fixed latency. Measured, all in the same run:

- the root's wall time (its first start to its recorded end) against the critical path
  (its own model time plus its slowest sub-agent, queue wait included);
- sequential: one agent making every model call and tool call of the tree (the
  supervisor's and every sub-agent's), one after another, from their measured latencies;
  the whole root's speed-up is that over the root's wall time. The supervisor's own
  turns are serial either way, so with one-step sub-agents they cap it;
- the sub-agent phase: from the spawn (the sub-agents' submission) to the last one's
  recorded end, against the sub-agents' own calls in sequence;
- worker threads held by the supervisor while it waits: sampled every 20 ms from the
  moment it has suspended (it reads `waiting`: its lease released, and its delivery
  acknowledged) to the moment its sub-agents had all recorded, as the
  supervisor's lease (a run in some thread) plus its delivered, unacknowledged messages;
  a sample counts when the supervisor still reads `waiting` after it was taken (so the
  continuation the last sub-agent sends is not counted as held while waiting).

    python bench/bench_swarm.py --agents 50 --latency-ms 1000 --concurrency 64 --steps 5
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
from swarm_workers.localfleet import (
    FakeLLMSpec,
    FleetSpec,
    LocalFleet,
    McpServerSpec,
    WorkerSpec,
)
from swarm_workers.models import TaskResult, TaskState

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


def _serial_s(result: TaskResult) -> float:
    """What one agent making this task's model and tool calls in turn would wait."""
    return sum(c.latency_s for c in result.usage.calls) + sum(
        t.latency_s for t in result.tool_calls
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=50, help="sub-agents spawned")
    parser.add_argument("--latency-ms", type=float, default=1000.0, help="fake LLM latency")
    parser.add_argument("--concurrency", type=int, default=64, help="threads of the worker")
    parser.add_argument(
        "--steps", type=int, default=1, help="model calls per sub-agent (tool calls between)"
    )
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    sub_role: dict[str, Any] = {"concurrency": args.concurrency, "max_steps": args.steps}
    if args.steps > 1:
        sub_role["tools"] = ["kb__add"]
    spec = FleetSpec(
        config={
            "ratelimit": {"enabled": False},
            "roles": {
                "boss": {"spawn": {"max_per_spawn": 100}, "concurrency": args.concurrency},
                "research": sub_role,
                "summarize": sub_role,
            },
        },
        llm=FakeLLMSpec(("--latency-ms", str(args.latency_ms))),
        mcp_servers=(McpServerSpec("kb"),) if args.steps > 1 else (),
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
            if args.steps > 1:
                prompt += f' | TURNS {args.steps - 1} CALL kb__add {{"a": 1, "b": 2}}'
            handle = client.submit(prompt, role="boss", priority="P1")
            stop = threading.Event()

            def sample() -> None:
                waiting = False
                while not stop.is_set():
                    tree = client.tree(handle.id)
                    if tree is not None and tree.total_agents == args.agents:
                        if (
                            not waiting
                            and client.status(handle.id).state is TaskState.WAITING
                            and _held(client, handle.id) == 0
                        ):
                            # Suspended: its lease released and its delivery acknowledged.
                            # From here until the round closes it must hold nothing.
                            waiting = True
                        if all(a.status in ("succeeded", "failed") for a in tree.children):
                            return
                        if waiting:
                            held = _held(client, handle.id)
                            # Counted only while the round is still open after the look:
                            # once its last sub-agent records, the continuation may run.
                            if client.status(handle.id).state is TaskState.WAITING:
                                samples.append(held)
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            result = handle.result(timeout=600)
            stop.set()
            sampler.join(5)
            tree = result.swarm
            assert tree is not None and tree.wall_s is not None, result
            found = client.results.get_many([a.task_id for a in tree.children])
    children = [r for r in found if r is not None]
    longest = max((a.run_s or 0.0) + (a.queue_wait_s or 0.0) for a in tree.children)
    phase_serial = sum(_serial_s(r) for r in children)
    phase_wall = (
        max(r.timings.finished_at for r in children) - min(r.timings.submitted_at for r in children)
    ).total_seconds()
    serial = _serial_s(result) + phase_serial
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "sub_agents": tree.total_agents,
        "succeeded": sum(a.status == "succeeded" for a in tree.children),
        "latency_ms": args.latency_ms,
        "concurrency": args.concurrency,
        "steps_per_sub_agent": args.steps,
        "model_calls": len(result.usage.calls) + sum(len(r.usage.calls) for r in children),
        "root_wall_s": round(tree.wall_s, 3),
        "critical_path_s": round(tree.critical_path_s, 3),
        "wall_over_critical_path": round(tree.wall_s / tree.critical_path_s, 3),
        "supervisor_model_s": round(tree.own_model_s, 3),
        "longest_sub_agent_s": round(longest, 3),
        "sequential_s": round(serial, 3),
        "speedup_vs_sequential": round(serial / tree.wall_s, 2),
        "sub_agent_phase_wall_s": round(phase_wall, 3),
        "sub_agent_phase_sequential_s": round(phase_serial, 3),
        "sub_agent_phase_speedup": round(phase_serial / phase_wall, 2),
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
