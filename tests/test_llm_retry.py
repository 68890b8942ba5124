"""`llm.complete` over HTTP against the fake provider: retries, backoff, error mapping.

The provider runs as its own process and requires a key, so a wrong key is a real 401.
Sleeps are recorded (and really taken, they are short) to check the policy's delays.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from swarm_workers.agent.llm import (
    ChatRequest,
    Completion,
    Redactor,
    RetryPolicy,
    build_llm_client,
    complete,
    is_retryable,
    retry_after_s,
)
from swarm_workers.config import LLMSettings
from swarm_workers.deadline import Deadline
from swarm_workers.errors import (
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    TimeLimitExceeded,
)
from swarm_workers.localfleet import FakeProvider, ProcessGroup, free_port, start_fake_llm
from swarm_workers.models import Priority

from .test_agent_loop import RecordingLimiter

KEY = "sk-retry-test-abcdef0123456789"


KeyedFake = FakeProvider


@pytest.fixture(scope="module")
def keyed() -> Iterator[KeyedFake]:
    with ProcessGroup() as group:
        yield start_fake_llm(group, "--api-key", KEY, "--latency-ms", "2")


@pytest.fixture
def fake(keyed: KeyedFake) -> KeyedFake:
    keyed.reset()
    return keyed


def _settings(base_url: str, **overrides: Any) -> LLMSettings:
    values: dict[str, Any] = {
        "base_url": base_url,
        "api_key": KEY,
        "max_retries": 4,
        "backoff_base_s": 0.02,
        "backoff_max_s": 0.5,
        **overrides,
    }
    return LLMSettings(**values)


@dataclass
class Call:
    """One `complete` run with its recorded sleeps and limiter events."""

    limiter: RecordingLimiter
    sleeps: list[float]

    def run(
        self,
        settings: LLMSettings,
        prompt: str = "hi REPLY_LEN 5",
        deadline: Deadline | None = None,
        **kwargs: Any,
    ) -> Completion:
        client = build_llm_client(settings)
        try:
            request = ChatRequest(
                model="fake-gpt",
                messages=[{"role": "user", "content": prompt}],
                tools=[],
                max_tokens=50,
                priority=Priority.P0,
                prompt_tokens=10,
                deadline=deadline,
            )

            def sleep(seconds: float) -> None:
                self.sleeps.append(seconds)
                time.sleep(seconds)

            return complete(
                client,
                request,
                limiter=self.limiter,
                policy=RetryPolicy.from_settings(settings),
                redactor=Redactor(secrets=[KEY], texts=[prompt]),
                count_tokens=lambda text: len(text) // 4,
                sleep=sleep,
                **kwargs,
            )
        finally:
            client.close()


@pytest.fixture
def call() -> Call:
    return Call(RecordingLimiter(), [])


def test_client_has_no_sdk_retries_and_explicit_timeouts() -> None:
    settings = LLMSettings(timeout_s=12.0, connect_timeout_s=2.0, api_key="sk-x")
    client = build_llm_client(settings)
    try:
        assert client.max_retries == 0
        assert client.timeout.read == 12.0  # type: ignore[union-attr]
        assert client.timeout.connect == 2.0  # type: ignore[union-attr]
        assert client.api_key == "sk-x"
    finally:
        client.close()


def test_success_reconciles_the_reservation(fake: KeyedFake, call: Call) -> None:
    completion = call.run(_settings(fake.base_url))
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens == 5
    assert completion.usage_reported
    assert completion.attempts == 1
    events = call.limiter.ledger.events
    assert events[0] == ("acquire", ("fake-gpt", Priority.P0, 60))
    assert events[1] == ("reconcile", completion.prompt_tokens + completion.completion_tokens)
    assert call.sleeps == []


def test_429_storm_honours_retry_after_and_penalizes_the_fleet(fake: KeyedFake, call: Call) -> None:
    fake.fault(status=429, count=3, retry_after=0.1)
    completion = call.run(_settings(fake.base_url))

    assert completion.finish_reason == "stop"
    assert completion.attempts == 4
    assert len(call.sleeps) == 3
    assert all(0.1 <= s <= 0.11 for s in call.sleeps), call.sleeps  # the hint, plus <=10% jitter
    kinds = call.limiter.ledger.kinds()
    assert kinds == ["acquire", "cancel", "penalize"] * 3 + ["acquire", "reconcile"]
    penalties = [e[1] for e in call.limiter.ledger.events if e[0] == "penalize"]
    assert penalties == [("fake-gpt", 0.1)] * 3
    stats = fake.stats()
    assert (stats["requests"], stats["completions"]) == (4, 1)


def test_5xx_without_hint_backs_off_exponentially_with_full_jitter(
    fake: KeyedFake, call: Call
) -> None:
    fake.fault(status=503, count=3)
    completion = call.run(_settings(fake.base_url), rand=lambda: 1.0)
    assert completion.attempts == 4
    assert call.sleeps == pytest.approx([0.02, 0.04, 0.08])
    assert "penalize" not in call.limiter.ledger.kinds()  # only a 429 slows the fleet


def test_exhausted_retries_raise_provider_unavailable(fake: KeyedFake, call: Call) -> None:
    fake.fault(status=500, count=10)
    with pytest.raises(ProviderUnavailable) as failed:
        call.run(_settings(fake.base_url, max_retries=2))
    assert failed.value.status == 500
    assert "gave up after 3 attempts" in str(failed.value)
    assert len(call.sleeps) == 2
    assert call.limiter.ledger.kinds().count("cancel") == 3
    assert "reconcile" not in call.limiter.ledger.kinds()


def test_wrong_key_is_rejected_at_once_without_leaking_it(fake: KeyedFake, call: Call) -> None:
    wrong = "sk-wrong-key-9876543210fedcba"
    settings = _settings(fake.base_url, api_key=wrong)
    client = build_llm_client(settings)
    request = ChatRequest(
        model="fake-gpt",
        messages=[{"role": "user", "content": "hi"}],
        tools=[],
        max_tokens=10,
        priority=Priority.P2,
        prompt_tokens=8,
    )
    started = time.monotonic()
    try:
        with pytest.raises(ProviderRejected) as rejected:
            complete(
                client,
                request,
                limiter=call.limiter,
                policy=RetryPolicy.from_settings(settings),
                redactor=Redactor(secrets=[wrong]),
                count_tokens=len,
                sleep=call.sleeps.append,
            )
    finally:
        client.close()
    assert time.monotonic() - started < 2.0
    assert rejected.value.status == 401
    assert rejected.value.provider_message == "Incorrect API key provided."
    assert wrong not in str(rejected.value)
    assert rejected.value.__cause__ is None  # the SDK error (and its request) is not chained
    assert rejected.value.__suppress_context__
    assert call.sleeps == []
    assert call.limiter.ledger.kinds() == ["acquire", "cancel"]


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_client_errors_are_not_retried(fake: KeyedFake, call: Call, status: int) -> None:
    fake.fault(status=status, count=1, message=f"nope {KEY} hi REPLY_LEN 5")
    with pytest.raises(ProviderRejected) as rejected:
        call.run(_settings(fake.base_url))
    assert rejected.value.status == status
    assert str(rejected.value) == f"HTTP {status}: nope [redacted] [redacted]"
    assert call.sleeps == []


def test_unreachable_provider_retries_then_gives_up(call: Call) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable) as failed:
        call.run(_settings(f"http://127.0.0.1:{port}/v1", max_retries=2))
    assert time.monotonic() - started < 5.0
    assert "connection failed" in str(failed.value)
    assert failed.value.status is None
    assert len(call.sleeps) == 2


@contextmanager
def _silent_port() -> Iterator[int]:
    """The port of a listening socket that accepts connections and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield silent.getsockname()[1]


def test_slow_provider_times_out_and_is_retried(call: Call) -> None:
    # A listening socket that never answers: the read timeout fires.
    with _silent_port() as port:
        settings = _settings(f"http://127.0.0.1:{port}/v1", max_retries=1, timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable) as failed:
            call.run(settings)
    assert "timed out" in str(failed.value)
    assert 0.6 <= time.monotonic() - started < 5.0
    assert len(call.sleeps) == 1


def test_the_task_deadline_caps_the_call_timeout(call: Call) -> None:
    """A provider that never answers, a client timeout of 30 s and a task with 0.5 s
    left: the call ends at the deadline, not at the client's timeout."""
    with _silent_port() as port:
        settings = _settings(f"http://127.0.0.1:{port}/v1", max_retries=0, timeout_s=30.0)
        started = time.monotonic()
        with pytest.raises((ProviderUnavailable, TimeLimitExceeded)):
            call.run(settings, deadline=Deadline.start(0.5))
    assert time.monotonic() - started < settings.timeout_s / 2


def test_status_classes() -> None:
    assert [
        s for s in (400, 401, 403, 404, 408, 409, 422, 429, 500, 502, 503, 529) if is_retryable(s)
    ] == [408, 409, 429, 500, 502, 503, 529]


def test_retry_after_parsing() -> None:
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after": "1.5"}) == 1.5
    assert retry_after_s({"retry-after-ms": "junk", "retry-after": "3"}) == 3.0
    assert retry_after_s({}) is None
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    hint = retry_after_s({"retry-after": future})
    assert hint is not None
    assert 25 <= hint <= 31


def test_policy_delays() -> None:
    policy = RetryPolicy(max_retries=6, backoff_base_s=0.5, backoff_max_s=4.0)
    assert [policy.delay(n, None, lambda: 1.0) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert policy.delay(3, None, lambda: 0.0) == 0.0  # full jitter reaches down to zero
    assert policy.delay(0, 1.0, lambda: 0.0) == 1.0
    assert policy.delay(0, 1.0, lambda: 1.0) == pytest.approx(1.1)
    assert policy.delay(0, 60.0, lambda: 0.5) == 4.0  # a thread never sleeps past the max


def test_redactor() -> None:
    redactor = Redactor(secrets=["sk-live-abcdef1234567890"], texts=["my private prompt", "short"])
    text = "key sk-live-abcdef1234567890, echo sk-live-***7890, said 'my private prompt' short"
    assert redactor.scrub(text) == "key [redacted], echo [redacted]***7890, said '[redacted]' short"
    assert redactor.scrub("other sk-ant-api03-xyz12345 leaked") == "other [redacted] leaked"
    assert redactor.scrub("a key-value store") == "a key-value store"
    assert len(redactor.scrub("x" * 2000)) == 503


def test_unreadable_response_is_a_provider_error(call: Call) -> None:
    # An HTTP server that answers 200 with a body that has no choices.
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Empty(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            body = b'{"id": "x", "object": "chat.completion", "created": 0, "model": "m", '
            body += b'"choices": []}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Empty)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ProviderError, match="no choices"):
            call.run(_settings(f"http://127.0.0.1:{server.server_port}/v1"))
    finally:
        server.shutdown()
        server.server_close()
    assert call.limiter.ledger.kinds() == ["acquire", "cancel"]


def test_openai_sdk_is_the_client() -> None:
    assert isinstance(build_llm_client(LLMSettings()), openai.OpenAI)
