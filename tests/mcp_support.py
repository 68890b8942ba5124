"""Real fake MCP servers for tests: separate processes on loopback, always stopped.

The classes and helpers live here; the fixtures are in `tests/mcp_fixtures.py` (a test
module opts in with `pytest_plugins = ["tests.mcp_fixtures"]`). The end-to-end worker
test, for example:

    def test_e2e(mcp_servers, swarm_config, start_worker):
        search = mcp_servers.http(name="search")                  # modern, streamable HTTP
        legacy = mcp_servers.http("--handshake-only", name="legacy")
        local = mcp_servers.stdio()                              # MCPServerSettings (stdio)
        config = swarm_config(tools=tools_section({"search": search.settings(),
                                                   "legacy": legacy.settings(),
                                                   "local": local}))
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from swarm_workers.config import MCPServerSettings, ToolsSettings
from swarm_workers.processes import free_port, wait_until
from swarm_workers.tools.registry import ToolRegistry

__all__ = [
    "McpServer",
    "McpServers",
    "RegistryFactory",
    "SharedServers",
    "spawn_mcp_http",
    "stdio_counts",
    "stdio_settings",
    "tools_section",
]

ROOT = Path(__file__).resolve().parent.parent
MODULE = "swarm_workers.fakes.mcp_server"


@dataclass
class McpServer:
    """A fake MCP server process speaking streamable HTTP on 127.0.0.1:`port`."""

    name: str
    port: int
    flags: tuple[str, ...]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    MODULE,
                    "--port",
                    str(self.port),
                    "--name",
                    self.name,
                    *self.flags,
                ],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"fake MCP server exited: {self.log.read_text()[-2000:]}")
            try:
                return httpx.get(f"{self.base}/_fake/stats", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, 20, f"fake MCP server {self.name}")

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-run, as a crashed dependency does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def spawn_mcp_http(
    *flags: str, name: str = "fake", env: Mapping[str, str] | None = None, log_dir: Path
) -> McpServer:
    """Start a fake server over streamable HTTP on a free port and wait until it answers."""
    server = McpServer(
        name=name,
        port=free_port(),
        flags=tuple(flags),
        env=dict(env or {}),
        log=log_dir / f"mcp-{name}-{os.getpid()}-{free_port()}.log",
    )
    server.start()
    return server


def stdio_settings(
    *flags: str, stats_dir: Path | None = None, **overrides: Any
) -> MCPServerSettings:
    """Settings for a fake server the worker itself spawns over stdio."""
    args = ["-m", MODULE, "--transport", "stdio", *flags]
    if stats_dir is not None:
        args += ["--stats-dir", str(stats_dir)]
    overrides.setdefault("env", {"PYTHONPATH": str(ROOT)})
    return MCPServerSettings(
        transport="stdio", command=sys.executable, args=tuple(args), **overrides
    )


def stdio_counts(stats_dir: Path, method: str) -> int:
    """`method` requests summed over every stdio server process that wrote to `stats_dir`."""
    total = 0
    for path in stats_dir.glob("*.json"):
        total += int(json.loads(path.read_text())["counts"].get(method, 0))
    return total


def tools_section(servers: Mapping[str, MCPServerSettings], **extra: Any) -> dict[str, Any]:
    """The `[tools]` table for `swarm_config(tools=...)` naming these servers."""
    return {
        **extra,
        "servers": {
            name: s.model_dump(mode="json", exclude_defaults=True) | {"transport": s.transport}
            for name, s in servers.items()
        },
    }


@dataclass
class McpServers:
    """Starts fake MCP servers for one test and stops them all afterwards."""

    tmp_path: Path
    started: list[McpServer] = field(default_factory=list)

    def http(
        self, *flags: str, name: str = "fake", env: Mapping[str, str] | None = None
    ) -> McpServer:
        server = spawn_mcp_http(*flags, name=name, env=env, log_dir=self.tmp_path)
        self.started.append(server)
        return server

    def stdio(
        self, *flags: str, stats_dir: Path | None = None, **overrides: Any
    ) -> MCPServerSettings:
        return stdio_settings(*flags, stats_dir=stats_dir, **overrides)

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


@dataclass
class SharedServers:
    """A modern and a handshake-only HTTP server for a whole module (starting one costs
    seconds); tests that add tools or kill servers start their own instead."""

    modern: McpServer
    legacy: McpServer

    def reset(self) -> None:
        self.modern.reset()
        self.legacy.reset()


@dataclass
class RegistryFactory:
    """Builds started `ToolRegistry`s (one per simulated worker); closes them all."""

    redis_url: str
    built: list[ToolRegistry] = field(default_factory=list)

    def __call__(
        self, servers: Mapping[str, MCPServerSettings], *, start: bool = True, **tools: Any
    ) -> ToolRegistry:
        settings = ToolsSettings(servers=dict(servers), **tools)
        client = redis.Redis.from_url(self.redis_url)
        registry = ToolRegistry(settings, client, redis_url=self.redis_url, key_prefix="swarm")
        self.built.append(registry)
        return registry.start() if start else registry

    def close_all(self) -> None:
        for registry in self.built:
            registry.close()
