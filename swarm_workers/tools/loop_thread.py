"""An asyncio loop on a daemon thread, for blocking callers (Celery's threads pool).

The `mcp` SDK is async and Celery's pool threads are not: one loop per process owns
every MCP session, and pool threads hand it coroutines and wait with a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoopThread:
    """An asyncio loop on a daemon thread; other threads run coroutines on it and wait.

    >>> loop = LoopThread("mcp"); loop.start()
    >>> loop.run(asyncio.sleep(0, "ok"), timeout=1)
    'ok'
    >>> loop.stop()
    """

    def __init__(self, name: str = "mcp-loop") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the loop thread is not running")
        return self._loop

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()
        self._started.wait()

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coro` on the loop; TimeoutError (and the coroutine cancelled) past `timeout`."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called from the loop thread itself (deadlock)")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout:.1f}s") from None

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what still runs on the loop, then stop the thread."""
        if self._loop is None or self._thread is None:
            return
        loop = self._loop

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=timeout) if tasks else None

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout + 1)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("mcp loop: some tasks did not stop within %.0fs", timeout)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        self._thread = None
        self._loop = None
