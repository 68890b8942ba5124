"""`swarm worker` processes: what to start (`WorkerSpec`) and the running one (`Worker`).

Usage::

    worker = start_worker(group, WorkerSpec(roles=("research",)), name="w0",
                          workdir=tmp, config=Path("swarm.toml"))
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from swarm_workers.localfleet.process import ManagedProcess, ProcessGroup

__all__ = ["Worker", "WorkerSpec", "start_worker"]


@dataclass(frozen=True)
class WorkerSpec:
    """One `swarm worker` process.

    >>> WorkerSpec(roles=("research",), priorities="p0", concurrency=2).argv("w1@test")[3:7]
    ['worker', '--priorities', 'p0', '--hostname']
    """

    roles: tuple[str, ...] = ("default",)
    priorities: str = "p0,p1,p2"
    concurrency: int | None = 4
    hostname: str | None = None
    loglevel: str = "INFO"
    heartbeat_interval_s: float | None = 0.5
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self, hostname: str) -> list[str]:
        argv = [sys.executable, "-m", "swarm_workers.cli", "worker"]
        argv += ["--priorities", self.priorities, "--hostname", hostname]
        argv += ["--loglevel", self.loglevel]
        if self.concurrency is not None:
            argv += ["--concurrency", str(self.concurrency)]
        for role in self.roles:
            argv += ["--role", role]
        return argv


@dataclass
class Worker:
    """A running `swarm worker`: its Celery node name, heartbeat file and log."""

    hostname: str
    heartbeat: Path
    process: ManagedProcess
    # Celery says "ready." only at INFO and below; the heartbeat is the real signal.
    says_ready: bool = True

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.proc

    @property
    def log(self) -> Path | None:
        return self.process.log

    def output(self) -> str:
        return self.process.output()

    def ready(self) -> bool:
        return self.heartbeat.exists() and (not self.says_ready or "ready." in self.output())

    def wait_ready(self, timeout: float = 30.0) -> Worker:
        """Wait for the first heartbeat; stop the worker if it never comes."""
        self.process.wait_ready(self.ready, timeout, f"worker {self.hostname} to report ready")
        return self

    def signal(self, sig: int) -> None:
        self.process.signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        self.process.stop()


def start_worker(
    group: ProcessGroup,
    spec: WorkerSpec,
    *,
    name: str,
    workdir: Path,
    redis_url: str | None = None,
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout: float | None = 30.0,
) -> Worker:
    """Start a worker reading `config` (and `redis_url`); wait for its first heartbeat
    (`ready_timeout` None: return at once, call `Worker.wait_ready` later).

    Its environment holds only what is given here: `env` (the fleet's), then `spec.env`.
    """
    hostname = spec.hostname or f"{name}@localfleet"
    heartbeat = workdir / f"{name}.heartbeat"
    heartbeat.unlink(missing_ok=True)
    own: dict[str, str] = {"SWARM_WORKER_HEARTBEAT_FILE": str(heartbeat)}
    if spec.heartbeat_interval_s is not None:
        own["SWARM_WORKER_HEARTBEAT_INTERVAL_S"] = str(spec.heartbeat_interval_s)
    if redis_url is not None:
        own["REDIS_URL"] = redis_url
    if config is not None:
        own["SWARM_CONFIG"] = str(config)
    process = group.spawn(name, spec.argv(hostname), env={**own, **(env or {}), **spec.env})
    worker = Worker(hostname, heartbeat, process, spec.loglevel.upper() in ("DEBUG", "INFO"))
    return worker if ready_timeout is None else worker.wait_ready(ready_timeout)
