"""Chat-completions calls: the client, our retry policy, error mapping.

The SDK's own retries are off (`max_retries=0`) so the policy here is the only one, and
it sees every attempt: each attempt takes a reservation from the fleet's limiter first
and settles it after (`reconcile` with the real usage, `cancel` when there is none).

    status                       what happens
    429, 408, 409, 5xx, network  retried in this thread (the task is not re-published):
                                 sleep `Retry-After`/`retry-after-ms` when the provider
                                 sends one, else exponential backoff with full jitter;
                                 a 429 also `penalize`s the model for the whole fleet
    other 4xx (400/401/403/404)  `ProviderRejected` at once, with the provider's message
    retries exhausted            `ProviderUnavailable`

Error messages pass through a `Redactor`: the API key never appears, nor (when prompts
are redacted) any message text the provider echoes back.

>>> policy = RetryPolicy(max_retries=3, backoff_base_s=0.5, backoff_max_s=30.0)
>>> policy.delay(2, retry_after=None, rand=lambda: 1.0)
2.0
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx2
import openai
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionMessageParam,
    ChatCompletionToolUnionParam,
)

from swarm_workers.config import LLMSettings
from swarm_workers.deadline import Deadline
from swarm_workers.errors import (
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    TimeLimitExceeded,
)
from swarm_workers.metrics import LLM_429
from swarm_workers.models import Priority
from swarm_workers.ratelimit.limiter import Limiter

__all__ = [
    "ChatRequest",
    "Completion",
    "Redactor",
    "RetryPolicy",
    "build_llm_client",
    "complete",
    "is_retryable",
    "retry_after_s",
]

log = logging.getLogger(__name__)

# Statuses worth another attempt: rate limits, timeouts, lock conflicts, server trouble.
_RETRYABLE = frozenset({408, 409, 429})
_MAX_MESSAGE_CHARS = 500
# Anything shaped like an OpenAI-style secret key, even one that is not ours.
_KEYLIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{8,}")


def build_llm_client(
    settings: LLMSettings, transport: httpx2.BaseTransport | None = None
) -> openai.OpenAI:
    """A client with explicit timeouts and no SDK retries; pooled connections unless a
    `transport` is given (the worker's: `clients.ThreadConnections`).

    >>> client = build_llm_client(LLMSettings(base_url="http://127.0.0.1:8400/v1"))
    """
    timeout = httpx2.Timeout(settings.timeout_s, connect=settings.connect_timeout_s)
    if transport is not None:
        http_client = openai.DefaultHttpxClient(timeout=timeout, transport=transport)
    else:
        connections = settings.max_connections or 64
        limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
        http_client = openai.DefaultHttpxClient(timeout=timeout, limits=limits)
    return openai.OpenAI(
        base_url=settings.base_url,
        api_key=settings.resolved_api_key(),
        timeout=timeout,
        max_retries=0,
        http_client=http_client,
    )


def is_retryable(status: int) -> bool:
    return status in _RETRYABLE or status >= 500


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The provider's wait hint: `retry-after-ms`, else `retry-after` (seconds or a date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = -1.0
        if value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before retry number `retry` (0-based) of one call."""

    max_retries: int
    backoff_base_s: float
    backoff_max_s: float

    @classmethod
    def from_settings(cls, settings: LLMSettings) -> RetryPolicy:
        return cls(settings.max_retries, settings.backoff_base_s, settings.backoff_max_s)

    def delay(self, retry: int, retry_after: float | None, rand: Callable[[], float]) -> float:
        """Full jitter, `rand() * min(max, base * 2**retry)`, unless the provider said.

        A provider hint is honoured with up to 10% jitter added (so threads that were
        refused together do not return together), cut at `backoff_max_s`: a thread
        never sleeps longer than that, and the fleet-wide penalty carries the full hint.
        """
        if retry_after is not None:
            return min(self.backoff_max_s, retry_after * (1 + 0.1 * rand()))
        return rand() * self.ceiling(retry)

    def ceiling(self, retry: int) -> float:
        """The longest backoff before retry number `retry`: `min(max, base * 2**retry)`."""
        return min(self.backoff_max_s, self.backoff_base_s * 2.0**retry)


class Redactor:
    """Removes secrets (and, optionally, prompt text) from provider messages.

    >>> Redactor(secrets=["sk-abc123456789"]).scrub("Incorrect API key provided: sk-abc123456789")
    'Incorrect API key provided: [redacted]'
    """

    def __init__(self, secrets: Iterable[str] = (), texts: Iterable[str] = ()) -> None:
        self._needles = sorted(
            {s for s in secrets if len(s) >= 4} | {t for t in texts if len(t) >= 8},
            key=len,
            reverse=True,
        )
        # Providers often echo a key's first characters ("sk-abc1***6789").
        self._prefixes = [s[:8] for s in secrets if len(s) >= 12]

    def scrub(self, text: str) -> str:
        for needle in self._needles:
            text = text.replace(needle, "[redacted]")
        for prefix in self._prefixes:
            text = text.replace(prefix, "[redacted]")
        text = _KEYLIKE.sub("[redacted]", text)
        if len(text) > _MAX_MESSAGE_CHARS:
            text = text[:_MAX_MESSAGE_CHARS] + "..."
        return text


@dataclass(frozen=True)
class ChatRequest:
    """One model turn to send; `prompt_tokens` is our pre-call count of `messages`."""

    model: str
    messages: Sequence[ChatCompletionMessageParam]
    tools: Sequence[ChatCompletionToolUnionParam]
    max_tokens: int
    priority: Priority
    prompt_tokens: int
    deadline: Deadline | None = None


@dataclass(frozen=True)
class Completion:
    """The model's answer to one `ChatRequest`, with its usage.

    `usage_reported` is False when the provider sent no `usage`: the token counts are
    then our estimates. `latency_s` is the successful attempt's round trip;
    `attempts` counts every attempt, refused ones included.
    """

    message: ChatCompletionMessage
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    usage_reported: bool
    latency_s: float
    attempts: int


def complete(
    client: openai.OpenAI,
    request: ChatRequest,
    *,
    limiter: Limiter,
    policy: RetryPolicy,
    redactor: Redactor,
    count_tokens: Callable[[str], int],
    cut: Callable[[], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
) -> Completion:
    """Send `request`, retrying per `policy`; raise a `ProviderError` subclass on failure.

    `cut` (`clients.LLMClient.cutter`) ends this thread's call when the request's
    deadline is stopped; without it a stopped task waits for the call to end."""
    reserve = request.prompt_tokens + request.max_tokens
    failure = "no attempt made"
    status: int | None = None
    deadline = request.deadline
    for attempt in range(policy.max_retries + 1):
        if deadline is not None:
            deadline.check("waiting to call the model")
        reservation = limiter.acquire(request.model, request.priority, reserve, deadline)
        started = time.monotonic()
        hint: float | None = None
        try:
            response = _cuttable(lambda: _post(client, request), deadline, cut)
        except _Abandoned as exc:
            # Cut mid-call: what the provider spent is unknown, so the reservation stands.
            reservation.reconcile(reserve)
            raise exc.reason from None
        except openai.APIStatusError as exc:
            reservation.cancel()
            status = exc.status_code
            message = redactor.scrub(_provider_message(exc))
            if not is_retryable(status):
                raise ProviderRejected(message, status=status) from None
            failure, hint = message, retry_after_s(exc.response.headers)
            if status == 429:
                LLM_429.labels(request.model).inc()
                penalty = hint if hint is not None else policy.ceiling(attempt)
                limiter.penalize(request.model, penalty)
        except openai.APIConnectionError as exc:
            reservation.cancel()
            status = None
            kind = "timed out" if isinstance(exc, openai.APITimeoutError) else "connection failed"
            failure = f"{kind}: {redactor.scrub(str(exc.__cause__ or exc))}"
        except openai.APIError as exc:  # e.g. a body that is not a chat completion
            reservation.cancel()
            raise ProviderError(redactor.scrub(f"unreadable response: {exc}")) from None
        except BaseException:
            reservation.cancel()
            raise
        else:
            latency = time.monotonic() - started
            try:
                completion = _completion(response, request, latency, attempt + 1, count_tokens)
            except ProviderError:
                reservation.cancel()
                raise
            reservation.reconcile(completion.prompt_tokens + completion.completion_tokens)
            return completion
        if attempt == policy.max_retries:
            break
        delay = policy.delay(attempt, hint, rand)
        if deadline is not None and delay >= deadline.remaining():
            raise TimeLimitExceeded(deadline.limit_s, f"retrying the model after: {failure}")
        log.warning(
            "llm %s: %s (attempt %d of %d); retrying in %.2fs",
            request.model,
            f"HTTP {status}" if status is not None else failure,
            attempt + 1,
            policy.max_retries + 1,
            delay,
        )
        sleep(delay)
    raise ProviderUnavailable(
        f"{failure} (gave up after {policy.max_retries + 1} attempts)", status=status
    )


def _post(client: openai.OpenAI, request: ChatRequest) -> ChatCompletion:
    """`POST /chat/completions`, what `client.chat.completions.create` sends, without its
    walk of the body against the SDK's typed-dict schema: the loop builds `messages` and
    `tools` as plain JSON already, and that walk was a third of the SDK's CPU on a short
    call (bench/README.md). `client.post` is the SDK's documented way to send a body as
    is; the answer is parsed into the same `ChatCompletion`."""
    body: dict[str, object] = {
        "model": request.model,
        "messages": request.messages,
        "max_tokens": request.max_tokens,
    }
    if request.tools:
        body["tools"] = request.tools
    options: openai.RequestOptions = {}
    if request.deadline is not None:
        # Never wait on the provider past the task's own time limit.
        options["timeout"] = _capped(client.timeout, request.deadline)
    return client.post("/chat/completions", cast_to=ChatCompletion, body=body, options=options)


class _Abandoned(Exception):
    def __init__(self, reason: BaseException) -> None:
        super().__init__(str(reason))
        self.reason = reason


def _cuttable(
    call: Callable[[], ChatCompletion], deadline: Deadline | None, cut: Callable[[], None] | None
) -> ChatCompletion:
    """`call()` on this thread, ended by `cut` the moment the task's deadline is stopped
    (cancelled, or its lease lost): the task goes on at once. `cut` acts only while the
    call runs; a stop during the call's connect, before its socket exists, lets the call
    run to its time limit (capped by the deadline) and its answer is then dropped."""
    if deadline is None or cut is None:
        return call()
    lock = threading.Lock()
    running = True

    def stop() -> None:
        with lock:
            if running:
                cut()

    deadline.on_stop(stop)
    try:
        if deadline.stopped is None:
            response = call()
    except BaseException as exc:
        if deadline.stopped is None:
            raise
        raise _Abandoned(deadline.stopped) from exc
    finally:
        with lock:
            running = False
    if deadline.stopped is not None:
        raise _Abandoned(deadline.stopped)
    return response


def _capped(timeout: float | httpx2.Timeout | None, deadline: Deadline) -> httpx2.Timeout:
    """The client's timeouts, none longer than what is left of the task's time."""
    left = max(0.001, deadline.remaining())
    if not isinstance(timeout, httpx2.Timeout):
        return httpx2.Timeout(left if timeout is None else min(timeout, left))
    return httpx2.Timeout(
        connect=min(timeout.connect or left, left),
        read=min(timeout.read or left, left),
        write=min(timeout.write or left, left),
        pool=min(timeout.pool or left, left),
    )


def _provider_message(exc: openai.APIStatusError) -> str:
    """The provider's own words (`error.message`), else the SDK's summary."""
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return exc.message


def _completion(
    response: ChatCompletion,
    request: ChatRequest,
    latency: float,
    attempts: int,
    count_tokens: Callable[[str], int],
) -> Completion:
    if not response.choices:
        raise ProviderError(f"the response to model {request.model} has no choices")
    choice = response.choices[0]
    usage = response.usage
    if usage is not None:
        prompt_tokens, completion_tokens = usage.prompt_tokens, usage.completion_tokens
    else:  # some gateways omit usage; charge our own count rather than nothing
        message = choice.message
        spoken = (message.content or "") + "".join(
            call.function.name + call.function.arguments
            for call in message.tool_calls or ()
            if call.type == "function"
        )
        prompt_tokens, completion_tokens = request.prompt_tokens, count_tokens(spoken)
    return Completion(
        message=choice.message,
        finish_reason=choice.finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        usage_reported=usage is not None,
        latency_s=latency,
        attempts=attempts,
    )
