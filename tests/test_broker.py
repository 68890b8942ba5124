"""The fleet's kombu transport: a message taken and recorded in one step, bells for
idle consumers, and one command client per channel."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
from typing import Any

import kombu
import pytest
import redis

from swarm_workers import broker
from swarm_workers.celery_app import create_app
from swarm_workers.config import load_settings
from swarm_workers.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, queue_bell, queue_undecodable
from swarm_workers.localfleet import wait_until


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


# ---------------------------------------------------------------- take and record


def _consumer(redis_url: str, queue: str, **options: object) -> tuple[kombu.Connection, Any]:
    """A kombu connection on the fleet's transport, its channel consuming `queue`."""
    transport_options = {"queue_order_strategy": "sorted", "priority_steps": [0], **options}
    connection = kombu.Connection(
        redis_url, transport="swarm_workers.broker:Transport", transport_options=transport_options
    )
    channel = connection.default_channel
    channel.queue_declare(queue=queue)
    return connection, channel


def _publish(connection: kombu.Connection, queue: str, body: dict[str, Any]) -> None:
    with connection.Producer() as producer:
        producer.publish(body, routing_key=queue, serializer="json")


def test_a_message_taken_is_recorded_in_the_same_step(redis_url: str) -> None:
    """The consumer's connection is lost right after the take reached Redis, before the
    reply was read: the message is in `unacked` (kombu's BRPOP left it nowhere), and
    kombu's restore puts it back on its queue."""
    queue = "p1.window"
    connection, channel = _consumer(redis_url, queue)
    raw = redis.Redis.from_url(redis_url)
    try:
        _publish(connection, queue, {"n": 1})
        channel.basic_consume(
            queue, no_ack=False, consumer_tag="test", callback=lambda message: None
        )
        assert raw.llen(queue) == 1
        channel.connection.cycle._register_BRPOP(channel)  # sent; the worker dies unread
        wait_until(lambda: raw.llen(queue) == 0, 5, "the take to run")
        channel.client.connection.disconnect()

        (tag,) = raw.hkeys(KOMBU_UNACKED)
        assert raw.zscore(KOMBU_UNACKED_INDEX, tag) is not None
        message, exchange, routing_key = json.loads(raw.hget(KOMBU_UNACKED, tag))
        assert (exchange, routing_key) == ("", queue)
        assert json.loads(base64.b64decode(message["body"])) == {"n": 1}
        # What the visibility timeout does, here at once: back on the queue, once.
        channel.qos.restore_by_tag(tag)
        assert raw.llen(queue) == 1
        assert raw.hlen(KOMBU_UNACKED) == 0
    finally:
        connection.release()
        raw.close()


def test_a_publish_wakes_an_idle_consumer_at_once(redis_url: str) -> None:
    """An empty channel waits on its queues' bells. With the wait's own timeout far
    longer than the test waits, only the publish's ring can deliver the message."""
    queue = "p0.bells"
    connection, channel = _consumer(redis_url, queue, brpop_timeout=60)
    received: list[Any] = []
    try:
        channel.basic_consume(queue, no_ack=False, consumer_tag="test", callback=received.append)
        with pytest.raises(socket.timeout):
            connection.drain_events(timeout=0.5)  # empty: now asleep on the bell
        publisher = kombu.Connection(redis_url, transport="swarm_workers.broker:Transport")
        try:
            _publish(publisher, queue, {"n": 2})
        finally:
            publisher.release()
        connection.drain_events(timeout=10)
        assert len(received) == 1
        assert received[0].delivery_info["routing_key"] == queue
    finally:
        connection.release()


def test_a_message_pushed_without_a_ring_waits_at_most_the_bell_timeout(
    redis_url: str,
) -> None:
    queue = "p2.silent"
    connection, channel = _consumer(redis_url, queue, brpop_timeout=1)
    received: list[Any] = []
    raw = redis.Redis.from_url(redis_url)
    try:
        channel.basic_consume(queue, no_ack=False, consumer_tag="test", callback=received.append)
        with pytest.raises(socket.timeout):
            connection.drain_events(timeout=0.5)
        # A producer that writes the list itself, as kombu's own transport would.
        _publish_raw(raw, queue, {"n": 3})
        _drain(connection, received, 1)
        assert len(received) == 1
    finally:
        connection.release()
        raw.close()


def test_a_message_that_is_not_kombus_is_kept_aside_and_the_next_is_taken(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = "p1.garbled"
    connection, channel = _consumer(redis_url, queue)
    received: list[Any] = []
    raw = redis.Redis.from_url(redis_url)
    try:
        raw.lpush(queue, b"not json at all")
        _publish(connection, queue, {"n": 4})
        channel.basic_consume(queue, no_ack=False, consumer_tag="test", callback=received.append)
        _drain(connection, received, 1)
        assert [m.decode() for m in received] == [{"n": 4}]
        assert raw.lrange(queue_undecodable(queue), 0, -1) == [b"not json at all"]
        assert "is not a kombu message" in caplog.text
    finally:
        connection.release()
        raw.close()


def _drain(connection: kombu.Connection, received: list[Any], count: int) -> None:
    """Drain events until `count` messages are received, for at most 10 s."""
    deadline = time.monotonic() + 10
    while len(received) < count and time.monotonic() < deadline:
        with contextlib.suppress(socket.timeout):
            connection.drain_events(timeout=1)


def _publish_raw(client: redis.Redis, queue: str, body: dict[str, Any]) -> None:
    """The envelope kombu's Redis transport writes, LPUSHed without a ring."""
    envelope = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {},
        "properties": {
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": "raw-1",
        },
    }
    client.lpush(queue, json.dumps(envelope))


def test_a_reply_queues_bell_expires_with_it_and_a_deleted_queue_takes_its_bell(
    redis_url: str,
) -> None:
    """Celery's reply queues (`<oid>.reply.celery.pidbox`) are one per client and expire:
    their bells must not outlive them, one key per client forever."""
    connection = kombu.Connection(redis_url, transport="swarm_workers.broker:Transport")
    raw = redis.Redis.from_url(redis_url)
    try:
        channel = connection.default_channel
        channel.queue_declare(queue="c1.reply", arguments={"x-expires": 60_000})
        _publish(connection, "c1.reply", {"n": 5})
        assert 0 < raw.pttl(queue_bell("c1.reply")) <= 60_000
        gone = kombu.Queue("p2.gone", kombu.Exchange("gone"), routing_key="p2.gone")(channel)
        gone.declare()
        with connection.Producer() as producer:
            producer.publish({"n": 6}, exchange="gone", routing_key="p2.gone", serializer="json")
        assert raw.exists("p2.gone", queue_bell("p2.gone")) == 2
        gone.delete()
        assert not raw.exists("p2.gone", queue_bell("p2.gone"))
    finally:
        connection.release()
        raw.close()


def test_a_consumer_loads_the_take_script_again_after_redis_forgets_it(redis_url: str) -> None:
    """SCRIPT FLUSH (or a new primary that never saw the script) between two takes."""
    queue = "p1.flushed"
    connection, channel = _consumer(redis_url, queue)
    received: list[Any] = []
    raw = redis.Redis.from_url(redis_url)
    try:
        channel.basic_consume(queue, no_ack=False, consumer_tag="test", callback=received.append)
        _publish(connection, queue, {"n": 7})
        connection.drain_events(timeout=10)
        raw.script_flush()
        _publish(connection, queue, {"n": 8})
        _drain(connection, received, 2)
        assert [m.decode() for m in received] == [{"n": 7}, {"n": 8}]
    finally:
        connection.release()
        raw.close()
