"""A supervisor's tree of sub-agents, finished or live, and cancelling it.

`build_tree` reads a supervisor's ledger (its spawn rounds) and each child's state from
the result store: a recorded child shows its status, usage, cost and timings (and its
own sub-agents, from its result); one not recorded yet shows as running, waiting (a
supervisor whose own sub-agents run: it holds no thread) or queued. The root
stores the finished tree in its `TaskResult.swarm`; `swarm tree ID` builds it live.

Critical path: the supervisor's own model time plus, for each round, its slowest
sub-agent (queue wait and run): the least wall time the tree could take. Sequential:
its own model time plus every sub-agent's run, as one agent doing it all would spend.

Usage::

    build_tree(spawner, "3f2a...", started_at=t0, own_model_s=2.0).total_agents
    # -> 20
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from swarm_workers.cancellation import Canceller
from swarm_workers.models import SubAgent, SwarmTree, TaskResult, TaskState, TaskStatus, utcnow
from swarm_workers.swarm.spawn import Spawner

__all__ = ["build_tree", "cancel_tree", "descendants"]


def build_tree(
    spawner: Spawner,
    task_id: str,
    *,
    started_at: datetime | None,
    own_model_s: float,
    finished_at: datetime | None = None,
    depth: int = 1,
) -> SwarmTree:
    rounds = spawner.rounds(task_id)
    children: list[SubAgent] = []
    critical = own_model_s
    sequential = own_model_s
    for record in rounds:
        ids = [c.task_id for c in record.children]
        slowest = 0.0
        for child, status in zip(record.children, spawner.results.statuses(ids), strict=True):
            agent = _agent(spawner, child.task_id, child.role, task_id, record.round, status, depth)
            children.append(agent)
            if agent.run_s is not None:
                sequential += agent.run_s
                slowest = max(slowest, agent.run_s + (agent.queue_wait_s or 0.0))
        critical += slowest
    flat = list(_walk(children))
    end = finished_at or utcnow()
    return SwarmTree(
        rounds=len(rounds),
        children=tuple(children),
        total_agents=len(flat),
        prompt_tokens=sum(a.prompt_tokens for a in flat),
        completion_tokens=sum(a.completion_tokens for a in flat),
        cost_usd=round(sum(a.cost_usd for a in flat), 8),
        wall_s=None if started_at is None else round((end - started_at).total_seconds(), 6),
        own_model_s=round(own_model_s, 6),
        sequential_s=round(sequential, 6),
        critical_path_s=round(critical, 6),
    )


def _agent(
    spawner: Spawner,
    task_id: str,
    role: str,
    parent: str,
    number: int,
    status: TaskStatus,
    depth: int,
) -> SubAgent:
    result: TaskResult | None = status.result
    state = status.state
    if result is None:
        nested: tuple[SubAgent, ...] = ()
        if state is TaskState.RUNNING or spawner.rounds(task_id):
            nested = build_tree(
                spawner, task_id, started_at=None, own_model_s=0.0, depth=depth + 1
            ).children
        return SubAgent(
            task_id=task_id,
            role=role,
            parent=parent,
            round=number,
            depth=depth,
            status=_LIVE.get(state, "queued"),
            children=nested,
        )
    return SubAgent(
        task_id=task_id,
        role=role,
        parent=parent,
        round=number,
        depth=depth,
        status=result.status,
        error=result.error,
        prompt_tokens=result.usage.prompt_tokens,
        completion_tokens=result.usage.completion_tokens,
        cost_usd=result.cost_usd,
        queue_wait_s=round(result.timings.queue_wait_s, 6),
        run_s=round(result.timings.run_s, 6),
        children=result.swarm.children if result.swarm is not None else (),
    )


_LIVE: dict[TaskState, Literal["running", "waiting"]] = {
    TaskState.RUNNING: "running",
    TaskState.WAITING: "waiting",  # between its runs, its own sub-agents at work
}


def _walk(agents: list[SubAgent] | tuple[SubAgent, ...]) -> list[SubAgent]:
    found: list[SubAgent] = []
    for agent in agents:
        found.append(agent)
        found.extend(_walk(agent.children))
    return found


def descendants(spawner: Spawner, task_id: str) -> list[str]:
    """Every sub-agent under `task_id` that its ledgers still name (running trees)."""
    found: list[str] = []
    for record in spawner.rounds(task_id):
        for child in record.children:
            found.append(child.task_id)
            found.extend(descendants(spawner, child.task_id))
    return found


def cancel_tree(spawner: Spawner, canceller: Canceller, task_id: str) -> int:
    """Cancel every sub-agent under `task_id`; how many were not finished yet."""
    stopped = 0
    for child in descendants(spawner, task_id):
        if canceller.cancel(child, known=True).outcome != "finished":
            stopped += 1
    return stopped
