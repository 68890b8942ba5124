"""Fixtures that start real things: a Redis, Celery worker processes, the fake provider.

Every process is started through `swarm_workers.localfleet` and stopped here, even
when the test fails. The suite does not depend on the caller's shell: `SWARM_*` and
`REDIS_URL` are removed from this process's environment for the whole run (so an
in-test producer reads what the workers read), and every child gets an explicit one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from swarm_workers.localfleet import (
    FakeProvider,
    ProcessGroup,
    RedisServer,
    Worker,
    WorkerSpec,
    free_port,
    is_fleet_variable,
    start_fake_llm,
    start_redis,
    wait_until,
    write_toml,
)
from swarm_workers.localfleet import (
    start_worker as launch_worker,  # the fixture below is named `start_worker`
)

__all__ = [
    "ROOT",
    "FakeLLM",
    "RedisServer",
    "WorkerFactory",
    "WorkerProcess",
    "free_port",
    "spawn_fake_llm",
    "spawn_redis",
    "wait_until",
    "write_toml",
]

pytest_plugins = ["tests.mcp_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
# The suite's own settings (e.g. SWARM_TEST_REDIS_URL) survive the clean-up.
TEST_VARIABLE_PREFIX = "SWARM_TEST_"

FakeLLM = FakeProvider
WorkerProcess = Worker

# --------------------------------------------------------------------------- environment

_clean_environment = pytest.MonkeyPatch()


def pytest_configure(config: pytest.Config) -> None:
    """Before collection (module-level code reads settings too): no fleet variables."""
    for name in list(os.environ):
        if is_fleet_variable(name) and not name.startswith(TEST_VARIABLE_PREFIX):
            _clean_environment.delenv(name)


def pytest_unconfigure(config: pytest.Config) -> None:
    _clean_environment.undo()


# --------------------------------------------------------------------------- Redis


def spawn_redis(group: ProcessGroup, workdir: Path, **options: Any) -> RedisServer:
    """A redis-server of our own; a clear failure (not a skip) when there is none."""
    try:
        return start_redis(group, workdir, **options)
    except FileNotFoundError as exc:
        pytest.fail(
            f"No Redis for the tests: set SWARM_TEST_REDIS_URL to a Redis you own, or {exc}.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    external = os.environ.get("SWARM_TEST_REDIS_URL")
    if external:
        client = redis.Redis.from_url(external)
        try:
            client.ping()
        except redis.ConnectionError as exc:
            pytest.fail(f"SWARM_TEST_REDIS_URL={external} does not answer: {exc}", pytrace=False)
        port = client.connection_pool.connection_kwargs.get("port", 6379)
        yield RedisServer(url=external, port=int(port))
        return
    with ProcessGroup() as group:
        yield spawn_redis(group, tmp_path_factory.mktemp("redis"))


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A real, empty Redis for this test."""
    client = redis_server.client()
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# --------------------------------------------------------------------------- config


@pytest.fixture
def swarm_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a swarm.toml for this test: `swarm_config(roles={...}, worker={...})`."""

    def make(**sections: Any) -> Path:
        sections.setdefault("roles", {"default": {"concurrency": 4}})
        return write_toml(tmp_path / "swarm.toml", sections)

    return make


# --------------------------------------------------------------------------- workers


@dataclass
class WorkerFactory:
    """Starts `swarm worker` processes on `redis_url`; `stop_all()` stops every one.

    A worker's environment is `env` (the factory's, then the call's) on top of
    REDIS_URL, SWARM_CONFIG (when `config` is given) and its heartbeat settings.
    """

    redis_url: str
    tmp_path: Path
    env: dict[str, str] = field(default_factory=dict)
    started: list[Worker] = field(default_factory=list)
    group: ProcessGroup = field(init=False)

    def __post_init__(self) -> None:
        self.group = ProcessGroup(log_dir=self.tmp_path)

    def __call__(
        self,
        roles: Sequence[str] = ("default",),
        *,
        config: Path | None = None,
        priorities: str = "p0,p1,p2",
        concurrency: int = 4,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 30.0,
    ) -> Worker:
        index = len(self.started)
        spec = WorkerSpec(
            roles=tuple(roles),
            priorities=priorities,
            concurrency=concurrency,
            hostname=f"w{index}-{os.getpid()}@test",
            env={**self.env, **(env or {})},
        )
        worker = launch_worker(
            self.group,
            spec,
            name=f"worker-{index}",
            workdir=self.tmp_path,
            redis_url=self.redis_url,
            config=config,
            ready_timeout=ready_timeout,
        )
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        self.group.stop_all()


# --------------------------------------------------------------------------- fake provider


def spawn_fake_llm(*flags: str) -> FakeProvider:
    """A fake provider of the caller's own; the caller stops it (`.stop()`)."""
    return start_fake_llm(ProcessGroup(), *flags)


@pytest.fixture
def fake_llm() -> Iterator[FakeProvider]:
    """A fake OpenAI-compatible provider of this test's own (5 ms, no limits)."""
    with ProcessGroup() as group:
        yield start_fake_llm(group, "--latency-ms", "5")


@pytest.fixture(scope="session")
def shared_fake_llm() -> Iterator[FakeProvider]:
    """One fake provider for every test that only needs answers (no faults, no stats)."""
    with ProcessGroup() as group:
        yield start_fake_llm(group, "--latency-ms", "5")


@pytest.fixture
def start_worker(
    redis_url: str, tmp_path: Path, shared_fake_llm: FakeProvider
) -> Iterator[WorkerFactory]:
    """Start real `swarm worker` processes; all are stopped after the test.

    Workers talk to a session-wide fake provider unless a test sets
    `start_worker.env["SWARM_LLM_BASE_URL"]` to its own.
    """
    factory = WorkerFactory(
        redis_url=redis_url, tmp_path=tmp_path, env={"SWARM_LLM_BASE_URL": shared_fake_llm.base_url}
    )
    yield factory
    factory.stop_all()
