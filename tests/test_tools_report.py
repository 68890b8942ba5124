"""`swarm tools`: the fleet's published view of its MCP servers, with breaker state."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import redis

from swarm_workers.config import load_settings
from swarm_workers.tools.report import rows_json, tool_rows
from tests.mcp_support import RegistryFactory, SharedServers, tools_section


def test_rows_show_era_cache_age_and_breaker(
    shared_servers: SharedServers,
    registries: RegistryFactory,
    redis_url: str,
    redis_conn: redis.Redis,
    swarm_config: Callable[..., Path],
) -> None:
    servers = {
        "modern": shared_servers.modern.settings(),
        "legacy": shared_servers.legacy.settings(),
    }
    config = swarm_config(tools=tools_section(servers | {"down": servers["modern"]}))
    settings = load_settings(config, redis_url=redis_url)
    registry = registries(servers)  # a worker: lists and publishes its view
    breaker = registry.breaker
    for _ in range(settings.tools.breaker.failures):
        breaker.record(breaker.allow("legacy"), ok=False, reason="test outage")

    rows = tool_rows(settings, redis_conn)
    by_tool = {row.tool: row for row in rows}
    assert by_tool["modern__search"].era == "modern"
    assert by_tool["modern__search"].protocol_version == "2026-07-28"
    assert by_tool["legacy__search"].era == "handshake"
    assert by_tool["legacy__search"].description.startswith("Search the knowledge base")
    assert by_tool["modern__add"].breaker == "closed"
    assert by_tool["legacy__add"].breaker == "open"
    assert by_tool["legacy__add"].last_error == "test outage"
    age = by_tool["modern__add"].cache_age_s
    assert age is not None
    assert 0 <= age < 60
    down = [row for row in rows if row.server == "down"]
    assert len(down) == 1
    assert down[0].status == "not discovered"
    assert down[0].tool is None
    assert json.loads(rows_json(rows))["tools"][0]["server"] == "down"


def test_cli_tools_live_json(
    shared_servers: SharedServers, redis_url: str, swarm_config: Callable[..., Path]
) -> None:
    """No worker has run: `--live` connects and lists (through the shared cache) itself."""
    servers = {"modern": shared_servers.modern.settings()}
    config = swarm_config(tools=tools_section(servers))
    command = ["tools", "--json", "--live", "--config", str(config)]
    out = subprocess.run(
        [sys.executable, "-m", "swarm_workers.cli", *command],
        env={"REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = json.loads(out.stdout)["tools"]
    assert {row["tool"] for row in rows} >= {"modern__search", "modern__add"}
    assert {row["era"] for row in rows} == {"modern"}
    assert {row["breaker"] for row in rows} == {"closed"}
