"""Suspect runs in a child process, so a poison task cannot take its neighbours down.

A task whose earlier run was cut short (its run count is above one when a delivery
begins) is a suspect: the worker running it died, maybe because of it. With the
threads pool, a task that crashes its process costs an attempt to every task running
beside it, so a suspect's agent loop runs in a child process of its own; the worker
thread waits for it and keeps renewing the lease. If the child dies, only the
suspect's run is cut short: it counts as an attempt and the message goes back on the
queue; after `worker.max_attempts` runs the task is recorded as failed,
`TooManyAttempts`.

Children are forks of a fork server that imported the package once
(`multiprocessing`'s "forkserver", `execution.isolated_child` preloaded), so one
starts in milliseconds, not in the seconds a fresh interpreter takes to import
`openai`: a crashed worker's tasks, all suspects at once, must not become a storm of
interpreters. At most `worker.isolation_slots` children run at a time per worker
process; a suspect that gets no slot while half its time limit is left goes back on
the queue uncounted (`RunDeferred`). A child that fails with an exception is an
internal error, one still running at the task's deadline a time-limit stop: only a
child killed by a signal is a crash. A child that Redis failed raises a `RedisError` in
the parent, as a run on the worker's own thread does, and the message goes back on its
queue. Settings travel to the child on its pipe, secrets included, never on argv.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
from pathlib import Path
from typing import Any

import redis
from pydantic import SecretStr

from swarm_workers.agent.loop import AgentOutcome
from swarm_workers.config import Settings
from swarm_workers.deadline import Deadline
from swarm_workers.errors import TimeLimitExceeded
from swarm_workers.execution.isolated_child import OUTCOME_JSON, REDIS_UNAVAILABLE, serve
from swarm_workers.execution.runtime import Runtime
from swarm_workers.models import AgentTask

__all__ = ["RunCrashed", "RunDeferred", "run_isolated", "settings_json"]

_EXIT_GRACE_S = 2.0  # for the child to send its outcome once its deadline stopped the loop

log = logging.getLogger(__name__)

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["swarm_workers.execution.isolated_child"])
_slots: threading.BoundedSemaphore | None = None
_slots_lock = threading.Lock()


class RunCrashed(Exception):
    """The child running a suspect died: this run was cut short like its worker's was."""


class RunDeferred(Exception):
    """No child slot came free before the task's deadline: the run never started."""


def _slots_for(settings: Settings) -> threading.BoundedSemaphore:
    global _slots
    with _slots_lock:
        if _slots is None:
            _slots = threading.BoundedSemaphore(settings.worker.isolation_slots)
        return _slots


def run_isolated(
    task: AgentTask, runtime: Runtime, deadline: Deadline, token: str = ""
) -> AgentOutcome:
    """Run `task`'s agent loop in a child process; `RunCrashed` when the child dies,
    `RunDeferred` when no child slot came free in time.

    The child resumes from the task's checkpoint and saves its own, fenced by the
    parent's lease `token` (the parent keeps renewing the lease meanwhile).
    """
    slots = _slots_for(runtime.settings)
    # A run starts with at least half its time limit left, or not at all: a slot that
    # came free too late would only turn a crash's innocent victims into time-limit
    # failures. Deferred, the task goes back on the queue uncounted and comes back.
    wait_s = max(0.0, deadline.remaining() - deadline.limit_s / 2)
    if not slots.acquire(timeout=wait_s):
        raise RunDeferred(f"task {task.id}: no isolation slot while half its time was left")
    try:
        return _in_child(task, runtime, deadline, token)
    finally:
        slots.release()


def _in_child(task: AgentTask, runtime: Runtime, deadline: Deadline, token: str) -> AgentOutcome:
    request = {
        "token": token,
        "settings": settings_json(runtime.settings),
        "task": task.to_wire(),
        "remaining_s": max(0.001, deadline.remaining()),
        "worker": runtime.worker_name,
    }
    ours, theirs = _CONTEXT.Pipe(duplex=False)
    child = _CONTEXT.Process(target=serve, args=(json.dumps(request).encode(), theirs), daemon=True)
    child.start()
    theirs.close()
    try:
        if not ours.poll(max(0.0, deadline.remaining()) + _EXIT_GRACE_S):
            raise TimeLimitExceeded(deadline.limit_s, "running in isolation")
        try:
            return OUTCOME_JSON.validate_json(ours.recv_bytes())
        except EOFError:  # it ended without an answer: see how
            pass
        child.join(_EXIT_GRACE_S)
        code = child.exitcode
        if code is not None and code < 0:
            raise RunCrashed(f"task {task.id}: its isolated run was killed by signal {-code}")
        if code == REDIS_UNAVAILABLE:
            raise redis.ConnectionError(f"task {task.id}: Redis failed its isolated run")
        raise RuntimeError(f"isolated run of task {task.id} exited with {code} (see its log)")
    finally:
        ours.close()
        if child.is_alive():
            child.kill()
        child.join(_EXIT_GRACE_S)


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
