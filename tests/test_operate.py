"""What operators look at: worker /metrics, the depth exporter, Flower's API."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.localfleet import ManagedProcess, child_env

from .conftest import FakeLLM, WorkerFactory, free_port, wait_until


@pytest.fixture
def client(redis_url: str) -> Iterator[SwarmClient]:
    with SwarmClient(settings=load_settings(None, redis_url=redis_url)) as client:
        yield client


def _sample(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _spawn(args: list[str], env: dict[str, str]) -> ManagedProcess:
    """`swarm <args>` with only `env` on top of the harness's allowlist; `.stop()` ends it."""
    argv = (sys.executable, "-m", "swarm_workers.cli", *args)
    return ManagedProcess(args[0], argv, env=child_env(env)).start()


def test_worker_metrics_move_after_a_task(
    start_worker: WorkerFactory, client: SwarmClient, fake_llm: FakeLLM
) -> None:
    port = free_port()
    start_worker(
        env={
            "SWARM_WORKER_METRICS_PORT": str(port),
            "SWARM_LLM_BASE_URL": fake_llm.base_url,
            "SWARM_RATELIMIT_MODELS": json.dumps({"fake-gpt": {"rpm": 6000, "tpm": 10**6}}),
        }
    )
    url = f"http://127.0.0.1:{port}/metrics"
    labels = {"role": "default", "priority": "P0"}
    assert _sample(httpx.get(url).text, "swarm_tasks_total", outcome="succeeded", **labels) is None
    fake_llm.fault(429, 1, retry_after=0.1)
    assert client.submit("count me", priority="P0").result(timeout=30).ok

    text = httpx.get(url).text
    assert _sample(text, "swarm_tasks_total", outcome="succeeded", **labels) == 1.0
    assert _sample(text, "swarm_task_run_seconds_count", **labels) == 1.0
    assert _sample(text, "swarm_task_queue_wait_seconds_count", **labels) == 1.0
    assert _sample(text, "swarm_llm_request_seconds_count", model="fake-gpt") == 1.0
    assert (
        _sample(text, "swarm_llm_tokens_total", model="fake-gpt", direction="completion") or 0
    ) > 0
    assert _sample(text, "swarm_llm_429_total", model="fake-gpt") == 1.0
    # One wait on the bucket per attempt: the refused one and the one that succeeded.
    assert _sample(text, "swarm_bucket_wait_seconds_count", model="fake-gpt", priority="P0") == 2.0


def test_exporter_reports_queue_depth(redis_url: str, client: SwarmClient) -> None:
    for i in range(3):
        client.submit(f"waiting {i}", priority="P2")
    port = free_port()
    proc = _spawn(["exporter", "--port", str(port), "--interval", "0.2"], {"REDIS_URL": redis_url})
    try:

        def depth() -> float | None:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
            except httpx.HTTPError:
                return None
            return _sample(text, "swarm_queue_depth", role="default", priority="P2")

        wait_until(lambda: depth() == 3.0, 20, "the exporter to report 3 queued P2 tasks")
    finally:
        proc.stop(grace=15)


def test_flower_shows_a_task_with_redacted_args(
    redis_url: str, start_worker: WorkerFactory, client: SwarmClient
) -> None:
    port = free_port()
    proc = _spawn(
        ["flower", "--port", str(port)], {"REDIS_URL": redis_url, "FLOWER_BASIC_AUTH": "ops:s3cret"}
    )
    base = f"http://127.0.0.1:{port}"
    auth = ("ops", "s3cret")
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{base}/api/workers", auth=auth, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, "Flower to serve its API")
        assert httpx.get(f"{base}/api/tasks", timeout=2).status_code == 401
        start_worker()  # task events off (the default) until Flower turns them on

        def info(task_id: str) -> dict[str, object] | None:
            response = httpx.get(f"{base}/api/task/info/{task_id}", auth=auth, timeout=2)
            body = response.json() if response.status_code == 200 else None
            return body if body and body.get("state") == "SUCCESS" else None

        # Flower broadcasts enable_events every 5 s: within a few tasks, it shows them.
        seen: list[str] = []

        def shown_in_flower() -> bool:
            handle = client.submit("the confidential merger memo", priority="P1")
            assert handle.result(timeout=30).ok
            until = time.monotonic() + 2
            while time.monotonic() < until:
                if info(handle.id) is not None:
                    seen.append(handle.id)
                    return True
                time.sleep(0.1)
            return False

        wait_until(shown_in_flower, 40, "Flower to turn events on and see a task succeed")
        task = info(seen[0])
        assert task is not None
        assert task["name"] == "swarm.run_agent"
        assert "role=default" in str(task["args"])
        assert "confidential" not in str(task["args"])
        # Its result, as Flower has it: the pointer, sizes and usage, never the output.
        shown = str(task["result"])
        assert seen[0] in shown
        assert "succeeded" in shown
        assert "output_chars" in shown
        assert "merger" not in shown
    finally:
        proc.stop(grace=15)


def test_flower_will_not_start_without_credentials(redis_url: str, tmp_path: Path) -> None:
    argv = (sys.executable, "-m", "swarm_workers.cli", "flower", "--port", str(free_port()))
    env = child_env({"REDIS_URL": redis_url})
    proc = ManagedProcess("flower", argv, env=env, log=tmp_path / "flower.log").start()
    try:
        assert proc.wait(30) == 2
        assert "FLOWER_BASIC_AUTH" in proc.output()
    finally:
        proc.stop()
