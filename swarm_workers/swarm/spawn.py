"""`swarm__spawn`: a supervisor's model starts sub-agents on the fleet, and reads their
results on a later turn.

A role with `spawn` in its config is offered the tool. Its arguments are a list of
sub-tasks (prompt, role, optional priority, budget, id and deps among them); they become
a DAG of ordinary tasks (`dag.prepare`, so the DAG rules and errors apply) on their roles'
priority queues. Calling it never blocks a worker thread: the loop checkpoints and ends
its run as *waiting* (`Waiting`); the worker sends the children and acknowledges the
supervisor's message; the last child to record its outcome sends a continuation, an
ordinary delivery of the supervisor's task, which resumes from the checkpoint and finds
the children's results as the tool's answer (`Ready`).

Limits (`roles.<r>.spawn`), each refused as a `SpawnRefused` tool error the model reads:
sub-agents per call, in the root's whole tree, depth (sub-agents that may spawn), and a
token budget for the whole tree that each child's output budget is drawn from (what it
did not spend is given back when it records). The tree's total and budget are checked
and drawn in one script, once per call (racing deliveries of one call draw once), against
the root's limit and budget (a sub-supervisor's role cannot widen them). Priority is
inherited; it may be lowered, never raised.

Redis (names in `keys`): the supervisor's ledger `<p>:spawn:{<id>}` (`ledger.lua`: its
rounds, the children each waits on, whether the continuation was sent) and the root's
totals `<p>:swarm:{<root>}` (`draw.lua`). Both go when their task records its outcome.

Usage::

    spawner = Spawner(redis.Redis(), settings)
    spawner.answer(task, "call_1", '{"tasks": [{"prompt": "Find X"}]}')
    # -> Waiting(round=1, dag_id='3f2a....s1f0c9a2b')
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarm_workers.config import RoleSettings, Settings
from swarm_workers.dag.compile import plan
from swarm_workers.dag.model import DagSpec, Node
from swarm_workers.dag.prepare import PreparedDag, prepare_dag
from swarm_workers.dag.store import DagStore
from swarm_workers.errors import (
    Backpressure,
    DagError,
    InvalidTask,
    InvalidToolArguments,
    SpawnRefused,
)
from swarm_workers.models import AgentTask, Priority, TaskResult
from swarm_workers.ratelimit.admission import AdmissionControl
from swarm_workers.results import ResultStore
from swarm_workers.tools.base import ToolSpec

__all__ = ["SPAWN_TOOL", "ChildRef", "Lineage", "Ready", "RoundRecord", "Spawner", "Waiting"]

log = logging.getLogger(__name__)

SPAWN_TOOL = "swarm__spawn"

_LEDGER = resources.files(__package__).joinpath("ledger.lua").read_text()
_DRAW = resources.files(__package__).joinpath("draw.lua").read_text()

_SPEC = ToolSpec(
    name=SPAWN_TOOL,
    description=(
        "Start sub-agents that work in parallel on the fleet; their outputs (or errors) "
        "come back as this tool's result once all have finished. Each task: a prompt, and "
        "optionally a role, a priority (never above yours), an output-token budget, an id "
        "and deps (ids of tasks it needs first; {{ id.output }} in its prompt quotes them)."
    ),
    parameters={
        "type": "object",
        "properties": {
            "tasks": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "prompt": {"type": "string"},
                        "role": {"type": "string"},
                        "priority": {"type": "string", "enum": ["P0", "P1", "P2"]},
                        "budget": {"type": "integer", "minimum": 1},
                        "id": {"type": "string"},
                        "deps": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["prompt"],
                },
            }
        },
        "required": ["tasks"],
    },
)


class _SubTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    role: str | None = None
    priority: str | None = None
    budget: int | None = Field(None, gt=0)
    id: str | None = None
    deps: list[str] = Field(default_factory=list)


class _Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[_SubTask] = Field(min_length=1)


@dataclass(frozen=True)
class Lineage:
    """Where a task sits in a swarm, read from its metadata (a root has none)."""

    root: str
    parent: str | None
    round: int
    depth: int

    @classmethod
    def of(cls, task: AgentTask) -> Lineage:
        meta = task.metadata
        parent = meta.get("swarm_parent")
        if not isinstance(parent, str):
            return cls(root=task.id, parent=None, round=0, depth=0)
        return cls(
            root=str(meta.get("swarm_root") or parent),
            parent=parent,
            round=int(meta.get("swarm_round") or 1),
            depth=int(meta.get("swarm_depth") or 1),
        )


class ChildRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: str
    node: str
    role: str
    output_budget: int


class RoundRecord(BaseModel):
    """One `swarm__spawn` call: its children, as a DAG."""

    model_config = ConfigDict(frozen=True)

    round: int
    call_id: str
    dag_id: str
    children: tuple[ChildRef, ...]


@dataclass(frozen=True)
class Waiting:
    """The call's children run; the supervisor's run ends until they all record."""

    round: int
    dag_id: str


@dataclass(frozen=True)
class Ready:
    """Every child recorded: the tool's answer for the model."""

    content: str


class Spawner:
    """Answers `swarm__spawn` calls and keeps the ledgers, on one Redis client."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.keys = settings.keys
        self.ttl_s = settings.limits.result_ttl_s
        self.results = ResultStore.from_settings(settings, client)
        self.dags = DagStore(client, settings)
        self.admission = AdmissionControl(client, settings.admission)
        self._ledger = client.register_script(_LEDGER)
        self._draw = client.register_script(_DRAW)

    # ----------------------------------------------------------------- the tool

    @staticmethod
    def spec() -> ToolSpec:
        return _SPEC

    @staticmethod
    def offered(role: RoleSettings) -> bool:
        return role.spawn is not None

    def answer(self, task: AgentTask, call_id: str, raw: str) -> Waiting | Ready:
        """The answer to one call: its children started (`Waiting`) or done (`Ready`).

        The same call seen again (a resumed or continued run) finds its round; a new
        call is checked against the limits (`SpawnRefused`) and opens the next round.
        """
        known = self.redis.hget(self.keys.spawn(task.id), f"call:{call_id}")
        if known is not None:
            record = self.round(task.id, int(known))
            return self._collect(task, record)
        return self._open(task, call_id, raw)

    def _open(self, task: AgentTask, call_id: str, raw: str) -> Waiting:
        role = self.settings.role(task.role)
        limits = role.spawn
        if limits is None:
            raise SpawnRefused(f"role {task.role!r} may not spawn sub-agents")
        try:
            arguments = _Arguments.model_validate_json(raw or "{}")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "arguments"
            raise InvalidToolArguments(SPAWN_TOOL, f"{where}: {first['msg']}") from None
        lineage = Lineage.of(task)
        if lineage.depth >= limits.max_depth:
            raise SpawnRefused(
                f"depth limit: this agent is at depth {lineage.depth} and sub-agents may "
                f"spawn down to depth {limits.max_depth} only; do the work yourself"
            )
        n = len(arguments.tasks)
        if n > limits.max_per_spawn:
            raise SpawnRefused(
                f"{n} sub-agents asked in one call; at most {limits.max_per_spawn} per call"
            )
        digest = hashlib.sha256(call_id.encode()).hexdigest()[:8]
        dag_id = f"{task.id}.s{digest}"
        prepared = self._prepare(task, lineage, arguments, dag_id)
        for queue in prepared.queues:
            try:
                self.admission.check(queue)
            except Backpressure as exc:
                raise SpawnRefused(f"the fleet is saturated ({exc}); try again later") from None
        tokens = sum(t.output_budget for t in prepared.tasks.values())
        budget = limits.tree_budget if limits.tree_budget is not None else -1
        drawn, value, *limit = self._draw(
            keys=[self.keys.swarm_root(lineage.root)],
            args=["draw", dag_id, n, limits.max_total, tokens, budget, self.ttl_s],
        )
        if drawn == 0:
            raise SpawnRefused(
                f"tree limit: {value} sub-agents spawned under this root already, "
                f"{n} more would pass the limit of {limit[0] if limit else limits.max_total}"
            )
        if drawn == -1:
            raise SpawnRefused(
                f"tree budget: these sub-agents' budgets total {tokens} output tokens but "
                f"only {value} are left of the tree's budget; ask for fewer or smaller"
            )
        self.dags.save(prepared.record, prepared.tasks)
        children = tuple(
            ChildRef(task_id=t.id, node=node, role=t.role, output_budget=t.output_budget)
            for node, t in prepared.tasks.items()
        )
        record = RoundRecord(round=0, call_id=call_id, dag_id=dag_id, children=children)
        number = int(
            self._ledger(
                keys=[self.keys.spawn(task.id)],
                args=[
                    "round",
                    call_id,
                    dag_id,
                    record.model_dump_json(),
                    self.ttl_s,
                    *(c.task_id for c in children),
                ],
            )
        )
        log.info("task %s: spawn round %d, %d sub-agent(s)", task.id, number, n)
        return Waiting(round=number, dag_id=dag_id)

    def _prepare(
        self, parent: AgentTask, lineage: Lineage, arguments: _Arguments, dag_id: str
    ) -> PreparedDag:
        nodes = [
            Node(
                id=sub.id or f"c{i + 1}",
                prompt=sub.prompt,
                role=sub.role,
                priority=sub.priority,
                budget=sub.budget,
                deps=sub.deps,
                metadata={},
            )
            for i, sub in enumerate(arguments.tasks)
        ]

        def build_task(prompt: str, **options: Any) -> AgentTask:
            return self._child(parent, lineage, prompt, **options)

        try:
            return prepare_dag(
                DagSpec.of(nodes),
                build_task,
                max_nodes=self.settings.limits.max_dag_nodes,
                dag_id=dag_id,
            )
        except (DagError, InvalidTask) as exc:
            raise SpawnRefused(str(exc)) from None

    def _child(
        self,
        parent: AgentTask,
        lineage: Lineage,
        prompt: str,
        *,
        role: str | None,
        priority: str | None,
        budget: int | None,
        deps: Sequence[str],
        metadata: Mapping[str, Any],
        task_id: str,
    ) -> AgentTask:
        name = role or parent.role
        settings = self.settings.role(name)  # UnknownRole: an InvalidTask
        try:
            level = Priority(priority) if priority is not None else parent.priority
        except ValueError:
            raise InvalidTask("priority", f"{priority!r} is not one of P0, P1, P2") from None
        if level.value < parent.priority.value:
            raise InvalidTask(
                "priority",
                f"{level.value} is above the supervisor's {parent.priority.value}: "
                "a sub-agent's priority may be lowered, never raised",
            )
        return AgentTask(
            id=task_id,
            role=name,
            priority=level,
            prompt=prompt,
            output_budget=budget or settings.budget_for(level),
            deps=tuple(deps),
            metadata={
                **metadata,
                "swarm_root": lineage.root,
                "swarm_parent": parent.id,
                "swarm_depth": lineage.depth + 1,
            },
        )

    def _collect(self, task: AgentTask, record: RoundRecord) -> Waiting | Ready:
        left = self.redis.hget(self.keys.spawn(task.id), f"left:{record.round}")
        if left is not None and int(left) > 0:
            return Waiting(round=record.round, dag_id=record.dag_id)
        results = self.results.get_many([c.task_id for c in record.children])
        cap = max(200, self.settings.tools.max_output_chars // max(1, len(record.children)) - 120)
        rows: list[dict[str, Any]] = []
        for child, result in zip(record.children, results, strict=True):
            row: dict[str, Any] = {"id": child.node, "role": child.role}
            if result is None:
                row |= {"status": "failed", "error": "no recorded result (expired)"}
            else:
                row["status"] = result.status
                if result.output is not None:
                    row["output"] = result.output[:cap]
                if result.error is not None:
                    row["error"] = f"{result.error.type}: {result.error.message}"[:cap]
            rows.append(row)
        succeeded = sum(1 for r in rows if r["status"] == "succeeded")
        content = {
            "round": record.round,
            "sub_agents": len(rows),
            "succeeded": succeeded,
            "failed": len(rows) - succeeded,
            "results": rows,
        }
        return Ready(json.dumps(content, separators=(",", ":")))

    # ----------------------------------------------------------------- the ledger

    def round(self, task_id: str, number: int) -> RoundRecord:
        raw = self.redis.hget(self.keys.spawn(task_id), f"round:{number}")
        if raw is None:
            raise SpawnRefused(f"round {number} of task {task_id} expired")
        return RoundRecord.model_validate_json(raw).model_copy(update={"round": number})

    def rounds(self, task_id: str) -> list[RoundRecord]:
        """Every round a supervisor opened, in order (empty for a task that never spawned)."""
        fields = self.redis.hgetall(self.keys.spawn(task_id))
        found = []
        for key, raw in fields.items():
            name = key.decode() if isinstance(key, bytes) else str(key)
            if name.startswith("round:"):
                record = RoundRecord.model_validate_json(raw)
                found.append(record.model_copy(update={"round": int(name[6:])}))
        return sorted(found, key=lambda r: r.round)

    def flag(self, task_id: str, name: str) -> bool:
        return bool(self.redis.hexists(self.keys.spawn(task_id), name))

    def mark(self, task_id: str, name: str) -> None:
        self.redis.hset(self.keys.spawn(task_id), name, 1)

    def hold(self, task_id: str, position: str | None) -> None:
        """Keep where the suspending delivery sat in its DAG's canvas (`Sender.position`),
        for the continuation to take its place; nothing for a task outside a canvas."""
        if position is not None:
            self.redis.hset(self.keys.spawn(task_id), "canvas", position)

    def position(self, task_id: str) -> str | None:
        raw = self.redis.hget(self.keys.spawn(task_id), "canvas")
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    def prepared(self, dag_id: str) -> PreparedDag:
        """A round's children as sent: rebuilt from the DAG store (the same every time)."""
        record = self.dags.record(dag_id)
        tasks = {node: self.dags.task(dag_id, node) for node in record.nodes}
        steps = plan({node: rec.deps for node, rec in record.nodes.items()})
        return PreparedDag(record=record, tasks=tasks, plan=steps)

    def child_done(self, child: AgentTask, result: TaskResult) -> tuple[str, int] | None:
        """Count a child's recorded outcome; (parent id, round) when the round is complete
        and its continuation is to be sent (then `mark(parent, f"cont:{round}")`)."""
        lineage = Lineage.of(child)
        if lineage.parent is None:
            return None
        number = self.redis.hget(
            self.keys.spawn(lineage.parent), f"dag:{child.metadata.get('dag_id')}"
        )
        if number is None:
            log.warning("task %s: its supervisor's ledger is gone", child.id)
            return None
        first, last = self._ledger(
            keys=[self.keys.spawn(lineage.parent)], args=["done", int(number), child.id]
        )
        unspent = child.output_budget - result.usage.completion_tokens
        if first and unspent > 0:
            self._draw(keys=[self.keys.swarm_root(lineage.root)], args=["give", unspent])
        return (lineage.parent, int(number)) if last else None
