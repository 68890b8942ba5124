"""Dead letters: tasks that failed for good, kept per role with the original task and
every run's error, until an operator replays or purges them.

Keys (named in `keys.Keys.dead_letters`, one hash tag per role):

    {<prefix>:dead:<role>}:index     zset: task id -> when it died (s)
    {<prefix>:dead:<role>}:entries   hash: task id -> `DeadLetter` JSON
    {<prefix>:dead:<role>}:dropped   how many the cap pushed out, oldest first

Kept for `deadletters.retention_s` and at most `deadletters.max_per_role` per role;
both are enforced by `add.lua` on every add. `take.lua` removes letters atomically,
so a replay or purge of the same id happens once.

Usage::

    store = DeadLetterStore(redis.Redis(), settings)
    [letter.task.id for letter in store.find(role="research")]
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from importlib import resources

import redis
from pydantic import BaseModel, ConfigDict

from swarm_workers.config import Settings
from swarm_workers.models import AgentTask, ErrorInfo, TaskResult

__all__ = ["NOT_DEAD", "AttemptRecord", "DeadLetter", "DeadLetterStore", "is_dead"]

NOT_DEAD = frozenset({"UpstreamFailed", "UpstreamSkipped", "TaskCancelled"})
"""Failures that are no task's own: a DAG node blocked by its deps, a cancel."""


def is_dead(result: TaskResult) -> bool:
    """Does this recorded outcome make its task a dead letter?"""
    if result.status != "failed":
        return False
    return result.error is None or result.error.type not in NOT_DEAD


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


_ADD = _script("add.lua")
_TAKE = _script("take.lua")


class AttemptRecord(BaseModel):
    """One run of the task: how it ended, and when (unknown for a run its worker's
    death cut short)."""

    model_config = ConfigDict(frozen=True)

    run: int
    error: ErrorInfo
    at: datetime | None = None


class DeadLetter(BaseModel):
    """A task that failed for good: the task as it ran, and every run's error."""

    model_config = ConfigDict(frozen=True)

    task: AgentTask
    error: ErrorInfo
    attempts: tuple[AttemptRecord, ...]
    died_at: datetime
    worker: str | None = None

    @classmethod
    def of(cls, task: AgentTask, result: TaskResult) -> DeadLetter:
        error = result.error or ErrorInfo(type="Failed", message="failed")
        lost = ErrorInfo(type="WorkerLost", message="its worker died while it ran")
        runs = max(1, result.attempts)
        earlier = tuple(AttemptRecord(run=n, error=lost) for n in range(1, runs))
        last = AttemptRecord(run=runs, error=error, at=result.timings.finished_at)
        return cls(
            task=task,
            error=error,
            attempts=(*earlier, last),
            died_at=result.timings.finished_at,
            worker=result.worker,
        )


class DeadLetterStore:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.keys = settings.keys
        self._add = client.register_script(_ADD)
        self._take = client.register_script(_TAKE)

    def add(self, letter: DeadLetter) -> int:
        """Keep `letter`; returns how many older letters the cap dropped."""
        now = time.time()
        keep_after = now - self.settings.deadletters.retention_s
        return int(
            self._add(
                keys=list(self.keys.dead_letters(letter.task.role)),
                args=[
                    letter.task.id,
                    letter.model_dump_json(),
                    letter.died_at.timestamp(),
                    keep_after,
                    self.settings.deadletters.max_per_role,
                ],
            )
        )

    def _roles(self, role: str | None) -> list[str]:
        return [role] if role is not None else list(self.settings.roles)

    def find(
        self,
        *,
        role: str | None = None,
        since: datetime | None = None,
        error: str | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Dead letters, newest first, filtered by role, age and error type."""
        low = since.timestamp() if since is not None else "-inf"
        found: list[DeadLetter] = []
        for name in self._roles(role):
            index, entries, _ = self.keys.dead_letters(name)
            ids: list[bytes] = self.redis.zrangebyscore(index, low, "+inf")  # type: ignore[assignment]
            if not ids:
                continue
            for raw in self.redis.hmget(entries, ids):
                if raw is not None:
                    letter = DeadLetter.model_validate_json(raw)
                    if error is None or letter.error.type == error:
                        found.append(letter)
        found.sort(key=lambda letter: letter.died_at, reverse=True)
        return found[:limit] if limit is not None else found

    def get(self, task_id: str) -> DeadLetter | None:
        for name in self.settings.roles:
            raw = self.redis.hget(self.keys.dead_letters(name)[1], task_id)
            if raw is not None:
                return DeadLetter.model_validate_json(raw)
        return None

    def take(self, task_ids: Iterable[str]) -> list[DeadLetter]:
        """Remove these letters and return them; ids already taken are left out."""
        wanted = list(dict.fromkeys(task_ids))
        taken: list[DeadLetter] = []
        for name in self.settings.roles:
            if not wanted:
                break
            index, entries, _ = self.keys.dead_letters(name)
            raws = self._take(keys=[index, entries], args=wanted)
            for task_id, raw in zip(list(wanted), raws, strict=True):
                if raw:
                    taken.append(DeadLetter.model_validate_json(raw))
                    wanted.remove(task_id)
        return taken

    def counts(self) -> dict[str, int]:
        """Dead letters kept per role."""
        pipe = self.redis.pipeline(transaction=False)
        for name in self.settings.roles:
            pipe.zcard(self.keys.dead_letters(name)[0])
        return dict(zip(self.settings.roles, (int(n) for n in pipe.execute()), strict=True))

    def dropped(self) -> dict[str, int]:
        """Dead letters the cap pushed out, per role."""
        raws = self.redis.mget([self.keys.dead_letters(n)[2] for n in self.settings.roles])
        return {n: int(r or 0) for n, r in zip(self.settings.roles, raws, strict=True)}
