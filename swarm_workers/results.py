"""The result store: the one place a task's outcome is written, read and waited for.

A task's `TaskResult` lives under one key, `<prefix>:result:<task_id>`, written once
(put-if-absent: a racing twin delivery gets the stored outcome back, not its own) and
kept for `limits.result_ttl_s`. Celery keeps no copy: the task bodies return a few
bytes (`pointer`) with `ignore_result`, which is all a chord counts.

Where a task is (`status`) is read from the fleet's own keys, in one round trip:
a stored result means succeeded, failed or cancelled, a held lease means running, an
open spawn round (a supervisor's ledger, between its runs) means waiting for its
sub-agents, anything else queued (an id nobody has recorded yet reads as queued too).
A recorded result's state is `TaskState.of(result)`: the one map.

Waiting polls the key instead of subscribing: a pub/sub notice is lost with its
connection (a Redis restart, a dropped socket), a stored key is not, so a waiter finds
its result whatever happened to its connection in between.

Usage::

    store = ResultStore(redis.Redis(), Keys("swarm"), ttl_s=3600)
    store.wait("3f2a...", timeout=60).status
    # -> 'succeeded'
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import redis

from swarm_workers.config import Settings
from swarm_workers.errors import ResultTimeout
from swarm_workers.keys import Keys
from swarm_workers.models import TaskResult, TaskState, TaskStatus

__all__ = ["ResultStore", "pointer"]

log = logging.getLogger(__name__)

_POLL_FIRST_S = 0.02
_POLL_MAX_S = 0.5


def pointer(result: TaskResult, *, redact: bool = True) -> dict[str, Any]:
    """What a Celery task returns in place of the result, which is what Flower shows:
    the id, the status, sizes and usage; the output only when `redact` is off (it may
    quote a private prompt), cut to 1 KiB."""
    shown: dict[str, Any] = {
        "task_id": result.task_id,
        "status": result.status,
        "output_chars": len(result.output or ""),
        "tokens": result.usage.total_tokens,
        "steps": result.steps,
    }
    if result.error is not None:
        shown["error"] = result.error.type
    if not redact:
        shown["output"] = (result.output or "")[:1024]
    return shown


class ResultStore:
    """Reads and writes task results under one Redis client."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int) -> None:
        self.redis = client
        self.keys = keys
        self.ttl_s = ttl_s

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis) -> ResultStore:
        return cls(client, settings.keys, settings.limits.result_ttl_s)

    # ----------------------------------------------------------------- write

    def put(self, result: TaskResult) -> TaskResult:
        """Store `result` unless an outcome is stored already; return the stored one."""
        key = self.keys.result(result.task_id)
        pipe = self.redis.pipeline()
        pipe.set(key, result.model_dump_json(), nx=True, ex=self.ttl_s)
        pipe.get(key)
        _, stored = pipe.execute()
        return TaskResult.model_validate_json(stored)

    # ----------------------------------------------------------------- read

    def get(self, task_id: str) -> TaskResult | None:
        raw = self.redis.get(self.keys.result(task_id))
        return None if raw is None else TaskResult.model_validate_json(raw)

    def get_many(self, task_ids: Sequence[str]) -> list[TaskResult | None]:
        if not task_ids:
            return []
        raws = self.redis.mget([self.keys.result(t) for t in task_ids])
        return [None if raw is None else TaskResult.model_validate_json(raw) for raw in raws]

    def status(self, task_id: str) -> TaskStatus:
        (found,) = self.statuses([task_id])
        return found

    def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        """Each task's state: one round trip for all of them."""
        if not task_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget([self.keys.result(t) for t in task_ids])
        for task_id in task_ids:
            pipe.exists(self.keys.lease(task_id))
            pipe.hexists(self.keys.spawn(task_id), "waiting")
        raws, *flags = pipe.execute()
        found: list[TaskStatus] = []
        for i, (task_id, raw) in enumerate(zip(task_ids, raws, strict=True)):
            leased, waiting = flags[2 * i], flags[2 * i + 1]
            if raw is not None:
                result = TaskResult.model_validate_json(raw)
                found.append(TaskStatus(task_id=task_id, state=TaskState.of(result), result=result))
            else:
                state = (
                    TaskState.RUNNING
                    if leased
                    else TaskState.WAITING
                    if waiting
                    else TaskState.QUEUED
                )
                found.append(TaskStatus(task_id=task_id, state=state))
        return found

    # ----------------------------------------------------------------- wait

    def wait(self, task_id: str, timeout: float) -> TaskResult:
        """The stored result, once there is one; `ResultTimeout` after `timeout` seconds.

        A Redis error while waiting is not the task's outcome: the poll goes on until
        the timeout (the connection pool reconnects on the next call).
        """
        deadline = time.monotonic() + timeout
        interval = _POLL_FIRST_S
        while True:
            try:
                result = self.get(task_id)
            except redis.RedisError as exc:
                log.debug("waiting for %s: Redis unavailable: %s", task_id, exc)
                result = None
            if result is not None:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResultTimeout(task_id, timeout)
            time.sleep(min(interval, left))
            interval = min(interval * 2, _POLL_MAX_S)
