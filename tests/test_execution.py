"""The task body without Celery: one run per task id, stored outcomes, odd payloads."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis

from swarm_workers.config import load_settings
from swarm_workers.execution import Runtime, execute
from swarm_workers.execution.claims import Claim, Claims
from swarm_workers.models import AgentTask, Priority, TaskResult
from swarm_workers.results import ResultStore

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


# --------------------------------------------------------------------------- faults
# Redis failing at a chosen moment, in process: a real Redis behind, with a wrapper that
# raises (or runs a twin's move) where a failover or a race would strike.


class _FlakyLimiter:
    """The bucket's Redis fails for the first `failures` takes, as in a failover."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner, self.failures = inner, failures

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise redis.ConnectionError("failover in progress")
        return self.inner.acquire(*args, **kwargs)

    def penalize(self, *args: Any, **kwargs: Any) -> None:
        self.inner.penalize(*args, **kwargs)


def _task(prompt: str = "fault") -> dict[str, Any]:
    return AgentTask(
        role="default", priority=Priority.P1, prompt=prompt, output_budget=50
    ).to_wire()


def test_redis_blips_during_runs_cost_the_task_no_attempt(runtime: Runtime) -> None:
    """Three deliveries cut short by Redis (each requeued) and a fourth that runs: the
    task succeeds on its first counted run, not `TooManyAttempts` (max_attempts 3)."""
    flaky = replace(runtime, limiter=_FlakyLimiter(runtime.limiter, failures=3))
    payload = _task()
    for _ in range(3):
        with pytest.raises(redis.ConnectionError):
            execute(payload, flaky)
        assert runtime.redis.get(runtime.settings.keys.attempts(str(payload["id"]))) is None
    result = execute(payload, flaky)
    assert result.ok, result.error
    assert result.attempts == 1


class _FailingFinish(Claims):
    def finish(self, claim: Claim, result: TaskResult) -> TaskResult:
        raise redis.ConnectionError("Redis went away while the result was saved")


def test_a_failed_save_does_not_strand_the_task_behind_its_lease(
    runtime: Runtime, redis_url: str, slow_fake: FakeLLM
) -> None:
    settings = load_settings(
        None,
        redis_url=redis_url,
        llm={"base_url": slow_fake.base_url},
        worker={"redis_retry_s": 0.3},
    )
    keys = settings.keys
    claims = _FailingFinish(
        runtime.redis, keys, lease_ttl_s=30, result_ttl_s=60, attempts_ttl_s=600
    )
    broken = replace(runtime, settings=settings, claims=claims)
    payload = _task()
    with pytest.raises(redis.ConnectionError):
        execute(payload, broken)
    task_id = str(payload["id"])
    # The lease is given back at once (not held for its TTL, or for the task's time limit
    # as before), and the cut-short run is not counted: the redelivery runs right away.
    assert runtime.redis.exists(keys.lease(task_id)) == 0
    assert runtime.redis.get(keys.attempts(task_id)) is None
    result = execute(payload, runtime)
    assert result.ok
    assert result.attempts == 1


class _TwinFinishesAfterOurLook(redis.Redis):
    """Runs `twin()` right after the first command that touched the task's keys returns:
    the moment a twin delivery finished and released, in the race the issue found."""

    task_id: str
    twin: Any

    def execute_command(self, *args: Any, **options: Any) -> Any:
        answer = super().execute_command(*args, **options)
        if self.twin is not None and any(self.task_id in str(a) for a in args):
            twin, self.twin = self.twin, None
            twin()
        return answer


def test_a_twin_finishing_between_look_and_lease_is_not_run_again(
    runtime: Runtime, redis_url: str, slow_fake: FakeLLM
) -> None:
    payload = _task("once only")
    task_id = str(payload["id"])
    keys = runtime.settings.keys
    twin_result = TaskResult.failure("TwinDone", "the twin's outcome", task_id=task_id)
    runtime.redis.set(keys.lease(task_id), "twin-token", px=30_000)  # the twin runs

    def twin_finishes() -> None:
        runtime.results.put(twin_result)
        runtime.redis.delete(keys.lease(task_id))

    client = _TwinFinishesAfterOurLook.from_url(redis_url)
    client.task_id, client.twin = task_id, twin_finishes
    claims = Claims(client, keys, lease_ttl_s=30, result_ttl_s=60, attempts_ttl_s=600)
    ours = replace(runtime, claims=claims)
    result = execute(payload, ours)
    assert result == twin_result
    assert slow_fake.stats()["requests"] == 0


def test_a_dag_node_requeues_on_redis_errors_instead_of_failing(
    runtime: Runtime, redis_url: str
) -> None:
    from swarm_workers.client import SwarmClient
    from swarm_workers.dag import Node
    from swarm_workers.execution import run_node

    with SwarmClient(settings=runtime.settings) as client:
        dag = client.submit_dag([Node("a", "first"), Node("b", "second", deps=["a"])])

    class _Down(ResultStore):
        def get_many(self, task_ids: Any) -> Any:
            raise redis.ConnectionError("Redis restarting")

    down = replace(runtime, results=_Down(runtime.redis, runtime.settings.keys, ttl_s=60))
    with pytest.raises(redis.ConnectionError):
        run_node(dag.id, "b", down)
    assert runtime.results.get(dag.task_id("b")) is None  # nothing recorded for 7 days
