"""Child processes that are always stopped: for `swarm demo` and the test fixtures.

>>> with ProcessGroup() as group:                                # doctest: +SKIP
...     redis = group.spawn("redis", ["redis-server", "--port", "6399"])
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["ManagedProcess", "ProcessGroup", "free_port", "redis_server_argv", "wait_until"]


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_argv(binary: str, port: int, workdir: Path) -> list[str]:
    """A throwaway redis-server on loopback: nothing saved, enough clients for a fleet."""
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--maxclients",
        "10000",
    ]


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll `predicate` until it is true; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class ManagedProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path | None = None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def stop(self, grace: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


@dataclass
class ProcessGroup:
    """Starts processes and stops all of them, newest first, on exit."""

    log_dir: Path | None = None
    processes: list[ManagedProcess] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        log = (self.log_dir / f"{name}.log") if self.log_dir else None
        out = log.open("wb") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                list(argv),
                env={**os.environ, **(env or {})},
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        managed = ManagedProcess(name=name, proc=proc, log=log)
        self.processes.append(managed)
        return managed

    def stop_all(self) -> None:
        for managed in reversed(self.processes):
            managed.stop()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
