"""The agent loop in-process: the real `openai` SDK against the fake provider over HTTP.

The provider is a separate process (the shipped fake); tools are a `LocalToolset`;
the limiter records what the loop asked of it. No Celery, no Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from openai.types.chat.chat_completion_message_function_tool_call import Function

from swarm_workers.agent.budget import token_counter
from swarm_workers.agent.clients import LLMClient
from swarm_workers.agent.loop import _run_tool_calls, initial_messages, run_agent
from swarm_workers.config import (
    ModelLimit,
    RateLimitSettings,
    Settings,
    ToolsSettings,
    load_settings,
)
from swarm_workers.deadline import Deadline
from swarm_workers.models import AgentTask, ChatMessage, Priority
from swarm_workers.ratelimit.bucket import TokenBucketLimiter
from swarm_workers.ratelimit.limiter import Limiter, Reservation
from swarm_workers.tools.base import LocalToolset, ToolResult, Toolset
from swarm_workers.tools.registry import ToolRegistry

from .conftest import FakeLLM, spawn_fake_llm
from .mcp_support import McpServers

MODEL = "fake-gpt"
SLOW_SPANS: list[tuple[float, float]] = []  # (start, end) of every `slow` tool call
KEY = "sk-loop-test-0123456789abcdef"


@dataclass
class Ledger:
    """What the loop asked of the limiter, in order."""

    events: list[tuple[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, *event: Any) -> None:
        with self.lock:
            self.events.append(event)

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


@dataclass
class _Held:
    ledger: Ledger

    def reconcile(self, used_tokens: int) -> None:
        self.ledger.add("reconcile", used_tokens)

    def cancel(self) -> None:
        self.ledger.add("cancel", None)


@dataclass
class RecordingLimiter:
    ledger: Ledger = field(default_factory=Ledger)

    def acquire(
        self, model: str, priority: Priority, tokens: int, deadline: Deadline | None = None
    ) -> Reservation:
        self.ledger.add("acquire", (model, priority, tokens))
        return _Held(self.ledger)

    def penalize(self, model: str, retry_after_s: float) -> None:
        self.ledger.add("penalize", (model, retry_after_s))


@dataclass
class LoopRuntime:
    """The four things `run_agent` needs, without Redis or Celery."""

    settings: Settings
    tools: Toolset
    limiter: Limiter
    llm: LLMClient


def _toolset() -> LocalToolset:
    tools = LocalToolset()

    @tools.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @tools.tool(description="Wait, then echo.")
    def slow(text: str) -> str:
        start = time.monotonic()
        time.sleep(0.4)
        SLOW_SPANS.append((start, time.monotonic()))
        return f"slow {text} on {threading.current_thread().name}"

    @tools.tool(description="Not for this role.")
    def secret() -> str:
        return "classified"

    @tools.tool(description="Always fails.")
    def broken() -> str:
        raise RuntimeError("disk on fire")

    return tools


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeLLM]:
    fake = spawn_fake_llm()
    yield fake
    fake.stop()


@pytest.fixture
def fake(provider: FakeLLM) -> FakeLLM:
    httpx.post(f"http://127.0.0.1:{provider.port}/_fake/reset", timeout=5).raise_for_status()
    return provider


def _settings(fake: FakeLLM, *, role: dict[str, Any] | None = None, **llm: Any) -> Settings:
    role_config = {"tools": ["local__add", "local__slow", "local__broken"], **(role or {})}
    return load_settings(
        None,
        roles={"default": role_config},
        llm={"base_url": fake.base_url, "api_key": KEY, "model": MODEL, **llm},
    )


def _runtime(settings: Settings) -> LoopRuntime:
    return LoopRuntime(
        settings=settings,
        tools=_toolset(),
        limiter=RecordingLimiter(),
        llm=LLMClient(settings.llm, threads=1),
    )


def _task(prompt: str, budget: int = 4096) -> AgentTask:
    return AgentTask(role="default", priority=Priority.P1, prompt=prompt, output_budget=budget)


def test_multi_step_tool_loop_reports_usage_and_cost(fake: FakeLLM) -> None:
    prices = {MODEL: {"input": 2.0, "output": 8.0}}
    runtime = _runtime(_settings(fake, prices=prices))
    outcome = run_agent(_task('Add them. CALL local__add {"a": 2, "b": 3}'), runtime)

    assert outcome.ok, outcome.error
    assert outcome.stop_reason == "final"
    assert outcome.steps == 2
    assert outcome.model == MODEL
    assert outcome.output is not None
    assert "local__add: 5" in outcome.output
    (record,) = outcome.tool_calls
    assert (record.name, record.ok, record.error) == ("local__add", True, None)
    assert record.arguments == '{"a": 2, "b": 3}'
    assert record.latency_s >= 0
    calls = outcome.usage.calls
    assert [c.finish_reason for c in calls] == ["tool_calls", "stop"]
    assert outcome.usage.prompt_tokens == sum(c.prompt_tokens for c in calls)
    assert outcome.usage.completion_tokens == sum(c.completion_tokens for c in calls)
    stats = fake.stats()
    assert stats["completions"] == 2
    assert outcome.usage.prompt_tokens == stats["prompt_tokens"]
    assert outcome.usage.completion_tokens == stats["completion_tokens"]
    expected = (outcome.usage.prompt_tokens * 2.0 + outcome.usage.completion_tokens * 8.0) / 1e6
    assert outcome.cost_usd == pytest.approx(expected)
    assert outcome.cost_usd > 0


def test_limiter_reserves_prompt_plus_max_tokens_then_reconciles(fake: FakeLLM) -> None:
    runtime = _runtime(_settings(fake, role={"tools": []}))
    task = _task("Summarise the queue design.", budget=300)
    outcome = run_agent(task, runtime)
    assert outcome.stop_reason == "final"
    ledger = runtime.limiter.ledger  # type: ignore[attr-defined]
    assert ledger.kinds() == ["acquire", "reconcile"]
    model, priority, reserved = ledger.events[0][1]
    prompt = token_counter(MODEL).count_prompt(
        initial_messages(runtime.settings.role("default").system_prompt, task)
    )
    # The offline estimate is the fake's own rule, so the pre-call count is exact here.
    assert outcome.usage.calls[0].prompt_tokens == prompt
    assert (model, priority, reserved) == (MODEL, Priority.P1, prompt + 300)
    assert ledger.events[1][1] == outcome.usage.total_tokens


def test_parallel_tool_calls_run_concurrently(fake: FakeLLM) -> None:
    runtime = _runtime(_settings(fake))
    prompt = 'CALL local__slow {"text": "a"} CALL local__slow {"text": "b"} CALL local__add'
    SLOW_SPANS.clear()
    outcome = run_agent(_task(prompt + ' {"a": 1, "b": 1}'), runtime)

    assert outcome.stop_reason == "final"
    assert [r.name for r in outcome.tool_calls] == ["local__slow", "local__slow", "local__add"]
    assert all(r.ok for r in outcome.tool_calls)
    (a_start, a_end), (b_start, b_end) = SLOW_SPANS
    assert a_start < b_end and b_start < a_end, "the two slow tools ran one after another"
    assert outcome.output is not None
    assert "slow a on MainThread" in outcome.output  # the first call stays in the task's thread
    assert "slow b on swarm-tool" in outcome.output
    assert "local__add: 2" in outcome.output


def test_malformed_tool_call_is_corrected_by_the_model(fake: FakeLLM) -> None:
    runtime = _runtime(_settings(fake))
    outcome = run_agent(_task('CALL_BAD local__add {"a": 40, "b": 2}'), runtime)

    assert outcome.ok, outcome.error
    assert outcome.stop_reason == "final"
    assert outcome.steps == 3
    bad, good = outcome.tool_calls
    assert not bad.ok
    assert bad.error is not None
    assert "not valid JSON" in bad.error
    assert good.ok
    assert outcome.output is not None
    assert "local__add: 42" in outcome.output


def test_schema_violation_and_tool_failure_go_back_to_the_model(fake: FakeLLM) -> None:
    runtime = _runtime(_settings(fake))
    outcome = run_agent(_task('CALL local__add {"a": "two", "b": 3} CALL local__broken'), runtime)

    assert outcome.ok, outcome.error
    assert outcome.stop_reason == "final"
    invalid, broken = outcome.tool_calls
    assert not invalid.ok
    assert invalid.error is not None
    assert "invalid arguments: a:" in invalid.error
    assert not broken.ok
    assert broken.error is not None
    assert "disk on fire" in broken.error
    assert outcome.output is not None
    assert "local__add: error: local__add: invalid arguments" in outcome.output


def test_tool_not_offered_to_the_role_is_refused_to_the_model(fake: FakeLLM) -> None:
    # The fake never calls a tool it was not offered; a real model can, so drive it here.
    runtime = _runtime(_settings(fake, role={"tools": ["local__a*"]}))
    offered = {s.name: s for s in runtime.tools.specs(["local__a*"])}
    assert list(offered) == ["local__add"]

    def call(name: str, arguments: str) -> ChatCompletionMessageFunctionToolCall:
        function = Function(name=name, arguments=arguments)
        return ChatCompletionMessageFunctionToolCall(
            id=f"id-{name}", type="function", function=function
        )

    role = runtime.settings.role("default")
    answers = _run_tool_calls(
        [call("local__secret", "{}"), call("local__absent", ""), call("local__add", "[1, 2]")],
        role,
        "default",
        runtime,
        Deadline.start(30),
    )
    records = [a[0] for a in answers]
    contents = [a[1]["content"] for a in answers]
    assert not any(r.ok for r in records)
    assert contents[0] == "error: local__secret: tool is not allowed for role 'default'"
    assert contents[1] == "error: local__absent: unknown tool"
    assert "expected a JSON object" in str(contents[2])
    assert [a[1]["tool_call_id"] for a in answers] == [
        "id-local__secret",
        "id-local__absent",
        "id-local__add",
    ]


def test_role_resources_extend_the_system_prompt(fake: FakeLLM) -> None:
    runtime = _runtime(_settings(fake, role={"tools": [], "resources": ["doc://guide"]}))
    seen: list[str] = []

    def role_context(role: Any) -> str:
        seen.extend(role.resources)
        return "Guide: be exact."

    runtime.tools.role_context = role_context  # type: ignore[method-assign]
    task = _task("REPLY_LEN 3")
    outcome = run_agent(task, runtime)
    assert outcome.stop_reason == "final"
    assert seen == ["doc://guide"]
    system = runtime.settings.role("default").system_prompt + "\n\nGuide: be exact."
    expected = token_counter(MODEL).count_prompt(initial_messages(system, task))
    assert outcome.usage.calls[0].prompt_tokens == expected


def test_output_budget_caps_max_tokens_and_stops(fake: FakeLLM) -> None:
    runtime = _runtime(_settings(fake))
    outcome = run_agent(_task("Write at length. REPLY_LEN 500", budget=40), runtime)

    assert outcome.ok
    assert outcome.stop_reason == "budget"
    assert outcome.usage.completion_tokens == 40
    assert outcome.usage.calls[0].finish_reason == "length"
    assert outcome.output is not None
    assert len(outcome.output) == 160  # the fake cuts at 4 characters a token


def test_budget_spent_by_a_tool_call_turn_stops_before_running_tools(fake: FakeLLM) -> None:
    runtime = _runtime(_settings(fake))
    outcome = run_agent(_task('CALL local__add {"a": 2, "b": 3}', budget=10), runtime)

    assert outcome.stop_reason == "budget"
    assert outcome.steps == 1
    assert outcome.tool_calls == ()
    assert outcome.usage.completion_tokens >= 10
    assert fake.stats()["completions"] == 1


def test_max_steps_stops_a_loop_that_keeps_calling_tools(fake: FakeLLM) -> None:
    runtime = _runtime(_settings(fake, role={"max_steps": 2}))
    outcome = run_agent(_task('CALL_BAD local__add {"a": 1, "b": 1}'), runtime)

    assert outcome.ok
    assert outcome.stop_reason == "max_steps"
    assert outcome.steps == 2
    assert len(outcome.tool_calls) == 1  # the second turn's calls were not run
    assert fake.stats()["completions"] == 2


def test_messages_input_and_role_system_prompt(fake: FakeLLM) -> None:
    runtime = _runtime(_settings(fake, role={"tools": [], "system_prompt": "Be brief."}))
    task = AgentTask(
        role="default",
        priority=Priority.P0,
        messages=(
            ChatMessage(role="user", content="Earlier question"),
            ChatMessage(role="assistant", content="Earlier answer"),
            ChatMessage(role="user", content="REPLY_LEN 7"),
        ),
        output_budget=100,
    )
    assert [m["role"] for m in initial_messages("Be brief.", task)] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    outcome = run_agent(task, runtime)
    assert outcome.stop_reason == "final"
    assert outcome.usage.completion_tokens == 7


def test_context_overflow_fails_before_any_request(fake: FakeLLM) -> None:
    runtime = _runtime(_settings(fake, context_windows={MODEL: 1000}))
    outcome = run_agent(_task("x" * 5000), runtime)

    assert not outcome.ok
    assert outcome.stop_reason == "error"
    assert outcome.error is not None
    assert outcome.error.type == "ContextOverflow"
    assert "1000-token context" in outcome.error.message
    assert "x" * 20 not in outcome.error.message
    assert outcome.steps == 0
    assert fake.stats()["requests"] == 0
    assert runtime.limiter.ledger.events == []  # type: ignore[attr-defined]


def test_provider_rejection_fails_the_task_and_keeps_earlier_usage(fake: FakeLLM) -> None:
    runtime = _runtime(_settings(fake))
    secret_prompt = 'Private plan 7731. CALL local__add {"a": 1, "b": 2}'
    fault = {"status": 400, "count": 1, "message": f"bad request near '{secret_prompt}' key={KEY}"}

    # Let the first turn succeed, then refuse the second one.
    original = runtime.tools.call

    def call_then_fault(name: str, arguments: dict[str, Any], **options: Any) -> ToolResult:
        httpx.post(f"http://127.0.0.1:{fake.port}/_fake/faults", json=fault, timeout=5)
        return original(name, arguments, **options)

    runtime.tools.call = call_then_fault  # type: ignore[method-assign]
    outcome = run_agent(_task(secret_prompt), runtime)

    assert outcome.stop_reason == "error"
    assert outcome.error is not None
    assert outcome.error.type == "ProviderRejected"
    assert outcome.error.message.startswith("HTTP 400: bad request near")
    assert "7731" not in outcome.error.message
    assert KEY not in outcome.error.message
    assert KEY[:8] not in outcome.error.message
    assert outcome.steps == 1
    assert outcome.usage.completion_tokens > 0
    assert len(outcome.tool_calls) == 1
    assert fake.stats()["requests"] == 2


def test_the_loop_enforces_the_task_time_limit() -> None:
    """Celery's threads pool enforces no time limit; the loop's own deadline does."""
    slow = spawn_fake_llm("--latency-ms", "1500")
    try:
        settings = load_settings(
            None,
            roles={"default": {"tools": ["local__add"]}},
            llm={"base_url": slow.base_url, "model": MODEL, "max_retries": 3},
            worker={"task_time_limit_s": 2, "visibility_timeout_s": 10, "lease_ttl_s": 2},
        )
        started = time.monotonic()
        outcome = run_agent(_task('CALL local__add {"a": 1, "b": 2}'), _runtime(settings))
        elapsed = time.monotonic() - started
    finally:
        slow.stop()
    assert outcome.error is not None
    assert outcome.error.type == "TimeLimitExceeded"
    assert "time limit of 2s" in outcome.error.message
    assert outcome.steps == 1  # the first call finished; the second was cut off
    assert elapsed < 2.0 + 1.5, f"the loop ran {elapsed:.1f}s past a 2 s limit"


def test_a_bucket_wait_ends_at_the_task_deadline_not_at_max_wait(
    fake: FakeLLM, redis_conn: redis.Redis
) -> None:
    """Issue 13 item 5: a blocked bucket used to hold a 1 s task for `max_wait_s`."""
    settings = _settings(fake, role={"tools": []})
    limits = RateLimitSettings(
        models={MODEL: ModelLimit(rpm=60_000, tpm=60_000)},
        max_wait_s={Priority.P0: 6.0, Priority.P1: 6.0, Priority.P2: 6.0},
    )
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        time.sleep(seconds)

    limiter = TokenBucketLimiter(redis_conn, limits, sleep=sleep)
    limiter.penalize(MODEL, 60.0)  # the provider said 429: every take waits a minute
    runtime = LoopRuntime(settings, _toolset(), limiter, LLMClient(settings.llm, threads=1))
    deadline = Deadline.start(1.0)
    started = time.monotonic()
    outcome = run_agent(_task("REPLY_LEN 3"), runtime, deadline)
    elapsed = time.monotonic() - started

    assert outcome.error is not None
    assert outcome.error.type == "TimeLimitExceeded", outcome.error
    assert "token bucket" in outcome.error.message
    max_wait = limits.max_wait_s[Priority.P1]
    assert sum(naps) <= deadline.limit_s  # slept no longer than the deadline allowed
    assert elapsed < max_wait / 2, f"waited {elapsed:.1f}s of a {max_wait:g}s max wait"
    assert fake.stats()["requests"] == 0


def test_a_tool_that_outlives_the_deadline_is_not_waited_for_past_it(
    fake: FakeLLM, mcp_servers: McpServers, redis_url: str
) -> None:
    """One deadline bounds the tool wait: no grace on top of it in the loop or registry."""
    server = mcp_servers.http(name="crawl")
    settings = _settings(fake, role={"tools": ["crawl__*"]})
    registry = ToolRegistry(
        ToolsSettings(servers={"crawl": server.settings()}),
        redis.Redis.from_url(redis_url),
        redis_url=redis_url,
    ).start()
    try:
        runtime = LoopRuntime(
            settings, registry, RecordingLimiter(), LLMClient(settings.llm, threads=1)
        )
        deadline = Deadline.start(1.5)
        tool_s = 6.0
        outcome = run_agent(_task(f'CALL crawl__slow {{"seconds": {tool_s}}}'), runtime, deadline)
    finally:
        registry.close()
    (record,) = outcome.tool_calls
    assert not record.ok
    assert record.error is not None and "unavailable" in record.error
    # The wait ended with the deadline, long before the tool's answer would have come.
    assert record.latency_s < tool_s - deadline.limit_s
    assert outcome.error is not None and outcome.error.type == "TimeLimitExceeded"


def test_the_toolset_alone_caps_output(fake: FakeLLM) -> None:
    tools = LocalToolset(max_output_chars=300)

    @tools.tool(description="Talk at length.")
    def ramble(words: int) -> str:
        return " ".join(["word"] * words)

    settings = _settings(fake, role={"tools": ["local__ramble"]})
    runtime = LoopRuntime(settings, tools, RecordingLimiter(), LLMClient(settings.llm, threads=1))
    outcome = run_agent(_task('CALL local__ramble {"words": 5000}'), runtime)
    assert outcome.ok, outcome.error
    assert outcome.output is not None
    assert outcome.output.count("[truncated: 24999 characters, limit 300]") == 1
