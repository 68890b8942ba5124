"""kombu's Redis transport, with one redis-py client per channel instead of one per command.

kombu's Redis channel builds a new `redis.Redis` for each command it sends outside its
BRPOP connection (`Channel._create_client`): the `unacked` record of every delivered
message and every ack. The connections come from the channel's pool, but the client's
constructor is costly (it inspects its arguments and reads the installed redis-py's
metadata), and it runs on the worker's consumer thread, the one thread every message of
the process passes through: at 1,000 calls in flight it was a tenth of that thread's
time (bench/README.md, *Model calls in flight*). A `redis.Redis` is safe to share
between threads (each command takes a connection from the pool), so the channel keeps
one, rebuilt when kombu replaces the pool after a lost connection.

Celery selects it with `broker_transport` (`celery_app.py`); the broker URL stays
`redis://`. Everything else, the wire format included, is kombu's own.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

__all__ = ["Channel", "Transport"]


class Channel(kombu_redis.Channel):
    _commands: redis.Redis | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the BRPOP/pub-sub client: kombu keeps that one itself
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._commands
        if client is None or client.connection_pool is not self.pool:
            client = self._commands = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
