"""Cancelling tasks: a flag the worker reads when a delivery begins, and a message a
running task hears at once.

`Canceller.cancel(task_id)` answers with what it did, never an error trace:

- `finished`: the task has a recorded outcome; nothing changes.
- `stopping`: it is running; its run stops at its next step or tool call boundary
  and records `cancelled` with the usage so far.
- `cancelled`: it is waiting in a queue (or delivered and not begun); when its message
  is taken, the worker records `cancelled` without calling the model.
- `unknown`: no queue, run or result knows this id; nothing is written.

The flag lives under the task's own hash tag and is removed when the task records its
outcome, so a cancelled task leaves its result and nothing else.

Usage::

    Canceller(redis.Redis(), settings).cancel("3f2a...").outcome
    # -> 'cancelled'
"""

from __future__ import annotations

from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict

from swarm_workers.config import Settings
from swarm_workers.keys import KOMBU_UNACKED
from swarm_workers.models import TaskResult
from swarm_workers.queues import ALL_PRIORITIES, queue_name

__all__ = ["CancelOutcome", "CancelReport", "Canceller"]

CancelOutcome = Literal["cancelled", "stopping", "finished", "unknown"]

_SCAN_CHUNK = 1000


class CancelReport(BaseModel):
    """What a cancel did, in words an operator can act on."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    outcome: CancelOutcome

    @property
    def message(self) -> str:
        return {
            "cancelled": "cancelled: it will not run",
            "stopping": "running: it stops at its next step and records `cancelled`",
            "finished": "already finished: nothing to cancel",
            "unknown": "unknown task id: no queue, run or result knows it",
        }[self.outcome]


class Canceller:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.keys = settings.keys

    def cancel(self, task_id: str, *, known: bool = False) -> CancelReport:
        """Cancel one task. `known`: the caller knows the id was submitted (a DAG's node),
        so queues need not be searched to tell a waiting task from an unknown id."""
        result_key, lease_key, _, cancel_key = self.keys.task_keys(task_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(result_key)
        pipe.exists(lease_key)
        recorded, running = pipe.execute()
        if recorded:
            return CancelReport(task_id=task_id, outcome="finished")
        if not running and not known and not self._waiting(task_id):
            return CancelReport(task_id=task_id, outcome="unknown")
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(cancel_key, b"1", ex=self.settings.limits.result_ttl_s)
        pipe.publish(self.keys.cancels_channel(), task_id)
        pipe.execute()
        answer: CancelOutcome = "stopping" if running else "cancelled"
        # A result recorded since the look: either our cancel already took (the run
        # heard it and stopped), or the task finished first and the flag is an orphan
        # the finish script will never see, so it goes.
        stored = self.redis.get(result_key)
        if stored is not None:
            self.redis.delete(cancel_key)
            if TaskResult.model_validate_json(stored).status != "cancelled":
                answer = "finished"
        return CancelReport(task_id=task_id, outcome=answer)

    def _waiting(self, task_id: str) -> bool:
        """Is a message for `task_id` in one of the fleet's queues, or delivered and not
        yet begun? A scan of the queues: an operator's command, not a hot path."""
        needle = task_id.encode()
        for role in self.settings.roles:
            for priority in ALL_PRIORITIES:
                queue = queue_name(priority, role)
                length = int(self.redis.llen(queue))
                for start in range(0, length, _SCAN_CHUNK):
                    chunk = self.redis.lrange(queue, start, start + _SCAN_CHUNK - 1)
                    if any(needle in raw for raw in chunk):
                        return True
        return any(needle in raw for _, raw in self.redis.hscan_iter(KOMBU_UNACKED))
