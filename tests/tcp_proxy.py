"""A loopback TCP proxy that cuts every connection on demand: a flaky network in a test.

Clients connect to `proxy.port`; each connection is relayed to the upstream port on
127.0.0.1 by two threads. `cut()` resets every open connection at once (both sides
see the socket die, as after a failover or a NAT timeout); `cut_every(0.5)` does it
on a timer until `stop_cutting()`. New connections are accepted throughout.

Usage::

    with TcpProxy(6379) as proxy:
        redis.Redis(port=proxy.port).ping()
        proxy.cut()
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

__all__ = ["TcpProxy"]

_CHUNK = 65536


class TcpProxy:
    """Relays 127.0.0.1:`port` to 127.0.0.1:`upstream_port` until closed."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = threading.Event()
        self._stop_cutting = threading.Event()
        self._cutter: threading.Thread | None = None
        self.connections = 0  # accepted so far
        self.cuts = 0  # connections reset by cut()
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    # ----------------------------------------------------------------- faults

    def cut(self) -> int:
        """Reset every open connection (RST, not FIN); returns how many were cut."""
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            _reset(sock)
        self.cuts += len(sockets) // 2
        return len(sockets) // 2

    def cut_every(self, interval_s: float) -> None:
        """Cut every connection every `interval_s` seconds until `stop_cutting()`."""
        self._stop_cutting.clear()

        def loop() -> None:
            while not self._stop_cutting.wait(interval_s):
                self.cut()

        self._cutter = threading.Thread(target=loop, name="proxy-cutter", daemon=True)
        self._cutter.start()

    def stop_cutting(self) -> None:
        self._stop_cutting.set()
        if self._cutter is not None:
            self._cutter.join(5)
            self._cutter = None

    # ----------------------------------------------------------------- relay

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)  # upstream down: the client sees a refused-like reset
                continue
            with self._lock:
                if self._closed.is_set():
                    _reset(client)
                    _reset(upstream)
                    return
                self._open.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._open.discard(src)
            self._open.discard(dst)
        _reset(src)
        _reset(dst)

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self.stop_cutting()
        self._closed.set()
        self._listener.close()
        self.cut()
        self._acceptor.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST: SO_LINGER 0 drops unsent data, as a broken network would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)  # wakes a thread blocked in recv; sends nothing
    sock.close()
