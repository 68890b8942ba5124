"""Liveness is "the consumer loop runs": real workers, real Redis, real probes.

- a config file broken under a running worker leaves its liveness green;
- a Redis outage (a redis-server of the test's own, stopped and restarted) leaves
  liveness green and readiness red, and the worker consumes again afterwards;
- a consumer loop that is stuck (blocked by a remote-control command that sleeps on
  the loop) turns liveness red while Redis answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm_workers.celery_app import create_app
from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.errors import ConfigError
from swarm_workers.health import Liveness, broker_file

from .conftest import ROOT, RedisServer, WorkerFactory, free_port, spawn_redis, wait_until


@pytest.fixture(autouse=True)
def _no_shell_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """SWARM_* or REDIS_URL from the developer's shell would override these tests' own."""
    for name in list(os.environ):
        if name.startswith("SWARM_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


INTERVAL_S = 0.5  # the fixtures' heartbeat interval (SWARM_WORKER_HEARTBEAT_INTERVAL_S)


def _probe_env(heartbeat: Path, config: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_") and k != "REDIS_URL"}
    env["SWARM_WORKER_HEARTBEAT_FILE"] = str(heartbeat)
    if config is not None:  # as on Kubernetes: the probe's environment names the config
        env["SWARM_CONFIG"] = str(config)
    return env


def healthcheck(
    heartbeat: Path, max_age: float, *, ready: bool = False, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "swarm_workers.cli", "healthcheck", "--max-age", str(max_age)]
    return subprocess.run(
        [*argv, "--ready"] if ready else argv,
        env=_probe_env(heartbeat, config),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def mtime(path: Path) -> float:
    return path.stat().st_mtime


# --------------------------------------------------------------------------- judgement


def test_liveness_judgement() -> None:
    live = Liveness(loop_stall_s=3, outage_grace_s=20, reconnect_grace_s=5, now=0.0)
    assert live.alive(now=3.0)
    assert not live.alive(now=3.5), "a silent loop with a healthy broker is stuck"
    live.broker_seen(False, now=4.0)
    assert live.alive(now=23.0), "an outage shorter than the grace restarts nothing"
    live.broker_seen(True, now=10.0)
    assert live.alive(now=14.0), "the consumer gets time to reconnect"
    assert not live.alive(now=16.0), "and then must tick again"
    live.tick(now=16.0)
    assert live.alive(now=18.0)
    live.broker_seen(False, now=30.0)
    assert not live.alive(now=51.0), "an outage longer than the grace is a restart"
    live.draining()
    assert live.alive(now=1000.0), "a warm shutdown drains; the grace period bounds it"


# --------------------------------------------------------------------------- config


def test_broken_config_under_a_running_worker_keeps_liveness_green(
    start_worker: WorkerFactory, swarm_config: object, redis_url: str
) -> None:
    config: Path = swarm_config()  # type: ignore[operator]
    worker = start_worker(config=config)
    config.write_text("[roles.default\nconcurrency = 'many'\n")  # a bad ConfigMap edit
    broken_at = time.time()
    with pytest.raises(ConfigError):
        load_settings(config)  # the file really is broken for anyone who reads it now
    wait_until(
        lambda: mtime(worker.heartbeat) > broken_at + 4 * INTERVAL_S,
        30,
        "the worker to keep beating after the config broke",
    )
    probe = healthcheck(worker.heartbeat, 4 * INTERVAL_S, config=config)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert worker.proc.poll() is None
    # The worker still works on the settings it read at start.
    with SwarmClient(settings=load_settings(None, redis_url=redis_url)) as client:
        assert client.submit("still here", priority="P0").result(timeout=30).ok


# --------------------------------------------------------------------------- Redis outage


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: the test stops and restarts it."""
    port = free_port()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(
        url=f"redis://127.0.0.1:{port}/0", port=port, proc=spawn_redis(port, workdir), dir=workdir
    )
    yield server
    server.stop()


def test_redis_outage_keeps_liveness_green_and_readiness_red(
    own_redis: RedisServer, tmp_path: Path, shared_fake_llm: object
) -> None:
    workers = WorkerFactory(
        redis_url=own_redis.url,
        tmp_path=tmp_path,
        env={"SWARM_LLM_BASE_URL": shared_fake_llm.base_url},  # type: ignore[attr-defined]
    )
    try:
        worker = workers()
        beat, broker = worker.heartbeat, broker_file(worker.heartbeat)
        wait_until(broker.exists, 10, "the broker file")
        own_redis.stop()
        down_at = time.time()
        # Longer than the loop may stall (6 ticks): only the outage rule keeps it green.
        wait_until(
            lambda: time.time() - mtime(broker) > 10 * INTERVAL_S,
            30,
            "the broker file to go stale",
        )
        assert mtime(beat) > mtime(broker) + 6 * INTERVAL_S, "the heartbeat kept beating"
        live = healthcheck(beat, 4 * INTERVAL_S)
        assert live.returncode == 0, live.stdout + live.stderr
        ready = healthcheck(beat, 4 * INTERVAL_S, ready=True)
        assert ready.returncode == 1, ready.stdout + ready.stderr
        assert "broker" in ready.stdout + ready.stderr
        outage_s = time.time() - down_at

        own_redis.start()
        with SwarmClient(settings=load_settings(None, redis_url=own_redis.url)) as client:
            result = client.submit("after the outage", priority="P0").result(timeout=90)
        assert result.ok, result.error
        assert worker.proc.poll() is None, "no restart"
        probe = healthcheck(beat, 4 * INTERVAL_S, ready=True)
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert outage_s > 6 * INTERVAL_S
    finally:
        workers.stop_all()


# --------------------------------------------------------------------------- stuck loop

# Loaded into the worker only (PYTHONPATH): a remote-control command, which Celery runs
# on the consumer's event loop, that sleeps there, as a wedged loop would.
_BLOCKER = """
import time
from celery.worker.control import control_command

@control_command(args=[("seconds", float)], signature="<seconds>")
def swarm_test_block_loop(state, seconds):
    time.sleep(seconds)
    return {"ok": "unblocked"}
"""


def test_stuck_consumer_loop_fails_liveness_while_redis_answers(
    start_worker: WorkerFactory, tmp_path: Path, redis_url: str
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER)
    worker = start_worker(env={"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])})
    beat, broker = worker.heartbeat, broker_file(worker.heartbeat)
    app = create_app(load_settings(None, redis_url=redis_url))
    block_s = 40 * INTERVAL_S
    app.control.broadcast(
        "swarm_test_block_loop", arguments={"seconds": block_s}, destination=[worker.hostname]
    )
    blocked_at = time.time()
    wait_until(
        lambda: healthcheck(beat, 4 * INTERVAL_S).returncode == 1,
        block_s,
        "liveness to fail on a stuck loop",
        interval=INTERVAL_S,
    )
    failed_after = time.time() - blocked_at
    assert time.time() - mtime(broker) < time.time() - mtime(beat), "Redis kept answering"
    assert worker.proc.poll() is None
    # The loop comes back when the command returns, and so does liveness.
    wait_until(
        lambda: healthcheck(beat, 4 * INTERVAL_S).returncode == 0,
        block_s * 2,
        "liveness to recover",
        interval=INTERVAL_S,
    )
    assert failed_after < block_s
