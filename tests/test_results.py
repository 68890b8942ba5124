"""The result store: one key per outcome, put-if-absent, states from the fleet's own keys,
and waits that survive dropped connections."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from swarm_workers.config import load_settings
from swarm_workers.errors import ResultTimeout
from swarm_workers.models import AgentTask, Priority, TaskResult, TaskState
from swarm_workers.results import ResultStore, pointer


@pytest.fixture
def store(redis_url: str) -> Iterator[ResultStore]:
    settings = load_settings(None, redis_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    yield ResultStore.from_settings(settings, client)
    client.close()


def _task() -> AgentTask:
    return AgentTask(role="default", priority=Priority.P1, prompt="x", output_budget=10)


def test_the_first_outcome_stored_wins(store: ResultStore) -> None:
    task = _task()
    first = TaskResult.failure("Boom", "first", task=task)
    second = TaskResult.failure("Boom", "second", task=task)
    assert store.put(first) == first
    assert store.put(second) == first  # a racing twin gets the stored outcome back
    assert store.get(task.id) == first
    assert store.redis.ttl(store.keys.result(task.id)) > 0


def test_states_come_from_the_result_and_the_lease(store: ResultStore) -> None:
    queued, running, done = _task(), _task(), _task()
    store.redis.set(store.keys.lease(running.id), "token", px=10_000)
    store.put(TaskResult.failure("Boom", "x", task=done))
    states = {s.task_id: s.state for s in store.statuses([queued.id, running.id, done.id])}
    assert states == {
        queued.id: TaskState.QUEUED,
        running.id: TaskState.RUNNING,
        done.id: TaskState.FAILED,
    }
    assert store.status(done.id).result is not None


def test_get_many_keeps_the_order_and_the_gaps(store: ResultStore) -> None:
    a, b = _task(), _task()
    store.put(TaskResult.failure("Boom", "a", task=a))
    found = store.get_many([b.id, a.id])
    assert found[0] is None
    assert found[1] is not None
    assert found[1].task_id == a.id


def test_a_wait_finds_the_result_although_its_connections_were_cut(
    store: ResultStore, redis_conn: redis.Redis
) -> None:
    """A waiter relies on the stored key, not on a notice that dies with its socket."""
    task = _task()
    got: list[TaskResult] = []
    waiter = threading.Thread(target=lambda: got.append(store.wait(task.id, timeout=30)))
    waiter.start()
    for _ in range(5):  # drop every other client's connection, the waiter's included
        redis_conn.client_kill_filter(_type="normal", skipme=True)
        time.sleep(0.05)
    ResultStore(redis_conn, store.keys, ttl_s=60).put(TaskResult.failure("Boom", "x", task=task))
    waiter.join(30)
    assert got
    assert got[0].task_id == task.id


def test_a_wait_times_out_with_a_typed_error(store: ResultStore) -> None:
    with pytest.raises(ResultTimeout) as info:
        store.wait("never-submitted", timeout=0.2)
    assert info.value.task_id == "never-submitted"


def test_the_celery_side_keeps_a_pointer_of_a_few_bytes() -> None:
    result = TaskResult.failure("Boom", "x" * 10_000, task=_task())
    assert pointer(result) == {
        "task_id": result.task_id,
        "status": "failed",
        "output_chars": 0,
        "tokens": 0,
        "steps": 0,
        "error": "Boom",
    }
    done = result.model_copy(update={"status": "succeeded", "error": None, "output": "o" * 5000})
    assert "output" not in pointer(done)
    assert pointer(done, redact=False)["output"] == "o" * 1024
