"""A run's claim on its task id: one stored outcome, one live run, runs counted.

Three Lua scripts (`begin.lua`, `finish.lua`, `lease.lua`, loaded once), one round trip
at the start of a run and one at its end:

- `begin`: the stored outcome if there is one; else the lease on the task id (a short
  TTL, `worker.lease_ttl_s`) and the run counted, atomically, so a twin delivery that
  finishes in between is never missed.
- while the run lives, one thread per process renews every lease it holds, every third
  of the TTL. A lease that could not be renewed for two thirds of its TTL (Redis away,
  or someone else holds it) is *lost*: the run's deadline is stopped with `LeaseLost`,
  so it ends at its next step and records nothing. A dead worker's lease lapses within
  one TTL and its task can be taken over.
- `finish`: store the outcome (put-if-absent), forget the run count, release the lease.
- `abandon`: a run stopped by a Redis or broker fault gives its count back, so a blip
  never costs a task an attempt; only a run cut short by a dying worker does.
- cancels: `begin` answers "cancelled" for a task cancelled before it ran; a running
  one hears of its cancel on the `<prefix>:cancels` channel at once (or, if that
  message was lost, at its next renewal), and its deadline is stopped with
  `TaskCancelled`, so the loop ends at its next step or tool call boundary.

Usage::

    claims = Claims(redis.Redis(), Keys("swarm"), lease_ttl_s=30, result_ttl_s=86400,
                    attempts_ttl_s=14400)
    start = claims.begin("3f2a...", Deadline.start(1800))
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

import redis

from swarm_workers.deadline import Deadline
from swarm_workers.errors import LeaseLost, TaskCancelled
from swarm_workers.keys import Keys
from swarm_workers.models import TaskResult

__all__ = ["Begun", "Claim", "Claims"]

log = logging.getLogger(__name__)


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


_BEGIN = _script("begin.lua")
_FINISH = _script("finish.lua")
_LEASE = _script("lease.lua")


@dataclass
class Claim:
    """The lease a run holds on its task id, and how many runs of it have started."""

    task_id: str
    token: str
    runs: int
    deadline: Deadline
    renewed_at: float = field(default_factory=time.monotonic)
    lost: bool = False
    cancelled: bool = False
    # Known at begin: a fresh run need not ask Redis for a checkpoint it has not got.
    has_checkpoint: bool = True


@dataclass(frozen=True)
class Begun:
    """What `Claims.begin` found: a stored outcome, a cancel, a busy lease, or a claim."""

    kind: Literal["done", "cancelled", "busy", "run"]
    result: TaskResult | None = None
    claim: Claim | None = None
    busy_for_s: float = 0.0


class Claims:
    """Begins, renews, finishes and abandons runs for one worker process."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        lease_ttl_s: float,
        result_ttl_s: int,
        attempts_ttl_s: int,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.lease_ttl_s = lease_ttl_s
        self.result_ttl_s = result_ttl_s
        self.attempts_ttl_s = attempts_ttl_s
        self._begin = client.register_script(_BEGIN)
        self._finish = client.register_script(_FINISH)
        self._lease = client.register_script(_LEASE)
        self._held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._renewer: threading.Thread | None = None
        self._listener: threading.Thread | None = None

    def _task_keys(self, task_id: str) -> list[str]:
        return self.keys.task_keys(task_id)

    # ----------------------------------------------------------------- a run

    def begin(self, task_id: str, deadline: Deadline) -> Begun:
        token = uuid.uuid4().hex
        kind, value, *more = self._begin(
            keys=[*self._task_keys(task_id), self.keys.checkpoint(task_id)],
            args=[token, int(self.lease_ttl_s * 1000), self.attempts_ttl_s],
        )
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "done":
            return Begun("done", result=TaskResult.model_validate_json(value))
        if kind == "cancelled":
            return Begun("cancelled")
        if kind == "busy":
            return Begun("busy", busy_for_s=max(0.0, int(value) / 1000))
        claim = Claim(
            task_id=task_id,
            token=token,
            runs=int(value),
            deadline=deadline,
            has_checkpoint=bool(more and int(more[0])),
        )
        with self._lock:
            self._held[task_id] = claim
            self._ensure_renewer()
        return Begun("run", claim=claim)

    def finish(self, claim: Claim, result: TaskResult) -> TaskResult:
        """Record `result` (unless one is stored) and release; returns what is stored."""
        self._forget(claim)
        return self.record(result, token=claim.token)

    def record(self, result: TaskResult, *, token: str = "") -> TaskResult:
        """Record `result` unless one is stored, answering any cancel; returns the stored
        one. Without a `token` no lease is released (a task cancelled before it ran)."""
        stored = self._finish(
            keys=self._task_keys(result.task_id) + self.keys.run_state_keys(result.task_id),
            args=[result.model_dump_json(), self.result_ttl_s, token],
        )
        return TaskResult.model_validate_json(stored)

    def release(self, claim: Claim) -> None:
        """Drop the lease without recording, keeping the run counted."""
        self._forget(claim)
        self._lease(keys=self._task_keys(claim.task_id)[1:], args=["release", claim.token, 0])

    def abandon(self, claim: Claim) -> None:
        """Drop the lease and un-count the run: it stopped for a fault that was not its
        worker dying. Best effort: if Redis is away the lease lapses on its own."""
        self._forget(claim)
        try:
            self._lease(keys=self._task_keys(claim.task_id)[1:], args=["abandon", claim.token, 0])
        except redis.RedisError as exc:
            log.warning("task %s: could not give back its run count: %s", claim.task_id, exc)

    def _forget(self, claim: Claim) -> None:
        with self._lock:
            if self._held.get(claim.task_id) is claim:
                del self._held[claim.task_id]

    # ----------------------------------------------------------------- renewal

    def _ensure_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(
                target=self._renew_forever, name="swarm-lease-renewer", daemon=True
            )
            self._renewer.start()
        if self._listener is None or not self._listener.is_alive():
            self._listener = threading.Thread(
                target=self._listen_for_cancels, name="swarm-cancel-listener", daemon=True
            )
            self._listener.start()

    def _listen_for_cancels(self) -> None:
        """Stop a held run the moment its cancel is published; reconnects on its own."""
        while not self._closed:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.keys.cancels_channel())
                while not self._closed:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._cancelled(message["data"].decode())
            except redis.RedisError as exc:
                log.debug("cancel listener: %s; resubscribing", exc)
                self._wake.wait(1.0)
            finally:
                pubsub.close()

    def _cancelled(self, task_id: str) -> None:
        with self._lock:
            claim = self._held.get(task_id)
        if claim is not None and not claim.cancelled:
            log.info("task %s: cancelled; stopping at its next step", task_id)
            claim.cancelled = True
            claim.deadline.stop(TaskCancelled(task_id))

    def _renew_forever(self) -> None:
        interval = self.lease_ttl_s / 3
        while not self._closed:
            self._wake.wait(interval)
            if self._closed:
                return
            self.renew_all()

    def renew_all(self) -> None:
        """Renew every held lease once; mark those that cannot be kept as lost."""
        with self._lock:
            held = list(self._held.values())
        if not held:
            return
        ttl_ms = int(self.lease_ttl_s * 1000)
        now = time.monotonic()
        try:
            pipe = self.redis.pipeline(transaction=False)
            for claim in held:
                self._lease(
                    keys=self._task_keys(claim.task_id)[1:],
                    args=["renew", claim.token, ttl_ms],
                    client=pipe,
                )
            answers = pipe.execute()
        except redis.RedisError as exc:
            log.warning("lease renewal failed for %d run(s): %s", len(held), exc)
            for claim in held:
                if now - claim.renewed_at > self.lease_ttl_s * 2 / 3:
                    self._lose(claim, f"not renewed for {now - claim.renewed_at:.1f}s")
            return
        for claim, answer in zip(held, answers, strict=True):
            if answer:
                claim.renewed_at = now
                if answer == 2:
                    self._cancelled(claim.task_id)
            else:
                self._lose(claim, "another delivery holds it, or it lapsed")

    def _lose(self, claim: Claim, why: str) -> None:
        log.error("task %s: lease lost (%s); the run stops at its next step", claim.task_id, why)
        claim.lost = True
        claim.deadline.stop(LeaseLost(claim.task_id, why))
        self._forget(claim)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
