"""A whole fleet on this machine from one typed description: `FleetSpec` -> `LocalFleet`.

It starts a Redis (its own unless the spec names one), the fake provider, fake MCP
servers, writes the swarm.toml the workers read (the endpoints filled in), starts the
workers, and stops everything, newest first, on exit. The demo, the benchmarks and the
test fixtures all start processes through this package.

Usage::

    spec = FleetSpec(config={"roles": {"default": {"concurrency": 4}}}, workers=(WorkerSpec(),))
    with LocalFleet(spec, workdir) as fleet:
        client = SwarmClient(settings=fleet.settings())
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from swarm_workers.config import Settings, given_settings
from swarm_workers.localfleet.process import ProcessGroup
from swarm_workers.localfleet.services import (
    FakeProvider,
    McpHttpServer,
    RedisServer,
    start_fake_llm,
    start_mcp_http,
    start_redis,
)
from swarm_workers.localfleet.toml import write_toml
from swarm_workers.localfleet.workers import Worker, WorkerSpec, start_worker

__all__ = ["FakeLLMSpec", "FleetSpec", "LocalFleet", "McpServerSpec", "file_settings"]


@dataclass(frozen=True)
class FakeLLMSpec:
    """The fake provider's command-line flags, e.g. `("--latency-ms", "5")`."""

    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class McpServerSpec:
    """A fake MCP server over streamable HTTP, configured as `[tools.servers.<name>]`."""

    name: str
    flags: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FleetSpec:
    """What to start. `config` is the swarm.toml body; the fleet adds `redis_url`,
    `llm.base_url` (when it starts the fake) and one `tools.servers` entry per MCP server.

    `redis_url` None starts a redis-server of the fleet's own. `env` is set for every
    worker (on top of its `WorkerSpec.env`); it reaches the workers only, never the
    producer's `settings()`.
    """

    config: Mapping[str, Any] = field(default_factory=dict)
    workers: tuple[WorkerSpec, ...] = ()
    llm: FakeLLMSpec | None = FakeLLMSpec()
    mcp_servers: tuple[McpServerSpec, ...] = ()
    redis_url: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    worker_ready_timeout_s: float = 90.0


def file_settings(path: Path) -> Settings:
    """What a worker started with only `SWARM_CONFIG=path` reads, whatever this
    process's own environment holds (a producer's `REDIS_URL` cannot redirect it)."""
    data = tomllib.loads(path.read_text())
    return given_settings({**data, "config_path": path})


class LocalFleet:
    """Starts the fleet a `FleetSpec` describes; `stop()` (or leaving `with`) ends it all."""

    def __init__(self, spec: FleetSpec, workdir: Path, *, group: ProcessGroup | None = None):
        self.spec = spec
        self.workdir = workdir
        self.group = group or ProcessGroup(log_dir=workdir)
        self.config_path = workdir / "swarm.toml"
        self.redis: RedisServer | None = None
        self.llm: FakeProvider | None = None
        self.mcp: dict[str, McpHttpServer] = {}
        self.workers: list[Worker] = []

    @property
    def redis_url(self) -> str:
        if self.redis is None:
            raise RuntimeError("the fleet is not started")
        return self.redis.url

    def start(self) -> LocalFleet:
        """Start the services, write swarm.toml, start the workers; all stopped on error."""
        try:
            self.start_services()
            self.add_workers(self.spec.workers)
        except BaseException:
            self.stop()
            raise
        return self

    def start_services(self) -> None:
        """Redis, the fake provider and the MCP servers, then swarm.toml; no workers."""
        if self.spec.redis_url is None:
            self.redis = start_redis(self.group, self.workdir)
        else:
            self.redis = RedisServer(self.spec.redis_url, 0)
        if self.spec.llm is not None:
            self.llm = start_fake_llm(self.group, *self.spec.llm.flags)
        for server in self.spec.mcp_servers:
            self.mcp[server.name] = start_mcp_http(
                self.group, *server.flags, name=server.name, env=server.env
            )
        write_toml(self.config_path, self.config())

    def config(self) -> dict[str, Any]:
        """The swarm.toml body: the spec's, with this fleet's endpoints filled in."""
        data = copy.deepcopy(dict(self.spec.config))
        data["redis_url"] = self.redis_url
        if self.llm is not None:
            data.setdefault("llm", {})["base_url"] = self.llm.base_url
        if self.mcp:
            servers = data.setdefault("tools", {}).setdefault("servers", {})
            for name, server in self.mcp.items():
                servers[name] = {"transport": "http", "url": server.url}
        return data

    def add_worker(self, spec: WorkerSpec | None = None) -> Worker:
        """Start one more worker on this fleet's swarm.toml and wait until it is ready."""
        return self.add_workers([spec or WorkerSpec()])[0]

    def add_workers(self, specs: Iterable[WorkerSpec]) -> list[Worker]:
        """Start several workers at once (they boot in parallel), then wait for each."""
        started = [
            start_worker(
                self.group,
                spec,
                name=f"worker-{len(self.workers) + i}",
                workdir=self.workdir,
                redis_url=self.redis_url,
                config=self.config_path,
                env=self.spec.env,
                ready_timeout=None,
            )
            for i, spec in enumerate(specs)
        ]
        self.workers += started
        for worker in started:
            worker.wait_ready(self.spec.worker_ready_timeout_s)
        return started

    def settings(self) -> Settings:
        """The settings the workers read, for a producer in this process."""
        return file_settings(self.config_path)

    def stop(self) -> None:
        self.group.stop_all()

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
