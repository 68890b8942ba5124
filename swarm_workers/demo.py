"""`swarm demo`: a whole swarm on this machine, from nothing, apart from any real fleet.

It starts a redis-server of its own (or uses an empty Redis database named with
`--redis-url`), the fake OpenAI-compatible provider (unless `SWARM_LLM_BASE_URL` names
a real endpoint), a demo MCP server over streamable HTTP and one worker per role,
submits a sample DAG with P0/P1/P2 work and tool calls, shows the swarm live, prints a
summary, and stops every process it started.

Isolation: a real fleet's Redis holds queues with the same names (`p1.research`...),
so demo workers attached to it could take real work and answer it with the fake
provider. The demo therefore never attaches to a Redis it finds; its keys carry their
own prefix (`swarm-demo`); and its processes get an explicit environment, so a
`REDIS_URL` or `SWARM_*` in the shell reaches none of them (only `SWARM_LLM_*`, when
`SWARM_LLM_BASE_URL` asks for a real endpoint).

Everything goes through the same `SwarmClient` a producer uses.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from swarm_workers.client import SwarmClient
from swarm_workers.config import Settings
from swarm_workers.dag import DagSpec, DagStatus, Node, NodeState
from swarm_workers.fleet import fleet_status
from swarm_workers.localfleet import (
    FakeLLMSpec,
    FleetSpec,
    LocalFleet,
    McpServerSpec,
    WorkerSpec,
)
from swarm_workers.queues import ALL_PRIORITIES, queue_name

__all__ = ["KEY_PREFIX", "DemoReport", "run_demo"]

ROLES = ("research", "summarize", "review")
MODEL = "fake-gpt"
MCP_SERVER = "docs"
KEY_PREFIX = "swarm-demo"
FAKE_LLM_FLAGS = ("--latency-ms", "150", "--rpm", "600", "--tpm", "400000")


@dataclass
class DemoReport:
    """What the demo did; `--json` prints it, the test asserts on it."""

    redis: str
    llm: str
    isolation: str = ""
    dag_state: str = "not submitted"
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tool_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    swarm: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        swarm_ok = not self.swarm or self.swarm.get("status") == "succeeded"
        return (
            swarm_ok
            and self.dag_state == "succeeded"
            and all(n["state"] == NodeState.DONE.value for n in self.nodes.values())
        )


def run_demo(
    *, fast: bool, console: Console, timeout_s: float = 300.0, redis_url: str | None = None
) -> DemoReport:
    """Run the demo end to end; every process it starts is stopped before it returns.

    `redis_url` None (the default) starts a redis-server of the demo's own; otherwise
    that database must be empty, so no fleet is using it.
    """
    if redis_url is not None:
        _require_empty(redis_url)
    real_llm = os.environ.get("SWARM_LLM_BASE_URL")
    spec = _fleet_spec(redis_url, real_llm)
    with tempfile.TemporaryDirectory(prefix="swarm-demo-") as tmp:
        fleet = LocalFleet(spec, Path(tmp))
        try:
            return _run(fleet, real_llm, fast=fast, console=console, timeout_s=timeout_s)
        finally:
            fleet.stop()


def _run(
    fleet: LocalFleet, real_llm: str | None, *, fast: bool, console: Console, timeout_s: float
) -> DemoReport:
    """Start the parts step by step (saying what each is), run the DAG, report."""
    started = time.monotonic()
    with console.status("starting Redis, the fake provider and the MCP server..."):
        try:
            fleet.start_services()
        except FileNotFoundError as exc:
            raise SystemExit(f"swarm demo needs a Redis: {exc}.") from None
    report = DemoReport(
        redis=_redis_note(fleet),
        llm=(
            f"real endpoint {real_llm} (from SWARM_LLM_BASE_URL)"
            if real_llm
            else f"fake provider at {_llm_url(fleet)} (no API key needed; 600 RPM, 400k TPM)"
        ),
        isolation=(
            f"key prefix '{KEY_PREFIX}' on a Redis no fleet uses; none of this shell's "
            "REDIS_URL or SWARM_* settings reach the demo's processes"
        ),
    )
    console.print(f"[bold]Redis[/bold]  {report.redis}")
    console.print(f"[bold]LLM[/bold]    {report.llm}")
    console.print(f"[bold]MCP[/bold]    demo server '{MCP_SERVER}' at {fleet.mcp[MCP_SERVER].url}")
    console.print(f"[bold]Apart[/bold]  {report.isolation}")
    with console.status(f"starting one worker per role: {', '.join(ROLES)}..."):
        fleet.add_workers(fleet.spec.workers)
    settings = fleet.settings()  # what the workers read; this shell's REDIS_URL cannot redirect it
    with SwarmClient(settings=settings) as client, _LiveView(settings) as view:
        dag = client.submit_dag(_sample_dag(fast=fast, fake=not real_llm))
        deadline = time.monotonic() + timeout_s
        with Live(view.render(dag.status()), console=console, refresh_per_second=4) as live:
            while True:
                status = dag.status()
                live.update(view.render(status))
                if status.finished or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
        console.print()
        if not real_llm:
            _swarm(client, report, console, agents=4 if fast else 8, timeout_s=timeout_s)
    _fill(report, status)
    report.seconds = round(time.monotonic() - started, 1)
    _summary(console, report, status)
    if not report.ok:
        for proc in fleet.group.processes:
            console.print(f"[dim]--- {proc.name} log (tail) ---[/dim]")
            console.print(proc.output()[-1500:], markup=False)
    return report


def _swarm(
    client: SwarmClient, report: DemoReport, console: Console, *, agents: int, timeout_s: float
) -> None:
    """A supervisor (the research role may spawn) fans out to sub-agents and synthesises."""
    prompt = f"SPAWN {agents} roles=summarize,review"
    with console.status(f"a research supervisor spawns {agents} sub-agents..."):
        result = client.submit(prompt, role="research").result(timeout=timeout_s)
    tree = result.swarm
    report.swarm = {
        "task_id": result.task_id,
        "status": result.status,
        "sub_agents": tree.total_agents if tree else 0,
        "succeeded": sum(a.status == "succeeded" for a in tree.children) if tree else 0,
        "wall_s": tree.wall_s if tree else None,
        "sequential_s": tree.sequential_s if tree else None,
        "output": (result.output or "")[:120],
    }
    if tree is not None and tree.wall_s:
        console.print(
            f"[bold]Swarm[/bold]  supervisor {result.task_id}: {report.swarm['succeeded']}/"
            f"{tree.total_agents} sub-agents succeeded; {tree.wall_s:.2f}s wall against "
            f"{tree.sequential_s:.2f}s in sequence (`swarm tree {result.task_id}`)"
        )
    console.print(f"[bold]Synth[/bold]  {report.swarm['output']}", markup=False)


def _fleet_spec(redis_url: str | None, real_llm: str | None) -> FleetSpec:
    """The demo's fleet: three roles, one worker each, a docs MCP server, the fake LLM."""
    llm: dict[str, Any] = {
        "model": MODEL,
        "prices": {MODEL: {"input": 0.6, "output": 2.5}},
    }
    env: dict[str, str] = {}
    if real_llm:
        llm["base_url"] = real_llm
        # Deliberately forwarded: the demo's documented way to talk to a real endpoint.
        env = {k: v for k, v in os.environ.items() if k.startswith("SWARM_LLM_")}
    config = {
        "key_prefix": KEY_PREFIX,
        "roles": _roles(),
        "llm": llm,
        "ratelimit": {"models": {MODEL: {"rpm": 600, "tpm": 400000}}},
        "worker": {"visibility_timeout_s": 900, "task_time_limit_s": 600},
    }
    workers = tuple(
        WorkerSpec(
            roles=(role,),
            concurrency=None,  # the role's own (16)
            hostname=f"demo-{role}@%h",
            loglevel="WARNING",
            heartbeat_interval_s=None,
        )
        for role in ROLES
    )
    return FleetSpec(
        config=config,
        workers=workers,
        llm=None if real_llm else FakeLLMSpec(FAKE_LLM_FLAGS),
        mcp_servers=(McpServerSpec(MCP_SERVER),),
        redis_url=redis_url,
        env=env,
    )


def _roles() -> dict[str, dict[str, Any]]:
    roles = {
        "research": (
            "You research questions with the docs tools, then answer briefly.",
            [f"{MCP_SERVER}__*"],
            "P1",
        ),
        "summarize": ("You summarise what you are given in three lines.", [], "P2"),
        "review": ("You review a summary and list one risk.", [f"{MCP_SERVER}__search"], "P0"),
    }
    return {
        name: {
            "system_prompt": prompt,
            "tools": tools,
            "default_priority": priority,
            "concurrency": 16,
            **({"spawn": {"max_per_spawn": 20}} if name == "research" else {}),
        }
        for name, (prompt, tools, priority) in roles.items()
    }


def _redis_note(fleet: LocalFleet) -> str:
    server = fleet.redis
    assert server is not None
    if server.process is None:
        return f"the empty database {server.url} (from --redis-url)"
    binary = server.process.argv[0]
    return f"started {binary} on port {server.port} (the demo's own; stopped when it ends)"


def _llm_url(fleet: LocalFleet) -> str:
    assert fleet.llm is not None
    return fleet.llm.base_url


def _require_empty(url: str) -> None:
    """An existing Redis only if its database holds nothing: no fleet's queues, no workers."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        keys = int(client.dbsize())
    except redis.RedisError as exc:
        raise SystemExit(f"--redis-url {url} does not answer: {exc}") from None
    finally:
        client.close()
    if keys:
        raise SystemExit(
            f"--redis-url {url} holds {keys} keys; the demo uses only an empty database, so "
            "it cannot take a real fleet's work. Name another database (e.g. .../15) or "
            "leave --redis-url out to let the demo start its own redis-server."
        )


def _sample_dag(*, fast: bool, fake: bool) -> DagSpec:
    """Research fans out (P1/P2, with tool calls), a summary fans in, a P0 review ends it.

    The fake provider calls tools when a prompt says `CALL <tool> {args}`; a real model
    is asked in words and decides itself.
    """

    def ask(text: str, tool_args: str) -> str:
        return f"{text} CALL {MCP_SERVER}__search {tool_args}" if fake else text

    topics = ["queue priorities", "token buckets", "circuit breakers"]
    if fast:
        topics = topics[:2]
    nodes = [
        Node(
            f"research-{i}",
            ask(f"Look up {topic} in the docs and explain it.", json.dumps({"query": topic})),
            role="research",
            priority="P1" if i == 0 else "P2",
        )
        for i, topic in enumerate(topics)
    ]
    deps = [n.id for n in nodes]
    nodes.append(
        Node(
            "summary",
            "Summarise the research for an engineer.",
            role="summarize",
            priority="P1",
            deps=deps,
        )
    )
    nodes.append(
        Node(
            "review",
            ask(
                "Review the summary; check one claim in the docs.", json.dumps({"query": "review"})
            ),
            role="review",
            priority="P0",
            deps=["summary"],
        )
    )
    return DagSpec(nodes=tuple(nodes), name="demo: research, summarise, review")


class _LiveView:
    """One frame of the live view: queues, nodes, tokens, bucket and breakers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url)

    def __enter__(self) -> _LiveView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.redis.close()

    def render(self, status: DagStatus) -> Group:
        fleet = fleet_status(self.settings, self.redis)
        queues = Table(title="queued", expand=False)
        queues.add_column("role")
        for p in ALL_PRIORITIES:
            queues.add_column(p.value, justify="right")
        for role in self.settings.roles:
            queues.add_row(role, *(str(fleet.queues[queue_name(p, role)]) for p in ALL_PRIORITIES))

        nodes = Table(title=status.name or "DAG", expand=False)
        for column in ("node", "role", "prio", "state", "tools", "tokens", "cost $"):
            nodes.add_column(column)
        for node in status.nodes.values():
            result = node.result
            nodes.add_row(
                node.node,
                node.role,
                node.priority.value,
                _styled(node.state),
                str(len(result.tool_calls)) if result else "",
                str(result.usage.total_tokens) if result else "",
                f"{result.cost_usd:.5f}" if result else "",
            )
        levels = fleet.buckets.get(MODEL, {})
        bucket = ", ".join(f"{k} {v:.0%}" for k, v in levels.items()) or "no limit"
        breakers = ", ".join(f"{s}: {state}" for s, state in fleet.breakers.items()) or "none"
        footer = Panel(f"bucket ({MODEL}): {bucket}    breakers: {breakers}", expand=False)
        return Group(queues, nodes, footer)


def _styled(state: NodeState) -> str:
    colour = {
        NodeState.DONE: "green",
        NodeState.FAILED: "red",
        NodeState.RUNNING: "yellow",
        NodeState.SKIPPED: "magenta",
    }.get(state, "white")
    return f"[{colour}]{state.value}[/{colour}]"


def _fill(report: DemoReport, status: DagStatus) -> None:
    report.dag_state = status.state
    for node in status.nodes.values():
        result = node.result
        report.nodes[node.node] = {
            "state": node.state.value,
            "role": node.role,
            "priority": node.priority.value,
            "reason": node.reason,
            "tool_calls": [t.name for t in result.tool_calls] if result else [],
            "output": (result.output or "")[:200] if result else None,
        }
        if result is not None:
            report.tool_calls += len(result.tool_calls)
            report.prompt_tokens += result.usage.prompt_tokens
            report.completion_tokens += result.usage.completion_tokens
            report.cost_usd += result.cost_usd


def _summary(console: Console, report: DemoReport, status: DagStatus) -> None:
    table = Table(title=f"demo {'succeeded' if report.ok else 'FAILED'} in {report.seconds}s")
    for column in ("node", "state", "output (start)"):
        table.add_column(column)
    for name, node in report.nodes.items():
        text = node["output"] or node["reason"] or ""
        table.add_row(name, node["state"], text[:80].replace("\n", " "))
    console.print(table)
    console.print(
        f"{report.tool_calls} tool calls, {report.prompt_tokens} prompt + "
        f"{report.completion_tokens} completion tokens, ${report.cost_usd:.5f} at the demo's "
        "price table."
    )
    console.print(
        "Next: run your own fleet with `swarm worker --role <role>`, feed it with "
        "`swarm submit` or `swarm run examples/swarm.yaml`, watch it with `swarm status`, "
        "`swarm flower` and the Grafana dashboard in deploy/grafana (README: Operating it)."
    )
