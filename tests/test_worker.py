"""Real worker processes on a real Redis: results, strict priority, express pools."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.models import AgentTask, Priority, TaskResult, TaskState
from swarm_workers.queues import RUN_AGENT, queue_name

from .conftest import WorkerFactory, wait_until


@pytest.fixture
def client(redis_url: str) -> Iterator[SwarmClient]:
    with SwarmClient(settings=load_settings(None, redis_url=redis_url)) as client:
        yield client


def test_submit_and_wait_for_a_result(start_worker: WorkerFactory, client: SwarmClient) -> None:
    worker = start_worker()
    handle = client.submit("hello swarm", priority="P1")
    result = handle.result(timeout=30)
    assert result.ok, result.error
    assert result.worker == worker.hostname
    assert result.task_id == handle.id
    assert result.output
    assert result.attempts == 1
    assert result.timings.started_at >= result.timings.submitted_at
    status = client.status(handle.id)
    assert status.state is TaskState.SUCCEEDED
    assert status.result == result


def test_a_finished_task_leaves_exactly_one_key_its_result(
    start_worker: WorkerFactory, client: SwarmClient, redis_conn: redis.Redis
) -> None:
    """One copy of the outcome: no Celery result, no lease, no run count left behind."""
    start_worker()
    handle = client.submit("store me once", priority="P1")
    result = handle.result(timeout=30)
    assert result.ok, result.error
    naming_it = sorted(k.decode() for k in redis_conn.scan_iter(match=f"*{handle.id}*"))
    assert naming_it == [client.settings.keys.result(handle.id)]
    stored = redis_conn.get(naming_it[0])
    assert stored is not None
    assert TaskResult.model_validate_json(stored) == result


def test_status_of_a_queued_task(client: SwarmClient) -> None:
    handle = client.submit("nobody is listening", priority="P2")
    assert client.status(handle.id).state is TaskState.QUEUED


def _results(client: SwarmClient, tasks: list[AgentTask]) -> dict[str, TaskResult]:
    return {t.id: client.result(t.id, timeout=60) for t in tasks}


def _run_priority_scenario(
    start_worker: WorkerFactory, client: SwarmClient, *, fifo: bool
) -> tuple[list[TaskResult], list[TaskResult], float]:
    """500 P2 queued, a busy single-threaded worker, then 20 P0; returns (p0, p2, t_sent)."""
    p2 = [client.build_task(f"bulk {i}", priority="P2") for i in range(500)]
    p0 = [client.build_task(f"urgent {i}", priority="P0") for i in range(20)]
    for task in p2:
        client.enqueue(task)
    start_worker(concurrency=1)
    wait_until(
        lambda: client.status(p2[4].id).state is TaskState.SUCCEEDED,
        30,
        "the worker to be busy with P2 work",
    )
    for task in p0:
        if fifo:  # the contrast: one queue for everything, as a FIFO design would have it
            client.app.send_task(
                RUN_AGENT,
                args=[task.to_wire()],
                task_id=task.id,
                queue=queue_name(Priority.P2, task.role),
            )
        else:
            client.enqueue(task)
    sent = time.time()
    results = _results(client, p0 + p2)
    return [results[t.id] for t in p0], [results[t.id] for t in p2], sent


def _p2_still_waiting(p2: list[TaskResult], sent: float) -> list[TaskResult]:
    return [r for r in p2 if r.timings.started_at.timestamp() > sent]


def test_strict_priority_p0_overtakes_queued_p2(
    start_worker: WorkerFactory, client: SwarmClient
) -> None:
    p0, p2, sent = _run_priority_scenario(start_worker, client, fifo=False)
    waiting = _p2_still_waiting(p2, sent)
    assert len(waiting) >= 100, "the worker drained P2 too fast for the test to mean anything"
    last_p0 = max(r.timings.started_at for r in p0)
    first_waiting_p2 = min(r.timings.started_at for r in waiting)
    assert last_p0 < first_waiting_p2
    # FIFO within a level.
    p0_order = sorted(p0, key=lambda r: r.timings.started_at)
    assert [r.task_id for r in p0_order] == [r.task_id for r in p0]


def test_single_fifo_queue_makes_p0_wait(start_worker: WorkerFactory, client: SwarmClient) -> None:
    """The same scenario on one FIFO queue: P0 starts only after the P2 backlog."""
    p0, p2, sent = _run_priority_scenario(start_worker, client, fifo=True)
    waiting = _p2_still_waiting(p2, sent)
    first_p0 = min(r.timings.started_at for r in p0)
    overtaken_by = [r for r in waiting if r.timings.started_at < first_p0]
    assert len(overtaken_by) >= 100


def test_express_worker_serves_p0_only(
    start_worker: WorkerFactory, client: SwarmClient, redis_conn: redis.Redis
) -> None:
    start_worker(priorities="p0")
    slow = client.submit("can wait", priority="P1")
    urgent = client.submit("now", priority="P0")
    assert urgent.result(timeout=30).ok
    time.sleep(1.0)
    assert client.status(slow.id).state is TaskState.QUEUED
    assert redis_conn.llen("p1.default") == 1


def test_worker_serving_two_roles_drains_all_p0_first(
    start_worker: WorkerFactory, redis_url: str, swarm_config: object
) -> None:
    roles = {"research": {}, "summarize": {}}
    settings = load_settings(None, redis_url=redis_url, roles=roles)
    config: Path = swarm_config(roles=roles)  # type: ignore[operator]
    with SwarmClient(settings=settings) as client:
        low = [client.submit(f"r{i}", role="research", priority="P1") for i in range(30)]
        high = [client.submit(f"s{i}", role="summarize", priority="P0") for i in range(10)]
        start_worker(["research", "summarize"], config=config, concurrency=1)
        results = {h.id: h.result(timeout=60) for h in low + high}
    last_high = max(results[h.id].timings.started_at for h in high)
    first_low = min(results[h.id].timings.started_at for h in low)
    assert last_high < first_low


def test_a_worker_names_its_llm_endpoint_and_warns_on_the_default(
    start_worker: WorkerFactory,
) -> None:
    configured = start_worker()
    assert "LLM endpoint http://127.0.0.1:" in configured.output()
    assert "NO LLM ENDPOINT CONFIGURED" not in configured.output()
    unset = start_worker(env={"SWARM_LLM_BASE_URL": "http://127.0.0.1:8400/v1"})
    assert "NO LLM ENDPOINT CONFIGURED" in unset.output()
    assert "fake-gpt" in unset.output()


def _task_events_while(redis_conn: redis.Redis, run: Callable[[], None]) -> list[str]:
    """The task-* event types workers publish (kombu fans `celeryev` out with PUBLISH)
    while `run()` runs."""
    listener = redis_conn.pubsub(ignore_subscribe_messages=True)
    listener.psubscribe("*celeryev*")
    try:
        listener.get_message(timeout=0.2)  # the subscription is live from here
        run()
        seen: list[str] = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 1.0:  # events trail the result a little
            message = listener.get_message(timeout=0.2)
            if message is not None:
                quiet_since = time.monotonic()
                channel = message["channel"].decode()  # `/<db>.celeryev/<routing key>`
                routing_key = channel.rsplit("/", 1)[-1]
                if routing_key.startswith("task"):
                    seen.append(routing_key)
        return seen
    finally:
        listener.close()


def test_task_events_are_off_until_flower_or_the_setting_turns_them_on(
    start_worker: WorkerFactory, client: SwarmClient, redis_conn: redis.Redis
) -> None:
    """Workers send no task events by default (`worker.task_events`); the control
    broadcast Flower repeats while it runs (`enable_events`) turns them on, and
    `worker.task_events = true` sends them from the start. Celery's
    `worker_send_task_events` in the app's config used to win over the setting."""

    def one_task() -> None:
        assert client.submit("observe me", priority="P1").result(timeout=30).ok

    quiet = start_worker()
    assert _task_events_while(redis_conn, one_task) == []
    replies = client.app.control.enable_events(reply=True, timeout=5)
    assert [quiet.hostname] == [name for reply in replies for name in reply]
    assert _task_events_while(redis_conn, one_task)
    quiet.stop()
    start_worker(env={"SWARM_WORKER_TASK_EVENTS": "true"})
    assert _task_events_while(redis_conn, one_task)
