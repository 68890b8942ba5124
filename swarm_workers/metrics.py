"""Prometheus metrics of a worker process, and the queue-depth exporter's gauge.

Most series are derived from the `TaskResult` each task records (tokens, cost, tool
calls, LLM latency), so the agent loop carries no metrics code. The bucket and the
breaker report what only they see through the small functions below. prometheus-client
metrics are thread-safe; the threads pool shares them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from swarm_workers.models import TaskResult

__all__ = [
    "BREAKER_STATE",
    "BUCKET_WAIT",
    "LLM_429",
    "QUEUE_DEPTH",
    "REGISTRY",
    "allow_tool_servers",
    "observe_result",
    "serve",
    "tool_server_label",
]

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

TASKS = Counter(
    "swarm_tasks", "Agent tasks finished.", ["role", "priority", "outcome"], registry=REGISTRY
)
QUEUE_WAIT = Histogram(
    "swarm_task_queue_wait_seconds",
    "Submit to start.",
    ["role", "priority"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
RUN_TIME = Histogram(
    "swarm_task_run_seconds",
    "Start to finish.",
    ["role", "priority"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
LLM_LATENCY = Histogram(
    "swarm_llm_request_seconds",
    "One chat-completions call.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
LLM_TOKENS = Counter(
    "swarm_llm_tokens", "Tokens by direction.", ["model", "direction"], registry=REGISTRY
)
LLM_COST = Counter(
    "swarm_llm_cost_usd", "Cost from the configured price table.", ["model"], registry=REGISTRY
)
LLM_429 = Counter("swarm_llm_429", "429 answers from the provider.", ["model"], registry=REGISTRY)
TOOL_CALLS = Counter(
    "swarm_tool_calls",
    "Tool calls by server and outcome.",
    ["server", "outcome"],
    registry=REGISTRY,
)
BREAKER_STATE = Gauge(
    "swarm_breaker_state", "0 closed, 1 half-open, 2 open.", ["server"], registry=REGISTRY
)
BUCKET_WAIT = Histogram(
    "swarm_bucket_wait_seconds",
    "Time spent waiting on the token bucket.",
    ["model", "priority"],
    buckets=(0, 0.01, 0.1, 0.5, 1, 5, 15, 60, 300),
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "swarm_dead_letters",
    "Tasks that failed for good and were kept as dead letters (`swarm dead list`).",
    ["role", "error"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "swarm_queue_depth",
    "Messages waiting in a queue (exporter only).",
    ["role", "priority"],
    registry=REGISTRY,
)


# Tool names come from the model, so a label taken from them is unbounded: only servers
# a toolset was configured with may name a series. Process-wide, as the series are.
_tool_servers: frozenset[str] = frozenset()
_tool_servers_lock = threading.Lock()
UNKNOWN_SERVER = "unknown"


def allow_tool_servers(servers: Iterable[str]) -> None:
    """Let these configured servers label `swarm_tool_calls` (toolsets call this)."""
    global _tool_servers
    with _tool_servers_lock:
        _tool_servers = _tool_servers | frozenset(servers)


def tool_server_label(tool: str) -> str:
    """The server of `server__tool` when it is a configured one, else `unknown`.

    >>> tool_server_label("nosuch__tool")
    'unknown'
    """
    server, sep, _ = tool.partition("__")
    return server if sep and server in _tool_servers else UNKNOWN_SERVER


def observe_result(result: TaskResult) -> None:
    """Account one recorded task outcome."""
    role, priority = result.role, result.priority.value
    TASKS.labels(role, priority, result.status).inc()
    QUEUE_WAIT.labels(role, priority).observe(result.timings.queue_wait_s)
    RUN_TIME.labels(role, priority).observe(result.timings.run_s)
    model = result.model or "none"
    for call in result.usage.calls:
        LLM_LATENCY.labels(model).observe(call.latency_s)
    if result.usage.calls:
        LLM_TOKENS.labels(model, "prompt").inc(result.usage.prompt_tokens)
        LLM_TOKENS.labels(model, "completion").inc(result.usage.completion_tokens)
        LLM_COST.labels(model).inc(result.cost_usd)
    for tool in result.tool_calls:
        TOOL_CALLS.labels(tool_server_label(tool.name), "ok" if tool.ok else "error").inc()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Expose /metrics on `port` from a daemon thread (all interfaces: scraped by pod IP)."""
    start_http_server(port, addr=addr, registry=REGISTRY)
