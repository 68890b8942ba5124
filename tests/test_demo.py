"""`swarm demo` end to end, as a newcomer runs it: no config, no key, its own Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _processes_with(marker: str) -> list[int]:
    """PIDs whose environment carries `marker` (every child of the demo inherits it)."""
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


def test_demo_runs_a_whole_swarm_and_cleans_up(tmp_path: Path) -> None:
    marker = f"SWARM_DEMO_TEST_MARKER={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_") and k != "REDIS_URL"}
    key, value = marker.split("=", 1)
    env[key] = value
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm_workers.cli",
            "demo",
            "--fast",
            "--own-redis",
            "--json",
            "--timeout",
            "240",
        ],
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
    assert report["llm"].startswith("fake provider")
    assert report["dag_state"] == "succeeded"
    assert set(report["nodes"]) == {"research-0", "research-1", "summary", "review"}
    assert all(n["state"] == "done" for n in report["nodes"].values())
    assert report["tool_calls"] >= 3
    assert "docs__search" in report["nodes"]["review"]["tool_calls"]
    assert report["completion_tokens"] > 0
    assert report["cost_usd"] > 0
    assert _processes_with(marker) == [], "the demo left processes behind"
