"""The Redis ResponseCacheStore under the SDK's own cache coordinator, on a real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import redis
import redis.asyncio
from mcp.client.caching import CacheEntry, CacheKey, ClientResponseCache
from mcp.types import ListToolsResult, Tool

from swarm_workers.config import MCPServerSettings
from swarm_workers.tools.cache import RedisResponseCacheStore, credential_partition, target_id

MODERN = "2026-07-28"


def _listing(scope: Literal["public", "private"], ttl_ms: int = 60_000) -> ListToolsResult:
    tool = Tool(name="search", input_schema={"type": "object", "properties": {}})
    return ListToolsResult(tools=[tool], ttl_ms=ttl_ms, cache_scope=scope)


def _coordinator(
    store: RedisResponseCacheStore, partition: str, version: str = MODERN
) -> ClientResponseCache:
    """What `Client.__post_init__` builds (client.py:419), for one server and credential."""
    return ClientResponseCache(
        store=store,
        partition=partition,
        arm_id=hashlib.sha256(b"http://127.0.0.1:1/mcp").hexdigest(),
        default_ttl_ms=0,
        clock=time.time,
        share_public=True,
        negotiated_version=lambda: version,
    )


def _run(redis_url: str, body: Callable[[redis.asyncio.Redis], Awaitable[None]]) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            await body(client)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_round_trip_keeps_the_model_and_expires_in_redis(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    async def body(client: redis.asyncio.Redis) -> None:
        store = RedisResponseCacheStore(client, "swarm")
        key = CacheKey("tools/list", "", '["private","2026-07-28","arm","p"]')
        await store.set(key, CacheEntry(_listing("private"), "private", time.time() + 0.3))
        entry = await store.get(key)
        assert entry is not None
        assert isinstance(entry.value, ListToolsResult)
        assert entry.value.tools[0].name == "search"
        assert entry.scope == "private"
        assert store.stored_at("tools/list") is not None
        await asyncio.sleep(0.4)
        assert await store.get(key) is None  # Redis expired it (PX)

    _run(redis_url, body)


def test_wrong_shape_is_a_miss_not_an_error(redis_url: str, redis_conn: redis.Redis) -> None:
    async def body(client: redis.asyncio.Redis) -> None:
        store = RedisResponseCacheStore(client, "swarm")
        key = CacheKey("tools/list", "", "x")
        await client.set(store._key(key), b'{"method": "tools/list", "value": 3}')
        assert await store.get(key) is None
        assert await client.get(store._key(key)) is None

    _run(redis_url, body)


def test_private_entries_stay_with_their_credential(redis_url: str) -> None:
    async def body(client: redis.asyncio.Redis) -> None:
        store = RedisResponseCacheStore(client, "swarm")
        alice, bob = _coordinator(store, "cred-alice"), _coordinator(store, "cred-bob")
        alice_again = _coordinator(RedisResponseCacheStore(client, "swarm"), "cred-alice")
        await alice.write(
            "tools/list", "", _listing("private"), alice.capture("tools/list", ""), "use"
        )
        assert await alice_again.read("tools/list", "") is not None  # another worker, same key
        assert await bob.read("tools/list", "") is None  # another credential

    _run(redis_url, body)


def test_public_entries_serve_every_credential(redis_url: str) -> None:
    async def body(client: redis.asyncio.Redis) -> None:
        store = RedisResponseCacheStore(client, "swarm")
        alice, bob = _coordinator(store, "cred-alice"), _coordinator(store, "cred-bob")
        await alice.write(
            "tools/list", "", _listing("public"), alice.capture("tools/list", ""), "use"
        )
        served = await bob.read("tools/list", "")
        assert served is not None

    _run(redis_url, body)


def test_ttl_zero_is_not_stored_and_eras_do_not_mix(redis_url: str) -> None:
    async def body(client: redis.asyncio.Redis) -> None:
        store = RedisResponseCacheStore(client, "swarm")
        modern = _coordinator(store, "p")
        await modern.write(
            "tools/list", "", _listing("public", ttl_ms=0), modern.capture("tools/list", ""), "use"
        )
        assert await modern.read("tools/list", "") is None
        await modern.write(
            "tools/list", "", _listing("public"), modern.capture("tools/list", ""), "use"
        )
        handshake = _coordinator(store, "p", version="2025-11-25")
        assert await handshake.read("tools/list", "") is None

    _run(redis_url, body)


def test_partition_comes_from_the_credential_only() -> None:
    server = MCPServerSettings(url="http://u:pw@127.0.0.1:9/mcp", bearer_token_env="TOKEN")
    a = credential_partition(server, {"TOKEN": "alpha"})
    assert a == credential_partition(server, {"TOKEN": "alpha"})
    assert a != credential_partition(server, {"TOKEN": "beta"})
    assert "alpha" not in a
    plain = MCPServerSettings(url="http://127.0.0.1:9/mcp")
    assert credential_partition(plain, {}) == "anonymous"
    assert target_id(server) == "http://127.0.0.1:9/mcp"  # userinfo stays out of the identity
    stdio = MCPServerSettings(transport="stdio", command="srv", env={"KEY": "k1"})
    other = MCPServerSettings(transport="stdio", command="srv", env={"KEY": "k2"})
    assert credential_partition(stdio, {}) != credential_partition(other, {})
