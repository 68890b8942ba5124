"""Failpoints: faults the fault suite injects into real workers; off unless configured.

`failpoints = "crash"` (or `SWARM_FAILPOINTS=crash`) in a worker's settings makes a
task whose metadata has `failpoint = "crash"` SIGKILL the process that runs it, as the
kernel's OOM killer would: the poison task of the fault suite. A producer cannot turn
this on; only the worker's own configuration can.
"""

from __future__ import annotations

import logging
import os
import signal

from swarm_workers.config import Settings
from swarm_workers.models import AgentTask

__all__ = ["check_failpoints"]

log = logging.getLogger(__name__)


def check_failpoints(task: AgentTask, settings: Settings) -> None:
    if "crash" in settings.failpoint_set and task.metadata.get("failpoint") == "crash":
        log.critical("failpoint crash: task %s kills process %d", task.id, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
