"""The package's one Redis client factory."""

from __future__ import annotations

import pytest
import redis.utils

from swarm_workers.redis_client import redis_client


def test_new_connections_do_not_search_the_package_metadata(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py reads its version from the installed metadata for every new connection
    unless given one (~0.8 ms of file-system search each; a 1,000-thread worker opens
    up to 1,000 as it starts)."""
    client = redis_client(redis_url, max_connections=8)
    searched: list[int] = []
    real = redis.utils.get_lib_version
    monkeypatch.setattr(redis.utils, "get_lib_version", lambda: searched.append(1) or real())
    try:
        pool = client.connection_pool
        connections = [pool.get_connection() for _ in range(5)]
        for connection in connections:
            connection.send_command("PING")
            assert connection.read_response() in (b"PONG", "PONG")
            pool.release(connection)
        assert searched == []
    finally:
        client.close()
