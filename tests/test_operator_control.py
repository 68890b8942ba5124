"""Operator control on real workers: dead letters and replay, cancellation, idempotent
submits. Every scenario ends by looking at what Redis holds for the tasks involved."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.dag import Node, NodeState
from swarm_workers.deadletters import DeadLetter, DeadLetterStore
from swarm_workers.localfleet import ProcessGroup, start_mcp_http
from swarm_workers.models import AgentTask, Priority, TaskResult, TaskState

from .conftest import ROOT, FakeLLM, WorkerFactory, spawn_fake_llm, wait_until


@pytest.fixture(scope="module")
def mcp_port() -> Iterator[int]:
    with ProcessGroup() as group:
        yield start_mcp_http(group).port


@pytest.fixture
def config(swarm_config: Callable[..., Path], mcp_port: int) -> Path:
    return swarm_config(
        roles={
            "default": {"concurrency": 4, "tools": ["kb__slow"]},
            "other": {"concurrency": 2},
        },
        llm={"backoff_base_s": 0.05, "backoff_max_s": 0.2, "max_retries": 1},
        worker={"lease_ttl_s": 3},
        tools={
            "call_timeout_s": 60,
            "servers": {"kb": {"transport": "http", "url": f"http://127.0.0.1:{mcp_port}/mcp"}},
        },
    )


@pytest.fixture
def client(redis_url: str, config: Path) -> Iterator[SwarmClient]:
    with SwarmClient(settings=load_settings(config, redis_url=redis_url)) as client:
        yield client


@pytest.fixture
def slow_llm() -> Iterator[FakeLLM]:
    fake = spawn_fake_llm("--latency-ms", "4000")
    yield fake
    fake.stop()


def _keys_naming(conn: redis.Redis, task_id: str) -> list[str]:
    return sorted(k.decode() for k in conn.scan_iter(match=f"*{task_id}*"))


# --------------------------------------------------------------------------- dead letters


def test_a_task_that_fails_for_good_is_a_dead_letter_and_replays_once(
    client: SwarmClient, config: Path, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    start_worker(config=config, env={"SWARM_LLM_BASE_URL": fake_llm.base_url})
    fake_llm.fault(status=401, count=1)  # the provider refuses us once: fails at once
    handle = client.submit("doomed for now", priority="P1", metadata={"ticket": "T-1"})
    failed = handle.result(timeout=30)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.type == "ProviderRejected"

    # The letter is kept just after the outcome is recorded (a separate key, another
    # slot): the result can be read a moment before it.
    wait_until(lambda: len(client.dead_letters()) == 1, 10, "the dead letter to be kept")
    (letter,) = client.dead_letters()
    assert letter.task.id == handle.id
    assert letter.task.prompt == "doomed for now"
    assert letter.error.type == "ProviderRejected"
    assert [a.run for a in letter.attempts] == [1]
    assert client.dead_letters(error="TooManyAttempts") == []
    assert client.dead_letters(role="other") == []
    shown = subprocess.run(
        [sys.executable, "-m", "swarm_workers.cli", "dead", "list", "--json", "-c", str(config)],
        env=_cli_env(client),
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert [entry["task"]["id"] for entry in json.loads(shown.stdout)] == [handle.id]

    # The fault is gone: replaying twice, even at once, enqueues one new task.
    replays: list[list[str | None]] = []
    racers = [
        threading.Thread(
            target=lambda: replays.append([r.task_id for r in client.replay([handle.id])])
        )
        for _ in range(2)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(30)
    new_ids = [i for batch in replays for i in batch if i is not None]
    assert len(new_ids) == 1, replays
    replayed = client.result(new_ids[0], timeout=30)
    assert replayed.ok, replayed.error
    assert client.dead_letters() == []
    assert fake_llm.stats()["completions"] == 1  # the replay; the refused call completed none


def test_the_cap_drops_the_oldest_letters_and_counts_them(
    redis_conn: redis.Redis, redis_url: str, config: Path
) -> None:
    settings = load_settings(config, redis_url=redis_url, deadletters={"max_per_role": 2})
    store = DeadLetterStore(redis_conn, settings)
    for i in range(3):
        task = AgentTask(role="default", priority=Priority.P2, prompt=f"p{i}", output_budget=9)
        store.add(DeadLetter.of(task, TaskResult.failure("Boom", str(i), task=task)))
        time.sleep(0.01)  # distinct death times
    kept = store.find()
    assert [letter.task.prompt for letter in kept] == ["p2", "p1"]
    assert store.dropped() == {"default": 1, "other": 0}
    index, entries, _ = settings.keys.dead_letters("default")
    assert redis_conn.zcard(index) == redis_conn.hlen(entries) == 2  # nothing half-kept


# --------------------------------------------------------------------------- cancel


def test_a_cancelled_queued_task_never_runs(
    client: SwarmClient,
    config: Path,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
    redis_conn: redis.Redis,
) -> None:
    handle = client.submit("never mind", priority="P1")
    report = client.cancel(handle.id)
    assert report.outcome == "cancelled"
    start_worker(config=config, env={"SWARM_LLM_BASE_URL": fake_llm.base_url})
    result = handle.result(timeout=30)
    assert result.status == "cancelled"
    assert client.status(handle.id).state is TaskState.CANCELLED
    assert fake_llm.stats()["completions"] == 0
    wait_until(lambda: redis_conn.llen("p1.default") == 0, 10, "the message to be taken")
    assert _keys_naming(redis_conn, handle.id) == [client.settings.keys.result(handle.id)]
    assert client.dead_letters() == []  # a cancel is no failure


def test_cancel_stops_a_running_task_mid_model_call(
    client: SwarmClient,
    config: Path,
    start_worker: WorkerFactory,
    slow_llm: FakeLLM,
    redis_conn: redis.Redis,
) -> None:
    start_worker(config=config, env={"SWARM_LLM_BASE_URL": slow_llm.base_url})
    handle = client.submit("take your time", priority="P1")
    wait_until(lambda: slow_llm.stats()["requests"] >= 1, 20, "the model call to start")
    asked = time.monotonic()
    report = client.cancel(handle.id)
    assert report.outcome == "stopping", client.status(handle.id)
    result = handle.result(timeout=30)
    stopped_after = time.monotonic() - asked
    assert result.status == "cancelled"
    assert result.stop_reason == "cancelled"
    # Abandoned, not waited for: well before the provider's 4 s answer would come.
    wait_until(lambda: slow_llm.stats()["completions"] >= 1, 20, "the abandoned call to end")
    call_took = time.monotonic() - asked
    assert stopped_after < call_took
    wait_until(
        lambda: _keys_naming(redis_conn, handle.id) == [client.settings.keys.result(handle.id)],
        10,
        "only the result to be left",
    )


def test_cancel_stops_a_running_task_mid_tool_call(
    client: SwarmClient,
    config: Path,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
    redis_conn: redis.Redis,
) -> None:
    start_worker(config=config, env={"SWARM_LLM_BASE_URL": fake_llm.base_url})
    handle = client.submit('Wait for it: CALL kb__slow {"seconds": 30}', priority="P1")
    wait_until(lambda: fake_llm.stats()["completions"] >= 1, 20, "the tool call to start")
    asked = time.monotonic()
    time.sleep(0.3)  # inside the 30 s tool call now
    assert client.cancel(handle.id).outcome == "stopping"
    result = handle.result(timeout=30)
    assert result.status == "cancelled"
    assert time.monotonic() - asked < 30  # the tool's answer was not waited for
    assert len(result.usage.calls) == 1  # the usage so far: the step that asked for the tool
    assert fake_llm.stats()["completions"] == 1
    assert _keys_naming(redis_conn, handle.id) == [client.settings.keys.result(handle.id)]


def test_cancelling_a_dag_completes_its_chords(
    client: SwarmClient, config: Path, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    dag = client.submit_dag(
        [
            Node("a", "one", role="default"),
            Node("b", "two", role="default"),
            Node("s", "sum {{ a.output }} {{ b.output }}", role="other", deps=["a", "b"]),
        ]
    )
    reports = dag.cancel()
    assert {node: r.outcome for node, r in reports.items()} == {
        "a": "cancelled",
        "b": "cancelled",
        "s": "cancelled",
    }
    start_worker(["default", "other"], config=config, env={"SWARM_LLM_BASE_URL": fake_llm.base_url})
    status = dag.wait(timeout=60)  # the fan-in ran (and recorded its cancel): no hang
    assert status.state == "cancelled"
    assert {n.state for n in status.nodes.values()} == {NodeState.CANCELLED}
    assert fake_llm.stats()["completions"] == 0


def test_cancelling_unknown_or_finished_tasks_says_so(
    client: SwarmClient,
    config: Path,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
    redis_conn: redis.Redis,
) -> None:
    assert client.cancel("no-such-task").outcome == "unknown"
    assert _keys_naming(redis_conn, "no-such-task") == []  # nothing written
    start_worker(config=config, env={"SWARM_LLM_BASE_URL": fake_llm.base_url})
    handle = client.submit("quick", priority="P0")
    assert handle.result(timeout=30).ok
    assert client.cancel(handle.id).outcome == "finished"
    assert client.result(handle.id).ok  # unchanged
    done = subprocess.run(
        [sys.executable, "-m", "swarm_workers.cli", "cancel", "no-such-task", "-c", str(config)],
        env=_cli_env(client),
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 1
    assert "unknown task id" in done.stdout
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- idempotency


def test_racing_threads_with_one_key_enqueue_once(
    client: SwarmClient, redis_conn: redis.Redis
) -> None:
    ids: list[str] = []
    start = threading.Barrier(8)

    def submit() -> None:
        start.wait(10)
        ids.append(client.submit("pay once", priority="P2", idempotency_key="order-42").id)

    racers = [threading.Thread(target=submit) for _ in range(8)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(30)
    assert len(ids) == 8
    assert len(set(ids)) == 1
    assert redis_conn.llen("p2.default") == 1
    # Another key is another task.
    client.submit("pay once", priority="P2", idempotency_key="order-43")
    assert redis_conn.llen("p2.default") == 2


def test_racing_processes_with_one_key_enqueue_once(
    client: SwarmClient, config: Path, redis_conn: redis.Redis
) -> None:
    argv = [
        sys.executable,
        "-m",
        "swarm_workers.cli",
        "submit",
        "--key",
        "req-7",
        "-c",
        str(config),
    ]
    procs = [
        subprocess.Popen(
            [*argv, "-p", "P2", "charge the card"],
            env=_cli_env(client),
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(4)
    ]
    printed = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(printed) == 1
    assert redis_conn.llen("p2.default") == 1


def test_a_dag_submitted_twice_with_one_key_is_one_dag(
    client: SwarmClient, redis_conn: redis.Redis
) -> None:
    nodes = [Node("a", "x", role="default"), Node("b", "y", role="default", deps=["a"])]
    first = client.submit_dag(nodes, idempotency_key="dag-1")
    again = client.submit_dag(nodes, idempotency_key="dag-1")
    assert again.id == first.id
    assert redis_conn.llen("p1.default") == 1  # the head of one chain


def _cli_env(client: SwarmClient) -> dict[str, str]:
    from swarm_workers.localfleet import child_env

    return child_env({"REDIS_URL": client.settings.redis_url})
