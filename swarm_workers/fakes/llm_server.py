"""A fake OpenAI-compatible chat-completions provider for demos, CI and load tests.

Nobody should pay a provider to run a benchmark, so the fleet can be pointed at this
server instead. It is a peer over HTTP and imports nothing from ``swarm_workers``.

Endpoints (``/v1/*`` checks the bearer key when one is configured):
    POST /v1/chat/completions  non-streaming only; ``stream: true`` answers 400
    GET  /v1/models            the configured model ids (any model name is accepted and echoed)
    GET  /_fake/stats          counters, see ``Stats``; ``POST /_fake/reset`` zeroes them,
                               clears rate windows and pending faults, reseeds latency
    POST /_fake/faults         ``{"status": 503, "count": 2, "retry_after": 0.2}``: the next
                               ``count`` chat requests answer ``status`` (after the key check)

Replies are a pure function of the messages (a sha256 of their JSON); ``id`` and
``created`` are the only fields that vary. Token estimates, used for ``usage`` and TPM:
``tokens(text) = ceil(len(text) / 4)``; a prompt costs ``3 + sum(4 + tokens(content +
name + tool-call names and arguments))`` over the messages, plus ``tokens(json(tools))``;
a tool call costs ``3 + tokens(name + arguments)``. A text reply is capped at
``max_completion_tokens`` (else ``max_tokens``): cut to ``4 * cap`` characters with
``finish_reason="length"``. Tool-call replies are never cut.

Directives, read from the LAST user message; its "turn" is every message after it:
    CALL name {"a": 1}      call tool ``name`` (arguments optional, default ``{}``); several
                            directives give parallel calls in one assistant message
    CALL_BAD name {"a": 1}  the same, but the first call's arguments are invalid JSON; once a
                            tool message answers it (the agent's error report), the call is
                            made again with the given arguments
    REPLY_LEN n             a text reply of exactly n tokens (final answers are padded to n;
                            n <= 200000); for budget stops
    TURNS k                 with CALL directives: make the calls again in each of k
                            assistant turns (each answered by its tool messages) before the
                            final text, so one task makes k + 1 model calls (default 1)
    SPAWN n roles=a,b [rounds=k] [fail=i,j] [deps=i:j+k,...] [| text]
                            a supervisor: call ``swarm__spawn`` with n sub-tasks, role i
                            cycling over the roles, prompt "sub-task i of n (round r)"
                            followed by ": text" when given (so "| SPAWN 2 roles=c" nests),
                            and " REJECT" for the numbers in ``fail``; with ``deps``, the
                            sub-tasks have ids c1..cn, sub-task i waits for j and k, and its
                            prompt ends ": ECHO {{ cj.output }} {{ ck.output }}" instead of
                            the text (so its reply shows what it was given); once answered, spawn
                            again until k rounds (default 1) were made; then a final text
                            "Synthesis: R round(s), N sub-agents, S succeeded, F failed: "
                            with each sub-agent's id, role and first 40 characters of output
                            (from the tool's JSON answer; "Spawn refused: ..." for an error)
    REJECT                  answer 400 (a request the provider refuses), for failing tasks
    ECHO                    a text reply quoting the last user message whole (capped like
                            any text): what a prompt became, e.g. after a DAG template
Rules (SPAWN and REJECT apart), first match wins (``tool_choice: "none"`` disables CALL directives):
    1. a directive names a tool that is not in ``tools`` -> text "Tool not offered: ..."
    2. no assistant ``tool_calls`` in the turn yet -> ``tool_calls`` for every directive,
       ids ``call_<hash>`` derived from the conversation, ``finish_reason="tool_calls"``
    3. exactly one such message so far and some CALL_BAD -> the corrected calls only
    3b. fewer such messages than TURNS -> the calls again (new ids)
    4. otherwise -> "Tool results: name: content | ..." from the answers to well-formed calls
As OpenAI does, an assistant ``tool_calls`` message must be followed by a tool message for
each id, and a tool message must answer one; otherwise 400.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Literal

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = [
    "DEFAULT_PORT",
    "FakeLLMConfig",
    "FaultSpec",
    "FixedLatency",
    "LognormalLatency",
    "Stats",
    "UniformLatency",
    "build_app",
    "main",
    "serve",
]

DEFAULT_PORT = 8400
_Z99 = 2.3263478740408408  # the standard normal's 99th percentile


class FixedLatency(BaseModel):
    """Every reply waits ``ms``. >>> FixedLatency(ms=200)"""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["fixed"] = "fixed"
    ms: float = Field(0.0, ge=0)

    def sample(self, rng: random.Random) -> float:
        return self.ms / 1000


class UniformLatency(BaseModel):
    """Uniform between two bounds. >>> UniformLatency(min_ms=50, max_ms=400)"""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["uniform"] = "uniform"
    min_ms: float = Field(ge=0)
    max_ms: float = Field(ge=0)

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.min_ms, self.max_ms) / 1000


class LognormalLatency(BaseModel):
    """Long-tailed, like real providers. >>> LognormalLatency(median_ms=300, p99_ms=2000)"""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["lognormal"] = "lognormal"
    median_ms: float = Field(gt=0)
    p99_ms: float = Field(gt=0)

    @model_validator(mode="after")
    def _tail_above_median(self) -> LognormalLatency:
        if self.p99_ms < self.median_ms:
            raise ValueError("p99_ms must be >= median_ms")
        return self

    def sample(self, rng: random.Random) -> float:
        sigma = math.log(self.p99_ms / self.median_ms) / _Z99
        return rng.lognormvariate(math.log(self.median_ms), sigma) / 1000


Latency = Annotated[FixedLatency | UniformLatency | LognormalLatency, Field(discriminator="kind")]


class FakeLLMConfig(BaseModel):
    """What the fake provider does; limits are per server process, in memory.

    >>> FakeLLMConfig(latency=UniformLatency(min_ms=50, max_ms=400), rpm=600).latency.max_ms
    400.0
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    models: tuple[str, ...] = ("fake-model",)
    latency: Latency = FixedLatency()
    seed: int = 0
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    api_key: str | None = None
    reply_tokens: tuple[int, int] = (16, 160)  # bounds of a reply's length without REPLY_LEN


class FaultSpec(BaseModel):
    """Make the next ``count`` chat requests fail. >>> FaultSpec(status=429, retry_after=0.2)"""

    model_config = ConfigDict(frozen=True, extra="forbid")
    status: int = Field(ge=400, le=599)
    count: int = Field(1, ge=1, le=100_000)
    retry_after: float | None = Field(None, ge=0)
    message: str | None = None


class RateLimited(BaseModel):
    """429s sent, by reason: our own RPM/TPM limit, or an injected fault."""

    limit: int = 0
    injected: int = 0


class Stats(BaseModel):
    """What ``GET /_fake/stats`` answers; benchmarks read it. ``requests`` counts chat calls."""

    requests: int = 0
    completions: int = 0
    rate_limited: RateLimited = Field(default_factory=RateLimited)
    server_errors: int = 0
    errors_by_status: dict[str, int] = Field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


class _Lenient(BaseModel):
    """Request payloads keep unknown fields: a provider ignores what it does not use."""

    model_config = ConfigDict(extra="allow")


class ToolFunction(_Lenient):
    name: str
    arguments: str = ""


class ToolCall(_Lenient):
    id: str
    type: str = "function"
    function: ToolFunction


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class FunctionSpec(_Lenient):
    name: str


class OfferedTool(_Lenient):
    type: str = "function"
    function: FunctionSpec | None = None


class ChatRequest(_Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[OfferedTool] | None = None
    tool_choice: str | dict[str, object] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool | None = False


@dataclass(frozen=True)
class Reply:
    """The assistant turn and what it costs, decided before any waiting."""

    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: Literal["stop", "length", "tool_calls"]
    completion_tokens: int


@dataclass(frozen=True)
class _Directive:
    name: str
    arguments: str
    malformed: bool


_CALL = re.compile(r"\b(CALL_BAD|CALL)\s+([A-Za-z_][\w.\-]*)")
_ERROR_TYPES = {429: "requests", 403: "permission_error", 404: "not_found_error"}
_REPLY_LEN = re.compile(r"\bREPLY_LEN\s+(\d+)")
_SPAWN = re.compile(
    r"\bSPAWN\s+(\d+)\s+roles=([\w,-]+)(?:\s+rounds=(\d+))?(?:\s+fail=([\d,]+))?"
    r"(?:\s+deps=([\d:+,]+))?(?:\s*\|\s*(.*))?",
    re.DOTALL,
)
_REJECT = re.compile(r"\bREJECT\b")
_ECHO = re.compile(r"\bECHO\b")
_TURNS = re.compile(r"\bTURNS\s+(\d+)")
SPAWN_TOOL = "swarm__spawn"
_MAX_REPLY = 200_000  # tokens; REPLY_LEN is clamped so one request cannot eat the memory
_PROSE = (
    "the swarm routes each task to a worker that reads context calls tools and writes a short "
    "answer while the bucket keeps every request inside the provider limits so queues drain"
)
_WORDS = _PROSE.split()


def estimate_tokens(text: str) -> int:
    """About four characters a token, rounded up: close enough for budgets and TPM."""
    return -(-len(text) // 4)


def estimate_prompt_tokens(request: ChatRequest) -> int:
    total = 3
    for m in request.messages:
        calls = "".join(c.function.name + c.function.arguments for c in m.tool_calls or [])
        total += 4 + estimate_tokens(m.text() + (m.name or "") + calls)
    if request.tools:
        total += estimate_tokens(
            json.dumps([t.model_dump(mode="json", exclude_unset=True) for t in request.tools])
        )
    return total


def tool_call_problem(messages: list[ChatMessage]) -> str | None:
    """OpenAI's pairing rule for tool calls and tool messages; None when it holds."""
    pending: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "tool":
            if m.tool_call_id not in pending:
                return f"messages[{i}]: a 'tool' message must answer a preceding 'tool_calls' id"
            pending.discard(m.tool_call_id)
        elif pending:
            break
        if m.role == "assistant" and m.tool_calls:
            pending = {c.id for c in m.tool_calls}
    if pending:
        return f"tool_calls must be answered by tool messages; missing: {sorted(pending)}"
    return None


def _digest(messages: list[ChatMessage]) -> str:
    dumped = [m.model_dump(mode="json", exclude_none=True) for m in messages]
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()


def _parse_directives(text: str) -> list[_Directive]:
    decoder = json.JSONDecoder()
    found = []
    for match in _CALL.finditer(text):
        rest = text[match.end() :].lstrip()
        args: object = {}
        if rest.startswith("{"):
            try:
                args, _ = decoder.raw_decode(rest)
            except json.JSONDecodeError as exc:
                raise ValueError(f"arguments of {match[2]} are not JSON: {exc}") from exc
            except RecursionError:  # nested deeper than the decoder goes
                raise ValueError(f"arguments of {match[2]} are nested too deeply") from None
        found.append(_Directive(match[2], json.dumps(args), match[1] == "CALL_BAD"))
    return found


def _filler(seed: str, tokens: int) -> str:
    """Exactly ``tokens`` tokens of deterministic prose."""
    if tokens <= 0:
        return ""
    rng = random.Random(seed)
    words, size = [], 0
    while size < 4 * tokens:
        words.append(rng.choice(_WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)[: 4 * tokens - 1] + "."


def _text_reply(text: str, digest: str, length: int | None, cap: int | None) -> Reply:
    if length is not None and estimate_tokens(text) < length:
        text = (
            (text + " " + _filler(digest, length))[: 4 * length]
            if text
            else _filler(digest, length)
        )
    if cap is not None and estimate_tokens(text) > cap:
        return Reply(text[: 4 * cap], [], "length", cap)
    return Reply(text, [], "stop", estimate_tokens(text))


def _calls_reply(directives: list[_Directive], digest: str, *, first: bool) -> Reply:
    calls = [
        ToolCall(
            id="call_" + hashlib.sha256(f"{digest}:{i}".encode()).hexdigest()[:24],
            function=ToolFunction(
                name=d.name, arguments=d.arguments[:-1] if first and d.malformed else d.arguments
            ),
        )
        for i, d in enumerate(directives)
    ]
    tokens = sum(3 + estimate_tokens(c.function.name + c.function.arguments) for c in calls)
    return Reply(None, calls, "tool_calls", tokens)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _last_user(request: ChatRequest) -> tuple[str, list[ChatMessage]]:
    """The last user message's text, and its turn (every message after it)."""
    users = [i for i, m in enumerate(request.messages) if m.role == "user"]
    last = users[-1] if users else -1
    said = request.messages[last].text() if users else ""
    return said, request.messages[last + 1 :]


def rejects(request: ChatRequest) -> bool:
    """Does the last user message carry REJECT (answered 400)?"""
    return _REJECT.search(_last_user(request)[0]) is not None


def _spawn_reply(
    match: re.Match[str], request: ChatRequest, turn: list[ChatMessage], digest: str
) -> Reply:
    offered = {t.function.name for t in request.tools or [] if t.function}
    if SPAWN_TOOL not in offered:
        return _text_reply(f"Tool not offered: {SPAWN_TOOL}.", digest, None, None)
    n, roles = int(match[1]), [r for r in match[2].split(",") if r]
    rounds = int(match[3] or 1)
    fail = {int(x) for x in (match[4] or "").split(",") if x}
    deps = {
        int(task): [int(d) for d in needs.split("+") if d]
        for task, _, needs in (pair.partition(":") for pair in (match[5] or "").split(",") if pair)
    }
    text = (match[6] or "").strip()
    made = sum(1 for m in turn if m.role == "assistant" and m.tool_calls)
    answers = [m.text() for m in turn if m.role == "tool"]
    refused = [a for a in answers if not _is_json(a)]
    if made < rounds and not refused:
        r = made + 1
        tasks: list[dict[str, object]] = []
        for i in range(1, n + 1):
            quoted = " ".join(f"{{{{ c{j}.output }}}}" for j in deps.get(i, ()))
            said = f": ECHO {quoted}" if i in deps else f": {text}" if text else ""
            task: dict[str, object] = {
                "role": roles[(i - 1) % len(roles)],
                "prompt": f"sub-task {i} of {n} (round {r}){said}"
                + (" REJECT" if i in fail else ""),
            }
            if deps:
                task |= {"id": f"c{i}", "deps": [f"c{j}" for j in deps.get(i, ())]}
            tasks.append(task)
        call = ToolCall(
            id="call_" + hashlib.sha256(f"{digest}:spawn".encode()).hexdigest()[:24],
            function=ToolFunction(name=SPAWN_TOOL, arguments=json.dumps({"tasks": tasks})),
        )
        return Reply(None, [call], "tool_calls", 3 + estimate_tokens(call.function.arguments))
    if refused:
        return _text_reply(f"Spawn refused: {refused[-1]}", digest, None, None)
    total = succeeded = 0
    parts: list[str] = []
    for answer in answers:
        found = json.loads(answer)
        total += int(found.get("sub_agents", 0))
        succeeded += int(found.get("succeeded", 0))
        for row in found.get("results", []):
            said = row.get("output") or row.get("error") or ""
            parts.append(f"{row.get('id')}({row.get('role')},{row.get('status')}): {said[:40]}")
    head = (
        f"Synthesis: {len(answers)} round(s), {total} sub-agents, {succeeded} succeeded, "
        f"{total - succeeded} failed: "
    )
    return _text_reply(head + " | ".join(parts), digest, None, None)


def compose_reply(request: ChatRequest, config: FakeLLMConfig) -> Reply:
    """Apply the directive rules of the module docstring; a pure function of the request."""
    digest = _digest(request.messages)
    said, turn = _last_user(request)
    if (spawn := _SPAWN.search(said)) is not None and request.tool_choice != "none":
        return _spawn_reply(spawn, request, turn, digest)
    length = min(int(found[1]), _MAX_REPLY) if (found := _REPLY_LEN.search(said)) else None
    cap = request.max_completion_tokens or request.max_tokens
    if _ECHO.search(said) is not None:
        return _text_reply(said, digest, None, cap)
    try:
        directives = _parse_directives(said) if request.tool_choice != "none" else []
    except ValueError as exc:
        return _text_reply(f"Directive error: {exc}", digest, length, cap)
    if not directives:
        low, high = sorted(config.reply_tokens)
        n = length if length is not None else random.Random(digest).randint(low, high)
        return _text_reply(_filler(digest, n), digest, None, cap)
    offered = {t.function.name for t in request.tools or [] if t.function}
    if missing := sorted({d.name for d in directives} - offered):
        text = f"Tool not offered: {', '.join(missing)}. Offered: {', '.join(sorted(offered))}."
        return _text_reply(text, digest, length, cap)
    rounds = sum(1 for m in turn if m.role == "assistant" and m.tool_calls)
    if rounds == 0:
        return _calls_reply(directives, digest, first=True)
    if rounds == 1 and any(d.malformed for d in directives):
        return _calls_reply([d for d in directives if d.malformed], digest, first=False)
    if (turns := _TURNS.search(said)) is not None and rounds < int(turns[1]):
        return _calls_reply(directives, digest, first=False)
    names = {
        c.id: c.function.name
        for m in turn
        for c in m.tool_calls or []
        if _is_json(c.function.arguments)
    }
    results = [f"{names[m.tool_call_id]}: {m.text()}" for m in turn if m.tool_call_id in names]
    return _text_reply("Tool results: " + " | ".join(results), digest, length, cap)


class SlidingWindow:
    """Amounts taken in the last ``window`` seconds. >>> SlidingWindow(limit=60).wait(1)"""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self._taken: deque[tuple[float, int]] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        while self._taken and self._taken[0][0] <= now - self.window:
            self._used -= self._taken.popleft()[1]

    def remaining(self) -> int:
        self._expire(time.monotonic())
        return max(0, self.limit - self._used)

    def wait(self, amount: int) -> float:
        """Seconds until ``amount`` fits; the whole window if it never can."""
        now = time.monotonic()
        self._expire(now)
        if amount > self.limit:
            return self.window
        excess = self._used + amount - self.limit
        for at, taken in self._taken:
            if excess <= 0:
                break
            excess -= taken
            if excess <= 0:
                return at + self.window - now
        return 0.0

    def take(self, amount: int) -> None:
        self._taken.append((time.monotonic(), amount))
        self._used += amount

    def clear(self) -> None:
        self._taken.clear()
        self._used = 0


class FakeProvider:
    """The server's state: counters, rate windows, pending faults, the latency RNG."""

    def __init__(self, config: FakeLLMConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.rpm = SlidingWindow(config.rpm) if config.rpm else None
        self.tpm = SlidingWindow(config.tpm) if config.tpm else None
        self.faults: deque[FaultSpec] = deque()
        self.rng = random.Random(config.seed)

    def error(
        self,
        status: int,
        message: str,
        *,
        kind: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> Response:
        """An OpenAI-shaped error body, counted."""
        self.stats.errors_by_status[str(status)] = (
            self.stats.errors_by_status.get(str(status), 0) + 1
        )
        self.stats.server_errors += int(status >= 500)
        headers: dict[str, str] = {}
        if retry_after is not None:
            headers = {
                "retry-after": str(math.ceil(retry_after)),
                "retry-after-ms": str(round(retry_after * 1000)),
            }
        kind = kind or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "")
        body = {"message": message, "type": kind or "invalid_request_error", "param": param}
        return JSONResponse({"error": body | {"code": code}}, status_code=status, headers=headers)

    def denied(self, request: Request) -> Response | None:
        key = self.config.api_key
        if key is None or request.headers.get("authorization") == f"Bearer {key}":
            return None
        return self.error(401, "Incorrect API key provided.", code="invalid_api_key")

    def injected(self) -> Response:
        fault = self.faults.popleft()
        if fault.status == 429:
            self.stats.rate_limited.injected += 1
        message = fault.message or f"Injected fault: HTTP {fault.status}"
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(fault.status)
        return self.error(fault.status, message, code=code, retry_after=fault.retry_after)

    def admit(self, tokens: int) -> Response | None:
        """Check both limits, then take from both: a refused request costs nothing."""
        for kind, window, amount in (("requests", self.rpm, 1), ("tokens", self.tpm, tokens)):
            if window is not None and (wait := window.wait(amount)) > 0:
                self.stats.rate_limited.limit += 1
                message = (
                    f"Rate limit reached for {kind}: limit {window.limit} per minute, "
                    f"requested {amount}. Please try again in {wait:.3f}s."
                )
                return self.error(
                    429, message, kind=kind, code="rate_limit_exceeded", retry_after=wait
                )
        for window, amount in ((self.rpm, 1), (self.tpm, tokens)):
            if window is not None:
                window.take(amount)
        return None

    def limit_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for kind, window in (("requests", self.rpm), ("tokens", self.tpm)):
            if window is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(window.remaining())
        return headers

    async def chat_completions(self, request: Request) -> Response:
        self.stats.requests += 1
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            return await self._chat(request)
        finally:
            self.stats.in_flight -= 1

    async def _chat(self, request: Request) -> Response:
        if (refused := self.denied(request)) is not None:
            return refused
        if self.faults:
            return self.injected()
        try:
            chat = ChatRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return self.error(400, f"Invalid request: {first['msg']}", param=param)
        if chat.stream:
            unsupported = "stream=true is not supported by the fake provider"
            return self.error(400, unsupported, param="stream", code="unsupported_value")
        if (problem := tool_call_problem(chat.messages)) is not None:
            return self.error(400, problem, param="messages")
        if rejects(chat):
            return self.error(400, "Rejected: the request carries the REJECT directive")
        reply = compose_reply(chat, self.config)
        prompt_tokens = estimate_prompt_tokens(chat)
        if (limited := self.admit(prompt_tokens + reply.completion_tokens)) is not None:
            return limited
        await asyncio.sleep(self.config.latency.sample(self.rng))
        self.stats.completions += 1
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += reply.completion_tokens
        message: dict[str, object] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = [c.model_dump(mode="json") for c in reply.tool_calls]
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": prompt_tokens + reply.completion_tokens,
            },
        }
        return JSONResponse(body, headers=self.limit_headers())

    async def models(self, request: Request) -> Response:
        if (refused := self.denied(request)) is not None:
            return refused
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "fake"}
            for m in self.config.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def add_faults(self, request: Request) -> Response:
        try:
            fault = FaultSpec.model_validate_json(await request.body())
        except ValidationError as exc:
            return self.error(400, f"Invalid fault: {exc.errors()[0]['msg']}")
        self.faults.extend([fault] * fault.count)
        return JSONResponse({"pending": len(self.faults)})

    async def read_stats(self, request: Request) -> Response:
        return JSONResponse(self.stats.model_dump(mode="json"))

    async def reset(self, request: Request) -> Response:
        in_flight = self.stats.in_flight
        self.stats = Stats(in_flight=in_flight, max_in_flight=in_flight)
        for window in (self.rpm, self.tpm):
            if window is not None:
                window.clear()
        self.faults.clear()
        self.rng = random.Random(self.config.seed)
        return JSONResponse({"reset": True})


def build_app(config: FakeLLMConfig) -> Starlette:
    """The ASGI app; embed it in tests or another server. >>> build_app(FakeLLMConfig())"""
    provider = FakeProvider(config)
    routes = [
        Route("/v1/chat/completions", provider.chat_completions, methods=["POST"]),
        Route("/v1/models", provider.models, methods=["GET"]),
        Route("/_fake/stats", provider.read_stats, methods=["GET"]),
        Route("/_fake/reset", provider.reset, methods=["POST"]),
        Route("/_fake/faults", provider.add_faults, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.provider = provider
    return app


def _raise_open_file_limit() -> None:
    """Thousands of concurrent connections need thousands of descriptors."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(config: FakeLLMConfig, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Run the server until SIGINT/SIGTERM; blocks. >>> serve(FakeLLMConfig(), port=8400)"""
    _raise_open_file_limit()
    server_config = uvicorn.Config(
        build_app(config),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        limit_concurrency=None,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(server_config).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m swarm_workers.fakes.llm_server --port 8400 --latency-ms 200 --rpm 600``"""
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible provider.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    latency = parser.add_mutually_exclusive_group()
    latency.add_argument("--latency-ms", type=float, metavar="MS", help="fixed latency")
    latency.add_argument("--latency-uniform", type=float, nargs=2, metavar=("MIN_MS", "MAX_MS"))
    latency.add_argument(
        "--latency-lognormal", type=float, nargs=2, metavar=("MEDIAN_MS", "P99_MS")
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the latency RNG")
    parser.add_argument("--rpm", type=int, help="requests per minute (sliding 60 s window)")
    parser.add_argument("--tpm", type=int, help="tokens per minute (sliding 60 s window)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--model", action="append", dest="models", help="repeatable")
    args = parser.parse_args(argv)
    try:
        lat: FixedLatency | UniformLatency | LognormalLatency = FixedLatency(
            ms=args.latency_ms or 0
        )
        if args.latency_uniform:
            lat = UniformLatency(min_ms=args.latency_uniform[0], max_ms=args.latency_uniform[1])
        elif args.latency_lognormal:
            low, p99 = args.latency_lognormal
            lat = LognormalLatency(median_ms=low, p99_ms=p99)
        config = FakeLLMConfig(
            latency=lat,
            seed=args.seed,
            rpm=args.rpm,
            tpm=args.tpm,
            api_key=args.api_key,
            models=tuple(args.models or FakeLLMConfig().models),
        )
    except ValidationError as exc:
        parser.error(str(exc))
    serve(config, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
