"""The child process of an isolated run (see `execution.isolation`).

A fork of the fork server that imported this module once: it reads the parent's
settings, the task and the time left from the pipe; runs the agent loop under the same
failpoints as a worker (resuming from the task's checkpoint, and saving its own under
the parent's lease); and sends the `AgentOutcome` back as JSON.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
from multiprocessing.connection import Connection

import redis
from pydantic import TypeAdapter

from swarm_workers.agent.loop import AgentOutcome, run_agent
from swarm_workers.config import given_settings
from swarm_workers.deadline import Deadline
from swarm_workers.execution.failpoints import check_failpoints
from swarm_workers.execution.runtime import Runtime
from swarm_workers.models import AgentTask

__all__ = ["OUTCOME_JSON", "REDIS_UNAVAILABLE", "serve"]

log = logging.getLogger(__name__)

OUTCOME_JSON = TypeAdapter(AgentOutcome)
# The child's exit code when Redis failed it (sysexits' EX_TEMPFAIL): the parent raises
# a `RedisError` as a run in its own thread would, and the message goes back on its queue.
REDIS_UNAVAILABLE = 75
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Be killed when the fork server dies, which it does when its worker does: a child
    outliving a SIGKILLed worker would run on past its lease, beside the task's next
    delivery. (Linux; elsewhere the child ends at its deadline.)"""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)


def serve(request: bytes, pipe: Connection) -> None:
    """Run one isolated task and send its outcome on `pipe` (the child's whole life)."""
    _die_with_parent()
    data = json.loads(request)
    settings = given_settings(data["settings"])
    task = AgentTask.from_wire(data["task"])
    deadline = Deadline.start(data["remaining_s"])
    runtime = Runtime.build(settings, data["worker"])
    try:
        check_failpoints(task, settings)
        outcome = run_agent(
            task,
            runtime,
            deadline,
            durable=runtime.checkpoints.writer(task.id, data.get("token", "")),
            spawner=runtime.spawner,
        )
    except redis.RedisError:
        log.exception("task %s: Redis failed its isolated run", task.id)
        os._exit(REDIS_UNAVAILABLE)
    finally:
        runtime.close()
    pipe.send_bytes(OUTCOME_JSON.dump_json(outcome))
    pipe.close()
    os._exit(0)  # no interpreter teardown: the parent has what it needs
