"""Suspect runs in a child process, so a poison task cannot take its neighbours down.

A task whose earlier run was cut short (its run count is above one when a delivery
begins) is a suspect: the worker running it died, maybe because of it. With the
threads pool, a task that crashes its process costs an attempt to every task running
beside it, so a suspect's agent loop runs in a child process of its own
(`python -m swarm_workers.execution.isolation`); the worker thread waits for it and
keeps renewing the lease. If the child dies, only the suspect's run is cut short: it
counts as an attempt and the message goes back on the queue; after
`worker.max_attempts` runs the task is recorded as failed, `TooManyAttempts`.

The child (`execution.isolated_child`) rebuilds the process runtime from the parent's
settings (sent on stdin, secrets included, never on argv) and writes the
`AgentOutcome` as JSON on stdout. A child that fails with an exception is an internal
error, one still running at the task's deadline a time-limit stop: only a child killed
by a signal is a crash.
A child costs a Python start and the runtime's build (about a second): a price paid
only by tasks that already took a worker down once.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr, TypeAdapter

from swarm_workers.agent.loop import AgentOutcome
from swarm_workers.config import Settings
from swarm_workers.deadline import Deadline
from swarm_workers.errors import TimeLimitExceeded
from swarm_workers.execution.runtime import Runtime
from swarm_workers.models import AgentTask

__all__ = ["OUTCOME_JSON", "RunCrashed", "run_isolated", "settings_json"]

OUTCOME_JSON = TypeAdapter(AgentOutcome)
_EXIT_GRACE_S = 2.0  # for the child to write its outcome once its deadline stopped the loop


log = logging.getLogger(__name__)


class RunCrashed(Exception):
    """The child running a suspect died: this run was cut short like its worker's was."""


def run_isolated(
    task: AgentTask, runtime: Runtime, deadline: Deadline, token: str = ""
) -> AgentOutcome:
    """Run `task`'s agent loop in a child process; `RunCrashed` when the child dies.

    The child resumes from the task's checkpoint and saves its own, fenced by the
    parent's lease `token` (the parent keeps renewing the lease meanwhile).
    """
    request = {
        "token": token,
        "settings": settings_json(runtime.settings),
        "task": task.to_wire(),
        "remaining_s": max(0.001, deadline.remaining()),
        "worker": runtime.worker_name,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "swarm_workers.execution.isolated_child"],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=max(0.0, deadline.remaining()) + _EXIT_GRACE_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # subprocess.run killed it
        raise TimeLimitExceeded(deadline.limit_s, "running in isolation") from exc
    if done.returncode < 0:
        raise RunCrashed(
            f"task {task.id}: its isolated run was killed by signal {-done.returncode}"
        )
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-2000:]
        log.error("task %s: isolated run failed (%d):\n%s", task.id, done.returncode, tail)
        raise RuntimeError(f"isolated run exited with {done.returncode}")
    return OUTCOME_JSON.validate_json(done.stdout)


def settings_json(settings: Settings) -> Any:
    """Settings as plain JSON data, secrets revealed: for our own child, on a pipe."""
    return _plain(settings.model_dump(mode="python"))


def _plain(value: Any) -> Any:
    """Settings as JSON, secrets revealed: they travel on a pipe to our own child only."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
