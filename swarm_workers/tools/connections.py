"""Long-lived MCP connections, one per server per worker process, on one event-loop thread.

Why this shape: the `mcp` SDK is async, Celery's threads pool is not. A connection per
call (the seed's bug) pays a handshake per call and drops the session id; a connection
per thread multiplies sessions by the pool size. So one daemon thread runs an asyncio
loop (`LoopThread`) that owns every `mcp.Client`; pool threads hand it coroutines with
`asyncio.run_coroutine_threadsafe` and wait with a timeout. JSON-RPC ids let hundreds
of concurrent calls share one session (on HTTP, an httpx pool carries them).

`ServerConnection` owns one server: an owner task enters the `Client` (the SDK
negotiates: `server/discover` for 2026-07-28 servers, `initialize` +
`notifications/initialized` otherwise), keeps it until it breaks, then reconnects
with exponential backoff. A caller that finds it disconnected wakes the backoff and
waits for that attempt, so after an outage the first call (the breaker's probe)
reconnects at once instead of after the backoff. List-changed events arrive through
the client's message handler in both eras (2026-07-28 events come from a
`subscriptions/listen` stream the owner keeps open; the SDK tees them to the handler
after evicting the response cache).

Usage::

    loop = LoopThread("mcp"); loop.start()         # tools/loop_thread.py
    conn = ServerConnection("search", settings, store=store, on_connected=hook,
                            on_list_changed=changed)
    loop.run(conn.call_tool("search", {"query": "x"}, timeout=5), 6)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal, Protocol, TypeVar

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.caching import CacheConfig, CacheMode
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost
from mcp.shared.exceptions import MCPError
from mcp.types import (
    CONNECTION_CLOSED,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    REQUEST_TIMEOUT,
    CallToolResult,
    Implementation,
    ReadResourceResult,
    Resource,
    ResourceListChangedNotification,
    TextContent,
    Tool,
    ToolListChangedNotification,
)
from mcp.types.version import MODERN_PROTOCOL_VERSIONS

from swarm_workers.config import MCPServerSettings
from swarm_workers.tools.bounded_read import (
    MIN_READ_LIMIT,
    OUTPUT_TOO_LARGE,
    BoundedTransport,
    bounded_stdio_client,
)
from swarm_workers.tools.cache import (
    RedisResponseCacheStore,
    credential_partition,
    server_url,
    target_id,
)
from swarm_workers.tools.listing import Era

__all__ = ["MAX_PAGES", "CallTiming", "ListKind", "ServerConnection", "ServerUnavailable"]

log = logging.getLogger(__name__)

T = TypeVar("T")
ListKind = Literal["tools", "resources"]

MAX_PAGES = 100  # a paginator that never ends must not hang discovery
HTTP_MAX_CONNECTIONS = 256  # per server per worker: calls beyond this queue in the pool
# Calls in flight per server per worker. Below the pool size, so the long-lived GET and
# listen streams keep their connections and a call holding a slot never waits in the pool.
MAX_IN_FLIGHT = HTTP_MAX_CONNECTIONS - 8
SSE_READ_TIMEOUT_S = 300.0  # the SDK's default; listen / GET streams idle between events
_CONNECTION_ERRORS = (
    httpx2.TransportError,
    OSError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)

try:
    _CLIENT_INFO = Implementation(name="swarm-workers", version=version("swarm-workers"))
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    _CLIENT_INFO = Implementation(name="swarm-workers", version="0")


class ServerUnavailable(Exception):
    """The server could not be reached, or did not answer in time (a breaker failure)."""

    def __init__(
        self,
        server: str,
        reason: str,
        *,
        timed_out: bool = False,
        unsent: bool = False,
        untried: bool = False,
    ) -> None:
        super().__init__(f"{server}: {reason}")
        self.server = server
        self.reason = reason
        self.timed_out = timed_out
        # True when the server provably did not run the request (an expired session
        # is refused before dispatch), so resending it on a new session is safe.
        self.unsent = unsent
        # True when this worker never sent it (its own connection was closing): the
        # outcome says nothing about the server, so the breaker must not hear of it.
        self.untried = untried


@dataclass
class CallTiming:
    """Filled in on the loop thread: was the request sent, and how long the server took
    (None when not judged). Read by the caller after the call's future completes."""

    sent: bool = False
    latency_s: float | None = None


OnConnected = Callable[["ServerConnection", Client], Awaitable[None]]
OnListChanged = Callable[[str, ListKind], None]


class ServerConnection:
    """One MCP server's connection in this process: connect, keep, reconnect, call.

    Usage::

        conn = ServerConnection("kb", settings, store=store, default_ttl_ms=300_000,
                                on_connected=hook, on_list_changed=changed)
        conn.start(); await conn.call_tool("search", {"query": "x"}, 10.0)

    Every method runs on the loop thread. Calls raise `ServerUnavailable` when the
    server cannot be reached or times out, `MCPError` when it answered with an error.
    """

    def __init__(
        self,
        name: str,
        settings: MCPServerSettings,
        *,
        store: RedisResponseCacheStore,
        default_ttl_ms: int,
        on_connected: OnConnected,
        on_list_changed: OnListChanged,
        backoff_min_s: float = 0.2,
        backoff_max_s: float = 30.0,
        max_message_bytes: int = MIN_READ_LIMIT,
    ) -> None:
        self.name = name
        self.settings = settings
        self.store = store
        self.era: Era | None = None
        self.protocol_version: str | None = None
        self.server_info: Implementation | None = None
        self.status: Literal["connecting", "ready", "backoff", "closed"] = "connecting"
        self.last_error: str | None = None
        self.connected_at: float | None = None
        self._default_ttl_ms = default_ttl_ms
        self._max_message_bytes = max_message_bytes
        self._on_connected = on_connected
        self._on_list_changed = on_list_changed
        self._backoff = (backoff_min_s, backoff_max_s)
        self._client: Client | None = None
        self._broken: asyncio.Event | None = None
        self._wake = asyncio.Event()
        self._attempt: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._owner: asyncio.Task[None] | None = None
        self._closing = False
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._owner is None:
            self._owner = asyncio.get_running_loop().create_task(
                self._own(), name=f"mcp-connection-{self.name}"
            )

    async def close(self, grace_s: float = 10.0) -> None:
        """End the session gracefully (stdio: close stdin then stop; HTTP: DELETE)."""
        self._closing = True
        self.status = "closed"
        self._wake.set()
        if self._broken is not None:
            self._broken.set()
        if self._owner is not None:
            done, _ = await asyncio.wait({self._owner}, timeout=grace_s)
            if not done:
                self._owner.cancel()
                await asyncio.gather(self._owner, return_exceptions=True)

    async def _own(self) -> None:
        delay = self._backoff[0]
        while not self._closing:
            attempt = self._attempt
            started = time.monotonic()
            try:
                await self._session(attempt)
                delay = self._backoff[0]
            except Exception as exc:
                self.last_error = _describe(exc)
                log.warning("mcp %s: connection failed: %s", self.name, self.last_error)
            finally:
                self._client = None
                self._broken = None
                if not attempt.done():
                    attempt.set_result(False)
                self._attempt = asyncio.get_running_loop().create_future()
            if self._closing:
                break
            self.status = "backoff"
            # Sleep out the backoff unless a caller wakes us; never spin faster than the minimum.
            self._wake.clear()
            pause = delay * random.uniform(0.8, 1.2)
            with anyio.move_on_after(max(0.0, pause)):
                await self._wake.wait()
            elapsed = time.monotonic() - started
            if elapsed < self._backoff[0]:
                await asyncio.sleep(self._backoff[0] - elapsed)
            delay = min(delay * 2, self._backoff[1])
        self.status = "closed"

    async def _session(self, attempt: asyncio.Future[bool]) -> None:
        self.status = "connecting"
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(await self._new_client(stack))
            self._client = client
            self._broken = asyncio.Event()
            self.protocol_version = client.protocol_version
            modern = client.protocol_version in MODERN_PROTOCOL_VERSIONS
            self.era = "modern" if modern else "handshake"
            self.server_info = client.server_info
            log.info(
                "mcp %s: connected (%s era, protocol %s)",
                self.name,
                self.era,
                self.protocol_version,
            )
            # The registry lists through the shared cache before anyone calls: a session
            # that never listed would list on its own to validate the first tool result.
            await self._on_connected(self, client)
            self.status = "ready"
            self.connected_at = time.time()
            self.last_error = None
            attempt.set_result(True)
            async with anyio.create_task_group() as group:
                if self.era == "modern" and _announces_changes(client):
                    group.start_soon(self._listen, client)
                await self._broken.wait()
                group.cancel_scope.cancel()

    async def _new_client(self, stack: AsyncExitStack) -> Client:
        settings = self.settings
        cache = CacheConfig(
            store=self.store,
            partition=credential_partition(settings),
            target_id=target_id(settings),
            default_ttl_ms=self._default_ttl_ms,
            # Honour cacheScope: "public" entries serve every partition, "private" ones
            # only the credential that fetched them.
            share_public=True,
        )
        common: dict[str, Any] = {
            "read_timeout_seconds": settings.timeout_s,
            "message_handler": self._on_message,
            "client_info": _CLIENT_INFO,
            "cache": cache,
        }
        if settings.transport == "stdio":
            assert settings.command is not None
            params = StdioServerParameters(
                command=settings.command, args=list(settings.args), env=dict(settings.env) or None
            )
            return Client(bounded_stdio_client(params, self._max_message_bytes), **common)
        # The read cap counts the bytes as sent: ask for them uncompressed.
        headers = {"Accept-Encoding": "identity", **settings.headers}
        if settings.bearer_token_env:
            token = os.environ.get(settings.bearer_token_env)
            if not token:
                raise ServerUnavailable(
                    self.name, f"bearer token env var {settings.bearer_token_env} is not set"
                )
            headers["Authorization"] = f"Bearer {token}"
        http = await stack.enter_async_context(
            httpx2.AsyncClient(
                headers=headers,
                timeout=httpx2.Timeout(settings.timeout_s, read=SSE_READ_TIMEOUT_S),
                transport=BoundedTransport(
                    httpx2.AsyncHTTPTransport(
                        limits=httpx2.Limits(
                            max_connections=HTTP_MAX_CONNECTIONS, max_keepalive_connections=64
                        )
                    ),
                    self._max_message_bytes,
                ),
            )
        )
        return Client(streamable_http_client(server_url(settings), http_client=http), **common)

    async def _listen(self, client: Client) -> None:
        """Keep a 2026-07-28 `subscriptions/listen` stream open; events reach `_on_message`."""
        delay = 1.0
        while True:
            try:
                listen = client.listen(tools_list_changed=True, resources_list_changed=True)
                async with listen as sub:
                    delay = 1.0
                    async for _event in sub:
                        pass  # the SDK tees each event to the message handler
            except ListenNotSupportedError:
                return
            except MCPError as exc:
                if exc.code == METHOD_NOT_FOUND:
                    return
                log.info("mcp %s: listen stream failed: %s", self.name, exc)
            except SubscriptionLost as exc:
                log.info("mcp %s: listen stream lost: %s", self.name, exc)
            except TimeoutError:
                log.info("mcp %s: listen stream not acknowledged in time", self.name)
            # No replay after a gap: anything may have changed, so refetch.
            self._on_list_changed(self.name, "tools")
            self._on_list_changed(self.name, "resources")
            await anyio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _on_message(self, message: IncomingMessage) -> None:
        if isinstance(message, ToolListChangedNotification):
            self._on_list_changed(self.name, "tools")
        elif isinstance(message, ResourceListChangedNotification):
            self._on_list_changed(self.name, "resources")
        elif isinstance(message, Exception):
            log.debug("mcp %s: transport reported %s", self.name, _describe(message))

    # ------------------------------------------------------------------ calls

    def _ready_client(self) -> Client | None:
        broken = self._broken is None or self._broken.is_set()
        if self.status == "ready" and self._client is not None and not broken:
            return self._client
        return None

    async def _ready(self, deadline: float) -> Client:
        """The connected client, waking a reconnect and waiting for it if need be."""
        loop = asyncio.get_running_loop()
        while True:
            client = self._ready_client()
            if client is not None:
                return client
            if self._closing:
                # Our own reconfiguration or shutdown: the server was not tried.
                raise ServerUnavailable(self.name, "connection closed", untried=True)
            attempt = self._attempt
            self._wake.set()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ServerUnavailable(self.name, "not connected", timed_out=True)
            if attempt.done():
                # That attempt's session is winding down; the owner opens the next one.
                await asyncio.sleep(0.01)
                continue
            try:
                ok = await asyncio.wait_for(asyncio.shield(attempt), remaining)
            except TimeoutError:
                raise ServerUnavailable(
                    self.name, f"not connected within {remaining:.1f}s", timed_out=True
                ) from None
            if not ok:
                raise ServerUnavailable(self.name, self.last_error or "cannot connect")

    async def connected(self) -> Client:
        """The session's client once it is up and listed, waiting at most the server's
        `timeout_s`.

        Discovery takes its client here before it takes the fleet's listing lock: a
        lister holding the lock while it waits for a session would hold up that very
        session, which lists under the same lock before it lets anyone in.
        """
        return await self._ready(asyncio.get_running_loop().time() + self.settings.timeout_s)

    @contextlib.asynccontextmanager
    async def _mapped(self, limit_s: float) -> AsyncIterator[None]:
        """Re-raise a failure that means "the server is unreachable" as ServerUnavailable;
        anything the server answered (MCPError, a malformed result) passes unchanged.
        `limit_s` is the request's time limit, for the message of a timeout."""
        try:
            yield
        except Exception as exc:
            failure = self._unavailable(exc, limit_s)
            if failure is None or failure is exc:
                raise
            raise failure from exc

    def _unavailable(self, exc: BaseException, timeout: float) -> ServerUnavailable | None:
        """Classify a failed request: None means the server answered (with an error)."""
        if isinstance(exc, ServerUnavailable):
            return exc
        if isinstance(exc, TimeoutError):
            return ServerUnavailable(self.name, f"no answer within {timeout:.1f}s", timed_out=True)
        if isinstance(exc, MCPError):
            if exc.code == REQUEST_TIMEOUT:
                reason = f"no answer within {timeout:.1f}s"
                return ServerUnavailable(self.name, reason, timed_out=True)
            if exc.code == INVALID_REQUEST and _session_gone(exc.message):
                # HTTP 404 on our session id: the server restarted (or reaped us) and
                # refused the request before dispatching it.
                self._mark_broken(exc)
                return ServerUnavailable(self.name, "session expired", unsent=True)
            if exc.code == CONNECTION_CLOSED:
                self._mark_broken(exc)
                return ServerUnavailable(self.name, f"connection lost ({exc.message})")
            return None
        if isinstance(exc, _CONNECTION_ERRORS) or (
            isinstance(exc, RuntimeError) and "async context manager" in str(exc)
        ):
            self._mark_broken(exc)
            return ServerUnavailable(self.name, f"connection lost ({_describe(exc)})")
        return None

    def _mark_broken(self, exc: BaseException) -> None:
        self.last_error = _describe(exc)
        if self._broken is not None and not self._broken.is_set():
            log.warning("mcp %s: connection broken: %s", self.name, self.last_error)
            self._broken.set()

    def _timeout(self, budget_s: float) -> float:
        return max(0.0, min(budget_s, self.settings.timeout_s))

    @contextlib.asynccontextmanager
    async def _timed(self, timing: CallTiming, judged: bool) -> AsyncIterator[None]:
        """Measure the request itself, on this loop, once it holds a slot in the pool.

        Waiting for the loop thread or for a pooled connection is this worker's
        congestion, not the server's latency. A call that first had to (re)connect
        (`judged` False) is not judged at all, or recovery itself re-opens the breaker.
        """
        async with self._slots:
            timing.sent = True
            started = time.monotonic()
            try:
                yield
            finally:
                if judged:
                    timing.latency_s = time.monotonic() - started

    async def call_tool(
        self,
        tool: str,
        arguments: dict[str, Any],
        budget_s: float,
        timing: CallTiming | None = None,
    ) -> CallToolResult:
        timing = timing or CallTiming()
        timeout = self._timeout(budget_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        judged = self._ready_client() is not None
        for attempt in (1, 2):
            client = await self._ready(deadline)
            try:
                async with self._mapped(timeout), self._timed(timing, judged):
                    remaining = max(0.01, deadline - loop.time())
                    return await client.call_tool(tool, arguments, read_timeout_seconds=remaining)
            except MCPError as exc:
                if exc.code != OUTPUT_TOO_LARGE:
                    raise
                return _truncated(exc)
            except ServerUnavailable as failure:
                if not (failure.unsent and attempt == 1):
                    raise
                judged = False
                log.info("mcp %s: %s; resending %s", self.name, failure.reason, tool)
        raise AssertionError("unreachable")

    async def read_resource(
        self, uri: str, budget_s: float, timing: CallTiming | None = None
    ) -> ReadResourceResult:
        timing = timing or CallTiming()
        timeout = self._timeout(budget_s)
        judged = self._ready_client() is not None
        client = await self._ready(asyncio.get_running_loop().time() + timeout)
        async with self._mapped(timeout), self._timed(timing, judged):
            with anyio.fail_after(timeout):
                return await client.read_resource(uri)

    async def list_tools(self, client: Client, mode: CacheMode = "use") -> list[Tool]:
        """Every page of `tools/list` on `client` (from `connected`, or the new session's
        own); page one goes through the shared response cache."""
        async with self._mapped(self.settings.timeout_s):
            first = await client.list_tools(cache_mode=mode)
            return await _all_pages(
                first, lambda page: page.tools, lambda c: client.list_tools(cursor=c)
            )

    async def list_resources(self, client: Client, mode: CacheMode = "use") -> list[Resource]:
        if client.server_capabilities.resources is None:
            return []
        async with self._mapped(self.settings.timeout_s):
            first = await client.list_resources(cache_mode=mode)
            return await _all_pages(
                first, lambda page: page.resources, lambda c: client.list_resources(cursor=c)
            )

    async def ping(self, budget_s: float) -> float:
        """Round-trip seconds: `ping` on handshake-era sessions, `server/discover` on modern ones
        (2026-07-28 removed `ping`; discover is the cheapest request every server answers)."""
        timeout = self._timeout(budget_s)
        loop = asyncio.get_running_loop()
        client = await self._ready(loop.time() + timeout)
        started = loop.time()
        async with self._mapped(timeout):
            with anyio.fail_after(timeout):
                if self.era == "modern" and self.protocol_version is not None:
                    await client.session.send_discover(self.protocol_version)
                else:
                    await client.session.send_ping()
        return loop.time() - started


class _Page(Protocol):
    @property
    def next_cursor(self) -> str | None: ...


P = TypeVar("P", bound=_Page)


async def _all_pages(
    first: P, items: Callable[[P], Sequence[T]], fetch: Callable[[str], Awaitable[P]]
) -> list[T]:
    """Follow `next_cursor` from `first`; at most MAX_PAGES, so an endless paginator
    cannot hang discovery."""
    page = first
    found = list(items(page))
    for _ in range(MAX_PAGES):
        if page.next_cursor is None:
            break
        page = await fetch(page.next_cursor)
        found.extend(items(page))
    return found


def _truncated(exc: MCPError) -> CallToolResult:
    """A result cut while it was read (`bounded_read`): its start, and a note saying so."""
    data = exc.data if isinstance(exc.data, dict) else {}
    text = str(data.get("text", ""))
    note = f"[truncated while reading: {exc.message}; this is only its start]"
    return CallToolResult(content=[TextContent(type="text", text=f"{text}\n{note}")])


def _announces_changes(client: Client) -> bool:
    caps = client.server_capabilities
    return bool(
        (caps.tools is not None and caps.tools.list_changed)
        or (caps.resources is not None and caps.resources.list_changed)
    )


def _session_gone(message: str) -> bool:
    """The SDK's words for an unknown `Mcp-Session-Id`: the transport's stand-in for a bare
    404 ("Session terminated") or the server's own JSON-RPC error ("Session not found")."""
    # Exact matches: "Session terminated before the request completed" is a different
    # case (the session died with the request in flight), not safe to resend.
    return message.strip().lower() in ("session terminated", "session not found")


def _describe(exc: BaseException) -> str:
    """One line for logs and `swarm tools`: the innermost cause of an exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
