"""The fleet's MCP tool registry: tools bound late, cached in Redis, called with a breaker.

A worker does not hard-code tool schemas: it asks each configured MCP server
`tools/list` and shows the model every tool as `server__tool` (an OpenAI function whose
parameters are the tool's `inputSchema`); a call maps the name back to the server and
the tool's real name. Server names cannot contain `__` (config validates), so the first
`__` splits a name unambiguously and two servers' tools never collide.

Fleet behaviour:
- Listings go through the SDK's response cache in Redis (`tools/cache.py`): whoever
  lists first serves everyone. At boot fifty workers must not all list every server,
  so listing takes a Redis lock per server and method; the winner lists (a cache hit if
  the entry is fresh), the others wait for the lock to go and read the cache.
- A listing is refreshed when it is `registry_ttl_s` old, when the server says its
  list changed (the SDK evicts the cache entry first), and once when the model calls a
  name nobody knows (a forced refetch, at most one per server per 5 s in the fleet).
  Each refresh re-reads the config file, so a server added to it needs no restart.
- Every call passes the server's circuit breaker (`tools/breaker.py`) and counts
  toward it: errors, timeouts and calls slower than `slow_call_ms` are failures.
- Each worker publishes what it sees (`<prefix>:tools:view:<server>`) for `swarm tools`.

>>> registry = ToolRegistry(settings.tools, redis_client, redis_url=url).start()  # doctest: +SKIP
>>> registry.call("search__search", {"query": "late binding"}, timeout=10,
...               allowed=["search__*"], role="research").content                 # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import redis
import redis.asyncio
from mcp import Client
from mcp.client.caching import CacheMode
from mcp.shared.exceptions import MCPError
from mcp.types import ReadResourceResult
from pydantic import ValidationError

from swarm_workers.config import (
    MCPServerSettings,
    RoleSettings,
    Settings,
    ToolsSettings,
    load_settings,
)
from swarm_workers.errors import (
    ConfigError,
    ToolFailed,
    ToolUnavailable,
    UnknownTool,
)
from swarm_workers.metrics import allow_tool_servers
from swarm_workers.tools.base import (
    ToolResult,
    Toolset,
    ToolSpec,
    check_allowed,
    is_allowed,
    validate_arguments,
)
from swarm_workers.tools.breaker import CircuitBreaker, Permit
from swarm_workers.tools.cache import RedisResponseCacheStore
from swarm_workers.tools.connections import (
    ListKind,
    LoopThread,
    ServerConnection,
    ServerUnavailable,
)
from swarm_workers.tools.listing import (
    RegisteredTool,
    ServerTools,
    cap,
    render_resource,
    render_result,
    server_tools,
)

__all__ = [
    "RegisteredTool",
    "ServerTools",
    "ToolRegistry",
    "build_toolset",
    "config_file_servers",
    "view_key",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
ServersSource = Callable[[], Mapping[str, MCPServerSettings]]

FORCED_REFRESH_GAP_S = 5.0  # fleet-wide: one forced refetch per server per gap
_GRACE_S = 2.0  # how much longer a pool thread waits than the call's own timeout


def view_key(key_prefix: str, server: str) -> str:
    return f"{key_prefix}:tools:view:{server}"


class ToolRegistry:
    """Every configured MCP server's tools, as a `Toolset` the agent loop can call.

    Thread-safe: pool threads call `specs`, `call` and `role_context`; discovery and the
    connections live on the registry's own event-loop thread.

    >>> registry = ToolRegistry(settings.tools, client, redis_url=url).start()  # doctest: +SKIP
    >>> [spec.name for spec in registry.specs(["search__*"])]                   # doctest: +SKIP
    ['search__add', 'search__search']
    """

    def __init__(
        self,
        settings: ToolsSettings,
        client: redis.Redis,
        *,
        redis_url: str,
        key_prefix: str = "swarm",
        servers_source: ServersSource | None = None,
    ) -> None:
        self._settings = settings
        self._redis = client
        self._redis_url = redis_url
        self._prefix = key_prefix
        self._source: ServersSource = servers_source or (lambda: settings.servers)
        self._breaker = CircuitBreaker(
            client,
            key_prefix,
            settings.breaker,
            probe_lease_s=settings.call_timeout_s + _GRACE_S,
        )
        self._loop = LoopThread("mcp-registry")
        self._lock = threading.Lock()  # guards swaps of the read-mostly maps below
        self._listings: dict[str, ServerTools] = {}
        self._index: dict[str, RegisteredTool] = {}
        self._resource_servers: dict[str, tuple[str, ...]] = {}
        # Loop-thread state.
        self._aredis: redis.asyncio.Redis | None = None
        self._connections: dict[str, ServerConnection] = {}
        self._discovered: dict[str, asyncio.Event] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # A refresh asked for while one runs: run once more after it (True: forced).
        self._again: dict[str, bool] = {}
        self._ticker: asyncio.Task[None] | None = None
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
        self._loop.run(self._boot(budget), timeout=budget + 10.0)
        return self

    async def _boot(self, wait_s: float) -> None:
        self._aredis = redis.asyncio.Redis.from_url(self._redis_url)
        await self._sync_servers()
        waits = [asyncio.wait_for(e.wait(), wait_s) for e in self._discovered.values()]
        results = await asyncio.gather(*waits, return_exceptions=True)
        for name, result in zip(list(self._discovered), results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "mcp %s: no listing within %.0fs at boot; retrying in the background",
                    name,
                    wait_s,
                )
        loop = asyncio.get_running_loop()
        self._ticker = loop.create_task(self._tick(), name="mcp-registry-tick")

    def close(self) -> None:
        """Close every connection (stdio servers exit) and stop the loop thread."""
        if not self._started:
            return
        try:
            self._loop.run(self._shutdown(), timeout=15.0)
        except TimeoutError:
            log.warning("mcp registry: connections did not close within 15s")
        self._loop.stop()
        self._started = False

    async def _shutdown(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*(c.close() for c in self._connections.values()))
        self._connections.clear()
        if self._aredis is not None:
            await self._aredis.aclose()

    # ------------------------------------------------------------------ Toolset

    @property
    def version(self) -> str:
        """A digest of every server's listing: equal on workers that see the same tools."""
        listings = self._listings
        digest = hashlib.sha256(
            json.dumps(sorted((s, t.version) for s, t in listings.items())).encode()
        )
        return digest.hexdigest()[:12]

    def specs(self, allowed: Sequence[str]) -> list[ToolSpec]:
        index = self._index
        return [index[n].spec for n in sorted(index) if is_allowed(n, allowed)]

    def resolve(self, name: str) -> RegisteredTool | None:
        return self._index.get(name)

    def servers(self) -> list[ServerTools]:
        listings = self._listings
        return [listings[name] for name in sorted(listings)]

    def call(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        timeout: float,
        allowed: Sequence[str] | None = None,
        role: str | None = None,
    ) -> ToolResult:
        """Run `name` on its server. Raises a ToolError subclass for the model to read."""
        check_allowed(name, allowed, role)
        tool = self._index.get(name) or self._after_refresh(name, timeout)
        validate_arguments(name, tool.spec.parameters, arguments)
        permit = self._breaker.allow(tool.server)
        if not permit.allowed:
            raise ToolUnavailable(name, tool.server, _denied(permit))
        result = self._run_on_server(
            name, tool.server, permit, timeout, lambda c: c.call_tool(tool.tool, arguments, timeout)
        )
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
            owners = self._resource_servers.get(uri, ())
            if not owners:
                log.warning("role resource %s: no configured server lists it", uri)
                continue
            server = owners[0]
            permit = self._breaker.allow(server)
            if not permit.allowed:
                log.warning("role resource %s: server %s unavailable (circuit open)", uri, server)
                continue
            timeout = self._settings.call_timeout_s
            try:
                result = self._run_on_server(uri, server, permit, timeout, _reader(uri, timeout))
            except (ToolUnavailable, ToolFailed) as exc:
                log.warning("role resource %s: %s", uri, exc)
                continue
            text = cap(render_resource(result), self._settings.max_output_chars)
            parts.append(f'<resource uri="{uri}" server="{server}">\n{text}\n</resource>')
        return "\n\n".join(parts)

    # ------------------------------------------------------------------ operator API

    def refresh(self, server: str | None = None, *, force: bool = False) -> None:
        """Re-read the config, then re-list `server` (or every server); blocks until done."""
        timeout = self._refresh_budget(server)
        self._loop.run(self._refresh_now(server, force), timeout=timeout)

    def ping(self, server: str, timeout: float = 5.0) -> float:
        """Round-trip seconds to `server` (ServerUnavailable if it does not answer)."""
        conn = self._connections.get(server)
        if conn is None:
            raise UnknownTool(f"{server}__*")
        return self._loop.run(conn.ping(timeout), timeout=timeout + _GRACE_S)

    def status(self) -> dict[str, dict[str, Any]]:
        """This process's connections: status, era, last error (for `swarm tools --live`)."""
        return {
            name: {
                "status": c.status,
                "era": c.era,
                "protocol_version": c.protocol_version,
                "last_error": c.last_error,
            }
            # A copy: the loop thread adds and removes connections while we read.
            for name, c in sorted(dict(self._connections).items())
        }

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    # ------------------------------------------------------------------ call plumbing

    def _run_on_server(
        self,
        name: str,
        server: str,
        permit: Permit,
        timeout: float,
        work: Callable[[ServerConnection], Awaitable[T]],
    ) -> T:
        """Run `work` on the server's connection, feeding the outcome to the breaker."""
        conn = self._connections.get(server)
        if conn is None:
            self._breaker.record(permit, ok=True)  # release a probe lease; nothing was tried
            raise UnknownTool(name)

        async def job() -> T:
            return await work(conn)

        # A call that first had to (re)connect, e.g. respawn a stdio server, is not a
        # slow server: its latency is not judged, or recovery itself re-opens the breaker.
        judged = conn.status == "ready"
        started = time.monotonic()

        def latency() -> float | None:
            return time.monotonic() - started if judged else None

        try:
            value = self._loop.run(job(), timeout=timeout + _GRACE_S)
        except ServerUnavailable as exc:
            self._breaker.record(permit, ok=False, reason=exc.reason)
            raise ToolUnavailable(name, server, exc.reason) from None
        except TimeoutError:
            reason = f"no answer within {timeout:.0f}s"
            self._breaker.record(permit, ok=False, reason=reason)
            raise ToolUnavailable(name, server, reason) from None
        except MCPError as exc:
            # The server answered, so it is up; the request itself was refused.
            self._breaker.record(permit, ok=True, latency_s=latency())
            raise ToolFailed(name, f"server error {exc.code}: {exc.message}") from None
        except (RuntimeError, ValidationError) as exc:
            # A malformed answer (e.g. structured content that breaks the output schema).
            self._breaker.record(permit, ok=True, latency_s=latency())
            raise ToolFailed(name, f"invalid answer from the server: {exc}") from None
        except Exception as exc:
            # Unclassified (an anyio ExceptionGroup, an HTTP error): count it, or a probe
            # that fails this way would hold the fleet's half-open lease until it expires.
            reason = f"{type(exc).__name__}: {exc}"[:200]
            self._breaker.record(permit, ok=False, reason=reason)
            raise ToolUnavailable(name, server, reason) from exc
        self._breaker.record(permit, ok=True, latency_s=latency())
        return value

    def _after_refresh(self, name: str, timeout: float) -> RegisteredTool:
        """The model named a tool nobody knows: refetch its server once, then give up."""
        server, sep, _ = name.partition("__")
        if not sep or not server:
            raise UnknownTool(name)
        if self._breaker.state(server).state == "open":
            raise UnknownTool(name)  # a down server cannot tell us about new tools anyway
        budget = min(timeout, self._refresh_budget(server))
        try:
            self._loop.run(self._refresh_now(server, True), timeout=budget)
        except (TimeoutError, ServerUnavailable) as exc:
            log.info("mcp %s: refresh for unknown tool %s failed: %s", server, name, exc)
        tool = self._index.get(name)
        if tool is None:
            raise UnknownTool(name)
        return tool

    def _refresh_budget(self, server: str | None) -> float:
        servers = self._source()
        chosen = [servers[server]] if server is not None and server in servers else servers.values()
        return max((s.timeout_s for s in chosen), default=1.0) * 2 + _GRACE_S

    # ------------------------------------------------------------------ loop thread

    @property
    def _ar(self) -> redis.asyncio.Redis:
        assert self._aredis is not None
        return self._aredis

    async def _sync_servers(self) -> None:
        """Make the connections match the configured servers (the config may have changed)."""
        try:
            wanted = dict(self._source())
        except Exception as exc:  # a config being edited must not stop the fleet
            log.warning("mcp registry: cannot re-read the server list, keeping it: %s", exc)
            return
        allow_tool_servers(wanted)
        for name in list(self._connections):
            conn = self._connections.get(name)  # a concurrent sync may have removed it
            if conn is None:
                continue
            if wanted.get(name) != conn.settings:
                log.info("mcp %s: %s", name, "removed" if name not in wanted else "reconfigured")
                del self._connections[name]
                self._discovered.pop(name, None)
                await conn.close()
                if name not in wanted:
                    self._drop(name)
        for name, server_settings in wanted.items():
            if name in self._connections:
                continue
            log.info("mcp %s: connecting (%s)", name, server_settings.transport)
            self._discovered[name] = asyncio.Event()
            conn = ServerConnection(
                name,
                server_settings,
                store=RedisResponseCacheStore(self._ar, self._prefix),
                default_ttl_ms=int(self._settings.registry_ttl_s * 1000),
                on_connected=self._on_connected,
                on_list_changed=self._on_list_changed,
            )
            self._connections[name] = conn
            conn.start()

    async def _tick(self) -> None:
        """Re-read the config and re-list whatever is older than `registry_ttl_s`."""
        ttl = self._settings.registry_ttl_s
        period = max(0.5, min(5.0, ttl / 4))
        while True:
            await asyncio.sleep(period)
            try:
                await self._sync_servers()
                now = time.time()
                for name, conn in list(self._connections.items()):
                    listing = self._listings.get(name)
                    stale = listing is None or now - listing.listed_at >= ttl
                    if stale and conn.status == "ready":
                        self._schedule(name, force=False, delay=0.0)
            except Exception:
                log.exception("mcp registry: periodic refresh failed")

    async def _on_connected(self, conn: ServerConnection, client: Client) -> None:
        """First thing on every new session: list through the lock and the shared cache."""
        try:
            await self._discover(conn, client=client, force=False)
        except ServerUnavailable as exc:
            log.warning("mcp %s: listing after connect failed: %s", conn.name, exc.reason)
        except Exception:
            log.exception("mcp %s: listing after connect failed", conn.name)
        finally:
            event = self._discovered.get(conn.name)
            if event is not None:
                event.set()

    def _on_list_changed(self, server: str, kind: ListKind) -> None:
        log.info("mcp %s: %s list changed", server, kind)
        # Other workers got the same event and each evicts the shared entry; a short,
        # random pause lets those evictions land before one of us refetches.
        self._schedule(server, force=False, delay=random.uniform(0.05, 0.25))

    def _schedule(self, server: str, *, force: bool, delay: float) -> asyncio.Task[None]:
        task = self._inflight.get(server)
        if task is not None and not task.done():
            # The running refresh may already have read the old list: it goes round
            # once more, so a list-changed event or a forced refetch is never lost.
            self._again[server] = self._again.get(server, False) or force
            return task

        async def run() -> None:
            if delay:
                await asyncio.sleep(delay)
            forced = force
            while True:
                conn = self._connections.get(server)
                if conn is None:
                    return
                try:
                    await self._discover(conn, client=None, force=forced)
                except ServerUnavailable as exc:
                    log.warning("mcp %s: refresh failed: %s", server, exc.reason)
                except Exception:
                    log.exception("mcp %s: refresh failed", server)
                again = self._again.pop(server, None)
                if again is None:
                    return
                forced = again

        task = asyncio.get_running_loop().create_task(run(), name=f"mcp-refresh-{server}")
        self._inflight[server] = task
        return task

    async def _refresh_now(self, server: str | None, force: bool) -> None:
        await self._sync_servers()
        names = [server] if server is not None else list(self._connections)
        tasks = [self._schedule(n, force=force, delay=0.0) for n in names if n in self._connections]
        if tasks:
            # Shielded: a caller that gives up must not cancel a refresh others share.
            await asyncio.gather(*(asyncio.shield(t) for t in tasks))

    async def _discover(
        self, conn: ServerConnection, *, client: Client | None, force: bool
    ) -> None:
        if force and not await self._take_forced_gap(conn.name):
            force = False  # someone in the fleet refetched a moment ago: read their entry
        conn.store.forget("tools/list")
        tools = await self._shared_list(
            conn, "tools/list", force, lambda mode: conn.list_tools(mode, client=client)
        )
        cached_at = conn.store.stored_at("tools/list")
        resources = await self._shared_list(
            conn, "resources/list", force, lambda mode: conn.list_resources(mode, client=client)
        )
        listing = server_tools(
            conn.name,
            tools,
            [r.uri for r in resources],
            era=conn.era,
            protocol_version=conn.protocol_version,
            cached_at=cached_at,
        )
        if conn is not self._connections.get(conn.name):
            return  # removed or reconfigured while we listed
        self._install(listing)
        try:
            await self._ar.set(
                view_key(self._prefix, conn.name),
                json.dumps(listing.view(conn.status, conn.last_error)),
                ex=max(60, int(self._settings.registry_ttl_s * 3)),
            )
        except redis.RedisError as exc:
            log.warning("mcp %s: cannot publish the view: %s", conn.name, exc)

    async def _take_forced_gap(self, server: str) -> bool:
        try:
            key = f"{self._prefix}:tools:forced:{server}"
            return bool(await self._ar.set(key, "1", nx=True, px=int(FORCED_REFRESH_GAP_S * 1000)))
        except redis.RedisError:
            return True

    async def _shared_list(
        self,
        conn: ServerConnection,
        method: str,
        force: bool,
        fetch: Callable[[CacheMode], Awaitable[list[T]]],
    ) -> list[T]:
        """List under a fleet-wide lock: one worker fetches, the rest read its cache entry."""
        hold = conn.settings.timeout_s * 2 + 5.0
        lock = self._ar.lock(
            f"{self._prefix}:tools:lock:{conn.name}:{method}",
            timeout=hold,
            blocking=False,
            thread_local=False,
        )
        try:
            acquired = bool(await lock.acquire())
        except redis.RedisError as exc:
            log.warning("mcp %s: no discovery lock (%s); listing without it", conn.name, exc)
            return await fetch("refresh" if force else "use")
        if acquired:
            try:
                return await fetch("refresh" if force else "use")
            finally:
                with contextlib.suppress(redis.RedisError):  # expired: the next lister goes ahead
                    await lock.release()
        deadline = time.monotonic() + hold
        with contextlib.suppress(redis.RedisError):
            # Polling: the lock lives in Redis, another process releases it.
            while time.monotonic() < deadline and await lock.locked():  # noqa: ASYNC110
                await asyncio.sleep(random.uniform(0.03, 0.08))
        # A cache hit now, unless the server forbids caching (ttlMs 0) or the winner failed.
        return await fetch("use")

    def _install(self, listing: ServerTools) -> None:
        with self._lock:
            listings = {**self._listings, listing.server: listing}
            self._publish(listings)
        log.info(
            "mcp %s: %d tools, %d resources (version %s)",
            listing.server,
            len(listing.tools),
            len(listing.resources),
            listing.version,
        )

    def _drop(self, server: str) -> None:
        with self._lock:
            listings = {k: v for k, v in self._listings.items() if k != server}
            self._publish(listings)

    def _publish(self, listings: dict[str, ServerTools]) -> None:
        index = {t.name: t for s in listings.values() for t in s.tools}
        owners: dict[str, list[str]] = {}
        for name in sorted(listings):
            for uri in listings[name].resources:
                owners.setdefault(uri, []).append(name)
        # Readers on pool threads see either the old maps or the new ones, never a mix.
        self._listings = listings
        self._index = index
        self._resource_servers = {uri: tuple(names) for uri, names in owners.items()}


def _reader(
    uri: str, timeout: float
) -> Callable[[ServerConnection], Awaitable[ReadResourceResult]]:
    def read(conn: ServerConnection) -> Awaitable[ReadResourceResult]:
        return conn.read_resource(uri, timeout)

    return read


def _denied(permit: Permit) -> str:
    wait = max(1, round(permit.retry_after_s))
    if permit.state == "half_open":
        return f"circuit half-open, another worker is probing; retry in {wait}s"
    return f"circuit open after repeated failures; retry in {wait}s"


def config_file_servers(
    path: str | Path, fallback: Mapping[str, MCPServerSettings]
) -> ServersSource:
    """The `[tools.servers]` of a config file, re-read when the file changes.

    A file that does not parse keeps the last good list (logged), so an operator's
    half-saved edit never disconnects the fleet.
    """
    file = Path(path)
    state: dict[str, Any] = {"mtime": None, "servers": dict(fallback)}

    def read() -> Mapping[str, MCPServerSettings]:
        try:
            mtime = file.stat().st_mtime_ns
        except OSError:
            return state["servers"]  # type: ignore[no-any-return]
        if mtime != state["mtime"]:
            state["mtime"] = mtime
            try:
                state["servers"] = dict(load_settings(file).tools.servers)
            except ConfigError as exc:
                log.warning("mcp registry: %s does not load, keeping its servers: %s", file, exc)
        return state["servers"]  # type: ignore[no-any-return]

    return read


def build_toolset(settings: Settings, client: redis.Redis) -> Toolset:
    """The worker's registry, started: connected to every configured server and listed.

    When `$SWARM_CONFIG` names the config file these settings came from, its server
    list is re-read on every refresh, so servers added to the file later join without a
    restart. Settings built some other way (their servers differ from the file's) are
    taken as they are.
    """
    path = os.environ.get("SWARM_CONFIG")
    source = config_file_servers(path, settings.tools.servers) if path else None
    if source is not None and dict(source()) != dict(settings.tools.servers):
        log.info("mcp registry: servers differ from %s; not watching that file", path)
        source = None
    registry = ToolRegistry(
        settings.tools,
        client,
        redis_url=settings.redis_url,
        key_prefix=settings.key_prefix,
        servers_source=source,
    )
    return registry.start()
