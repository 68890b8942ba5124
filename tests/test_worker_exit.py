"""`swarm worker` exits non-zero on fatal errors, so a supervisor notices (issue 13.10).

Real processes: the worker is started as an operator would, and its exit code read.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from swarm_workers.config import load_settings
from swarm_workers.errors import ConfigError

from .conftest import ROOT, write_toml


@pytest.fixture(autouse=True)
def _no_shell_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """SWARM_* or REDIS_URL from the developer's shell would override these tests' own."""
    for name in list(os.environ):
        if name.startswith("SWARM_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


RPM_1 = {
    "roles": {"default": {"concurrency": 2}},
    "ratelimit": {"models": {"fake-gpt": {"rpm": 1, "tpm": 100_000}}},
}


def _env(redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_") and k != "REDIS_URL"}
    env.update(
        REDIS_URL=redis_url,
        PYTHONUNBUFFERED="1",
        SWARM_WORKER_HEARTBEAT_FILE=str(tmp_path / "hb"),
        **extra,
    )
    return env


def _swarm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarm_workers.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_rpm_1_is_refused_by_every_command(redis_url: str, tmp_path: Path) -> None:
    config = write_toml(tmp_path / "swarm.toml", RPM_1)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "rpm" in str(caught.value)
    env = _env(redis_url, tmp_path, SWARM_CONFIG=str(config))
    worker = _swarm("worker", "--role", "default", env=env)
    assert worker.returncode != 0, worker.stdout + worker.stderr
    assert "rpm" in worker.stderr
    submit = _swarm("submit", "hello", env=env)
    assert submit.returncode == worker.returncode, submit.stdout + submit.stderr


def test_fatal_error_inside_celery_exits_non_zero(redis_url: str, tmp_path: Path) -> None:
    """A step that fails at start (here: the metrics port is taken) is Celery's
    "Unrecoverable error"; the worker used to log it and exit 0."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _env(redis_url, tmp_path, SWARM_WORKER_METRICS_PORT=str(port))
        worker = _swarm("worker", "--role", "default", "--concurrency", "2", env=env)
    assert "Unrecoverable error" in worker.stdout + worker.stderr
    assert worker.returncode != 0, worker.stdout + worker.stderr
