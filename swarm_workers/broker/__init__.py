"""kombu's Redis transport, with a message taken and recorded in one step.

kombu's Redis channel takes a message with BRPOP, and only when the reply has reached
the worker does it record the message in `unacked` (a second round trip, `QoS.append`).
A worker killed, or a connection lost, between the two has taken the message out of
Redis and written it nowhere: no visibility timeout brings it back (docs/reliability.md,
finding 3). This channel takes with `take.lua` instead, which pops the message and
writes the same `unacked` record in one script. The record is kombu's own, so kombu's
ack, reject, restore and visibility timeout work on it unchanged.

A script cannot block, so an empty channel waits on the queues' *bells*: a list beside
each queue (`keys.queue_bell`, at most one element) that every publish through this
transport rings in the same transaction as its LPUSH, and that `take.lua` rings when it
leaves messages behind, to wake the next idle consumer. The wait is a BRPOP on the bells
with kombu's `brpop_timeout` (1 s), so a message pushed without a ring (by a producer
that does not use this transport) waits at most that long.

It also keeps one redis-py client per channel for commands. kombu's channel builds a new
`redis.Redis` for each command it sends outside its BRPOP connection
(`Channel._create_client`): every ack. The constructor is costly and runs on the worker's
consumer thread, the one thread every message of the process passes through
(bench/README.md, *Model calls in flight*). A `redis.Redis` is safe to share between
threads, so the channel keeps one, rebuilt when kombu replaces the pool after a lost
connection.

Celery selects it with `broker_transport` (`celery_app.py`); the broker URL stays
`redis://`, and the messages on the queues are kombu's.
"""

from __future__ import annotations

import logging
from importlib import resources
from queue import Empty
from time import monotonic
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from swarm_workers.keys import queue_bell, queue_undecodable

__all__ = ["Channel", "QoS", "Transport", "ring_bell"]

log = logging.getLogger(__name__)

_TAKE = resources.files(__package__).joinpath("take.lua").read_text()


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        channel: Channel = self.channel
        if channel._recorded == delivery_tag:
            # take.lua recorded it with the pop: only the channel's own bookkeeping.
            virtual.QoS.append(self, message, delivery_tag)
        else:  # a basic_get: kombu's record, as before
            super().append(message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    _commands: redis.Redis | None = None
    _take_sha: str | None = None
    _recorded: str | None = None  # the tag take.lua just recorded, until QoS.append
    # The last take found every queue empty: the channel waits on the bells (sent, or
    # next to send) until they ring or the wait runs out.
    _on_bells = False

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the BRPOP/pub-sub client: kombu keeps that one itself
            return super()._create_client(asynchronous=True)
        client = self._commands
        if client is None or client.connection_pool is not self.pool:
            client = self._commands = super()._create_client()
        return client

    # ----------------------------------------------------------------- consuming

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self.global_keyprefix:
            # kombu prefixes each command's keys itself; the script's are not.
            super()._brpop_start(timeout)
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        client = self.client
        if self._take_sha is None:
            # On the BRPOP connection, idle here: nothing is in flight on it.
            self._take_sha = client.script_load(_TAKE)
        connection = client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # kombu declares None
        if self._on_bells:
            wait = self.brpop_timeout if timeout is None else timeout
            connection.send_command("BRPOP", *[queue_bell(k) for k in keys], wait or 0)
        else:
            script_keys = [self.unacked_key, self.unacked_index_key]
            for key in keys:
                script_keys += [key, queue_bell(key), queue_undecodable(key)]
            connection.send_command("EVALSHA", self._take_sha, len(script_keys), *script_keys)

    def _brpop_read(self, **options: Any) -> bool:
        if self.global_keyprefix:
            return bool(super()._brpop_read(**options))
        bells = self._on_bells
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, "BRPOP" if bells else "EVALSHA", **options
                )
            except self.connection_errors:
                # As kombu: disconnect, so the next round reconnects.
                self.client.connection.disconnect()
                raise
            except redis.exceptions.NoScriptError:
                self._take_sha = None  # Redis restarted or flushed its scripts: load again
                raise Empty() from None
            if bells:
                self._on_bells = False  # rung, or the wait ran out: take next
                raise Empty()
            if not reply:
                self._on_bells = True
                raise Empty()
            dest, payload = reply
            queue = bytes_to_str(dest)
            if payload is None:
                log.error(
                    "broker: a message on %s is not a kombu message; moved to %s",
                    queue,
                    queue_undecodable(queue),
                )
                raise Empty()
            message = loads(bytes_to_str(payload))
            self._queue_cycle.rotate(queue)
            self._recorded = message["properties"]["delivery_tag"]
            try:
                self.connection._deliver(message, queue)
            finally:
                self._recorded = None
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu declares bool
            self._flush_brpop_reauth()

    # ----------------------------------------------------------------- publishing

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """kombu's LPUSH, with the queue's bell rung in the same transaction."""
        batch = kwargs.get("_publish_batch")
        key = self._q_for_pri(queue, self._priority(message))
        expires = self._expires.get(queue)
        if batch is not None or self.global_keyprefix:
            super()._put(queue, message, **kwargs)
            if batch is not None and not self.global_keyprefix:
                ring_bell(batch, key, expires)
            return
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            pipe.lpush(key, dumps(message))
            if expires is not None:
                for pri in self.priority_steps:
                    pipe.pexpire(self._q_for_pri(queue, pri), expires)
            ring_bell(pipe, key, expires)
            pipe.execute()

    def _delete(
        self, queue: str, exchange: str, routing_key: str, pattern: str, *args: Any, **kwargs: Any
    ) -> None:
        """kombu's delete, and the queue's bells with it (its undecodable list stays)."""
        super()._delete(queue, exchange, routing_key, pattern, *args, **kwargs)
        if not self.global_keyprefix:
            with self.conn_or_acquire(client=kwargs.get("client")) as client:
                client.delete(*[queue_bell(self._q_for_pri(queue, p)) for p in self.priority_steps])

    def _do_restore_message(
        self, payload: Any, exchange: str, routing_key: str, pipe: Any, leftmost: bool = False
    ) -> None:
        """kombu's restore (a redelivery, or the visibility timeout), ringing the bells."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        if not self.global_keyprefix:
            for queue in self._lookup(exchange, routing_key):
                ring_bell(pipe, self._q_for_pri(queue, self._priority(payload)))

    def _priority(self, message: Any) -> int:
        return int(self._get_message_priority(message, reverse=False))


def ring_bell(pipe: Any, queue_key: str, expires_ms: int | None = None) -> None:
    """Ring `queue_key`'s bell: one element at most, however often it rings. A queue
    kombu gave an expiry (a reply queue) gives its bell the same one."""
    pipe.lpush(queue_bell(queue_key), 1)
    pipe.ltrim(queue_bell(queue_key), 0, 0)
    if expires_ms is not None:
        pipe.pexpire(queue_bell(queue_key), expires_ms)


class Transport(kombu_redis.Transport):
    Channel = Channel
