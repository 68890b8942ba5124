"""Model-directed swarms on real workers: a supervisor's `swarm__spawn`, its limits, its
continuation, and what survives a worker SIGKILLed while the supervisor waits.

The shipped fake provider plays the models: `SPAWN n roles=a,b` makes a supervisor
spawn n sub-tasks and then synthesise from their results.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.models import SubAgent, TaskResult, TaskState

from .conftest import FakeLLM, WorkerFactory, spawn_fake_llm, wait_until

ROLES = ("boss", "research", "summarize")


def _roles(**spawn: Any) -> dict[str, Any]:
    return {
        "boss": {"concurrency": 4, "spawn": spawn or True, "max_steps": 6},
        "research": {"concurrency": 4, "spawn": spawn or True},
        "summarize": {"concurrency": 4},
    }


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    fake = spawn_fake_llm("--latency-ms", "300")
    yield fake
    fake.stop()


@pytest.fixture
def fleet(
    redis_url: str, swarm_config: Callable[..., Path], llm: FakeLLM, start_worker: WorkerFactory
) -> Callable[..., SwarmClient]:
    """`fleet(roles=..., worker=..., workers=1, concurrency=24)`: workers started, a client."""
    start_worker.env["SWARM_LLM_BASE_URL"] = llm.base_url
    made: list[SwarmClient] = []

    def make(
        roles: dict[str, Any] | None = None,
        workers: int = 1,
        concurrency: int = 24,
        **sections: Any,
    ) -> SwarmClient:
        config = swarm_config(roles=roles or _roles(), **sections)
        for _ in range(workers):
            start_worker(ROLES, config=config, concurrency=concurrency)
        client = SwarmClient(settings=load_settings(config, redis_url=redis_url))
        made.append(client)
        fleet.config = config  # type: ignore[attr-defined]
        return client

    yield make  # type: ignore[misc]
    for client in made:
        client.close()


def _flat(agents: tuple[SubAgent, ...]) -> list[SubAgent]:
    return [x for a in agents for x in (a, *_flat(a.children))]


def test_a_supervisor_spawns_20_sub_agents_that_run_in_parallel(
    fleet: Callable[..., SwarmClient], llm: FakeLLM, redis_conn: redis.Redis
) -> None:
    client = fleet()
    handle = client.submit("SPAWN 20 roles=research,summarize", role="boss", priority="P1")
    result = handle.result(timeout=90)
    assert result.ok, result.error
    assert result.output is not None
    assert result.output.startswith("Synthesis: 1 round(s), 20 sub-agents, 20 succeeded")
    tree = result.swarm
    assert tree is not None and tree.rounds == 1 and tree.total_agents == 20
    assert {a.role for a in tree.children} == {"research", "summarize"}
    assert all(a.status == "succeeded" and a.run_s is not None for a in tree.children)
    # Each sub-agent ran once: one model call each, plus the supervisor's two turns.
    assert llm.stats()["completions"] == 20 + 2
    assert result.steps == 2 and result.steps_resumed == 1  # continued after the spawn
    # In parallel: the tree took much less than one agent doing it all in turn.
    assert tree.wall_s is not None and tree.wall_s * 3 < tree.sequential_s
    assert tree.critical_path_s <= tree.wall_s
    assert tree.completion_tokens == sum(a.completion_tokens for a in tree.children)
    # The supervisor's checkpoint, ledger and totals are gone with its outcome recorded.
    left = sorted(k.decode() for k in redis_conn.scan_iter(match=f"*{{{handle.id}}}*"))
    assert left == [f"swarm:result:{{{handle.id}}}"]
