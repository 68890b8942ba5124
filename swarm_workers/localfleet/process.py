"""Child processes that are always stopped: SIGTERM, then SIGKILL after a grace.

>>> with ProcessGroup() as group:
...     sleeper = group.spawn("sleeper", ["sleep", "30"])
...     sleeper.alive
True
>>> sleeper.alive
False
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from swarm_workers.localfleet.environment import child_env

__all__ = ["ManagedProcess", "ProcessExited", "ProcessGroup", "free_port", "wait_until"]

DEFAULT_GRACE_S = 20.0


class ProcessExited(RuntimeError):
    """A child died while we waited for it to become ready; carries its log's tail."""

    def __init__(self, name: str, code: int | None, tail: str) -> None:
        super().__init__(f"{name} exited with {code} before it was ready:\n{tail}")
        self.name = name
        self.code = code


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    """One child: its argv and whole environment are fixed, so it can be restarted.

    `env` is the complete environment (see `child_env`); output goes to `log`
    (appended across restarts) or nowhere.

    >>> proc = ManagedProcess("sleeper", ("sleep", "30"), env=child_env()).start()
    >>> proc.stop(grace=5)
    -15
    """

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=child_env)
    cwd: Path | None = None
    log: Path | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        out = self.log.open("ab") if self.log else None
        try:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        finally:
            if out:
                out.close()
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap: the process vanishes, as a crashed dependency does."""
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, grace: float = DEFAULT_GRACE_S) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds. The exit code (None: never started)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def wait_ready(
        self, predicate: Callable[[], bool], timeout: float, what: str | None = None
    ) -> None:
        """Poll `predicate`; ProcessExited at once if the process dies meanwhile.

        A process that is not ready in time is stopped: a failed start leaves nothing.
        """

        def ready() -> bool:
            if not self.alive:
                code = self.popen.returncode if self.popen else None
                raise ProcessExited(self.name, code, self.output()[-3000:])
            return predicate()

        try:
            wait_until(ready, timeout, what or self.name)
        except BaseException:
            self.stop(grace=5)
            raise


@dataclass
class ProcessGroup:
    """Starts processes and stops all of them, newest first, on exit."""

    log_dir: Path | None = None
    grace: float = DEFAULT_GRACE_S
    processes: list[ManagedProcess] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start `argv` with `child_env(env)`: the allowlist plus `env`, nothing else."""
        managed = ManagedProcess(
            name, tuple(argv), env=child_env(env), cwd=cwd, log=self._log_path(name)
        )
        self.processes.append(managed)
        return managed.start()

    def _log_path(self, name: str) -> Path | None:
        if self.log_dir is None:
            return None
        path, n = self.log_dir / f"{name}.log", 1
        while path.exists():  # several groups may share a directory, names repeat
            n += 1
            path = self.log_dir / f"{name}-{n}.log"
        path.touch()
        return path

    def stop_all(self) -> None:
        """Stop every process, newest first; one that will not die does not spare the rest."""
        for managed in reversed(self.processes):
            with contextlib.suppress(Exception):
                managed.stop(self.grace)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
