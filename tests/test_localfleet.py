"""The local-fleet harness: explicit environments, stop order, and a whole fleet.

The suite must pass whatever the caller's shell exports: `test_the_suite_ignores_the_
callers_shell` runs a piece of it in a subprocess with a hostile environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarm_workers.client import SwarmClient
from swarm_workers.localfleet import (
    FleetSpec,
    LocalFleet,
    ManagedProcess,
    ProcessGroup,
    WorkerSpec,
    child_env,
    is_fleet_variable,
    wait_until,
)

from .conftest import ROOT

HOSTILE = {
    "REDIS_URL": "redis://127.0.0.1:1/0",
    "SWARM_REDIS_URL": "redis://127.0.0.1:1/0",
    "SWARM_CONFIG": "/nonexistent/swarm.toml",
    "SWARM_KEY_PREFIX": "hostile",
    "SWARM_LLM_BASE_URL": "http://127.0.0.1:1/v1",
}


def _environ_of(pid: int, program: bytes = b"sleep") -> dict[str, str]:
    # Until the child has exec'd, /proc shows the environment it forked with: ours.
    wait_until(
        lambda: Path(f"/proc/{pid}/cmdline").read_bytes().startswith(program), 10, "the exec"
    )
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_child_env_is_the_allowlist_plus_what_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in HOSTILE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SOME_SECRET_TOKEN", "s3cret")
    env = child_env({"SWARM_LLM_API_KEY": "given"})
    assert [name for name in env if is_fleet_variable(name)] == ["SWARM_LLM_API_KEY"]
    assert "SOME_SECRET_TOKEN" not in env
    assert env["PATH"] == os.environ["PATH"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)  # children import this checkout


def test_a_spawned_process_sees_only_its_explicit_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in HOSTILE.items():
        monkeypatch.setenv(name, value)
    with ProcessGroup() as group:
        proc = group.spawn("sleeper", ["sleep", "30"], env={"REDIS_URL": "redis://given/0"})
        seen = _environ_of(proc.pid)
    assert seen["REDIS_URL"] == "redis://given/0"
    assert not [name for name in seen if is_fleet_variable(name) and name != "REDIS_URL"]


# On SIGTERM: note our name in a file, then exit, or (argv[3] == "stay") keep running.
NOTES_SIGTERM = """
import signal, sys, time
def on_term(*_):
    with open(sys.argv[1], "a") as f:
        f.write(sys.argv[2] + "\\n")
    if sys.argv[3] != "stay":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("up", flush=True)
while True:
    time.sleep(0.05)
"""


def test_the_group_stops_newest_first_and_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    order = tmp_path / "order"
    with ProcessGroup(log_dir=tmp_path, grace=1.0) as group:
        procs = [
            group.spawn(name, [sys.executable, "-c", NOTES_SIGTERM, str(order), name, mode])
            for name, mode in (("first", "go"), ("second", "go"), ("stubborn", "stay"))
        ]
        for proc in procs:
            proc.wait_ready(lambda p=proc: "up" in p.output(), 20)  # type: ignore[misc]
    assert order.read_text().split() == ["stubborn", "second", "first"]
    assert [p.proc.returncode for p in procs] == [0, 0, -9]


def test_a_process_that_dies_before_it_is_ready_says_why(tmp_path: Path) -> None:
    proc = ManagedProcess(
        "doomed",
        (sys.executable, "-c", "import sys; print('no config here'); sys.exit(3)"),
        env=child_env(),
        log=tmp_path / "doomed.log",
    ).start()
    with pytest.raises(RuntimeError, match=r"(?s)doomed exited with 3.*no config here"):
        proc.wait_ready(lambda: False, 20)


def test_a_local_fleet_runs_a_task_whatever_the_shell_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in HOSTILE.items():
        monkeypatch.setenv(name, value)
    spec = FleetSpec(
        config={"key_prefix": "fleettest", "roles": {"default": {"concurrency": 2}}},
        llm=None,  # no model call needed: the task fails fast on a provider that is not there
        workers=(WorkerSpec(concurrency=2),),
        env={"SWARM_LLM_BASE_URL": "http://127.0.0.1:9/v1", "SWARM_LLM_MAX_RETRIES": "0"},
    )
    with LocalFleet(spec, tmp_path) as fleet:
        settings = fleet.settings()
        assert settings.redis_url == fleet.redis_url
        assert settings.key_prefix == "fleettest"
        worker_env = _environ_of(fleet.workers[0].proc.pid, sys.executable.encode())
        assert worker_env["SWARM_CONFIG"] == str(fleet.config_path)
        assert "SWARM_KEY_PREFIX" not in worker_env
        with SwarmClient(settings=settings) as client:
            result = client.submit("hello", priority="P0").result(timeout=60)
        assert result.worker == fleet.workers[0].hostname  # the fleet's worker answered
    assert not any(p.alive for p in fleet.group.processes)


def test_the_suite_ignores_the_callers_shell(tmp_path: Path) -> None:
    """Producers in the tests and the workers they start agree, whatever is exported."""
    env = {**os.environ, **HOSTILE}
    env.pop("SWARM_TEST_REDIS_URL", None)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *("-o", f"cache_dir={tmp_path}"),
            "tests/test_client.py::test_submit_routes_to_the_role_priority_list",
            "tests/test_worker.py::test_submit_and_wait_for_a_result",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
