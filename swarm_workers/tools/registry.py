"""The fleet's MCP tools as one `Toolset`: allowlist, arguments, breaker, output cap.

A worker does not hard-code tool schemas: discovery (`tools/discovery.py`) lists each
configured MCP server and the model sees every tool as `server__tool` (an OpenAI
function whose parameters are the tool's `inputSchema`). Server names cannot contain
`__` (config validates), so the first `__` splits a name unambiguously.

This module is what the agent loop calls, and the one owner of what a call must pass:
the role's allowlist, the tool's argument schema, the server's circuit breaker
(`tools/breaker.py`: errors, timeouts and calls slower than `slow_call_ms` are
failures), and the output cap. A call waits at most its `timeout`, and that is the
whole wait: the hand-off to the MCP loop thread, the connection, the server.

Usage::

    registry = ToolRegistry(settings.tools, redis_client, redis_url=url).start()
    registry.call("search__search", {"query": "late binding"}, timeout=10,
                  allowed=["search__*"], role="research").content
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import redis
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from swarm_workers.config import RoleSettings, Settings, ToolsSettings
from swarm_workers.deadline import Deadline
from swarm_workers.errors import ToolFailed, ToolUnavailable, UnknownTool
from swarm_workers.keys import Keys
from swarm_workers.tools.base import (
    ToolResult,
    Toolset,
    ToolSpec,
    cap,
    check_allowed,
    validate_arguments,
)
from swarm_workers.tools.bounded_read import read_limit
from swarm_workers.tools.breaker import CircuitBreaker, Permit
from swarm_workers.tools.catalog import Catalog
from swarm_workers.tools.config_watch import ServersSource, servers_source
from swarm_workers.tools.connections import CallTiming, ServerConnection, ServerUnavailable
from swarm_workers.tools.discovery import Discovery
from swarm_workers.tools.listing import (
    RegisteredTool,
    ServerTools,
    render_resource,
    render_result,
)
from swarm_workers.tools.loop_thread import LoopThread

__all__ = ["RegisteredTool", "ServerTools", "ToolRegistry", "build_toolset"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Work = Callable[[ServerConnection, CallTiming], Coroutine[Any, Any, T]]

# A probe's lease outlives its call by this much, so recording its outcome never races
# the lease running out (a lease, not a wait: nobody sleeps on it).
PROBE_LEASE_MARGIN_S = 2.0
SHUTDOWN_S = 15.0


class ToolRegistry:
    """Every configured MCP server's tools, as a `Toolset` the agent loop can call.

    Thread-safe: pool threads call `specs`, `call` and `role_context`; discovery and the
    connections live on the registry's own event-loop thread.

    Usage::

        registry = ToolRegistry(settings.tools, client, redis_url=url).start()
        [spec.name for spec in registry.specs(["search__*"])]
        # -> ['search__add', 'search__search']
    """

    def __init__(
        self,
        settings: ToolsSettings,
        client: redis.Redis,
        *,
        redis_url: str,
        key_prefix: str = "swarm",
        servers_source: ServersSource | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        self._settings = settings
        self._source: ServersSource = servers_source or (lambda: settings.servers)
        self._breaker = CircuitBreaker(
            client,
            key_prefix,
            settings.breaker,
            probe_lease_s=settings.call_timeout_s + PROBE_LEASE_MARGIN_S,
        )
        self._catalog = Catalog()
        self._loop = LoopThread("mcp-registry")
        self._discovery = Discovery(
            settings,
            self._catalog,
            redis_url=redis_url,
            keys=Keys(key_prefix),
            source=self._source,
            max_message_bytes=max_message_bytes or read_limit(settings.max_output_chars),
        )
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, wait_s: float | None = None) -> ToolRegistry:
        """Connect to every server and wait (bounded) for their first listing."""
        if self._started:
            return self
        self._started = True
        self._loop.start()
        budget = wait_s
        if budget is None:
            budget = max((s.timeout_s for s in self._source().values()), default=0.0) + 2.0
        # Boot waits `budget` for listings inside; the outer bound only catches a hang.
        self._loop.run(self._discovery.boot(budget), timeout=budget + SHUTDOWN_S)
        return self

    def close(self) -> None:
        """Close every connection (stdio servers exit) and stop the loop thread."""
        if not self._started:
            return
        try:
            self._loop.run(self._discovery.shutdown(), timeout=SHUTDOWN_S)
        except TimeoutError:
            log.warning("mcp registry: connections did not close within %.0fs", SHUTDOWN_S)
        self._loop.stop()
        self._started = False

    # ------------------------------------------------------------------ Toolset

    @property
    def version(self) -> str:
        """A digest of every server's listing: equal on workers that see the same tools."""
        return self._catalog.version

    def specs(self, allowed: Sequence[str]) -> list[ToolSpec]:
        return self._catalog.specs(allowed)

    def resolve(self, name: str) -> RegisteredTool | None:
        return self._catalog.tool(name)

    def servers(self) -> list[ServerTools]:
        return self._catalog.servers()

    def call(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        timeout: float,
        allowed: Sequence[str] | None = None,
        role: str | None = None,
    ) -> ToolResult:
        """Run `name` on its server within `timeout`. Raises a ToolError for the model."""
        deadline = Deadline.start(timeout)
        check_allowed(name, allowed, role)
        tool = self._catalog.tool(name) or self._after_refresh(name, deadline)
        validate_arguments(name, tool.spec.parameters, arguments)

        async def work(conn: ServerConnection, timing: CallTiming) -> Any:
            # `remaining()` is read on the loop thread: time spent getting there counts.
            return await conn.call_tool(tool.tool, arguments, deadline.remaining(), timing)

        result = self._on_server(name, tool.server, deadline, work)
        text = cap(render_result(result), self._settings.max_output_chars)
        if result.is_error:
            raise ToolFailed(name, text or "the tool reported an error")
        return ToolResult(content=text)

    def role_context(self, role: RoleSettings) -> str:
        """The role's resources (`RoleSettings.resources`), read and framed for its system prompt.

        A resource no server lists, or whose server is unavailable, is left out (logged):
        a missing paragraph of context must not fail the task.
        """
        parts: list[str] = []
        for uri in role.resources:
            owners = self._catalog.resource_servers(uri)
            if not owners:
                log.warning("role resource %s: no configured server lists it", uri)
                continue
            server = owners[0]
            deadline = Deadline.start(self._settings.call_timeout_s)

            async def work(
                conn: ServerConnection,
                timing: CallTiming,
                uri: str = uri,
                deadline: Deadline = deadline,
            ) -> Any:
                return await conn.read_resource(uri, deadline.remaining(), timing)

            try:
                result = self._on_server(uri, server, deadline, work)
            except (ToolUnavailable, ToolFailed) as exc:
                log.warning("role resource %s: %s", uri, exc)
                continue
            text = cap(render_resource(result), self._settings.max_output_chars)
            parts.append(f'<resource uri="{uri}" server="{server}">\n{text}\n</resource>')
        return "\n\n".join(parts)

    # ------------------------------------------------------------------ operator API

    def refresh(self, server: str | None = None, *, force: bool = False) -> None:
        """Re-read the config, then re-list `server` (or every server); blocks until done."""
        budget = self._discovery.refresh_budget(server)
        self._loop.run(self._discovery.refresh_now(server, force), timeout=budget)

    def ping(self, server: str, timeout: float = 5.0) -> float:
        """Round-trip seconds to `server` (ServerUnavailable if it does not answer)."""
        conn = self._discovery.connection(server)
        if conn is None:
            raise UnknownTool(f"{server}__*")
        return self._loop.run(conn.ping(timeout), timeout=timeout)

    def status(self) -> dict[str, dict[str, Any]]:
        """This process's connections: status, era, last error (for `swarm tools --live`)."""
        return {
            name: {
                "status": c.status,
                "era": c.era,
                "protocol_version": c.protocol_version,
                "last_error": c.last_error,
            }
            for name, c in sorted(self._discovery.connections().items())
        }

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    # ------------------------------------------------------------------ call plumbing

    def _on_server(self, name: str, server: str, deadline: Deadline, work: Work[T]) -> T:
        """Run `work` on the server's connection, telling the breaker what the server did.

        Only calls that reached the server count: one this worker could not send (no
        connection, a connection closing, no time left before it went out) releases a
        probe lease untouched. Latency is the server's, measured on the loop thread.
        """
        conn = self._discovery.connection(server)
        if conn is None:
            raise ToolUnavailable(name, server, "this worker holds no connection to it")
        permit = self._breaker.allow(server)
        if not permit.allowed:
            raise ToolUnavailable(name, server, _denied(permit))
        timing = CallTiming()
        try:
            value = self._loop.run(work(conn, timing), timeout=max(0.0, deadline.remaining()))
        except ServerUnavailable as exc:
            self._judge_failure(permit, timing, exc.reason, untried=exc.untried)
            raise ToolUnavailable(name, server, exc.reason) from None
        except TimeoutError:
            reason = f"no answer within {deadline.limit_s:.0f}s"
            # Timed out before the request went out: this worker was congested.
            self._judge_failure(permit, timing, reason, untried=not timing.sent)
            raise ToolUnavailable(name, server, reason) from None
        except MCPError as exc:
            # The server answered, so it is up; the request itself was refused.
            self._breaker.record(permit, ok=True, latency_s=timing.latency_s)
            raise ToolFailed(name, f"server error {exc.code}: {exc.message}") from None
        except (RuntimeError, ValidationError) as exc:
            # A malformed answer (e.g. structured content that breaks the output schema).
            self._breaker.record(permit, ok=True, latency_s=timing.latency_s)
            raise ToolFailed(name, f"invalid answer from the server: {exc}") from None
        except Exception as exc:
            # Unclassified (an anyio ExceptionGroup, an HTTP error): count it, or a probe
            # that fails this way would hold the fleet's half-open lease until it expires.
            reason = f"{type(exc).__name__}: {exc}"[:200]
            self._breaker.record(permit, ok=False, reason=reason)
            raise ToolUnavailable(name, server, reason) from exc
        self._breaker.record(permit, ok=True, latency_s=timing.latency_s)
        return value

    def _judge_failure(
        self, permit: Permit, timing: CallTiming, reason: str, *, untried: bool
    ) -> None:
        if untried:
            self._breaker.release(permit)
        else:
            self._breaker.record(permit, ok=False, reason=reason)

    def _after_refresh(self, name: str, deadline: Deadline) -> RegisteredTool:
        """The model named a tool nobody knows: refetch its server once, then give up."""
        server, sep, _ = name.partition("__")
        if not sep or not server:
            raise UnknownTool(name)
        if self._breaker.state(server).state == "open":
            raise UnknownTool(name)  # a down server cannot tell us about new tools anyway
        budget = deadline.cap(self._discovery.refresh_budget(server))
        try:
            self._loop.run(self._discovery.refresh_now(server, True), timeout=budget)
        except (TimeoutError, ServerUnavailable) as exc:
            log.info("mcp %s: refresh for unknown tool %s failed: %s", server, name, exc)
        tool = self._catalog.tool(name)
        if tool is None:
            raise UnknownTool(name)
        return tool


def _denied(permit: Permit) -> str:
    wait = max(1, round(permit.retry_after_s))
    if permit.state == "half_open":
        return f"circuit half-open, another worker is probing; retry in {wait}s"
    return f"circuit open after repeated failures; retry in {wait}s"


def build_toolset(settings: Settings, client: redis.Redis) -> Toolset:
    """The worker's registry, started: connected to every configured server and listed.

    When the settings were read from a file (`Settings.config_path`), its server list is
    re-read on every refresh, so servers added to the file later join without a restart.
    """
    registry = ToolRegistry(
        settings.tools,
        client,
        redis_url=settings.redis_url,
        key_prefix=settings.key_prefix,
        servers_source=servers_source(settings),
    )
    return registry.start()
