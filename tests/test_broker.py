"""The fleet's kombu transport: kombu's Redis channel, one command client per channel."""

from __future__ import annotations

from swarm_workers import broker
from swarm_workers.celery_app import create_app
from swarm_workers.config import load_settings


def test_the_channel_keeps_one_client_until_kombu_replaces_its_pool(redis_url: str) -> None:
    app = create_app(load_settings(None, redis_url=redis_url))
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            assert isinstance(channel, broker.Channel)
            first = channel._create_client()
            assert channel._create_client() is first  # not one per ack
            assert first.ping()
            channel._pool = None  # what kombu does when the connection is lost
            again = channel._create_client()
            assert again is not first
            assert again.connection_pool is channel.pool
            assert channel._create_client(asynchronous=True) is not again
    finally:
        app.close()
