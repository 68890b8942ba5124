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
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from swarm_workers.config import MCPServerSettings, ToolsSettings
from swarm_workers.localfleet import McpHttpServer, ProcessGroup, start_mcp_http
from swarm_workers.localfleet.services import MCP_MODULE
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
MODULE = MCP_MODULE

# A fake MCP server process speaking streamable HTTP (see swarm_workers.localfleet).
McpServer = McpHttpServer


def spawn_mcp_http(
    *flags: str, name: str = "fake", env: Mapping[str, str] | None = None, log_dir: Path
) -> McpServer:
    """Start a fake server over streamable HTTP on a free port; the caller stops it."""
    return start_mcp_http(ProcessGroup(log_dir=log_dir), *flags, name=name, env=env)


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
    group: ProcessGroup = field(init=False)

    def __post_init__(self) -> None:
        self.group = ProcessGroup(log_dir=self.tmp_path)

    def http(
        self, *flags: str, name: str = "fake", env: Mapping[str, str] | None = None
    ) -> McpServer:
        return start_mcp_http(self.group, *flags, name=name, env=env)

    def stdio(
        self, *flags: str, stats_dir: Path | None = None, **overrides: Any
    ) -> MCPServerSettings:
        return stdio_settings(*flags, stats_dir=stats_dir, **overrides)

    def stop_all(self) -> None:
        self.group.stop_all()


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
