"""`swarm demo` end to end, as a newcomer runs it: no config, no key, its own Redis.

And apart from any real fleet: its own redis-server and key prefix, nothing from the
shell's REDIS_URL or SWARM_*, and an existing Redis only when its database is empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from rich.console import Console

from swarm_workers.demo import KEY_PREFIX, _fleet_spec, run_demo
from swarm_workers.localfleet import TAG_VARIABLE

from .conftest import ROOT


def _processes_with(marker: str) -> list[int]:
    """PIDs whose environment carries `marker` (the harness passes it to every child)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_the_demo_fleet_is_its_own() -> None:
    spec = _fleet_spec(None, None)
    assert spec.redis_url is None  # a redis-server of its own, never one it finds
    assert spec.config["key_prefix"] == KEY_PREFIX != "swarm"
    assert spec.llm is not None
    assert not spec.env


def test_the_demo_refuses_a_redis_database_in_use(redis_conn: redis.Redis, redis_url: str) -> None:
    redis_conn.set("_kombu.binding.p1.research", "a fleet lives here")
    with pytest.raises(SystemExit, match="holds 1 keys"):
        run_demo(fast=True, console=Console(quiet=True), redis_url=redis_url)
    assert redis_conn.dbsize() == 1  # nothing was enqueued


@pytest.mark.slow
def test_demo_runs_a_whole_swarm_and_cleans_up(tmp_path: Path) -> None:
    marker = f"{TAG_VARIABLE}={uuid.uuid4().hex}"
    # A shell that runs a real fleet: none of it may reach the demo.
    env = {
        **os.environ,
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "SWARM_CONFIG": "/nonexistent/swarm.toml",
        "SWARM_KEY_PREFIX": "swarm",
        "PYTHONPATH": str(ROOT),  # this checkout's code, from any working directory
    }
    key, value = marker.split("=", 1)
    env[key] = value
    done = subprocess.run(
        [sys.executable, "-m", "swarm_workers.cli", "demo", "--fast", "--json", "--timeout", "240"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["redis"].startswith("started "), report["redis"]
    assert KEY_PREFIX in report["isolation"]
    assert report["llm"].startswith("fake provider")
    assert report["dag_state"] == "succeeded"
    assert set(report["nodes"]) == {"research-0", "research-1", "summary", "review"}
    assert all(n["state"] == "done" for n in report["nodes"].values())
    assert report["tool_calls"] >= 3
    assert "docs__search" in report["nodes"]["review"]["tool_calls"]
    assert report["completion_tokens"] > 0
    assert report["cost_usd"] > 0
    assert _processes_with(marker) == [], "the demo left processes behind"
