"""The MCP registry against real fake servers (separate processes, loopback, both eras)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from swarm_workers.config import BreakerSettings, RoleSettings
from swarm_workers.errors import (
    InvalidToolArguments,
    ToolFailed,
    ToolNotAllowed,
    ToolUnavailable,
    UnknownTool,
)
from swarm_workers.localfleet import wait_until
from swarm_workers.tools.base import Toolset
from swarm_workers.tools.config_watch import config_file_servers
from swarm_workers.tools.listing import openai_name
from tests.conftest import write_toml
from tests.mcp_support import (
    McpServers,
    RegistryFactory,
    SharedServers,
    stdio_counts,
    tools_section,
)


def test_calls_a_tool_on_each_transport_and_era(
    mcp_servers: McpServers, registries: RegistryFactory, shared_servers: SharedServers
) -> None:
    modern, legacy = shared_servers.modern, shared_servers.legacy
    servers = {
        "modern": modern.settings(),
        "legacy": legacy.settings(),
        "local": mcp_servers.stdio(),
        "oldlocal": mcp_servers.stdio("--handshake-only"),
    }
    registry = registries(servers)
    assert isinstance(registry, Toolset)
    eras = {s.server: s.era for s in registry.servers()}
    assert eras == {
        "modern": "modern",
        "legacy": "handshake",
        "local": "modern",
        "oldlocal": "handshake",
    }
    for name in servers:
        assert registry.ping(name) < 5  # `ping` (handshake era) or `server/discover` (modern)
        assert registry.call(f"{name}__add", {"a": 2, "b": 3}, timeout=10).content == "5"
        result = registry.call(f"{name}__search", {"query": "mcp", "limit": 2}, timeout=10)
        assert result.content.splitlines() == ["1. result for 'mcp'", "2. result for 'mcp'"]
    assert legacy.stats()["eras"].get("modern", 0) == 1  # only the refused discover probe
    assert modern.stats()["eras"].get("handshake", 0) == 0


def test_specs_are_openai_functions_mapped_back_to_the_real_tool(
    shared_servers: SharedServers, registries: RegistryFactory
) -> None:
    registry = registries({"search": shared_servers.modern.settings()})
    specs = {s.name: s for s in registry.specs(["search__*"])}
    assert set(specs) == {
        "search__add",
        "search__fail",
        "search__grow",
        "search__huge",
        "search__search",
        "search__slow",
    }
    add = specs["search__add"].to_openai()
    assert add["type"] == "function"
    assert add["function"]["parameters"]["type"] == "object"
    assert set(add["function"]["parameters"]["required"]) == {"a", "b"}
    tool = registry.resolve("search__add")
    assert tool is not None
    assert (tool.server, tool.tool) == ("search", "add")
    assert registry.specs(["search__add"]) == [specs["search__add"]]
    assert registry.specs(["other__*"]) == []
    assert len(registry.version) == 12
    assert openai_name("s", "a.b") != openai_name("s", "a_b")
    assert len(openai_name("s", "x" * 100)) == 64


def test_second_worker_does_not_list_what_the_first_listed(
    mcp_servers: McpServers,
    registries: RegistryFactory,
    shared_servers: SharedServers,
    tmp_path: Path,
) -> None:
    modern, legacy = shared_servers.modern, shared_servers.legacy
    stats_dir = tmp_path / "stdio-stats"
    stats_dir.mkdir()
    servers = {
        "modern": modern.settings(),
        "legacy": legacy.settings(),
        "local": mcp_servers.stdio(stats_dir=stats_dir),
    }
    first = registries(servers)
    second = registries(servers)  # another worker: its own connections and processes
    assert second.version == first.version
    assert modern.count("tools/list") == 1
    assert legacy.count("tools/list") == 1
    assert stdio_counts(stats_dir, "tools/list") == 1
    assert len(list(stats_dir.glob("*.json"))) == 2  # two stdio server processes
    # Both connections were really made (the second worker can call), only listing was shared.
    assert modern.count("server/discover") == 2
    assert legacy.count("initialize") == 2
    assert second.call("legacy__add", {"a": 1, "b": 1}, timeout=10).content == "2"
    assert legacy.count("tools/list") == 1  # the call did not re-list to validate its result


def test_many_workers_booting_together_list_once(
    shared_servers: SharedServers, registries: RegistryFactory
) -> None:
    modern, legacy = shared_servers.modern, shared_servers.legacy
    servers = {"modern": modern.settings(), "legacy": legacy.settings()}
    built = [registries(servers, start=False) for _ in range(12)]
    threads = [threading.Thread(target=r.start) for r in built]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(r.specs(["*"])) == 12 for r in built)
    assert modern.count("tools/list") == 1
    assert legacy.count("tools/list") == 1
    assert modern.count("resources/list") == 1


def test_allowlist_validation_errors_and_output_cap(
    shared_servers: SharedServers, registries: RegistryFactory
) -> None:
    server = shared_servers.modern
    registry = registries({"s": server.settings()}, max_output_chars=256)
    with pytest.raises(ToolNotAllowed, match="research"):
        registry.call("s__add", {"a": 1, "b": 2}, timeout=5, allowed=["s__search"], role="research")
    assert registry.call("s__add", {"a": 1, "b": 2}, timeout=5, allowed=["s__*"]).content == "3"
    with pytest.raises(InvalidToolArguments, match="'a' is a required property"):
        registry.call("s__add", {"b": 2}, timeout=5)
    with pytest.raises(ToolFailed, match="boom"):
        registry.call("s__fail", {"message": "boom"}, timeout=5)
    long = registry.call("s__search", {"query": "q", "limit": 50}, timeout=5).content
    assert long.endswith("limit 256]")
    assert len(long) < 320
    with pytest.raises(ToolUnavailable, match="server s unavailable"):
        registry.call("s__slow", {"seconds": 3}, timeout=0.5)


def test_unknown_tool_refreshes_once_then_fails(
    mcp_servers: McpServers, registries: RegistryFactory
) -> None:
    server = mcp_servers.http("--quiet-changes")  # new tools are not announced
    registry = registries({"s": server.settings()})
    assert server.count("tools/list") == 1
    server.add_tool("fresh")
    # A name nobody knows: one forced refetch, and the new tool is found.
    assert registry.call("s__fresh", {"text": "hi"}, timeout=5).content == "fresh: hi"
    assert server.count("tools/list") == 2
    with pytest.raises(UnknownTool):
        registry.call("s__missing", {}, timeout=5)
    # Forced refetches are gapped fleet-wide: this one read the shared entry instead.
    assert server.count("tools/list") == 2
    with pytest.raises(UnknownTool):
        registry.call("nosuchserver__x", {}, timeout=5)
    with pytest.raises(UnknownTool):
        registry.call("plainname", {}, timeout=5)


@pytest.mark.parametrize("era_flags", [(), ("--handshake-only",)], ids=["modern", "handshake"])
def test_list_changed_event_adds_the_new_tool(
    mcp_servers: McpServers, registries: RegistryFactory, era_flags: tuple[str, ...]
) -> None:
    server = mcp_servers.http(*era_flags)
    first = registries({"s": server.settings()})
    second = registries({"s": server.settings()})
    server.add_tool("late")  # the server announces: listen event / list_changed notification
    wait_until(
        lambda: all(r.resolve("s__late") is not None for r in (first, second)), 10, "the new tool"
    )
    assert first.call("s__late", {"text": "x"}, timeout=5).content == "late: x"
    assert first.version == second.version
    assert server.count("tools/list") <= 3  # one refetch for the event, not one per worker


@pytest.mark.parametrize("era_flags", [(), ("--handshake-only",)], ids=["modern", "handshake"])
def test_list_changed_over_stdio(
    mcp_servers: McpServers, registries: RegistryFactory, era_flags: tuple[str, ...]
) -> None:
    registry = registries({"local": mcp_servers.stdio(*era_flags)})
    assert (
        registry.call("local__grow", {"name": "sprout"}, timeout=10).content == "added tool sprout"
    )
    wait_until(lambda: registry.resolve("local__sprout") is not None, 10, "the grown tool")


def test_server_added_to_config_is_picked_up_without_restart(
    mcp_servers: McpServers, redis_url: str, tmp_path: Path
) -> None:
    from swarm_workers.config import ToolsSettings
    from swarm_workers.tools.registry import ToolRegistry

    one = mcp_servers.http(name="one")
    two = mcp_servers.http("--handshake-only", name="two")
    config = tmp_path / "swarm.toml"
    write_toml(config, {"tools": tools_section({"one": one.settings()}, registry_ttl_s=2.0)})
    settings = ToolsSettings(servers={"one": one.settings()}, registry_ttl_s=2.0)
    registry = ToolRegistry(
        settings,
        redis.Redis.from_url(redis_url),
        redis_url=redis_url,
        servers_source=config_file_servers(config, settings.servers),
    ).start()
    try:
        assert {s.server for s in registry.servers()} == {"one"}
        write_toml(
            config,
            {
                "tools": tools_section(
                    {"one": one.settings(), "two": two.settings()}, registry_ttl_s=2.0
                )
            },
        )
        wait_until(lambda: registry.resolve("two__add") is not None, 10, "server two's tools")
        assert registry.call("two__add", {"a": 4, "b": 4}, timeout=5).content == "8"
        write_toml(config, {"tools": tools_section({"two": two.settings()}, registry_ttl_s=2.0)})
        wait_until(lambda: registry.resolve("one__add") is None, 10, "server one to go")
        with pytest.raises(UnknownTool):
            registry.call("one__add", {"a": 1, "b": 1}, timeout=5)
    finally:
        registry.close()


def test_paginated_listing_is_walked(mcp_servers: McpServers, registries: RegistryFactory) -> None:
    server = mcp_servers.http("--page-size", "2")
    registry = registries({"p": server.settings()})
    assert len(registry.specs(["p__*"])) == 6
    assert server.count("tools/list") == 3


def test_bearer_token_from_env(
    mcp_servers: McpServers, registries: RegistryFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = mcp_servers.http("--bearer-token-env", "FAKE_TOKEN", env={"FAKE_TOKEN": "s3cret"})
    monkeypatch.setenv("MCP_TOKEN", "s3cret")
    registry = registries({"auth": server.settings(bearer_token_env="MCP_TOKEN")})
    assert registry.call("auth__add", {"a": 1, "b": 2}, timeout=5).content == "3"
    monkeypatch.setenv("OTHER_TOKEN", "wrong")
    denied = registries({"auth": server.settings(bearer_token_env="OTHER_TOKEN")}, start=False)
    denied.start(wait_s=3)
    assert denied.specs(["*"]) == []


def test_role_context_reads_the_roles_resources(
    shared_servers: SharedServers, registries: RegistryFactory
) -> None:
    server = shared_servers.legacy
    registry = registries({"docs": server.settings()})
    role = RoleSettings(resources=("doc://guide", "doc://policy", "doc://missing"))
    context = registry.role_context(role)
    assert 'uri="doc://guide" server="docs"' in context
    assert "cite result numbers" in context
    assert "never invent sources" in context
    assert "missing" not in context
    assert registry.role_context(RoleSettings()) == ""


def test_listing_is_refreshed_when_it_expires(
    shared_servers: SharedServers, registries: RegistryFactory
) -> None:
    """Handshake-era results carry no ttlMs: the shared entry lives `registry_ttl_s`."""
    server = shared_servers.legacy
    first = registries({"s": server.settings()}, registry_ttl_s=1.0)
    second = registries({"s": server.settings()}, registry_ttl_s=1.0)
    booted = [r.servers()[0].listed_at for r in (first, second)]
    assert server.count("tools/list") == 1
    wait_until(
        lambda: all(
            r.servers()[0].listed_at > t + 1.0 for r, t in zip((first, second), booted, strict=True)
        ),
        10,
        "both workers to refresh",
    )
    assert server.count("tools/list") >= 2


def test_hundreds_of_threads_share_one_connection_per_server(
    shared_servers: SharedServers, registries: RegistryFactory
) -> None:
    modern, legacy = shared_servers.modern, shared_servers.legacy
    registry = registries(
        {"modern": modern.settings(), "legacy": legacy.settings()},
        breaker=BreakerSettings(
            slow_call_ms=30_000
        ),  # queueing on a loaded CI box is not an outage
    )

    def add(i: int) -> str:
        server = "modern" if i % 2 else "legacy"
        return registry.call(f"{server}__add", {"a": i, "b": 1}, timeout=30).content

    with ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(add, range(400)))
    assert results == [str(i + 1) for i in range(400)]
    assert legacy.count("initialize") == 1  # one session, one id, for every thread
    assert modern.count("server/discover") == 1
    assert modern.count("tools/call") + legacy.count("tools/call") == 400
