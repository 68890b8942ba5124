"""Fixtures that start fake MCP servers and registries; everything is stopped after use.

Opt in from a test module with `pytest_plugins = ["tests.mcp_fixtures"]` (or once for
all tests in the root conftest). Types and helpers: `tests/mcp_support.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mcp_support import McpServers, RegistryFactory, SharedServers

__all__ = ["mcp_servers", "registries", "shared_mcp", "shared_servers"]


@pytest.fixture
def mcp_servers(tmp_path: Path) -> Iterator[McpServers]:
    servers = McpServers(tmp_path)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def shared_mcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServers]:
    servers = McpServers(tmp_path_factory.mktemp("mcp"))
    shared = SharedServers(
        modern=servers.http(name="modern"), legacy=servers.http("--handshake-only", name="legacy")
    )
    yield shared
    servers.stop_all()


@pytest.fixture
def shared_servers(shared_mcp: SharedServers) -> SharedServers:
    """The module's shared servers with their request counters zeroed."""
    shared_mcp.reset()
    return shared_mcp


@pytest.fixture
def registries(redis_url: str) -> Iterator[RegistryFactory]:
    factory = RegistryFactory(redis_url)
    yield factory
    factory.close_all()
