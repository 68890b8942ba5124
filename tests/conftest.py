"""Fixtures that start real things: a Redis, Celery worker processes, the fake provider.

Every process started here is stopped here, even when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from swarm_workers.processes import free_port, redis_server_argv, wait_until

__all__ = ["ROOT", "free_port", "wait_until"]

pytest_plugins = ["tests.mcp_fixtures"]

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- Redis


@dataclass
class RedisServer:
    """A redis-server this test session owns (or the one SWARM_TEST_REDIS_URL names)."""

    url: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    dir: Path | None = None

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url, db=db)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def start(self) -> None:
        """(Re)start a server we own on the same port, e.g. after a broker-loss test."""
        if self.dir is None:
            raise RuntimeError("cannot restart an external Redis")
        self.proc = spawn_redis(self.port, self.dir)


def spawn_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "No Redis for the tests: set SWARM_TEST_REDIS_URL to a Redis you own, or install "
            "redis-server (Debian/Ubuntu: apt install redis-server) so the tests can start one.",
            pytrace=False,
        )
    proc = subprocess.Popen(
        redis_server_argv(binary, port, workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_until(answers, 10, f"redis-server on port {port}")
    client.close()
    return proc


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
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    server = RedisServer(
        url=f"redis://127.0.0.1:{port}/0", port=port, proc=spawn_redis(port, workdir), dir=workdir
    )
    yield server
    server.stop()


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


def write_toml(path: Path, data: Mapping[str, Any]) -> Path:
    """Write a nested dict as TOML (only what our config uses: tables, scalars, lists)."""
    lines: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, list | tuple):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f'"{k}" = {scalar(v)}' for k, v in value.items()) + "}"
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def table(prefix: str, body: Mapping[str, Any]) -> None:
        plain = {
            k: v
            for k, v in body.items()
            if not isinstance(v, dict) or not v or not all(isinstance(x, dict) for x in v.values())
        }
        nested = {k: v for k, v in body.items() if k not in plain}
        if prefix and plain:
            lines.append(f"[{prefix}]")
        for key, value in plain.items():
            lines.append(f'"{key}" = {scalar(value)}')
        for key, value in nested.items():
            table(f"{prefix}.{key}" if prefix else key, value)

    table("", data)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def swarm_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a swarm.toml for this test: `swarm_config(roles={...}, worker={...})`."""

    def make(**sections: Any) -> Path:
        sections.setdefault("roles", {"default": {"concurrency": 4}})
        return write_toml(tmp_path / "swarm.toml", sections)

    return make


# --------------------------------------------------------------------------- workers


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    hostname: str
    heartbeat: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class WorkerFactory:
    redis_url: str
    tmp_path: Path
    env: dict[str, str] = field(default_factory=dict)
    started: list[WorkerProcess] = field(default_factory=list)

    def __call__(
        self,
        roles: Sequence[str] = ("default",),
        *,
        config: Path | None = None,
        priorities: str = "p0,p1,p2",
        concurrency: int = 4,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 30.0,
    ) -> WorkerProcess:
        index = len(self.started)
        hostname = f"w{index}-{os.getpid()}@test"
        log = self.tmp_path / f"worker-{index}.log"
        heartbeat = self.tmp_path / f"worker-{index}.heartbeat"
        args = [
            sys.executable,
            "-m",
            "swarm_workers.cli",
            "worker",
            "--priorities",
            priorities,
            "--concurrency",
            str(concurrency),
            "--hostname",
            hostname,
            "--loglevel",
            "INFO",
        ]
        for role in roles:
            args += ["--role", role]
        proc_env = {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "PYTHONUNBUFFERED": "1",
            "SWARM_WORKER_HEARTBEAT_FILE": str(heartbeat),
            "SWARM_WORKER_HEARTBEAT_INTERVAL_S": "0.5",
            **self.env,
            **(env or {}),
        }
        proc_env.pop("SWARM_CONFIG", None)
        if config is not None:
            proc_env["SWARM_CONFIG"] = str(config)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, env=proc_env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )
        worker = WorkerProcess(proc=proc, log=log, hostname=hostname, heartbeat=heartbeat)
        self.started.append(worker)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited with {proc.returncode}:\n{worker.output()}")
            return heartbeat.exists() and "ready." in worker.output()

        wait_until(ready, ready_timeout, "the worker to report ready", interval=0.1)
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


# --------------------------------------------------------------------------- fake provider


@dataclass
class FakeLLM:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"http://127.0.0.1:{self.port}/_fake/stats", timeout=5).json())

    def fault(self, status: int, count: int, retry_after: float | None = None) -> None:
        body: dict[str, Any] = {"status": status, "count": count}
        if retry_after is not None:
            body["retry_after"] = retry_after
        httpx.post(
            f"http://127.0.0.1:{self.port}/_fake/faults", json=body, timeout=5
        ).raise_for_status()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def spawn_fake_llm(*flags: str) -> FakeLLM:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm_workers.fakes.llm_server", "--port", str(port), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    fake = FakeLLM(proc=proc, port=port)

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"fake provider exited with {proc.returncode}")
        try:
            return httpx.get(f"{fake.base_url}/models", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, 20, "the fake provider")
    except BaseException:
        fake.stop()
        raise
    return fake


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    """A fake OpenAI-compatible provider of this test's own (5 ms, no limits)."""
    fake = spawn_fake_llm("--latency-ms", "5")
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def shared_fake_llm() -> Iterator[FakeLLM]:
    """One fake provider for every test that only needs answers (no faults, no stats)."""
    fake = spawn_fake_llm("--latency-ms", "5")
    yield fake
    fake.stop()


@pytest.fixture
def start_worker(
    redis_url: str, tmp_path: Path, shared_fake_llm: FakeLLM
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
