"""Suspect runs in a child process, so a poison task cannot take its neighbours down.

A task whose earlier run was cut short (its run count is above one when a delivery
begins) is a suspect: the worker running it died, maybe because of it. With the
threads pool, a task that crashes its process costs an attempt to every task running
beside it, so a suspect's agent loop runs in a child process of its own
(`python -m swarm_workers.execution.isolation`); the worker thread waits for it and
keeps renewing the lease. If the child dies, only the suspect's run is cut short: it
counts as an attempt and the message goes back on the queue; after
`worker.max_attempts` runs the task is recorded as failed, `TooManyAttempts`.

The child rebuilds the process runtime from the parent's settings (sent on stdin,
secrets included, never on argv) and writes the `AgentOutcome` as JSON on stdout.
A child costs a Python start and the runtime's build (about a second): a price paid
only by tasks that already took a worker down once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr, TypeAdapter

from swarm_workers.agent.loop import AgentOutcome, run_agent
from swarm_workers.config import Settings
from swarm_workers.deadline import Deadline
from swarm_workers.execution.failpoints import check_failpoints
from swarm_workers.execution.runtime import Runtime
from swarm_workers.models import AgentTask

__all__ = ["RunCrashed", "run_isolated"]

_OUTCOME = TypeAdapter(AgentOutcome)
_EXTRA_GRACE_S = 10.0  # the child's start and runtime build, on top of the task's deadline


class RunCrashed(Exception):
    """The child running a suspect died: this run was cut short like its worker's was."""


def run_isolated(task: AgentTask, runtime: Runtime, deadline: Deadline) -> AgentOutcome:
    """Run `task`'s agent loop in a child process; `RunCrashed` when the child dies."""
    request = {
        "settings": _plain(runtime.settings.model_dump(mode="python")),
        "task": task.to_wire(),
        "remaining_s": max(0.001, deadline.remaining()),
        "worker": runtime.worker_name,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "swarm_workers.execution.isolation"],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=deadline.cap(deadline.limit_s) + _EXTRA_GRACE_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RunCrashed(f"task {task.id}: its isolated run did not end in time") from exc
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-500:]
        raise RunCrashed(f"task {task.id}: its isolated run died ({done.returncode}): {tail}")
    return _OUTCOME.validate_json(done.stdout)


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


def _child() -> None:
    request = json.loads(sys.stdin.buffer.read())
    settings = Settings.model_validate(request["settings"])
    task = AgentTask.from_wire(request["task"])
    runtime = Runtime.build(settings, request["worker"])
    try:
        check_failpoints(task, settings)
        outcome = run_agent(task, runtime, Deadline.start(request["remaining_s"]))
    finally:
        runtime.close()
    sys.stdout.buffer.write(_OUTCOME.dump_json(outcome))
    sys.stdout.flush()
    os._exit(0)  # no atexit work: the parent has what it needs


if __name__ == "__main__":
    _child()
