"""The agent loop: ask the model, run the tools it calls, repeat until it answers.

One task, in the calling (Celery pool) thread:

    messages = role's system prompt + the task's prompt (or messages)
    repeat, at most the role's `max_steps` model calls:
        count the prompt; ContextOverflow if it cannot fit with a useful `max_tokens`
        call the model (`llm.complete`: limiter, retries) with `max_tokens` = budget left
        no tool calls               -> stop "final"
        reply cut at max_tokens, or
        the output budget is spent  -> stop "budget" (tool calls are not run)
        this was the last step      -> stop "max_steps" (tool calls are not run)
        run the tool calls, concurrently when there are several; append their results

A tool call the model got wrong (arguments that are not JSON or break the schema, a
tool it was not offered, a tool that fails) becomes that call's tool message,
``"error: ..."``, so the model can correct itself. A provider or limiter failure ends
the loop with stop reason "error"; the usage spent until then is still reported.

Usage::

    outcome = run_agent(task, runtime)
    outcome.stop_reason, outcome.steps, outcome.usage.completion_tokens
    # -> ('final', 3, 412)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, cast

from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionMessage,
    ChatCompletionMessageParam,
    ChatCompletionMessageToolCallUnion,
    ChatCompletionMessageToolCallUnionParam,
    ChatCompletionToolMessageParam,
    ChatCompletionToolUnionParam,
)
from pydantic import TypeAdapter

from swarm_workers.agent.budget import (
    OutputBudget,
    context_window,
    cost_usd,
    token_counter,
)
from swarm_workers.agent.checkpoint import Checkpoint, CheckpointWriter
from swarm_workers.agent.clients import LLMClient
from swarm_workers.agent.llm import ChatRequest, Completion, Redactor, RetryPolicy, complete
from swarm_workers.config import RoleSettings, Settings
from swarm_workers.deadline import Deadline
from swarm_workers.errors import (
    InvalidToolArguments,
    SwarmError,
    ToolError,
    ToolUnavailable,
    UnknownTool,
)
from swarm_workers.models import (
    AgentTask,
    ErrorInfo,
    LLMCall,
    StopReason,
    ToolCallRecord,
    Usage,
    utcnow,
)
from swarm_workers.ratelimit.limiter import Limiter
from swarm_workers.swarm.spawn import SPAWN_TOOL, Spawner, Waiting
from swarm_workers.tools.base import Toolset, ToolSpec

__all__ = ["TOOL_THREADS", "AgentOutcome", "AgentRuntime", "initial_messages", "run_agent"]

log = logging.getLogger(__name__)

# Threads per process for the 2nd..nth tool call of one model turn (the 1st runs in the
# task's own thread). Bounded so a swarm of parallel calls cannot exhaust the process.
TOOL_THREADS = 32


class AgentRuntime(Protocol):
    """What the loop needs from the worker process (`runtime.Runtime` provides it)."""

    settings: Settings
    tools: Toolset
    limiter: Limiter
    llm: LLMClient


@dataclass(frozen=True)
class AgentOutcome:
    """What one run of the loop produced; `execution` turns it into a `TaskResult`."""

    model: str
    stop_reason: StopReason
    output: str | None = None
    steps: int = 0
    usage: Usage = field(default_factory=Usage)
    tool_calls: tuple[ToolCallRecord, ...] = ()
    cost_usd: float = 0.0
    error: ErrorInfo | None = None
    steps_resumed: int = 0
    waiting: int | None = None  # the spawn round this run ended waiting for
    started_at: datetime | None = None  # the first run's start (from the checkpoint)
    own_model_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Tally:
    """Running totals of one loop."""

    budget: OutputBudget
    calls: list[LLMCall] = field(default_factory=list)
    tools: list[ToolCallRecord] = field(default_factory=list)
    output: str | None = None

    def add(self, completion: Completion) -> None:
        self.calls.append(
            LLMCall(
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                latency_s=round(completion.latency_s, 6),
                finish_reason=completion.finish_reason,
            )
        )
        self.budget = self.budget.charge(completion.completion_tokens)

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=sum(c.prompt_tokens for c in self.calls),
            completion_tokens=sum(c.completion_tokens for c in self.calls),
            calls=tuple(self.calls),
        )


def run_agent(
    task: AgentTask,
    runtime: AgentRuntime,
    deadline: Deadline | None = None,
    *,
    durable: CheckpointWriter | None = None,
    spawner: Spawner | None = None,
) -> AgentOutcome:
    """Run `task`'s agent loop to a final answer, a budget, a step limit or an error.

    `deadline` is the task's, started at delivery; without one the loop starts its own.
    `durable`: checkpoint after every completed step and resume from the last one.
    `spawner`: offer `swarm__spawn` to a role that may spawn; its call ends the run as
    waiting (`AgentOutcome.waiting`) until the sub-agents have all recorded.
    """
    settings = runtime.settings
    model = settings.model_for(task.role)
    if deadline is None:
        deadline = Deadline.start(settings.worker.task_time_limit_s)
    tally = _Tally(OutputBudget(task.output_budget))
    steps = resumed = 0
    started_at = utcnow()
    own_model_s = 0.0
    waiting: Waiting | None = None
    stop: StopReason = "error"
    error: ErrorInfo | None = None
    messages: list[ChatCompletionMessageParam] = []

    def save() -> None:
        if durable is not None:
            durable.save(
                Checkpoint(
                    task=task,
                    started_at=started_at,
                    steps=steps,
                    messages=tuple(dict(m) for m in messages),
                    calls=tuple(tally.calls),
                    tools=tuple(tally.tools),
                    output=tally.output,
                    own_model_s=own_model_s,
                )
            )

    try:
        role = settings.role(task.role)
        specs = runtime.tools.specs(role.tools) if role.tools else []
        tools: list[ChatCompletionToolUnionParam] = [_tool_param(spec) for spec in specs]
        swarm = spawner if spawner is not None and spawner.offered(role) else None
        if swarm is not None:
            tools.append(_tool_param(swarm.spec()))
        state = durable.load() if durable is not None else None
        if state is not None:
            messages = [cast(ChatCompletionMessageParam, dict(m)) for m in state.messages]
            steps = resumed = state.steps
            tally.calls = list(state.calls)
            tally.tools = list(state.tools)
            tally.output = state.output
            tally.budget = OutputBudget(task.output_budget).charge(
                sum(c.completion_tokens for c in state.calls)
            )
            started_at, own_model_s = state.started_at, state.own_model_s
            log.info("task %s: resumed after %d step(s) from its checkpoint", task.id, steps)
        else:
            messages = initial_messages(_system_prompt(role, runtime.tools), task)
        counter = token_counter(model)
        context = context_window(settings.llm, model)
        policy = RetryPolicy.from_settings(settings.llm)
        redactor = _redactor(settings, task)
        while True:
            pending = _unanswered(messages)
            if pending:
                waiting = _answer(pending, task, role, runtime, deadline, swarm, tally, messages)
                save()
                if waiting is not None:
                    break
            if tally.budget.exhausted:
                stop = "budget"
                break
            deadline.check(f"before step {steps + 1}")
            prompt_tokens = counter.count_prompt(messages, tools)
            request = ChatRequest(
                model=model,
                messages=list(messages),
                tools=tools,
                max_tokens=tally.budget.max_tokens(model, prompt_tokens, context),
                priority=task.priority,
                prompt_tokens=prompt_tokens,
                deadline=deadline,
            )
            completion = complete(
                runtime.llm.openai,
                request,
                limiter=runtime.limiter,
                policy=policy,
                redactor=redactor,
                count_tokens=counter.count,
                cut=runtime.llm.cutter(),
            )
            steps += 1
            own_model_s += completion.latency_s
            tally.add(completion)
            message = completion.message
            tally.output = message.content if message.content is not None else message.refusal
            if completion.finish_reason == "length" or (
                message.tool_calls and tally.budget.exhausted
            ):
                stop = "budget"
                break
            if not message.tool_calls:
                stop = "final"
                break
            if steps == role.max_steps:
                stop = "max_steps"
                break
            messages.append(_assistant_turn(message))
            save()  # the model's turn is paid for: a resumed run does not ask again
    except SwarmError as exc:  # ToolErrors never get here: the model reads them
        stop = "error"
        error = ErrorInfo(type=type(exc).__name__, message=str(exc))
    usage = tally.usage()
    outcome = AgentOutcome(
        model=model,
        stop_reason=stop,
        output=tally.output if error is None else None,
        steps=steps,
        usage=usage,
        tool_calls=tuple(tally.tools),
        cost_usd=cost_usd(settings.llm.prices, model, usage.prompt_tokens, usage.completion_tokens),
        error=error,
        steps_resumed=resumed,
        waiting=waiting.round if waiting is not None and error is None else None,
        started_at=started_at,
        own_model_s=round(own_model_s, 6),
    )
    if outcome.waiting is not None:
        log.info(
            "task %s: waiting for spawn round %d after %d step(s)", task.id, outcome.waiting, steps
        )
        return outcome
    log.info(
        "task %s: %s after %d step(s) (%d resumed), %d tool call(s), tokens %d+%d, $%.6f",
        task.id,
        stop,
        steps,
        resumed,
        len(tally.tools),
        usage.prompt_tokens,
        usage.completion_tokens,
        outcome.cost_usd,
    )
    return outcome


_CALLS: TypeAdapter[ChatCompletionMessageToolCallUnion] = TypeAdapter(
    ChatCompletionMessageToolCallUnion
)


def _unanswered(
    messages: Sequence[ChatCompletionMessageParam],
) -> list[ChatCompletionMessageToolCallUnion]:
    """The last assistant turn's tool calls that no tool message answers yet."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message["role"] == "assistant":
            answered = {m["tool_call_id"] for m in messages[i + 1 :] if m["role"] == "tool"}
            calls = message.get("tool_calls") or []
            return [_CALLS.validate_python(c) for c in calls if c["id"] not in answered]
        if message["role"] != "tool":
            return []
    return []


def _answer(
    pending: Sequence[ChatCompletionMessageToolCallUnion],
    task: AgentTask,
    role: RoleSettings,
    runtime: AgentRuntime,
    deadline: Deadline,
    swarm: Spawner | None,
    tally: _Tally,
    messages: list[ChatCompletionMessageParam],
) -> Waiting | None:
    """Answer a turn's pending calls: tools first, then `swarm__spawn` (which may wait)."""
    spawns = [c for c in pending if c.type == "function" and c.function.name == SPAWN_TOOL]
    others = [c for c in pending if c not in spawns]
    if others:
        for record, tool_message in _run_tool_calls(others, role, task.role, runtime, deadline):
            tally.tools.append(record)
            messages.append(tool_message)
    for call in spawns:
        raw = _raw_arguments(call)
        started = time.monotonic()

        def took(started: float = started) -> float:
            return round(time.monotonic() - started, 6)

        try:
            if swarm is None:
                raise UnknownTool(SPAWN_TOOL)
            got = swarm.answer(task, call.id, raw)
        except ToolError as exc:
            record, tool_message = _failure(
                call.id, SPAWN_TOOL, raw, time.monotonic() - started, exc
            )
        else:
            if isinstance(got, Waiting):
                return got
            record = ToolCallRecord(
                name=SPAWN_TOOL,
                arguments=raw,
                latency_s=round(time.monotonic() - started, 6),
                ok=True,
            )
            tool_message = {"role": "tool", "tool_call_id": call.id, "content": got.content}
        tally.tools.append(record)
        messages.append(tool_message)
    return None


def initial_messages(system_prompt: str, task: AgentTask) -> list[ChatCompletionMessageParam]:
    """The role's system prompt, then the task's prompt or its messages."""
    messages: list[ChatCompletionMessageParam] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    if task.prompt is not None:
        messages.append({"role": "user", "content": task.prompt})
    for m in task.messages or ():
        if m.role == "system":
            messages.append({"role": "system", "content": m.content})
        elif m.role == "user":
            messages.append({"role": "user", "content": m.content})
        else:
            messages.append({"role": "assistant", "content": m.content})
    return messages


def _system_prompt(role: RoleSettings, tools: Toolset) -> str:
    """The role's prompt, followed by its MCP resources (read through the toolset)."""
    context = tools.role_context(role) if role.resources else ""
    return f"{role.system_prompt}\n\n{context}" if context else role.system_prompt


def _tool_param(spec: ToolSpec) -> ChatCompletionToolUnionParam:
    function = spec.to_openai()["function"]
    return {
        "type": "function",
        "function": {
            "name": function["name"],
            "description": function["description"],
            "parameters": function["parameters"],
        },
    }


def _redactor(settings: Settings, task: AgentTask) -> Redactor:
    texts: list[str] = []
    if settings.redact_prompts:
        texts = (
            [task.prompt] if task.prompt is not None else [m.content for m in task.messages or ()]
        )
    return Redactor(secrets=[settings.llm.resolved_api_key()], texts=texts)


def _assistant_turn(message: ChatCompletionMessage) -> ChatCompletionAssistantMessageParam:
    """The model's tool-calling turn, as it must be sent back (only the fields it needs)."""
    calls: list[ChatCompletionMessageToolCallUnionParam] = []
    for call in message.tool_calls or ():
        if call.type == "function":
            calls.append(
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            )
        else:
            calls.append(
                {
                    "id": call.id,
                    "type": "custom",
                    "custom": {"name": call.custom.name, "input": call.custom.input},
                }
            )
    return {"role": "assistant", "content": message.content, "tool_calls": calls}


# --------------------------------------------------------------------------- tool calls

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _tool_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(TOOL_THREADS, thread_name_prefix="swarm-tool")
    return _pool


_Answer = tuple[ToolCallRecord, ChatCompletionToolMessageParam]


def _run_tool_calls(
    calls: Sequence[ChatCompletionMessageToolCallUnion],
    role: RoleSettings,
    role_name: str,
    runtime: AgentRuntime,
    deadline: Deadline,
) -> list[_Answer]:
    """Every call's record and tool message, in the model's order; never raises ToolError.

    The first call runs in this thread, the others in the process's tool pool, so one
    turn's calls overlap and a single call costs no thread hand-off. The turn ends at
    `call_timeout_s` or the task's deadline, whichever is first; a call that starts late
    (the pool was busy) gets only what is left, and nothing waits past that.
    """
    turn = Deadline.start(deadline.cap(runtime.settings.tools.call_timeout_s))

    def one(call: ChatCompletionMessageToolCallUnion) -> _Answer:
        return _call_tool(call, role.tools, role_name, runtime.tools, turn)

    pending: list[Future[_Answer]] = [_tool_pool().submit(one, call) for call in calls[1:]]
    answers = [one(calls[0])]
    for call, future in zip(calls[1:], pending, strict=True):
        try:
            answers.append(future.result(timeout=max(0.0, turn.remaining())))
        except FutureTimeout:
            future.cancel()  # if it has not started yet, it never will: no late side effect
            name = call.function.name if call.type == "function" else call.custom.name
            late = ToolUnavailable(name, "?", f"no answer within {turn.limit_s:.0f}s")
            answers.append(_failure(call.id, name, _raw_arguments(call), turn.limit_s, late))
    return answers


def _call_tool(
    call: ChatCompletionMessageToolCallUnion,
    allowed: Sequence[str],
    role_name: str,
    tools: Toolset,
    turn: Deadline,
) -> _Answer:
    """One call's record and tool message; every ToolError becomes the message.

    The toolset owns what a call must pass (the role's allowlist, the argument schema,
    the output cap): the loop only turns the model's text into an object and hands it
    on, so a tool the registry learned since the offer was made still runs.
    """
    name = call.function.name if call.type == "function" else call.custom.name
    raw = _raw_arguments(call)
    started = time.monotonic()
    try:
        if call.type != "function":
            raise UnknownTool(name)  # free-form "custom" tools are never offered
        arguments = _parse_arguments(name, raw)
        timeout = turn.remaining()
        if timeout <= 0:
            raise ToolUnavailable(name, "?", "no time left in this turn")
        content = tools.call(
            name, arguments, timeout=timeout, allowed=allowed, role=role_name
        ).content
    except ToolError as exc:
        return _failure(call.id, name, raw, time.monotonic() - started, exc)
    except Exception as exc:  # a toolset bug: logged for us, reported to the model
        log.exception("tool %s raised %s, not a ToolError", name, type(exc).__name__)
        failed = ToolError(name, f"the tool failed unexpectedly ({type(exc).__name__})")
        return _failure(call.id, name, raw, time.monotonic() - started, failed)
    record = ToolCallRecord(
        name=name, arguments=raw, latency_s=round(time.monotonic() - started, 6), ok=True
    )
    return record, {"role": "tool", "tool_call_id": call.id, "content": content}


def _failure(call_id: str, name: str, raw: str, latency: float, exc: ToolError) -> _Answer:
    record = ToolCallRecord(
        name=name, arguments=raw, latency_s=round(latency, 6), ok=False, error=str(exc)
    )
    return record, {"role": "tool", "tool_call_id": call_id, "content": f"error: {exc}"}


def _raw_arguments(call: ChatCompletionMessageToolCallUnion) -> str:
    return call.function.arguments if call.type == "function" else call.custom.input


def _parse_arguments(name: str, raw: str) -> dict[str, Any]:
    """The model's arguments as an object; empty text means no arguments."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidToolArguments(
            name, f"not valid JSON ({exc.msg} at position {exc.pos}); send a JSON object"
        ) from None
    if not isinstance(value, dict):
        raise InvalidToolArguments(name, f"expected a JSON object, got {type(value).__name__}")
    return value
