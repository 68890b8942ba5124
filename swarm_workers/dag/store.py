"""A submitted DAG in Redis: its graph, its nodes' tasks, and the nodes' results.

Keys (prefix `swarm` by default), all expiring after `limits.result_ttl_s`:

    <prefix>:dag:<dag_id>          the graph (`DagRecord` JSON): deps, policies, task ids
    <prefix>:dag:<dag_id>:tasks    hash: node -> its `AgentTask` JSON (prompt as written)
    <prefix>:result:<task_id>      a node's `TaskResult`, written by `execution.execute`
                                   or, for a node that never runs the model, by `record`

Node messages carry only `(dag_id, node)`; the worker reads the rest here, so a
prompt never travels through the broker (nor shows in Flower), and a chord header
message, which carries its body, stays small.

>>> store = DagStore(redis.Redis(), settings)               # doctest: +SKIP
>>> store.record("3f2a...").nodes["s"].deps                 # doctest: +SKIP
('a', 'b')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import redis
from pydantic import BaseModel, ConfigDict, Field

from swarm_workers.config import Settings
from swarm_workers.dag.model import OnFailure
from swarm_workers.errors import DagError
from swarm_workers.models import AgentTask, Priority, TaskResult, utcnow

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
        self.prefix = settings.key_prefix
        self.ttl = settings.limits.result_ttl_s

    def _dag_key(self, dag_id: str) -> str:
        return f"{self.prefix}:dag:{dag_id}"

    def result_key(self, task_id: str) -> str:
        return f"{self.prefix}:result:{task_id}"

    def save(self, record: DagRecord, tasks: Mapping[str, AgentTask]) -> None:
        key = self._dag_key(record.dag_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(key, record.model_dump_json(), ex=self.ttl)
        pipe.hset(
            f"{key}:tasks", mapping={node: task.model_dump_json() for node, task in tasks.items()}
        )
        pipe.expire(f"{key}:tasks", self.ttl)
        pipe.execute()

    def record(self, dag_id: str) -> DagRecord:
        raw = self.redis.get(self._dag_key(dag_id))
        if raw is None:
            raise DagError(f"no DAG {dag_id!r}: unknown id, or its records expired")
        return DagRecord.model_validate_json(raw)

    def task(self, dag_id: str, node: str) -> AgentTask:
        raw = self.redis.hget(f"{self._dag_key(dag_id)}:tasks", node)
        if raw is None:
            raise DagError(f"DAG {dag_id!r} has no node {node!r} (or its records expired)")
        return AgentTask.model_validate_json(raw)

    def results(self, task_ids: Sequence[str]) -> list[TaskResult | None]:
        if not task_ids:
            return []
        raws = self.redis.mget([self.result_key(t) for t in task_ids])
        return [None if raw is None else TaskResult.model_validate_json(raw) for raw in raws]

    def put_result(self, result: TaskResult) -> TaskResult:
        """Store unless one is stored already; return what is stored (as `execute` does)."""
        key = self.result_key(result.task_id)
        pipe = self.redis.pipeline()
        pipe.set(key, result.model_dump_json(), nx=True, ex=self.ttl)
        pipe.get(key)
        _, stored = pipe.execute()
        return TaskResult.model_validate_json(stored)
