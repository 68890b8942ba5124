"""The task body without Celery: one run per task id, stored outcomes, odd payloads."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from swarm_workers.config import load_settings
from swarm_workers.execution import Runtime, execute
from swarm_workers.models import AgentTask, Priority, TaskResult

from .conftest import FakeLLM, spawn_fake_llm


@pytest.fixture
def slow_fake() -> Iterator[FakeLLM]:
    fake = spawn_fake_llm("--latency-ms", "1000")
    yield fake
    fake.stop()


@pytest.fixture
def runtime(redis_url: str, slow_fake: FakeLLM) -> Iterator[Runtime]:
    settings = load_settings(None, redis_url=redis_url, llm={"base_url": slow_fake.base_url})
    built = Runtime.build(settings, worker_name="test@host")
    yield built
    built.close()


def test_two_deliveries_at_once_run_the_model_once(runtime: Runtime, slow_fake: FakeLLM) -> None:
    """A redelivered twin waits for the running delivery's outcome instead of running."""
    payload = AgentTask(
        role="default", priority=Priority.P1, prompt="only once", output_budget=100
    ).to_wire()
    outcomes: list[TaskResult] = []

    def deliver() -> None:
        outcomes.append(execute(payload, runtime))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == 2
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].ok
    assert outcomes[0].attempts == 1
    assert slow_fake.stats()["completions"] == 1
    assert runtime.redis.exists(runtime.settings.keys.lease(str(payload["id"]))) == 0  # released


def test_a_payload_that_is_not_an_object_is_recorded_as_failed(runtime: Runtime) -> None:
    result = execute(["not", "a", "task"], runtime)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "InvalidPayload"
    assert "valid dictionary" in result.error.message


def test_an_invalid_field_is_named(runtime: Runtime) -> None:
    wire = AgentTask(role="default", priority=Priority.P1, prompt="x", output_budget=5).to_wire()
    wire["output_budget"] = -1
    result = execute(wire, runtime)
    assert result.error is not None
    assert result.error.message.startswith("output_budget:")
