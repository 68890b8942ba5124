"""What the registry tells the breaker: only the server's own latency, only real calls.

Issue 13 item 8: time spent queueing in this worker (for the MCP loop thread, for a
pooled connection) is not the server being slow, and a call that never went out
(the worker holds no connection to the server) says nothing about the server.
"""

from __future__ import annotations

import contextlib
import threading
import time

from swarm_workers.config import BreakerSettings
from swarm_workers.errors import ToolError
from swarm_workers.tools.registry import ToolRegistry
from tests.mcp_support import McpServers, RegistryFactory

ONE_STRIKE = BreakerSettings(failures=1, window_s=30.0, slow_call_ms=300.0, cooldown_s=0.3)


def _occupy_loop_thread(registry: ToolRegistry, seconds: float) -> None:
    """Keep the registry's MCP loop thread busy, as a saturated worker's would be."""
    busy = threading.Event()

    async def hog() -> None:
        busy.set()
        time.sleep(seconds)  # noqa: ASYNC251 (blocking on purpose: the loop is busy)

    registry._loop.submit(hog())
    assert busy.wait(5)


def _drop_connection(registry: ToolRegistry, server: str) -> None:
    """The window a reconfiguration opens: the server's tools listed, no connection held."""
    registry._discovery._connections.pop(server)


def test_local_queueing_is_not_judged_as_server_latency(
    mcp_servers: McpServers, registries: RegistryFactory
) -> None:
    server = mcp_servers.http(name="quick")
    registry = registries({"quick": server.settings()}, breaker=ONE_STRIKE)
    assert registry.call("quick__add", {"a": 1, "b": 1}, timeout=10).content == "2"

    _occupy_loop_thread(registry, 0.8)
    started = time.monotonic()
    assert registry.call("quick__add", {"a": 2, "b": 2}, timeout=10).content == "4"
    waited_ms = (time.monotonic() - started) * 1000

    assert waited_ms > ONE_STRIKE.slow_call_ms  # the caller did wait longer than "slow"...
    state = registry.breaker.state("quick")
    assert (state.state, state.recent_failures) == ("closed", 0)  # ...but the server was fast


def test_no_connection_does_not_close_a_half_open_breaker(
    mcp_servers: McpServers, registries: RegistryFactory
) -> None:
    server = mcp_servers.http(name="gone")
    registry = registries({"gone": server.settings()}, breaker=ONE_STRIKE)
    breaker = registry.breaker
    breaker.record(breaker.allow("gone"), ok=False, reason="down")
    assert breaker.state("gone").state == "open"
    time.sleep(ONE_STRIKE.cooldown_s + 0.1)
    assert breaker.state("gone").state == "half_open"

    _drop_connection(registry, "gone")
    with contextlib.suppress(ToolError):
        registry.call("gone__add", {"a": 1, "b": 1}, timeout=5)
    state = breaker.state("gone")
    assert state.state == "half_open"  # no call was made: nothing was learned
    assert not state.probe_pending  # and the fleet's single probe is free for a real call
    probe = breaker.allow("gone")
    assert probe.is_probe
