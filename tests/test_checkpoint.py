"""Durable agent loops: a worker killed mid-loop costs no model call already answered.

A three-step task (a malformed tool call, its correction, the final answer) runs on the
shipped fake provider at 1.5 s a call; the worker is SIGKILLed after the first step's
checkpoint. The redelivered run (a suspect, so in an isolated child process) resumes
from the checkpoint: the provider answers each step once, plus at most the one call the
dead worker had in flight.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from swarm_workers.agent.checkpoint import BLOB_CHARS, Checkpoint, CheckpointStore
from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.keys import Keys
from swarm_workers.localfleet import ProcessGroup, start_mcp_http
from swarm_workers.models import AgentTask, Priority

from .conftest import FakeLLM, WorkerFactory, spawn_fake_llm, wait_until

WORKER = {"visibility_timeout_s": 8, "task_time_limit_s": 7, "lease_ttl_s": 2}


@pytest.fixture
def slow_llm() -> Iterator[FakeLLM]:
    fake = spawn_fake_llm("--latency-ms", "1500")
    yield fake
    fake.stop()


@pytest.fixture
def mcp_port() -> Iterator[int]:
    with ProcessGroup() as group:
        yield start_mcp_http(group).port


def test_checkpoints_store_large_tool_outputs_once(redis_conn: redis.Redis) -> None:
    store = CheckpointStore(redis_conn, Keys("t"), ttl_s=60)
    task = AgentTask(role="default", priority=Priority.P1, prompt="x", output_budget=10)
    big = "y" * (BLOB_CHARS + 1)
    messages = ({"role": "user", "content": "x"}, {"role": "tool", "content": big})
    writer = store.writer(task.id)
    writer.save(Checkpoint(task=task, steps=1, messages=messages))
    writer.save(Checkpoint(task=task, steps=2, messages=(*messages, messages[1])))
    raw = redis_conn.get(Keys("t").checkpoint(task.id))
    assert isinstance(raw, bytes) and big.encode() not in raw  # referenced, not copied
    assert redis_conn.hlen(Keys("t").checkpoint_blobs(task.id)) == 1
    loaded = store.load(task.id)
    assert loaded is not None and loaded.steps == 2
    assert [m["content"] for m in loaded.messages][1:] == [big, big]


@pytest.mark.slow
def test_a_worker_killed_mid_loop_resumes_without_paying_again(
    redis_url: str,
    swarm_config: Callable[..., Path],
    slow_llm: FakeLLM,
    mcp_port: int,
    start_worker: WorkerFactory,
    redis_conn: redis.Redis,
) -> None:
    config = swarm_config(
        roles={"default": {"concurrency": 2, "tools": ["kb__add"]}},
        worker=WORKER,
        tools={"servers": {"kb": {"transport": "http", "url": f"http://127.0.0.1:{mcp_port}/mcp"}}},
    )
    start_worker.env["SWARM_LLM_BASE_URL"] = slow_llm.base_url
    settings = load_settings(config, redis_url=redis_url)
    store = CheckpointStore(redis_conn, settings.keys, ttl_s=60)
    with SwarmClient(settings=settings) as client:
        doomed = start_worker(config=config, concurrency=2)
        handle = client.submit('CALL_BAD kb__add {"a": 1, "b": 2}', priority="P1")
        wait_until(
            lambda: (found := store.load(handle.id)) is not None and found.steps >= 1,
            30,
            "the first step's checkpoint",
        )
        doomed.signal(signal.SIGKILL)
        assert doomed.wait(10) == -signal.SIGKILL
        in_flight = slow_llm.stats()["in_flight"]  # a call the dead worker never read

        start_worker(config=config, concurrency=2)
        result = handle.result(timeout=90)
    assert result.ok, result.error
    assert result.attempts == 2
    assert result.steps == 3 and result.steps_resumed >= 1
    assert (result.output or "").startswith("Tool results: kb__add: 3")
    assert len(result.usage.calls) == result.steps
    # Every step answered once; only a call cut off in flight was asked twice.
    assert slow_llm.stats()["completions"] == result.steps + in_flight
    left = sorted(k.decode() for k in redis_conn.scan_iter(match=f"*{{{handle.id}}}*"))
    assert left == [f"swarm:result:{{{handle.id}}}"]  # the checkpoint went with the outcome


@pytest.mark.slow
def test_a_supervisor_cut_short_once_spawns_waits_and_continues_in_isolation(
    redis_url: str,
    swarm_config: Callable[..., Path],
    slow_llm: FakeLLM,
    start_worker: WorkerFactory,
    redis_conn: redis.Redis,
) -> None:
    """Its worker SIGKILLed during its first model call, the supervisor is a suspect: its
    redelivery and its continuation both run in isolated children (run 2), which spawn,
    suspend and resume from the checkpoint like any run."""
    config = swarm_config(
        roles={"boss": {"concurrency": 2, "spawn": True}, "research": {"concurrency": 4}},
        worker=WORKER,
    )
    start_worker.env["SWARM_LLM_BASE_URL"] = slow_llm.base_url
    settings = load_settings(config, redis_url=redis_url)
    assert settings.worker.isolate_suspects
    with SwarmClient(settings=settings) as client:
        doomed = start_worker(("boss", "research"), config=config, concurrency=4)
        handle = client.submit("SPAWN 3 roles=research", role="boss", priority="P1")
        wait_until(lambda: slow_llm.stats()["in_flight"] == 1, 30, "the supervisor's first call")
        doomed.signal(signal.SIGKILL)
        assert doomed.wait(10) == -signal.SIGKILL
        in_flight = slow_llm.stats()["in_flight"]  # a call the dead worker never read

        second = start_worker(("boss", "research"), config=config, concurrency=4)
        result = handle.result(timeout=90)
    assert result.ok, result.error
    assert (result.output or "").startswith("Synthesis: 1 round(s), 3 sub-agents, 3 succeeded")
    assert result.attempts == 2  # the continuation was a suspect too: isolated
    assert result.steps == 2 and result.steps_resumed == 1
    assert result.swarm is not None and result.swarm.total_agents == 3
    assert all(a.status == "succeeded" for a in result.swarm.children)
    # The supervisor's two turns and each sub-agent's one, once (plus the call cut off).
    assert slow_llm.stats()["completions"] == 2 + 3 + in_flight
    runs = [
        line for line in second.output().splitlines() if f"start AgentTask(id={handle.id}," in line
    ]
    assert len(runs) == 2 and all("run=2" in line for line in runs), runs
    left = sorted(k.decode() for k in redis_conn.scan_iter(match=f"*{{{handle.id}}}*"))
    assert left == [f"swarm:result:{{{handle.id}}}"]
