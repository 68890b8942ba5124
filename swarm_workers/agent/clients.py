"""The worker process's chat-completions client: each pool thread its own connection.

Two costs of the obvious design (one client, one shared pool, each call handed to a
helper thread so a cancel can leave it behind) showed in the profiles of a worker with
many calls in flight (bench/README.md, *Model calls in flight*):

- httpcore's shared pool scans every connection and waiting request under one lock on
  each request and each response close: a third of the CPU at 1,000 calls in flight;
- the hand-off to a helper thread and back: thread wake-ups, futures and callbacks on
  every call, ~8% of the CPU at 16 threads, and two threads per call.

Here the transport gives each thread a connection pool of its own (one connection, kept
alive), so there is nothing to scan or contend for, and the call runs on the task's own
thread. A cancel or a lost lease still ends a call at once: `cut(thread)` shuts that
thread's socket down from the thread that stops the task, and the blocked read fails.
Only that thread's connection can be cut, since no other thread ever uses it.

>>> from swarm_workers.config import LLMSettings
>>> llm = LLMClient(LLMSettings(base_url="http://127.0.0.1:8400/v1"), threads=4)
>>> llm.transport.limit, llm.openai.max_retries
(None, 0)
>>> llm.close()
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterable, Iterator

import httpcore2
import httpx2

from swarm_workers.agent.llm import build_llm_client
from swarm_workers.config import LLMSettings

__all__ = ["LLMClient", "ThreadConnections"]


class _RememberingBackend(httpcore2.SyncBackend):
    """Opens sockets as httpcore does, and remembers each thread's latest one."""

    def __init__(self) -> None:
        self.latest: dict[int, socket.socket] = {}

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.NetworkStream:
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        self.latest[threading.get_ident()] = stream.get_extra_info("socket")
        return stream


class _Released(httpx2.SyncByteStream):
    """A response body that gives its connection slot back when closed."""

    def __init__(self, stream: httpx2.SyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            if self._release is not None:
                self._release()
                self._release = None


class ThreadConnections(httpx2.HTTPTransport):
    """An httpx transport whose connection pool is per thread: one connection each.

    `limit` bounds the calls in flight across threads (a call waits up to its pool
    timeout for a slot, then fails as `PoolTimeout`); None: one per thread, no bound.
    """

    def __init__(self, *, limit: int | None, keepalive_expiry_s: float = 5.0) -> None:
        # Not super().__init__(): that builds one shared pool; ours are made per thread.
        self.limit = limit
        self._ssl = httpx2.create_ssl_context()  # one for every thread: they are costly
        self._backend = _RememberingBackend()
        self._keepalive_expiry_s = keepalive_expiry_s
        self._mine = threading.local()
        self._pools: list[httpcore2.ConnectionPool] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(limit) if limit is not None else None

    @property
    def _pool(self) -> httpcore2.ConnectionPool:  # type: ignore[override]
        """This thread's pool (httpx's `handle_request` sends through `self._pool`)."""
        pool: httpcore2.ConnectionPool | None = getattr(self._mine, "pool", None)
        if pool is None:
            pool = httpcore2.ConnectionPool(
                ssl_context=self._ssl,
                max_connections=1,
                max_keepalive_connections=1,
                keepalive_expiry=self._keepalive_expiry_s,
                network_backend=self._backend,
            )
            self._mine.pool = pool
            with self._lock:
                self._pools.append(pool)
        return pool

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._slots is None:
            return super().handle_request(request)
        timeouts = request.extensions.get("timeout", {})
        if not self._slots.acquire(timeout=timeouts.get("pool")):
            raise httpx2.PoolTimeout(f"all {self.limit} llm.max_connections in use")
        try:
            response = super().handle_request(request)
        except BaseException:
            self._slots.release()
            raise
        assert isinstance(response.stream, httpx2.SyncByteStream)
        response.stream = _Released(response.stream, self._slots.release)
        return response

    def cut(self, thread: int) -> None:
        """End `thread`'s call now: its socket is shut down, its read fails."""
        sock = self._backend.latest.get(thread)
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed: nothing in flight on it
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, []
        for pool in pools:
            pool.close()


class LLMClient:
    """The process's `openai` client (no SDK retries) over `ThreadConnections`.
    `llm.max_connections` below the pool's threads bounds the calls in flight."""

    def __init__(self, settings: LLMSettings, threads: int) -> None:
        cap = settings.max_connections
        self.transport = ThreadConnections(limit=cap if cap is not None and cap < threads else None)
        self.openai = build_llm_client(settings, self.transport)

    def cutter(self) -> Callable[[], None]:
        """What ends the calling thread's model call from another thread."""
        thread = threading.get_ident()
        return lambda: self.transport.cut(thread)

    def close(self) -> None:
        self.openai.close()
        self.transport.close()
