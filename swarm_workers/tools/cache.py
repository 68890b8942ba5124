"""The MCP SDK's response cache, stored in Redis so one worker's listing serves the fleet.

The SDK (`mcp.client.caching`) already does the hard parts: it keys entries by method,
server identity, negotiated protocol era and authorization partition, honours the
server's `ttlMs`/`cacheScope` hints on 2026-07-28 connections, evicts on list-changed
notifications and guards the refetch race. It only needs somewhere to put entries: a
`ResponseCacheStore`. This one is Redis, so when worker A lists a server's tools, worker
B's `Client.list_tools()` is a cache hit and never reaches the server.

Two rules from the SDK's contract matter here:
- a serialising store must round-trip `value` to the result model (a wrong shape is a
  miss), so each entry records the method and is revalidated with its result type;
- `CacheConfig.partition` isolates "private" entries and must come from a verified
  credential, never request data: `credential_partition` hashes the bearer token,
  configured headers or stdio environment, so two principals never share a private entry.

Usage::

    store = RedisResponseCacheStore(redis.asyncio.Redis(), "swarm")
    CacheConfig(store=store, partition=credential_partition(server), target_id=target_id(server))

"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
from mcp.client.caching import CacheEntry, CacheKey
from mcp.types import (
    ListPromptsResult,
    ListResourcesResult,
    ListResourceTemplatesResult,
    ListToolsResult,
    ReadResourceResult,
    Result,
)
from pydantic import ValidationError

from swarm_workers.config import MCPServerSettings
from swarm_workers.keys import Keys

__all__ = ["RedisResponseCacheStore", "credential_partition", "server_url", "target_id"]

log = logging.getLogger(__name__)

# The SDK's cacheable methods and the result model each one round-trips to.
_RESULT_TYPES: dict[str, type[Result]] = {
    "tools/list": ListToolsResult,
    "resources/list": ListResourcesResult,
    "resources/templates/list": ListResourceTemplatesResult,
    "prompts/list": ListPromptsResult,
    "resources/read": ReadResourceResult,
}


class RedisResponseCacheStore:
    """`mcp.client.caching.ResponseCacheStore` on Redis; entries expire with their TTL.

    Usage::

        Client(url, cache=CacheConfig(store=RedisResponseCacheStore(aredis, "swarm"),
                                      partition="cred-1f2e"))

    Use one instance per `Client` (per server connection): `stored_at(method)` then
    tells the registry how old the listing it was just served is, for `swarm tools`.
    """

    def __init__(self, client: redis.asyncio.Redis, key_prefix: str) -> None:
        self._redis = client
        self._keys = Keys(key_prefix)
        self._stored_at: dict[tuple[str, str], float] = {}

    def _key(self, key: CacheKey) -> str:
        # The SDK says: compare keys as the field tuple, never a flattened string.
        # Hashing the JSON array of the fields keeps them apart and the key short.
        digest = hashlib.sha256(json.dumps([key.method, key.params_key, key.partition]).encode())
        return self._keys.mcp_cache(digest.hexdigest())

    async def get(self, key: CacheKey) -> CacheEntry | None:
        raw = await self._redis.get(self._key(key))
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            model = _RESULT_TYPES[doc["method"]]
            if doc["method"] != key.method or doc["scope"] not in ("public", "private"):
                return None
            value = model.model_validate(doc["value"], by_name=False)
        except (ValueError, KeyError, TypeError, ValidationError):
            log.warning("mcp cache: dropping an unreadable entry for %s", key.method)
            await self._redis.delete(self._key(key))
            return None
        self._stored_at[(key.method, key.params_key)] = float(doc.get("stored_at", 0.0))
        return CacheEntry(value=value, scope=doc["scope"], expires_at=doc["expires_at"])

    async def set(self, key: CacheKey, entry: CacheEntry) -> None:
        if entry.expires_at is None or key.method not in _RESULT_TYPES:
            return  # never fresh, or not a result type we can read back
        ttl_ms = int((entry.expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        now = time.time()
        value: Any = entry.value.model_dump(mode="json", by_alias=True, exclude_unset=True)
        doc = {
            "method": key.method,
            "params_key": key.params_key,
            "scope": entry.scope,
            "expires_at": entry.expires_at,
            "stored_at": now,
            "value": value,
        }
        await self._redis.set(self._key(key), json.dumps(doc), px=ttl_ms)
        self._stored_at[(key.method, key.params_key)] = now

    async def delete(self, key: CacheKey) -> None:
        await self._redis.delete(self._key(key))

    async def clear(self) -> None:
        """Delete every entry of this key prefix (the whole fleet's cache)."""
        async for name in self._redis.scan_iter(match=self._keys.mcp_cache_pattern(), count=500):
            await self._redis.delete(name)

    def forget(self, method: str, params_key: str = "") -> None:
        """Clear the observation, so a listing that was not cached reads as None."""
        self._stored_at.pop((method, params_key), None)

    def stored_at(self, method: str, params_key: str = "") -> float | None:
        """Epoch seconds the entry last served or written through this store was stored."""
        return self._stored_at.get((method, params_key))


def server_url(settings: MCPServerSettings) -> str:
    """The server's URL without userinfo: credentials belong in the partition, not here."""
    assert settings.url is not None
    parts = urlsplit(settings.url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def target_id(settings: MCPServerSettings) -> str:
    """The server identity cache entries are filed under; the same on every worker.

    The SDK derives it from a URL itself, but we hand it a configured transport
    (headers, limits) or stdio parameters, and then it must be given (client.py:411).
    Two configured names for the same URL share entries, as they should.
    """
    if settings.transport == "http":
        return server_url(settings)
    return "stdio:" + json.dumps(
        [settings.command, list(settings.args), sorted(settings.env.items())], separators=(",", ":")
    )


def credential_partition(settings: MCPServerSettings, env: Mapping[str, str] | None = None) -> str:
    """The authorization context of this connection: a hash of its credentials.

    Bearer token (read from the env var the config names), configured headers,
    URL userinfo and, for stdio, the child's environment. Servers configured with
    the same credentials share private entries; different credentials never do.
    """
    environ = os.environ if env is None else env
    material: list[list[str]] = []
    if settings.bearer_token_env:
        material.append(["bearer", environ.get(settings.bearer_token_env, "")])
    material.extend(["header", k.lower(), v] for k, v in sorted(settings.headers.items()))
    if settings.transport == "http" and settings.url and "@" in urlsplit(settings.url).netloc:
        material.append(["userinfo", urlsplit(settings.url).netloc.rpartition("@")[0]])
    if settings.transport == "stdio":
        material.extend(["env", k, v] for k, v in sorted(settings.env.items()))
    if not material:
        return "anonymous"
    return "cred-" + hashlib.sha256(json.dumps(material).encode()).hexdigest()[:32]
