"""End to end: producer -> Redis -> a real `swarm worker` process -> the fake provider.

Everything is a separate process speaking its real protocol: the worker runs the real
`openai` SDK against the shipped fake provider over HTTP, and binds its tools late
from the shipped fake MCP server (streamable HTTP) named in swarm.toml as `kb`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.localfleet import ProcessGroup, start_mcp_http
from swarm_workers.models import TaskResult

from .conftest import FakeLLM, WorkerFactory, WorkerProcess, spawn_fake_llm

KEY = "sk-worker-e2e-5f0c2a9b7d1e4c3a"
SECRET_PROMPT = "Quarterly numbers for project Bluebird"
PRICES = {"fake-gpt": {"input": 1.5, "output": 6.0}}


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeLLM]:
    fake = spawn_fake_llm("--latency-ms", "5")
    yield fake
    fake.stop()


@pytest.fixture
def fake(provider: FakeLLM) -> FakeLLM:
    httpx.post(f"http://127.0.0.1:{provider.port}/_fake/reset", timeout=5).raise_for_status()
    return provider


@pytest.fixture(scope="module")
def mcp_port() -> Iterator[int]:
    """The shipped fake MCP server over streamable HTTP."""
    with ProcessGroup() as group:
        yield start_mcp_http(group).port


@pytest.fixture
def config(swarm_config: Callable[..., Path], mcp_port: int) -> Path:
    return swarm_config(
        roles={"default": {"concurrency": 4, "tools": ["kb__add", "kb__search", "kb__fail"]}},
        llm={"backoff_base_s": 0.05, "backoff_max_s": 1.0, "max_retries": 5, "prices": PRICES},
        tools={"servers": {"kb": {"transport": "http", "url": f"http://127.0.0.1:{mcp_port}/mcp"}}},
    )


@pytest.fixture
def client(redis_url: str, config: Path) -> Iterator[SwarmClient]:
    with SwarmClient(settings=load_settings(config, redis_url=redis_url)) as client:
        yield client


@pytest.fixture
def worker(start_worker: WorkerFactory, config: Path, fake: FakeLLM) -> WorkerProcess:
    """One `swarm worker --role default` (stopped by conftest) that holds our key."""
    env = {"SWARM_LLM_BASE_URL": fake.base_url, "SWARM_LLM_API_KEY": KEY}
    return start_worker(config=config, env=env)


def _no_secrets(result: TaskResult, worker: WorkerProcess) -> None:
    """Neither the key nor the prompt text is in the result's error or the worker's log."""
    for text in (worker.output(), json.dumps(result.error.model_dump() if result.error else {})):
        assert KEY not in text
        assert KEY[:8] not in text
        assert SECRET_PROMPT not in text


def test_multi_step_tool_loop_in_a_worker(
    worker: WorkerProcess, client: SwarmClient, fake: FakeLLM
) -> None:
    prompt = f'{SECRET_PROMPT}: CALL kb__add {{"a": 20, "b": 22}} CALL kb__search'
    handle = client.submit(prompt + ' {"query": "bucket", "limit": 2}', priority="P1")
    result = handle.result(timeout=30)

    assert result.ok, result.error
    assert result.stop_reason == "final"
    assert result.model == "fake-gpt"
    assert result.steps == 2
    assert result.attempts == 1
    assert [(c.name, c.ok) for c in result.tool_calls] == [("kb__add", True), ("kb__search", True)]
    assert result.output is not None
    assert "kb__add: 42" in result.output
    assert "result for 'bucket'" in result.output
    stats = fake.stats()
    assert stats["completions"] == 2
    assert len(result.usage.calls) == 2
    assert result.usage.prompt_tokens == stats["prompt_tokens"]
    assert result.usage.completion_tokens == stats["completion_tokens"]
    price = PRICES["fake-gpt"]
    expected = (
        result.usage.prompt_tokens * price["input"]
        + result.usage.completion_tokens * price["output"]
    ) / 1e6
    assert result.cost_usd == pytest.approx(expected)
    _no_secrets(result, worker)


def test_malformed_tool_call_is_corrected_in_a_worker(
    worker: WorkerProcess, client: SwarmClient, fake: FakeLLM
) -> None:
    result = client.submit('CALL_BAD kb__add {"a": 1, "b": 2}', priority="P0").result(30)

    assert result.ok, result.error
    assert result.stop_reason == "final"
    assert result.steps == 3
    bad, good = result.tool_calls
    assert not bad.ok
    assert bad.error is not None
    assert "not valid JSON" in bad.error
    assert good.ok
    assert result.output is not None
    assert "kb__add: 3" in result.output
    assert fake.stats()["completions"] == 3


def test_failing_tool_is_reported_to_the_model_in_a_worker(
    worker: WorkerProcess, client: SwarmClient, fake: FakeLLM
) -> None:
    result = client.submit('CALL kb__fail {"message": "index offline"}', priority="P1").result(30)

    assert result.ok, result.error  # the tool failed, the task did not
    assert result.stop_reason == "final"
    (call,) = result.tool_calls
    assert not call.ok
    assert call.error is not None
    assert "index offline" in call.error
    assert result.output is not None
    assert "kb__fail: error:" in result.output


def test_budget_stop_in_a_worker(worker: WorkerProcess, client: SwarmClient, fake: FakeLLM) -> None:
    result = client.submit(f"{SECRET_PROMPT}. REPLY_LEN 900", priority="P2", budget=64).result(30)

    assert result.ok, result.error
    assert result.stop_reason == "budget"
    assert result.usage.completion_tokens == 64
    assert result.usage.calls[0].finish_reason == "length"
    assert result.output is not None
    assert len(result.output) == 4 * 64
    assert fake.stats()["completions"] == 1


def test_429_storm_is_retried_in_the_worker_thread(
    worker: WorkerProcess, client: SwarmClient, fake: FakeLLM
) -> None:
    fake.fault(status=429, count=4, retry_after=0.2)
    started = time.monotonic()
    result = client.submit(f"{SECRET_PROMPT}. REPLY_LEN 12", priority="P1").result(30)
    elapsed = time.monotonic() - started

    assert result.ok, result.error
    assert result.stop_reason == "final"
    assert result.usage.completion_tokens == 12
    assert result.attempts == 1  # slept in the thread; the task was never re-published
    stats = fake.stats()
    assert (stats["requests"], stats["completions"]) == (5, 1)
    assert stats["rate_limited"]["injected"] == 4
    assert elapsed >= 4 * 0.2  # it honoured retry-after-ms
    _no_secrets(result, worker)


def test_401_fails_at_once_in_a_worker(
    worker: WorkerProcess, client: SwarmClient, fake: FakeLLM
) -> None:
    fake.fault(status=401, count=1)
    started = time.monotonic()
    result = client.submit(f"{SECRET_PROMPT}. REPLY_LEN 12", priority="P1").result(30)

    assert not result.ok
    assert result.stop_reason == "error"
    assert result.error is not None
    assert result.error.type == "ProviderRejected"
    assert result.error.message == "HTTP 401: Injected fault: HTTP 401"
    assert result.steps == 0
    assert time.monotonic() - started < 5.0
    assert fake.stats()["requests"] == 1  # not retried
    assert client.status(result.task_id).result == result
    _no_secrets(result, worker)
