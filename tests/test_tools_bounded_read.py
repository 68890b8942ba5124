"""A tool that answers too much: the worker reads at most a bounded prefix of it.

Real fake MCP servers over HTTP and stdio answer `huge(chars)`; the registry's read
limit is set low so the test is quick. The model gets the start of the answer and a
note; memory held by the read stays near the limit, not near the answer's size.
"""

from __future__ import annotations

import tracemalloc

import pytest
import redis

from swarm_workers.config import MCPServerSettings, ToolsSettings
from swarm_workers.tools.bounded_read import LineCap, oversized_reply
from swarm_workers.tools.registry import ToolRegistry
from tests.mcp_support import McpServers

LIMIT = 64 * 1024
ANSWER = 8 * 1024 * 1024  # characters the tool sends: 128 times the read limit


def _registry(redis_url: str, server: MCPServerSettings) -> ToolRegistry:
    settings = ToolsSettings(servers={"big": server}, max_output_chars=2_000)
    return ToolRegistry(
        settings, redis.Redis.from_url(redis_url), redis_url=redis_url, max_message_bytes=LIMIT
    ).start()


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_a_huge_tool_result_is_cut_while_it_is_read(
    mcp_servers: McpServers, redis_url: str, transport: str
) -> None:
    server = (
        mcp_servers.http(name="big").settings(timeout_s=30.0)
        if transport == "http"
        else mcp_servers.stdio(timeout_s=30.0)
    )
    registry = _registry(redis_url, server)
    try:
        # One small call first: what a process does once (importing the argument
        # validator, the session's first request) is not the read's memory. Alone, the
        # http case counted ~4.7 MB of it; after other tests in the same process, none.
        assert registry.call("big__add", {"a": 2, "b": 2}, timeout=10).content == "4"
        tracemalloc.start()
        try:
            result = registry.call("big__huge", {"chars": ANSWER}, timeout=30)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # The session survives the cut: the next call works.
        assert registry.call("big__add", {"a": 1, "b": 2}, timeout=10).content == "3"
        assert registry.breaker.state("big").state == "closed"
    finally:
        registry.close()
    assert result.content.startswith("all work and no play makes jack a dull boy.")
    assert "truncated" in result.content
    assert len(result.content) < 2_000 + 200  # the registry's output cap still applies
    assert peak < ANSWER / 8, f"held {peak} bytes reading a {ANSWER}-character answer"


def test_line_cap_passes_small_lines_and_replaces_a_long_one() -> None:
    cap = LineCap(64)
    big = b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"' + b"x" * 500
    out = cap.feed(b'{"id":1}\n' + big[:200]) + cap.feed(big[200:] + b'"}]}}\n{"id":2}\n')
    first, replaced, last, rest = out.split(b"\n")
    assert (first, last, rest) == (b'{"id":1}', b'{"id":2}', b"")
    assert b'"id": 7' in replaced and b"-32099" in replaced
    notification = b'{"jsonrpc":"2.0","method":"notifications/x","params":{'
    assert oversized_reply(notification, 99, 64) is None  # nobody waits for it: dropped
