"""Servers that die or crawl: the fleet breaker opens for every worker and closes again."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from swarm_workers.config import BreakerSettings
from swarm_workers.errors import ToolUnavailable
from swarm_workers.localfleet import wait_until
from tests.mcp_support import (
    McpServers,
    RegistryFactory,
)

BREAKER = BreakerSettings(failures=3, window_s=30.0, slow_call_ms=800.0, cooldown_s=1.0)


def _unavailable(call: Callable[[], object]) -> ToolUnavailable:
    with pytest.raises(ToolUnavailable) as info:
        call()
    return info.value


@pytest.mark.slow
@pytest.mark.parametrize("era_flags", [(), ("--handshake-only",)], ids=["modern", "handshake"])
def test_killed_server_opens_the_breaker_for_every_worker_and_recovers(
    mcp_servers: McpServers, registries: RegistryFactory, era_flags: tuple[str, ...]
) -> None:
    server = mcp_servers.http(*era_flags, name="flaky")
    a = registries({"flaky": server.settings(timeout_s=3.0)}, breaker=BREAKER)
    b = registries({"flaky": server.settings(timeout_s=3.0)}, breaker=BREAKER)
    args = {"a": 1, "b": 2}
    assert a.call("flaky__add", args, timeout=5).content == "3"
    assert b.call("flaky__add", args, timeout=5).content == "3"

    server.kill()
    for _ in range(BREAKER.failures):
        error = _unavailable(lambda: a.call("flaky__add", args, timeout=5))
        assert "server flaky unavailable" in str(error)
        assert "circuit open" not in str(error)
    # Worker b never saw the server fail, yet fails fast: the state is the fleet's.
    started = time.monotonic()
    error = _unavailable(lambda: b.call("flaky__add", args, timeout=5))
    assert "circuit open" in str(error)
    assert time.monotonic() - started < 2.0  # well under the 5 s call timeout
    assert b.breaker.state("flaky").state == "open"

    server.start()  # back on the same port
    time.sleep(BREAKER.cooldown_s + 0.1)
    # The first caller after the cooldown is the fleet's single probe; it reconnects.
    assert b.call("flaky__add", args, timeout=5).content == "3"
    assert a.breaker.state("flaky").state == "closed"
    assert a.call("flaky__add", args, timeout=5).content == "3"


@pytest.mark.slow
def test_slow_calls_open_the_breaker(mcp_servers: McpServers, registries: RegistryFactory) -> None:
    server = mcp_servers.http(name="crawl")
    a = registries({"crawl": server.settings()}, breaker=BREAKER)
    b = registries({"crawl": server.settings()}, breaker=BREAKER)
    for _ in range(BREAKER.failures):
        # Slow but successful: the model still gets the answer, the breaker counts it.
        assert a.call("crawl__slow", {"seconds": 0.9}, timeout=5).content == "slept 0.9s"
    assert b.breaker.state("crawl").state == "open"
    assert "slow call" in (b.breaker.state("crawl").reason or "")
    error = _unavailable(lambda: b.call("crawl__add", {"a": 1, "b": 1}, timeout=5))
    assert "circuit open" in str(error)
    time.sleep(BREAKER.cooldown_s + 0.1)
    assert b.call("crawl__add", {"a": 1, "b": 1}, timeout=5).content == "2"  # a fast probe
    assert a.breaker.state("crawl").state == "closed"


@pytest.mark.slow
def test_killed_stdio_server_is_respawned(
    mcp_servers: McpServers, registries: RegistryFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A long request timeout: a wait that only ends when it runs out shows as recovery
    # taking longer than it.
    timeout_s = 20.0
    registry = registries({"local": mcp_servers.stdio(timeout_s=timeout_s)}, breaker=BREAKER)
    assert registry.call("local__add", {"a": 1, "b": 1}, timeout=10).content == "2"
    # Kill the server process the registry spawned.
    children = _children(os.getpid(), "swarm_workers.fakes.mcp_server")
    assert children
    killed = time.monotonic()
    for child in children:
        os.kill(child, signal.SIGKILL)

    def answers() -> bool:
        try:
            return registry.call("local__add", {"a": 2, "b": 2}, timeout=5).content == "4"
        except ToolUnavailable:
            return False

    wait_until(answers, 3 * timeout_s, "a respawned stdio server", interval=0.5)
    recovered = time.monotonic() - killed
    # The lost session's list-changed refresh used to hold the fleet's discovery lock
    # while it waited for the new session, and the new session listed under that lock
    # before it let anyone in: both waited until the refresh timed out.
    assert recovered < timeout_s, f"answered again {recovered:.1f} s after the kill"
    assert not [r for r in caplog.records if "refresh failed" in r.getMessage()]
    assert registry.breaker.state("local").state == "closed"


def _children(parent: int, needle: str) -> list[int]:
    """Pids of processes whose parent is `parent` and whose command line has `needle`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                cmdline = cmd.read().decode(errors="replace")
        except OSError:
            continue
        if ppid == parent and needle in cmdline:
            found.append(int(entry))
    return found
