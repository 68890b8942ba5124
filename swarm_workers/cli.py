"""`swarm`: the operator's and producer's command line, a thin layer over the client."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from swarm_workers.config import Settings, load_settings
from swarm_workers.errors import InvalidTask, SwarmError
from swarm_workers.models import Priority
from swarm_workers.queues import ALL_PRIORITIES, queue_name

app = typer.Typer(
    help="Run and feed a fleet of LLM agent workers on Celery and Redis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", envvar="SWARM_CONFIG", help="swarm.toml to read.", show_default=False
    ),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except SwarmError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from None


def _priorities(text: str) -> list[Priority]:
    try:
        return [Priority(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use a comma list of p0, p1, p2") from None


@app.command()
def worker(
    role: Annotated[list[str], typer.Option("--role", "-r", help="Role to serve (repeatable).")],
    priorities: Annotated[
        str, typer.Option(help="Levels to serve, e.g. 'p0' for an express worker.")
    ] = "p0,p1,p2",
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", "-n", min=1, help="Threads in the pool (default: the role's)."
        ),
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
    config: ConfigOption = None,
) -> None:
    """Start a worker that drains its roles' queues in strict priority order (P0 first)."""
    from swarm_workers.worker import run_worker

    settings = _settings(config)
    try:
        run_worker(
            settings,
            role,
            _priorities(priorities),
            concurrency=concurrency,
            loglevel=loglevel,
            hostname=hostname,
        )
    except SwarmError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="The task's prompt ('-' reads stdin).")],
    role: Annotated[str | None, typer.Option("--role", "-r", help="Role (default: first).")] = None,
    priority: Annotated[
        str | None, typer.Option("--priority", "-p", help="P0, P1 or P2 (default: the role's).")
    ] = None,
    budget: Annotated[int | None, typer.Option(help="Output-token budget for the task.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 300.0,
    config: ConfigOption = None,
) -> None:
    """Enqueue one agent task and print its id (or, with --wait, its result as JSON)."""
    from swarm_workers.client import SwarmClient

    try:
        text = _stdin_text() if prompt == "-" else prompt
        with SwarmClient(settings=_settings(config)) as client:
            handle = client.submit(text, role=role, priority=priority, budget=budget)
            if not wait:
                typer.echo(handle.id)
                return
            result = handle.result(timeout=timeout)
    except SwarmError as exc:  # its message may quote input: never read it as markup
        console.print(f"[red]{type(exc).__name__}:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    typer.echo(result.model_dump_json(indent=2))
    if not result.ok:
        raise typer.Exit(1)


def _stdin_text() -> str:
    """The prompt from stdin, as strict UTF-8: never the lone surrogates that Python's
    `surrogateescape` makes of invalid bytes (in a C or POSIX locale), which no worker,
    Redis or provider can encode again."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidTask(
            "prompt",
            f"stdin is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
        ) from None


@app.command()
def task(
    task_id: Annotated[str, typer.Argument(help="A task id printed by submit.")],
    config: ConfigOption = None,
) -> None:
    """Show one task's state and, once done, its result as JSON."""
    from swarm_workers.client import SwarmClient

    with SwarmClient(settings=_settings(config)) as client:
        typer.echo(client.status(task_id).model_dump_json(indent=2))


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOption = None,
) -> None:
    """The fleet at a glance: queue depth per role and priority, workers online, token
    bucket levels, MCP breaker states and tool-registry age."""
    from swarm_workers.celery_app import create_app
    from swarm_workers.fleet import fleet_status
    from swarm_workers.redis_client import redis_client

    settings = _settings(config)
    snapshot = fleet_status(settings, redis_client(settings.redis_url), app=create_app(settings))
    if as_json:
        typer.echo(snapshot.model_dump_json(indent=2))
        return
    out = Console()
    table = Table(title="queued tasks")
    table.add_column("role")
    for p in ALL_PRIORITIES:
        table.add_column(p.value, justify="right")
    for role in settings.roles:
        table.add_row(role, *(str(snapshot.queues[queue_name(p, role)]) for p in ALL_PRIORITIES))
    out.print(table)
    out.print(
        f"workers online: {len(snapshot.workers or [])} "
        f"{', '.join(snapshot.workers or []) or '(none answered within 1 s)'}"
    )
    for model, levels in snapshot.buckets.items():
        out.print(f"bucket {model}: " + ", ".join(f"{k} {v:.0%} full" for k, v in levels.items()))
    for server, state in snapshot.breakers.items():
        age = snapshot.registry_age_s.get(server)
        out.print(
            f"MCP {server}: breaker {state}, tool list "
            + ("not cached" if age is None else f"{age:.0f}s old")
        )


@app.command()
def purge(
    queue: Annotated[str, typer.Option("--queue", "-q", help="Queue to empty, e.g. p2.research.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    config: ConfigOption = None,
) -> None:
    """Delete every task waiting in one queue (running tasks are not touched)."""
    from swarm_workers.queues import parse_queue
    from swarm_workers.redis_client import redis_client

    settings = _settings(config)
    try:
        _, role = parse_queue(queue)
        settings.role(role)
    except (ValueError, SwarmError) as exc:
        console.print(f"[red]not a queue of this fleet:[/red] {queue} ({exc})")
        raise typer.Exit(2) from None
    client = redis_client(settings.redis_url)
    waiting = int(client.llen(queue))
    if waiting == 0:
        typer.echo(f"{queue} is empty")
        return
    if not yes and not typer.confirm(f"Delete {waiting} waiting tasks from {queue}?"):
        raise typer.Exit(1)
    # One atomic step: tasks enqueued after the count are deleted too, and reported.
    pipe = client.pipeline()
    pipe.llen(queue)
    pipe.delete(queue)
    removed, _ = pipe.execute()
    typer.echo(f"deleted {removed} tasks from {queue}")


@app.command()
def healthcheck(
    max_age: Annotated[float, typer.Option(help="Fail if the heartbeat is older (s).")] = 60.0,
    config: ConfigOption = None,
) -> None:
    """Liveness probe: exit 0 if this machine's worker polled the broker recently."""
    from swarm_workers.health import heartbeat_age

    path = _settings(config).worker.heartbeat_file
    age = heartbeat_age(path)
    if age is None or age > max_age:
        console.print(
            f"unhealthy: heartbeat {path} " + ("missing" if age is None else f"{age:.0f}s old")
        )
        raise typer.Exit(1)
    typer.echo(f"ok: heartbeat {age:.1f}s old")


@app.command()
def exporter(
    port: Annotated[int, typer.Option(help="Port of /metrics.")] = 9809,
    interval: Annotated[float, typer.Option(help="Seconds between reads.")] = 5.0,
    config: ConfigOption = None,
) -> None:
    """Export queue depth per role and priority to Prometheus (run one per fleet)."""
    import signal
    import threading

    from swarm_workers.exporter import run_exporter
    from swarm_workers.redis_client import redis_client

    settings = _settings(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"exporting queue depth on :{port}/metrics every {interval}s")
    try:
        run_exporter(
            settings, redis_client(settings.redis_url), port=port, interval_s=interval, stop=stop
        )
    except KeyboardInterrupt:
        stop.set()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def flower(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port of the web UI.")] = 5555,
    config: ConfigOption = None,
) -> None:
    """Start Flower on the fleet's broker. Basic auth from FLOWER_BASIC_AUTH=user:pass.

    Task arguments show as a redacted summary (role, priority, id, prompt length):
    producers set Celery's argsrepr, never the prompt. Extra options go to Flower.
    """

    from swarm_workers.celery_app import create_app

    settings = _settings(config)
    argv = ["flower", f"--port={port}", *ctx.args]
    if os.environ.get("FLOWER_BASIC_AUTH"):
        argv.append(f"--basic-auth={os.environ['FLOWER_BASIC_AUTH']}")
    create_app(settings).start(argv=argv)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="A DAG file, e.g. swarm.yaml (docs/dags.md).")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait and show each node.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 600.0,
    as_json: Annotated[bool, typer.Option("--json", help="With --wait: status as JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Submit a DAG of agent tasks; print its id, or with --wait each node's outcome."""
    from swarm_workers.client import SwarmClient
    from swarm_workers.dag import load_dag

    try:
        spec = load_dag(file)
        with SwarmClient(settings=_settings(config)) as client:
            dag = client.submit_dag(spec)
            if not wait:
                typer.echo(dag.id)
                return
            result = dag.wait(timeout=timeout)
    except SwarmError as exc:
        console.print(f"[red]{type(exc).__name__}:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        table = Table(title=f"DAG {result.dag_id}: {result.state}")
        for column in ("node", "role", "priority", "state", "output or reason"):
            table.add_column(column)
        for node in result.nodes.values():
            text = node.result.output if node.state == "done" and node.result else node.reason
            table.add_row(node.node, node.role, node.priority.value, node.state, (text or "")[:200])
        Console().print(table)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def tools(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    live: Annotated[
        bool, typer.Option("--live", help="Connect and list now, not the fleet's published view.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """MCP tools per server as the fleet sees them: era, cache age, breaker state."""
    from swarm_workers.redis_client import redis_client
    from swarm_workers.tools.report import rows_json, tool_rows

    settings = _settings(config)
    rows = tool_rows(settings, redis_client(settings.redis_url), live=live)
    if as_json:
        typer.echo(rows_json(rows))
        return
    table = Table(title="MCP tools")
    for column in ("server", "era", "tool", "description", "cache age", "breaker"):
        table.add_column(column)
    for row in rows:
        age = "-" if row.cache_age_s is None else f"{row.cache_age_s:.0f}s"
        era = row.era or row.status
        table.add_row(row.server, era, row.tool or "-", row.description[:60], age, row.breaker)
    Console().print(table)


@app.command("fake-llm")
def fake_llm(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8400,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(help="Fixed latency of every reply.")] = 200.0,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute before 429s.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute before 429s.")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="FAKE_LLM_API_KEY", help="Require this bearer key.")
    ] = None,
) -> None:
    """Serve the fake OpenAI-compatible provider, for demos, CI and load tests.

    Replies are deterministic; `CALL tool {json}` in a prompt makes it call tools. See
    `python -m swarm_workers.fakes.llm_server --help` for every option.
    """
    from swarm_workers.fakes.llm_server import main as serve_fake

    argv = ["--host", host, "--port", str(port), "--latency-ms", str(latency_ms)]
    for flag, value in (("--rpm", rpm), ("--tpm", tpm), ("--api-key", api_key)):
        if value is not None:
            argv += [flag, str(value)]
    raise typer.Exit(serve_fake(argv))


@app.command()
def demo(
    fast: Annotated[bool, typer.Option("--fast", help="A smaller sample DAG.")] = False,
    own_redis: Annotated[
        bool,
        typer.Option(
            "--own-redis", help="Always start a private redis-server, even if one answers."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 300.0,
) -> None:
    """Run a whole swarm on this machine: Redis, fake LLM, MCP server, workers, a DAG.

    Needs no Redis, API key or config. With SWARM_LLM_BASE_URL/SWARM_LLM_API_KEY set it
    uses that endpoint instead of the fake provider. Every process it starts is stopped.
    """
    import dataclasses

    from swarm_workers.demo import run_demo

    out = Console(stderr=as_json)
    report = run_demo(fast=fast, own_redis=own_redis, console=out, timeout_s=timeout)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(report) | {"ok": report.ok}, indent=2))
    raise typer.Exit(0 if report.ok else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
