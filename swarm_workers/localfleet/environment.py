"""The explicit environment every process of a local fleet starts with.

A child never inherits the caller's whole environment: a shell that runs a real fleet
holds `REDIS_URL` and `SWARM_*`, and a child that read them would join that fleet or
disagree with the parent about where its Redis is. Only a short allowlist of the
parent's variables (where programs and the home directory are, locale, temp dir, the
Python path) passes; everything else a child sees is set by its description.

>>> env = child_env({"SWARM_CONFIG": "/tmp/swarm.toml"})
>>> env["SWARM_CONFIG"], "REDIS_URL" in env
('/tmp/swarm.toml', False)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ALLOWED_VARIABLES", "TAG_VARIABLE", "child_env", "is_fleet_variable"]

# Set by a caller that wants to find every process a harness started (tests/test_demo.py
# scans /proc for it); passed through like the allowlist.
TAG_VARIABLE = "LOCALFLEET_TAG"

ALLOWED_VARIABLES: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    # tiktoken's local cache: without it a worker falls back to the estimate.
    "TIKTOKEN_CACHE_DIR",
    "DATA_GYM_CACHE_DIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "COVERAGE_PROCESS_START",
    TAG_VARIABLE,
)

# The source checkout this package runs from, when it is one (not an installed wheel).
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def is_fleet_variable(name: str) -> bool:
    """Whether `name` configures a fleet (so it must come from a description, not a shell)."""
    return name.startswith("SWARM_") or name == "REDIS_URL"


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allowlisted part of this process's environment, plus `extra`.

    Children import the same `swarm_workers` as the parent: a source checkout is put
    first on PYTHONPATH, so a worktree's tests never run another checkout's code.
    """
    env = {name: os.environ[name] for name in ALLOWED_VARIABLES if name in os.environ}
    if (_SOURCE_ROOT / "pyproject.toml").exists():
        paths = [str(_SOURCE_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"  # logs arrive while the test still looks at them
    env.update(extra or {})
    return env
