"""Discovery: keep one connection per configured server and its listing fresh, fleet-wide.

Runs on the registry's MCP loop thread. It makes the connections match the configured
servers (the config may change under a running worker), lists each server's tools and
resources into the `Catalog`, and decides when to list again:

- when the listing is `registry_ttl_s` old (a periodic tick),
- when the server says its list changed (the SDK evicts the shared cache entry first),
- when the model names a tool nobody knows (a forced refetch, at most one per server
  per `FORCED_REFRESH_GAP_S` in the whole fleet).

Listing goes through the SDK's response cache in Redis (`tools/cache.py`), so whoever
lists first serves everyone; a Redis lock per server and method makes fifty workers
booting together list once: the winner lists, the others wait for the lock to go and
read its entry. Each worker publishes what it holds (`Keys.tool_view`) for `swarm tools`.

Usage::

    discovery = Discovery(settings.tools, Catalog(), redis_url=url, keys=Keys(),
                          source=lambda: settings.tools.servers)
    await discovery.boot(wait_s=5)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
import redis.asyncio
from mcp import Client
from mcp.client.caching import CacheMode

from swarm_workers.config import ToolsSettings
from swarm_workers.keys import Keys
from swarm_workers.metrics import allow_tool_servers
from swarm_workers.tools.cache import RedisResponseCacheStore
from swarm_workers.tools.catalog import Catalog
from swarm_workers.tools.config_watch import ServersSource
from swarm_workers.tools.connections import ListKind, ServerConnection, ServerUnavailable
from swarm_workers.tools.listing import server_tools

__all__ = ["FORCED_REFRESH_GAP_S", "Discovery"]

log = logging.getLogger(__name__)

T = TypeVar("T")

FORCED_REFRESH_GAP_S = 5.0  # fleet-wide: one forced refetch per server per gap
LOCK_SLACK_S = 5.0  # the listing lock outlives two listing timeouts by this much


class Discovery:
    """The loop-thread half of the registry: connections, listings, refresh scheduling.

    Every coroutine runs on the registry's loop thread; `connection()` and
    `connections()` are plain dict reads, safe from pool threads.
    """

    def __init__(
        self,
        settings: ToolsSettings,
        catalog: Catalog,
        *,
        redis_url: str,
        keys: Keys,
        source: ServersSource,
        max_message_bytes: int,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._redis_url = redis_url
        self._keys = keys
        self._source = source
        self._max_message_bytes = max_message_bytes
        self._aredis: redis.asyncio.Redis | None = None
        self._connections: dict[str, ServerConnection] = {}
        self._discovered: dict[str, asyncio.Event] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # A refresh asked for while one runs: run once more after it (True: forced).
        self._again: dict[str, bool] = {}
        self._ticker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ from any thread

    def connection(self, server: str) -> ServerConnection | None:
        return self._connections.get(server)

    def connections(self) -> dict[str, ServerConnection]:
        """A copy: the loop thread adds and removes connections while others read."""
        return dict(self._connections)

    def refresh_budget(self, server: str | None) -> float:
        """The longest a refresh of `server` (or of all) can take: the lock, then a list."""
        servers = self._source()
        chosen = [servers[server]] if server is not None and server in servers else servers.values()
        return max((s.timeout_s for s in chosen), default=1.0) * 2 + LOCK_SLACK_S

    # ------------------------------------------------------------------ lifecycle

    async def boot(self, wait_s: float) -> None:
        """Connect to every server and wait (bounded) for their first listing."""
        self._aredis = redis.asyncio.Redis.from_url(self._redis_url)
        await self.sync_servers()
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

    async def shutdown(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*(c.close() for c in self._connections.values()))
        self._connections.clear()
        if self._aredis is not None:
            await self._aredis.aclose()

    # ------------------------------------------------------------------ scheduling

    async def refresh_now(self, server: str | None, force: bool) -> None:
        """Re-read the server list, then re-list `server` (or every server) and wait."""
        await self.sync_servers()
        names = [server] if server is not None else list(self._connections)
        tasks = [self._schedule(n, force=force, delay=0.0) for n in names if n in self._connections]
        if tasks:
            # Shielded: a caller that gives up must not cancel a refresh others share.
            await asyncio.gather(*(asyncio.shield(t) for t in tasks))

    async def sync_servers(self) -> None:
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
                    self._catalog.drop(name)
        for name, server_settings in wanted.items():
            if name in self._connections:
                continue
            log.info("mcp %s: connecting (%s)", name, server_settings.transport)
            self._discovered[name] = asyncio.Event()
            conn = ServerConnection(
                name,
                server_settings,
                store=RedisResponseCacheStore(self._ar, self._keys.prefix),
                default_ttl_ms=int(self._settings.registry_ttl_s * 1000),
                on_connected=self._on_connected,
                on_list_changed=self._on_list_changed,
                max_message_bytes=self._max_message_bytes,
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
                await self.sync_servers()
                now = time.time()
                for name, conn in list(self._connections.items()):
                    listing = self._catalog.listing(name)
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

    # ------------------------------------------------------------------ listing

    @property
    def _ar(self) -> redis.asyncio.Redis:
        assert self._aredis is not None, "Discovery.boot() first"
        return self._aredis

    async def _discover(
        self, conn: ServerConnection, *, client: Client | None, force: bool
    ) -> None:
        # The client before the listing lock (see `ServerConnection.connected`).
        listing_client = client if client is not None else await conn.connected()
        if force and not await self._take_forced_gap(conn.name):
            force = False  # someone in the fleet refetched a moment ago: read their entry
        conn.store.forget("tools/list")
        tools = await self._shared_list(
            conn, "tools/list", force, lambda mode: conn.list_tools(listing_client, mode)
        )
        cached_at = conn.store.stored_at("tools/list")
        resources = await self._shared_list(
            conn, "resources/list", force, lambda mode: conn.list_resources(listing_client, mode)
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
        self._catalog.install(listing)
        log.info(
            "mcp %s: %d tools, %d resources (version %s)",
            listing.server,
            len(listing.tools),
            len(listing.resources),
            listing.version,
        )
        try:
            await self._ar.set(
                self._keys.tool_view(conn.name),
                json.dumps(listing.view(conn.status, conn.last_error)),
                ex=max(60, int(self._settings.registry_ttl_s * 3)),
            )
        except redis.RedisError as exc:
            log.warning("mcp %s: cannot publish the view: %s", conn.name, exc)

    async def _take_forced_gap(self, server: str) -> bool:
        try:
            key = self._keys.tool_forced(server)
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
        hold = conn.settings.timeout_s * 2 + LOCK_SLACK_S
        lock = self._ar.lock(
            self._keys.tool_lock(conn.name, method),
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
