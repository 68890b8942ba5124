"""A worker killed mid-task loses nothing; a worker told to stop finishes first.

Each task here is one call to the fake provider with 3 s latency, so there is a
window to kill or stop the worker while the task runs.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.models import TaskState

from .conftest import FakeLLM, WorkerFactory, spawn_fake_llm, wait_until

pytestmark = pytest.mark.slow

# Short enough for a test; the production default is an hour (see README).
WORKER = {"visibility_timeout_s": 8, "task_time_limit_s": 7, "lease_ttl_s": 2}


@pytest.fixture
def slow_llm() -> Iterator[FakeLLM]:
    fake = spawn_fake_llm("--latency-ms", "3000")
    yield fake
    fake.stop()


@pytest.fixture
def setup(
    redis_url: str, swarm_config: object, slow_llm: FakeLLM, start_worker: WorkerFactory
) -> Iterator[tuple[SwarmClient, Path]]:
    config: Path = swarm_config(roles={"default": {"concurrency": 1}}, worker=WORKER)  # type: ignore[operator]
    start_worker.env["SWARM_LLM_BASE_URL"] = slow_llm.base_url
    with SwarmClient(settings=load_settings(config, redis_url=redis_url)) as client:
        yield client, config


def test_sigkill_mid_task_runs_it_again_elsewhere(
    setup: tuple[SwarmClient, Path], start_worker: WorkerFactory, redis_conn: redis.Redis
) -> None:
    client, config = setup
    doomed = start_worker(config=config, concurrency=1)
    handle = client.submit("survive a crash", priority="P1")
    wait_until(lambda: handle.status().state is TaskState.RUNNING, 20, "the task to start")
    doomed.signal(signal.SIGKILL)
    assert doomed.wait(10) == -signal.SIGKILL
    assert redis_conn.hlen("unacked") == 1  # held for the dead worker, not lost

    start_worker(config=config, concurrency=1)
    result = handle.result(timeout=60)
    assert result.ok, result.error
    assert result.attempts == 2
    # The ack follows the stored result by a moment.
    wait_until(lambda: redis_conn.hlen("unacked") == 0, 10, "the redelivered task's ack")


def test_sigterm_finishes_the_running_task_and_exits_zero(
    setup: tuple[SwarmClient, Path], start_worker: WorkerFactory, redis_conn: redis.Redis
) -> None:
    client, config = setup
    worker = start_worker(config=config, concurrency=1)
    running = client.submit("finish me", priority="P1")
    waiting = client.submit("leave me queued", priority="P1")
    wait_until(lambda: running.status().state is TaskState.RUNNING, 20, "the task to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()[-2000:]

    result = running.result(timeout=5)
    assert result.ok and result.attempts == 1
    assert waiting.status().state is TaskState.QUEUED
    assert redis_conn.llen("p1.default") == 1
    assert redis_conn.hlen("unacked") == 0


def test_a_poison_task_dies_alone(
    redis_url: str, swarm_config: object, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    """A task that kills whatever process runs it costs its neighbours one run, not
    their lives: after the first crash every suspect runs in a child process, the
    poison is given up after max_attempts runs, and the innocents succeed."""
    # Room for a child process's start inside the deadline on a loaded machine.
    worker_settings = {"visibility_timeout_s": 16, "task_time_limit_s": 15, "lease_ttl_s": 2}
    config: Path = swarm_config(roles={"default": {"concurrency": 4}}, worker=worker_settings)  # type: ignore[operator]
    start_worker.env.update({"SWARM_LLM_BASE_URL": fake_llm.base_url, "SWARM_FAILPOINTS": "crash"})
    with SwarmClient(settings=load_settings(config, redis_url=redis_url)) as client:
        # The worker first: a poison queued before it could kill it before it is ready.
        worker = start_worker(config=config, concurrency=4)
        innocents = [client.submit(f"innocent {i}", priority="P1") for i in range(3)]
        poison = client.submit("poison", priority="P1", metadata={"failpoint": "crash"})
        crashes = 0
        deadline = time.monotonic() + 120
        handles = [*innocents, poison]
        while time.monotonic() < deadline:
            if all(h.status().state in (TaskState.SUCCEEDED, TaskState.FAILED) for h in handles):
                break
            if worker.proc.poll() is not None:  # what a supervisor does: start another
                crashes += 1
                worker = start_worker(config=config, concurrency=4)
            time.sleep(0.2)
        results = [h.result(timeout=1) for h in handles]
    assert crashes == 1  # the first run of the poison; after that it ran in child processes
    for result in results[:3]:
        assert result.ok, result.error
        assert result.attempts in (1, 2)  # cut short once if it had begun beside the poison
    assert not results[3].ok
    assert results[3].error is not None
    assert results[3].error.type == "TooManyAttempts"
    assert results[3].attempts == 4
