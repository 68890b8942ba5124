"""A submitted DAG in Redis: its graph and its nodes' tasks.

Keys (named in `keys.Keys`), both expiring after `limits.result_ttl_s`:

    <prefix>:dag:<dag_id>          the graph (`DagRecord` JSON): deps, policies, task ids
    <prefix>:dag:<dag_id>:tasks    hash: node -> its `AgentTask` JSON (prompt as written)

A node's outcome is an ordinary task result (`results.ResultStore`), under its task
id `<dag_id>.<node>`.

Node messages carry only `(dag_id, node)`; the worker reads the rest here, so a
prompt never travels through the broker (nor shows in Flower), and a chord header
message, which carries its body, stays small.

Usage::

    store = DagStore(redis.Redis(), settings)
    store.record("3f2a...").nodes["s"].deps
    # -> ('a', 'b')
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import redis
from pydantic import BaseModel, ConfigDict, Field

from swarm_workers.config import Settings
from swarm_workers.dag.model import OnFailure
from swarm_workers.errors import DagError
from swarm_workers.models import AgentTask, Priority, utcnow

__all__ = ["DagRecord", "DagStore", "NodeRecord", "node_task_id"]


def node_task_id(dag_id: str, node: str) -> str:
    """The deterministic task id of a node: the same on every delivery of its message."""
    return f"{dag_id}.{node}"


class NodeRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: str
    role: str
    priority: Priority
    deps: tuple[str, ...] = ()
    on_failure: OnFailure = "fail"


class DagRecord(BaseModel):
    """What a worker and a `DagHandle` need to know about a submitted DAG."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dag_id: str
    name: str | None = None
    submitted_at: datetime = Field(default_factory=utcnow)
    nodes: dict[str, NodeRecord]  # in topological order
    extra_waits: int = 0
    levels_split: int = 0


class DagStore:
    """Reads and writes the keys above with one Redis client."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.keys = settings.keys
        self.ttl = settings.limits.result_ttl_s

    def save(self, record: DagRecord, tasks: Mapping[str, AgentTask]) -> None:
        """Both keys in one transaction: a worker never finds the graph without its tasks."""
        tasks_key = self.keys.dag_tasks(record.dag_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.dag(record.dag_id), record.model_dump_json(), ex=self.ttl)
        pipe.hset(tasks_key, mapping={node: task.model_dump_json() for node, task in tasks.items()})
        pipe.expire(tasks_key, self.ttl)
        pipe.execute()

    def record(self, dag_id: str) -> DagRecord:
        raw = self.redis.get(self.keys.dag(dag_id))
        if raw is None:
            raise DagError(f"no DAG {dag_id!r}: unknown id, or its records expired")
        return DagRecord.model_validate_json(raw)

    def task(self, dag_id: str, node: str) -> AgentTask:
        raw = self.redis.hget(self.keys.dag_tasks(dag_id), node)
        if raw is None:
            raise DagError(f"DAG {dag_id!r} has no node {node!r} (or its records expired)")
        return AgentTask.model_validate_json(raw)
