"""What the fault scenarios share: a fleet of real processes, and the census.

`Fleet` starts redis-server (AOF on), the counting fake provider (`tests.counting_llm`)
and `swarm worker` processes, each with an explicit environment (nothing inherited
from the shell's `SWARM_*` or `REDIS_URL`), and stops every one of them, newest
first, when the scenario ends, however it ends.

`take_census` waits (bounded) for every submitted task's recorded result and checks
the three promises: none lost, none ran to completion twice (the provider's completions
for a task, beyond the steps of its recorded run, must be explained by runs cut short,
at most `max_steps` per earlier run, plus, for a failed run, the call it gave up on),
and how many failed. `Census.emit` prints the
row and appends it to the JSON-lines file named by `SWARM_TEST_FAULTS_REPORT`, which is
where the table of `docs/reliability.md` comes from.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

from swarm_workers.client import SwarmClient
from swarm_workers.localfleet import free_port, wait_until
from swarm_workers.models import TaskResult
from tests.tcp_proxy import TcpProxy

__all__ = [
    "Census",
    "CountingLLM",
    "Fleet",
    "Proc",
    "RedisProc",
    "clean_env",
    "take_census",
]

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any fleet settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_") and k != "REDIS_URL"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Proc:
    """One child process and its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        if self.alive:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, grace: float = 15.0) -> None:
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass
class RedisProc:
    """A redis-server of the scenario's own, AOF on with `appendfsync always`, so a
    restart (even after SIGKILL) keeps every write it acknowledged."""

    port: int
    dir: Path
    fleet: Fleet
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("the fault scenarios need redis-server on PATH")
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--maxclients",
            "10000",
        ]
        self.proc = self.fleet.spawn(f"redis-{self.port}", argv)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False  # not up yet, or still loading the AOF

        try:
            wait_until(answers, 20, f"redis-server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()


@dataclass
class CountingLLM:
    """The counting fake provider (`tests.counting_llm`)."""

    port: int
    proc: Proc

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def census(self) -> dict[str, dict[str, int]]:
        return dict(httpx.get(self._url("/_census"), timeout=5).json())

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(self._url("/_fake/stats"), timeout=5).json())

    def fault(self, status: int, count: int) -> None:
        """The fake's own fault injection: the next `count` chat requests get `status`."""
        body = {"status": status, "count": count}
        httpx.post(self._url("/_fake/faults"), json=body, timeout=5).raise_for_status()

    def clear_faults(self) -> None:
        httpx.post(self._url("/_census/clear"), timeout=5).raise_for_status()


@dataclass
class Fleet:
    """Every process of one scenario; `stop_all` stops them, newest first."""

    tmp_path: Path
    procs: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    proxies: list[TcpProxy] = field(default_factory=list)
    # In every worker's environment, so the processes a worker starts (isolated runs)
    # can be found and stopped even after the worker died and they were re-parented.
    tag: str = field(default_factory=lambda: f"faults-{uuid.uuid4().hex}")

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        log = self.tmp_path / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else clean_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def redis(self) -> RedisProc:
        data = self.tmp_path / "redis-data"
        data.mkdir(exist_ok=True)
        server = RedisProc(port=free_port(), dir=data, fleet=self)
        server.start()
        return server

    def llm(self, latency_ms: float = 5.0, latency_max_ms: float | None = None) -> CountingLLM:
        port = free_port()
        argv = [sys.executable, "-m", "tests.counting_llm", "--port", str(port)]
        argv += ["--latency-ms", str(latency_ms)]
        if latency_max_ms is not None:
            argv += ["--latency-max-ms", str(latency_max_ms)]
        fake = CountingLLM(port=port, proc=self.spawn(f"llm-{port}", argv))

        def answers() -> bool:
            if not fake.proc.alive:
                raise AssertionError(f"fake provider exited:\n{fake.proc.output()[-2000:]}")
            try:
                return httpx.get(fake._url("/_census"), timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, 20, "the counting fake provider")
        return fake

    def worker(
        self,
        *,
        redis_url: str,
        config: Path,
        llm: CountingLLM,
        concurrency: int,
        env: Mapping[str, str] | None = None,
        ready: bool = True,
    ) -> Proc:
        """A `swarm worker` for role `default`; waits until it reports ready."""
        index = len(self.workers)
        heartbeat = self.tmp_path / f"worker-{index}.heartbeat"
        hostname = f"w{index}-{os.getpid()}@faults"
        argv = [
            sys.executable,
            "-m",
            "swarm_workers.cli",
            "worker",
            "--role",
            "default",
            "--concurrency",
            str(concurrency),
            "--hostname",
            hostname,
            "--loglevel",
            "INFO",
        ]
        proc_env = clean_env(
            REDIS_URL=redis_url,
            SWARM_CONFIG=str(config),
            SWARM_LLM_BASE_URL=llm.base_url,
            SWARM_WORKER_HEARTBEAT_FILE=str(heartbeat),
            SWARM_WORKER_HEARTBEAT_INTERVAL_S="0.5",
            LOCALFLEET_TAG=self.tag,
            **(env or {}),
        )
        proc = self.spawn(f"worker-{index}", argv, proc_env)
        self.workers.append(proc)
        if ready:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: Proc, timeout: float = 60.0) -> None:
        def up() -> bool:
            if not proc.alive:
                raise AssertionError(f"{proc.name} exited:\n{proc.output()[-3000:]}")
            return " ready." in proc.output()

        wait_until(up, timeout, f"{proc.name} to report ready", interval=0.1)

    def logs(self) -> str:
        """Every worker's log, for an assertion message."""
        return "\n".join(f"===== {w.name}\n{w.output()[-4000:]}" for w in self.workers)

    def proxy(self, upstream_port: int) -> TcpProxy:
        """A connection-cutting proxy to `upstream_port`, closed after the processes."""
        proxy = TcpProxy(upstream_port)
        self.proxies.append(proxy)
        return proxy

    def stop_all(self) -> None:
        """Workers first (while Redis still answers, so their warm shutdown is quick),
        then everything else, newest first."""
        others = [p for p in self.procs if p not in self.workers]
        for proc in [*reversed(self.workers), *reversed(others)]:
            try:
                proc.stop()
            except Exception:  # keep stopping the others
                proc.popen.kill()
        for proxy in self.proxies:
            proxy.close()
        for pid in tagged_processes(self.tag):  # orphans of SIGKILLed workers
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment has LOCALFLEET_TAG=`tag`."""
    needle = f"LOCALFLEET_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if needle in environ.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


# --------------------------------------------------------------------------- census


@dataclass
class Census:
    """One scenario's row of the reliability table."""

    scenario: str
    tasks: int
    lost: int
    ran_twice: int
    failed: int
    failures: dict[str, int]
    recover_s: float | None
    recover_what: str
    elapsed_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def emit(self) -> None:
        row = asdict(self) | {"at": datetime.now().isoformat(timespec="seconds")}
        print(f"\nFAULT CENSUS {json.dumps(row)}")
        path = os.environ.get("SWARM_TEST_FAULTS_REPORT")
        if path:
            with open(path, "a") as out:
                out.write(json.dumps(row) + "\n")


NEVER_RECEIVED = "unacked=False queued=False lease=0 runs=None"
# A task's message is always in a queue or in `unacked` until the task records its result
# (the transport takes and records it in one step: docs/reliability.md, finding 3). One
# seen nowhere, never begun, for this long is lost: waiting out the census's timeout for
# it would only make the failing run slower.
LOST_AFTER_S = 15.0


def wait_for_results(
    client: SwarmClient, task_ids: Sequence[str], timeout: float
) -> list[TaskResult | None]:
    """Every task's recorded result, polled until all are there or `timeout` passes, or
    until the only ones missing have been nowhere for `LOST_AFTER_S`."""
    deadline = time.monotonic() + timeout
    nowhere_since: float | None = None
    next_look = time.monotonic()
    while True:
        try:
            found = client.results.get_many(task_ids)
        except redis.RedisError:
            found = [None] * len(task_ids)
        missing = [t for t, r in zip(task_ids, found, strict=True) if r is None]
        now = time.monotonic()
        if not missing or now > deadline:
            return found
        if now >= next_look:  # whereabouts reads every queue: once a second is enough
            next_look = now + 1.0
            try:
                lost = all(w == NEVER_RECEIVED for w in whereabouts(client, missing).values())
            except redis.RedisError:
                lost = False
            if not lost:
                nowhere_since = None
            elif nowhere_since is None:
                nowhere_since = now
            elif now - nowhere_since >= LOST_AFTER_S:
                return found
        time.sleep(0.2)


def take_census(
    scenario: str,
    client: SwarmClient,
    tasks: Mapping[str, str],
    llm: CountingLLM,
    *,
    max_steps: int,
    started: float,
    timeout: float,
    recover_from: float | None = None,
    recover_what: str = "",
) -> tuple[Census, dict[str, TaskResult]]:
    """Wait for the results of `tasks` ({tag: task id}) and count what went wrong.

    `recover_from` (a `time.time()`): time to recover is from then to the last result
    recorded; for other measures, pass `recover_s` in `Census.extra` yourself.
    """
    tags = list(tasks)
    found = wait_for_results(client, [tasks[t] for t in tags], timeout)
    results = {tag: r for tag, r in zip(tags, found, strict=True) if r is not None}
    completions = {tag: c.get("completions", 0) for tag, c in llm.census().items()}
    ran_twice = []
    for tag, result in results.items():
        # Calls the recorded run did not count: those of earlier runs that were cut
        # short (at most max_steps each) and, for a run that ended in a failure such as
        # a time limit, its last call, answered as the run gave up on it.
        beyond = completions.get(tag, 0) - result.steps
        allowed = (result.attempts - 1) * max_steps + (0 if result.ok else 1)
        if beyond > allowed:
            ran_twice.append(tag)
    failures = Counter((r.error.type if r.error else "?") for r in results.values() if not r.ok)
    recover_s = None
    if recover_from is not None and results:
        last = max(r.timings.finished_at.timestamp() for r in results.values())
        recover_s = round(last - recover_from, 2)
    census = Census(
        scenario=scenario,
        tasks=len(tags),
        lost=len(tags) - len(results),
        ran_twice=len(ran_twice),
        failed=sum(failures.values()),
        failures=dict(failures),
        recover_s=recover_s,
        recover_what=recover_what,
        elapsed_s=round(time.monotonic() - started, 2),
        extra={
            "ran_twice_tags": ran_twice[:10],
            "lost": [f"{t}={tasks[t]}" for t in tags if t not in results][:10],
        },
    )
    if census.lost:
        where = whereabouts(client, [tasks[t] for t in tags if t not in results])
        census.extra["whereabouts"] = where
        census.extra["never_received"] = sum(w == NEVER_RECEIVED for w in where.values())
    return census, results


def whereabouts(client: SwarmClient, task_ids: Sequence[str]) -> dict[str, str]:
    """Where the broker and the claims still know each of these tasks from (diagnosis)."""
    r = client.redis
    keys = client.settings.keys
    unacked = _text(r.hvals("unacked"))
    queued = " ".join(_text(r.lrange(q, 0, -1)) for q in ("p0.default", "p1.default", "p2.default"))
    found = {}
    for task_id in task_ids:
        found[task_id] = (
            f"unacked={task_id in unacked} queued={task_id in queued} "
            f"lease={r.exists(keys.lease(task_id))} runs={r.get(keys.attempts(task_id))!r}"
        )
    return found


def _text(values: Sequence[bytes | str]) -> str:
    return " ".join(v.decode() if isinstance(v, bytes) else v for v in values)
