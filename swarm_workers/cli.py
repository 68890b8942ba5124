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
        code = run_worker(
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
    raise typer.Exit(code)


@app.command()
def submit(
    prompt: Annotated[
        str | None, typer.Argument(help="The task's prompt ('-' reads stdin).")
    ] = None,
    role: Annotated[str | None, typer.Option("--role", "-r", help="Role (default: first).")] = None,
    priority: Annotated[
        str | None, typer.Option("--priority", "-p", help="P0, P1 or P2 (default: the role's).")
    ] = None,
    budget: Annotated[int | None, typer.Option(help="Output-token budget for the task.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 300.0,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="Idempotency key: a submit with a key used in the last 24 h enqueues "
            "nothing and prints the first task's id.",
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            help="Submit a batch instead: one JSON object of submit options per line "
            '({"prompt": ..., "role": ..., "priority": ...}), all or none.',
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Enqueue one agent task and print its id (or, with --wait, its result as JSON);
    with --file, a batch: every line valid and admitted, or nothing sent."""
    from swarm_workers.client import SwarmClient

    if (prompt is None) == (file is None):
        raise typer.BadParameter("give a prompt (or '-'), or --file tasks.jsonl")
    if file is not None:
        _submit_file(file, config)
        return
    try:
        text = _stdin_text() if prompt == "-" else prompt
        with SwarmClient(settings=_settings(config)) as client:
            handle = client.submit(
                text, role=role, priority=priority, budget=budget, idempotency_key=key
            )
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


def _submit_file(path: Path, config: Path | None) -> None:
    from swarm_workers.client import SwarmClient

    items: list[dict[str, object]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        console.print(f"[red]cannot read {path}:[/red] {exc}")
        raise typer.Exit(2) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            console.print(f"[red]{path}:{number}: not JSON:[/red] {exc.msg}")
            raise typer.Exit(2) from None
        if not isinstance(item, dict):
            console.print(f"[red]{path}:{number}: each line is a JSON object[/red]")
            raise typer.Exit(2)
        items.append(item)
    try:
        with SwarmClient(settings=_settings(config)) as client:
            handles = client.submit_many(items)
    except SwarmError as exc:
        console.print(f"[red]{type(exc).__name__}:[/red] {escape(str(exc))} (nothing was sent)")
        raise typer.Exit(2) from None
    if handles:
        typer.echo("\n".join(handle.id for handle in handles))


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
def tree(
    task_id: Annotated[str, typer.Argument(help="A supervisor's task id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOption = None,
) -> None:
    """A swarm supervisor's sub-agents (live while it runs): status, tokens, cost, times,
    and the critical path against the sequential time. Exits 1 if it spawned nothing."""
    from rich.tree import Tree

    from swarm_workers.client import SwarmClient
    from swarm_workers.models import SubAgent

    with SwarmClient(settings=_settings(config)) as client:
        found = client.tree(task_id)
        state = client.status(task_id).state.value
    if found is None:
        console.print(f"task {task_id} ({state}) has no sub-agents")
        raise typer.Exit(1)
    if as_json:
        typer.echo(found.model_dump_json(indent=2))
        return
    speedup = f"{found.speedup:.1f}x" if found.speedup is not None else "-"
    root = Tree(
        f"[bold]{task_id}[/bold] {state}: {found.total_agents} sub-agents in {found.rounds} "
        f"round(s), tokens {found.prompt_tokens}+{found.completion_tokens}, "
        f"${found.cost_usd:.6f}; wall {found.wall_s or 0:.2f}s, critical path "
        f"{found.critical_path_s:.2f}s, sequential {found.sequential_s:.2f}s ({speedup})"
    )

    def add(branch: Tree, agents: tuple[SubAgent, ...]) -> None:
        for agent in agents:
            colour = {
                "succeeded": "green",
                "failed": "red",
                "cancelled": "yellow",
                "waiting": "magenta",
            }.get(agent.status, "cyan")
            run = f"{agent.run_s:.2f}s" if agent.run_s is not None else "-"
            label = (
                f"{agent.task_id} [{colour}]{agent.status}[/{colour}] {agent.role} r{agent.round}"
                f" tokens {agent.prompt_tokens}+{agent.completion_tokens} run {run}"
            )
            if agent.error is not None:
                label += f" ({agent.error.type})"
            add(branch.add(label), agent.children)

    add(root, found.children)
    console.print(root)


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
    dead = {role: n for role, n in snapshot.dead_letters.items() if n}
    out.print(
        "dead letters: "
        + (", ".join(f"{role} {n}" for role, n in dead.items()) if dead else "none")
        + (" (swarm dead list)" if dead else "")
    )
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
def cancel(
    task_id: Annotated[str | None, typer.Argument(help="The task to cancel.")] = None,
    dag: Annotated[str | None, typer.Option("--dag", help="Cancel every node of a DAG.")] = None,
    config: ConfigOption = None,
) -> None:
    """Cancel a task (queued: it never runs; running: it stops at its next step) or a
    whole DAG. Exits 1 when there was nothing to cancel (unknown or finished)."""
    from swarm_workers.client import SwarmClient

    if (task_id is None) == (dag is None):
        raise typer.BadParameter("give a task id, or --dag ID")
    with SwarmClient(settings=_settings(config)) as client:
        if dag is not None:
            try:
                reports = client.dag(dag).cancel()
            except SwarmError as exc:
                console.print(f"[red]{type(exc).__name__}:[/red] {exc}")
                raise typer.Exit(2) from None
            for node, report in reports.items():
                typer.echo(f"{node}: {report.message}")
            if not reports:
                typer.echo("every node had finished: nothing to cancel")
                raise typer.Exit(1)
            return
        assert task_id is not None
        report = client.cancel(task_id)
    typer.echo(f"{task_id}: {report.message}")
    if report.outcome in ("unknown", "finished"):
        raise typer.Exit(1)


dead = typer.Typer(
    help="Tasks that failed for good: list, show, replay, purge.", no_args_is_help=True
)
app.add_typer(dead, name="dead")

RoleFilter = Annotated[str | None, typer.Option("--role", "-r", help="Only this role.")]
ErrorFilter = Annotated[
    str | None, typer.Option("--error", "-e", help="Only this error type, e.g. TooManyAttempts.")
]


def _age(text: str | None) -> float | None:
    """`90s`, `15m`, `1h`, `2d` -> seconds."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise typer.BadParameter(f"{text!r}: use e.g. 90s, 15m, 1h or 2d") from None


@dead.command("list")
def dead_list(
    role: RoleFilter = None,
    since: Annotated[str | None, typer.Option(help="Only newer than this: 1h, 2d ...")] = None,
    error: ErrorFilter = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOption = None,
) -> None:
    """Dead letters, newest first."""
    from datetime import timedelta

    from swarm_workers.client import SwarmClient

    age = _age(since)
    with SwarmClient(settings=_settings(config)) as client:
        try:
            letters = client.dead_letters(
                role=role, since=timedelta(seconds=age) if age else None, error=error
            )
        except SwarmError as exc:
            console.print(f"[red]{type(exc).__name__}:[/red] {exc}")
            raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps([letter.model_dump(mode="json") for letter in letters], indent=2))
        return
    table = Table(title=f"{len(letters)} dead letter(s)")
    for column in ("task", "role", "priority", "error", "runs", "died"):
        table.add_column(column)
    for letter in letters:
        table.add_row(
            letter.task.id,
            letter.task.role,
            letter.task.priority.value,
            f"{letter.error.type}: {letter.error.message[:60]}",
            str(len(letter.attempts)),
            letter.died_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    Console().print(table)


@dead.command("show")
def dead_show(
    task_id: Annotated[str, typer.Argument(help="A dead letter's task id.")],
    config: ConfigOption = None,
) -> None:
    """One dead letter as JSON: the task as it ran, and every run's error."""
    from swarm_workers.client import SwarmClient

    with SwarmClient(settings=_settings(config)) as client:
        letter = client.dead_letter(task_id)
    if letter is None:
        console.print(f"no dead letter {task_id} (replayed, purged, or never failed for good)")
        raise typer.Exit(1)
    typer.echo(letter.model_dump_json(indent=2))


@dead.command("replay")
def dead_replay(
    task_ids: Annotated[list[str] | None, typer.Argument(help="Dead letters to replay.")] = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Replay every dead letter the filters select.")
    ] = False,
    role: RoleFilter = None,
    error: ErrorFilter = None,
    config: ConfigOption = None,
) -> None:
    """Submit dead letters again as new tasks (metadata `replay_of` names the old id).
    A letter is replayed once: replaying it again finds nothing."""
    from swarm_workers.client import SwarmClient

    with SwarmClient(settings=_settings(config)) as client:
        try:
            done = client.replay(task_ids or (), everything=everything, role=role, error=error)
        except SwarmError as exc:
            console.print(f"[red]{type(exc).__name__}:[/red] {exc}")
            raise typer.Exit(2) from None
    for replayed in done:
        if replayed.task_id is None:
            typer.echo(f"{replayed.replay_of}: not found (replayed or purged already?)")
        else:
            typer.echo(f"{replayed.replay_of}: replayed as {replayed.task_id}")
    if any(r.task_id is None for r in done):
        raise typer.Exit(1)


@dead.command("purge")
def dead_purge(
    task_ids: Annotated[list[str] | None, typer.Argument(help="Dead letters to drop.")] = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Drop every dead letter the filters select.")
    ] = False,
    role: RoleFilter = None,
    error: ErrorFilter = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    config: ConfigOption = None,
) -> None:
    """Drop dead letters for good (asks first)."""
    from swarm_workers.client import SwarmClient

    with SwarmClient(settings=_settings(config)) as client:
        try:
            chosen = (
                list(task_ids)
                if task_ids
                else [letter.task.id for letter in client.dead_letters(role=role, error=error)]
                if everything
                else []
            )
            if not chosen:
                raise typer.BadParameter("name dead letters by id, or give --all")
            if not yes and not typer.confirm(f"Drop {len(chosen)} dead letter(s) for good?"):
                raise typer.Exit(1)
            dropped = client.purge_dead(chosen)
        except SwarmError as exc:
            console.print(f"[red]{type(exc).__name__}:[/red] {exc}")
            raise typer.Exit(2) from None
    typer.echo(f"dropped {dropped} dead letter(s)")


@app.command()
def healthcheck(
    max_age: Annotated[float, typer.Option(help="Fail if the heartbeat is older (s).")] = 60.0,
    file: Annotated[
        Path,
        typer.Option(
            "--file",
            envvar="SWARM_WORKER_HEARTBEAT_FILE",
            help="The worker's heartbeat file (worker.heartbeat_file).",
        ),
    ] = Path("/tmp/swarm-worker.heartbeat"),
    ready: Annotated[
        bool, typer.Option("--ready", help="Readiness: the broker answered recently too.")
    ] = False,
) -> None:
    """Liveness probe: exit 0 if this machine's worker loop is alive (readiness with
    --ready: and its broker answers). Reads file ages only, never the config: a bad
    config edit must not fail the probe of every running worker."""
    from swarm_workers.health import broker_file, file_age

    checks = [("heartbeat", file)] + ([("broker", broker_file(file))] if ready else [])
    for what, path in checks:
        age = file_age(path)
        if age is None or age > max_age:
            console.print(
                f"unhealthy: {what} {path} " + ("missing" if age is None else f"{age:.0f}s old")
            )
            raise typer.Exit(1)
    typer.echo(f"ok: heartbeat {file_age(file) or 0.0:.1f}s old")


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
    no_auth: Annotated[
        bool,
        typer.Option("--no-auth", help="Serve without authentication (a local machine only)."),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Start Flower on the fleet's broker, behind basic auth.

    Credentials come from FLOWER_BASIC_AUTH=user:pass, or from the file
    FLOWER_BASIC_AUTH_FILE names (a mounted secret): never from argv, which `ps`
    shows. Without either, Flower does not start unless --no-auth is given.

    Task arguments show as a redacted summary (role, priority, id, prompt length) and
    task results as id, status, output size and tokens: agent outputs stay out of
    Flower while `redact_prompts` is on (set it to false to see them). Workers send no
    task events until Flower turns them on (it does every few seconds while it runs;
    `--enable_events=false` stops it), or from the start with `worker.task_events =
    true`. Extra options go to Flower.
    """

    from swarm_workers.celery_app import create_app

    settings = _settings(config)
    if not os.environ.get("FLOWER_BASIC_AUTH"):
        secret = os.environ.get("FLOWER_BASIC_AUTH_FILE")
        if secret:
            try:
                # Flower reads FLOWER_* itself: the credentials stay in the environment.
                os.environ["FLOWER_BASIC_AUTH"] = Path(secret).read_text().strip()
            except OSError as exc:
                console.print(f"[red]cannot read FLOWER_BASIC_AUTH_FILE {secret}:[/red] {exc}")
                raise typer.Exit(2) from None
        elif not no_auth:
            console.print(
                "[red]no credentials:[/red] set FLOWER_BASIC_AUTH=user:pass or "
                "FLOWER_BASIC_AUTH_FILE=/path, or pass --no-auth for a local machine"
            )
            raise typer.Exit(2)
    create_app(settings).start(argv=["flower", f"--port={port}", *ctx.args])


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
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            help="Use this Redis database instead of a private redis-server; it must be empty.",
            show_default=False,
        ),
    ] = None,
    own_redis: Annotated[
        bool,
        typer.Option("--own-redis", hidden=True, help="The default now; kept for old scripts."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 300.0,
) -> None:
    """Run a whole swarm on this machine: Redis, fake LLM, MCP server, workers, a DAG.

    Needs no Redis, API key or config, and stays apart from any real fleet: it starts
    its own redis-server (keys prefixed 'swarm-demo') and ignores REDIS_URL and
    SWARM_* in the shell. With SWARM_LLM_BASE_URL/SWARM_LLM_API_KEY set it uses that
    endpoint instead of the fake provider. Every process it starts is stopped.
    """
    import dataclasses

    from swarm_workers.demo import run_demo

    if own_redis and redis_url:
        raise typer.BadParameter("--own-redis and --redis-url exclude each other")
    out = Console(stderr=as_json)
    report = run_demo(fast=fast, console=out, timeout_s=timeout, redis_url=redis_url)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(report) | {"ok": report.ok}, indent=2))
    raise typer.Exit(0 if report.ok else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
