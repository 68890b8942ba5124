"""The scaling formula on a live Redis: tasks queued and running in a real worker, read by
a real `swarm exporter`, compared with what each rendered ScaledObject asks for."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from swarm_workers.client import SwarmClient, TaskHandle
from swarm_workers.config import load_settings
from swarm_workers.inflight import read_load
from swarm_workers.models import Priority, TaskState

from .conftest import (
    ROOT,
    FakeLLM,
    WorkerFactory,
    free_port,
    spawn_fake_llm,
    wait_until,
    write_toml,
)
from .test_deploy import K8S, render, replicas_asked, scaled_load


@pytest.fixture(autouse=True)
def _no_shell_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """SWARM_* or REDIS_URL from the developer's shell would override these tests' own."""
    for name in list(os.environ):
        if name.startswith("SWARM_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


RUNNING = 4  # the worker's threads: that many tasks hold a slot each


@pytest.fixture
def slow_llm() -> Iterator[FakeLLM]:
    """A provider that answers after a minute: delivered tasks stay running."""
    fake = spawn_fake_llm("--latency-ms", "60000")
    yield fake
    fake.stop()


@pytest.fixture
def exporter(redis_url: str, tmp_path: Path) -> Iterator[int]:
    config = write_toml(tmp_path / "exporter.toml", {"roles": _ROLES})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")}
    env.update(REDIS_URL=redis_url, SWARM_CONFIG=str(config))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarm_workers.cli",
            "exporter",
            "--port",
            str(port),
            "--interval",
            "0.2",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


_ROLES: dict[str, Any] = {
    "research": {"concurrency": RUNNING},
    "summarize": {"concurrency": RUNNING},
    "review": {"concurrency": RUNNING},
}


def test_scaled_objects_ask_for_queued_plus_running_over_concurrency(
    start_worker: WorkerFactory, slow_llm: FakeLLM, exporter: int, redis_url: str, tmp_path: Path
) -> None:
    config = write_toml(tmp_path / "swarm.toml", {"roles": _ROLES, "llm": {"timeout_s": 120}})
    settings = load_settings(config, redis_url=redis_url)
    start_worker.env["SWARM_LLM_BASE_URL"] = slow_llm.base_url
    with SwarmClient(settings=settings) as client:
        submitted: dict[tuple[str, Priority], list[TaskHandle]] = {}
        for role, priority, count in (
            ("research", Priority.P0, 1),
            ("research", Priority.P1, 40),
            ("research", Priority.P2, 30),
            ("summarize", Priority.P0, 5),
        ):
            submitted[(role, priority)] = [
                client.submit(f"{role} {i}", role=role, priority=priority) for i in range(count)
            ]
        worker = start_worker(["research"], config=config, concurrency=RUNNING)

        def states() -> dict[tuple[str, Priority], dict[TaskState, int]]:
            out: dict[tuple[str, Priority], dict[TaskState, int]] = {}
            for level, handles in submitted.items():
                counts = out.setdefault(level, {})
                for handle in handles:
                    state = client.status(handle.id).state
                    counts[state] = counts.get(state, 0) + 1
            return out

        # Ground truth from the task states the workers record, not from kombu's hash.
        wait_until(
            lambda: sum(c.get(TaskState.RUNNING, 0) for c in states().values()) == RUNNING,
            30,
            "the worker to run a task in each thread",
        )
        truth = states()
    queued = {lvl: c.get(TaskState.QUEUED, 0) for lvl, c in truth.items()}
    running = {lvl: c.get(TaskState.RUNNING, 0) for lvl, c in truth.items()}
    assert sum(running.values()) == RUNNING and sum(queued.values()) == 76 - RUNNING

    snapshot = read_load(redis.Redis.from_url(redis_url), list(_ROLES))
    for level in submitted:
        assert snapshot.queued[level] == queued[level], level
        assert snapshot.running[level] == running[level], level
    # Its tasks wait a minute on the provider and nothing here needs them: no warm
    # shutdown (20 s of grace at teardown).
    worker.process.stop(grace=1)

    # What each ScaledObject of the example overlay asks for, through the exporter's
    # /load on the URL the ScaledObject names, against the same numbers by hand.
    asked_any_more = False
    for scaled in (d for d in render(K8S / "overlays" / "example") if d["kind"] == "ScaledObject"):
        role, levels, _, _ = scaled_load(scaled)
        url = scaled["spec"]["triggers"][0]["metadata"]["url"]
        local = f"http://127.0.0.1:{exporter}/load?" + url.split("?", 1)[1]

        def answer(local: str = local) -> dict[str, Any] | None:
            try:
                reply = httpx.get(local, timeout=2)
            except httpx.HTTPError:
                return None
            return dict(reply.json()) if reply.status_code == 200 else None

        def answered(answer: Callable[[], dict[str, Any] | None] = answer) -> bool:
            return answer() is not None

        wait_until(answered, 20, "the exporter's /load")
        load = answer()
        assert load is not None
        expected = sum(queued.get((role, p), 0) + running.get((role, p), 0) for p in levels)
        assert load["load"] == expected, (scaled["metadata"]["name"], load)
        assert replicas_asked(scaled, load["load"]) == replicas_asked(scaled, expected)
        asked_any_more |= replicas_asked(scaled, expected) > scaled["spec"]["minReplicaCount"]
    assert asked_any_more, "the scenario should make some pool ask for more than its minimum"
