"""What `swarm tools` shows: every configured server's tools as the fleet sees them.

Read from Redis, not from the servers: each worker publishes the listing it holds
(`Keys.tool_view`, see tools/discovery.py) and the breaker state is shared, so
an operator sees what the workers see without opening MCP sessions of their own.
`live=True` first builds a registry in this process (connects, lists through the shared
cache, publishes), for a fleet with no worker running yet.

Usage::

    rows = tool_rows(load_settings(None), redis_client(url))
    print(rows_json(rows))
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from swarm_workers.config import Settings
from swarm_workers.tools.breaker import CircuitBreaker
from swarm_workers.tools.registry import ToolRegistry

__all__ = ["ToolRow", "rows_json", "tool_rows"]


@dataclass(frozen=True)
class ToolRow:
    """One line of `swarm tools`: a tool, or a server with none discovered yet."""

    server: str
    era: str | None  # "modern" (2026-07-28) or "handshake"; None: never reached
    protocol_version: str | None
    tool: str | None  # the name the model sees, `server__tool`
    description: str
    cache_age_s: float | None  # age of the shared listing; None: not cached (ttlMs 0)
    breaker: str  # closed | open | half_open
    status: str  # the publishing worker's connection status, or "not discovered"
    last_error: str | None = None


def tool_rows(
    settings: Settings, client: redis.Redis, *, live: bool = False, now: float | None = None
) -> list[ToolRow]:
    """Rows for every configured server, sorted by server then tool."""
    if live and settings.tools.servers:
        registry = ToolRegistry(
            settings.tools, client, redis_url=settings.redis_url, key_prefix=settings.key_prefix
        )
        try:
            registry.start()
        finally:
            registry.close()
    breaker = CircuitBreaker(client, settings.key_prefix, settings.tools.breaker)
    moment = time.time() if now is None else now
    rows: list[ToolRow] = []
    for server in sorted(settings.tools.servers):
        state = breaker.state(server)
        raw = client.get(settings.keys.tool_view(server))
        if raw is None:
            rows.append(
                ToolRow(
                    server=server,
                    era=None,
                    protocol_version=None,
                    tool=None,
                    description="",
                    cache_age_s=None,
                    breaker=state.state,
                    status="not discovered",
                    last_error=state.reason,
                )
            )
            continue
        view: dict[str, Any] = json.loads(raw)
        cached_at = view.get("cached_at")
        age = None if cached_at is None else max(0.0, moment - float(cached_at))
        tools = view.get("tools") or [{"name": None, "description": "(no tools)"}]
        for tool in tools:
            rows.append(
                ToolRow(
                    server=server,
                    era=view.get("era"),
                    protocol_version=view.get("protocol_version"),
                    tool=tool["name"],
                    description=tool.get("description") or "",
                    cache_age_s=None if age is None else round(age, 1),
                    breaker=state.state,
                    status=str(view.get("status", "?")),
                    last_error=state.reason or view.get("last_error"),
                )
            )
    return rows


def rows_json(rows: list[ToolRow]) -> str:
    """The JSON form of `swarm tools --json`: {"tools": [row, ...]}."""
    return json.dumps({"tools": [asdict(row) for row in rows]}, indent=2)
