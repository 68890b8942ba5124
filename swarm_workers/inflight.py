"""The fleet's load per role and priority: tasks waiting, tasks running, oldest wait.

A queue list holds only *waiting* tasks. A delivered task sits in kombu's `unacked`
hash until it is acked, and with prefetch disabled (celery_app.py) a worker holds no
more messages than it runs, so that hash is the running set. Each entry is the JSON
`[message, exchange, routing_key]`; the routing key is the queue name (`p0.<role>`).

Autoscaling needs both: a saturated pool with a short backlog is still busy. A pool's
load is `queued + running` over the (role, priority) lists it is scaled on, and it
needs `ceil(load / concurrency)` replicas.

>>> snap = LoadSnapshot(queued={("r", Priority.P1): 5}, running={("r", Priority.P1): 60})
>>> snap.load("r", [Priority.P1, Priority.P2])
65
>>> replicas_for(65, concurrency=32)
3

Caveat: the messages of a worker that died stay in `unacked` until kombu restores them
(`visibility_timeout_s`), and count as running meanwhile: the error is on the side of
more replicas.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from swarm_workers.keys import KOMBU_UNACKED
from swarm_workers.models import Priority
from swarm_workers.queues import ALL_PRIORITIES, parse_queue, queue_name

__all__ = ["LoadSnapshot", "read_load", "replicas_for"]

RoleLevel = tuple[str, Priority]

# Entries per HSCAN round trip: bounds one reply's size (entries carry whole messages).
_SCAN_COUNT = 200


@dataclass(frozen=True)
class LoadSnapshot:
    """One reading of every queue and the running set, taken at `taken_at` (epoch s)."""

    queued: dict[RoleLevel, int] = field(default_factory=dict)
    running: dict[RoleLevel, int] = field(default_factory=dict)
    oldest_age_s: dict[RoleLevel, float] = field(default_factory=dict)
    taken_at: float = field(default_factory=time.time)

    def load(self, role: str, priorities: Iterable[Priority]) -> int:
        """Tasks queued plus running for `role` at these levels."""
        return sum(
            self.queued.get((role, p), 0) + self.running.get((role, p), 0) for p in priorities
        )


def replicas_for(load: int, *, concurrency: int) -> int:
    """What an HPA with an AverageValue target of `concurrency` per pod asks for."""
    return math.ceil(load / concurrency)


def read_load(client: redis.Redis, roles: Iterable[str]) -> LoadSnapshot:
    """Queue depths, running counts and the oldest waiting task's age, for `roles`."""
    levels = [(role, p) for role in roles for p in ALL_PRIORITIES]
    pipe = client.pipeline(transaction=False)
    for role, p in levels:
        pipe.llen(queue_name(p, role))
        pipe.lindex(queue_name(p, role), -1)  # LPUSH/BRPOP: the oldest is at the tail
    replies = pipe.execute()
    now = time.time()
    queued: dict[RoleLevel, int] = {}
    oldest: dict[RoleLevel, float] = {}
    for index, level in enumerate(levels):
        queued[level] = int(replies[2 * index])
        submitted = _submitted_at(replies[2 * index + 1])
        if submitted is not None:
            oldest[level] = max(0.0, now - submitted)
    running = dict.fromkeys(levels, 0)
    for raw in _unacked_values(client):
        found = _level_of(raw)
        if found in running:
            running[found] += 1
    return LoadSnapshot(queued=queued, running=running, oldest_age_s=oldest, taken_at=now)


def _unacked_values(client: redis.Redis) -> Iterable[bytes | str]:
    cursor = 0
    while True:
        cursor, page = client.hscan(KOMBU_UNACKED, cursor, count=_SCAN_COUNT)
        assert isinstance(page, dict)  # HSCAN without NOVALUES: field -> value
        yield from page.values()
        if cursor == 0:
            return


def _level_of(raw: bytes | str) -> RoleLevel | None:
    try:
        entry = json.loads(raw)
        routing_key = entry[2] or entry[0]["properties"]["delivery_info"]["routing_key"]
        priority, role = parse_queue(str(routing_key))
    except (ValueError, LookupError, TypeError):
        return None  # not one of our messages (another app on the same Redis)
    return role, priority


def _submitted_at(raw: bytes | None) -> float | None:
    """`submitted_at` of the AgentTask inside a queued Celery message, if it has one."""
    if raw is None:
        return None
    try:
        message: dict[str, Any] = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return datetime.fromisoformat(args[0]["submitted_at"]).timestamp()
    except (ValueError, LookupError, TypeError):
        return None
