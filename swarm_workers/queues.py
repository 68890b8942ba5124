"""Queue names and routing: one Redis list per priority per role, and the names of
the two tasks that travel on them.

Names are priority-first (`p0.research`) so that kombu's `sorted` queue order, which
BRPOPs the lists in alphabetical order, drains every P0 of every role a worker serves
before any P1, and every P1 before any P2. These names are also the Redis list keys
(KEDA scales on them) because the transport's priority steps are turned off.

>>> queue_name(Priority.P0, "research")
'p0.research'
>>> worker_queues(["research"], [Priority.P1, Priority.P0])
['p0.research', 'p1.research']
"""

from __future__ import annotations

from collections.abc import Iterable

from swarm_workers.models import Priority

__all__ = ["ALL_PRIORITIES", "DAG_NODE", "RUN_AGENT", "parse_queue", "queue_name", "worker_queues"]

ALL_PRIORITIES: tuple[Priority, ...] = (Priority.P0, Priority.P1, Priority.P2)

RUN_AGENT = "swarm.run_agent"
"""The task that runs one agent task: one arg, `AgentTask.to_wire()`."""
DAG_NODE = "swarm.dag_node"
"""The task that runs one DAG node: args `(dag_id, node)`."""


def queue_name(priority: Priority, role: str) -> str:
    return f"{priority.queue_prefix}.{role}"


def worker_queues(
    roles: Iterable[str], priorities: Iterable[Priority] = ALL_PRIORITIES
) -> list[str]:
    """The queues a worker consumes, in the order it must drain them."""
    return sorted({queue_name(p, r) for r in roles for p in priorities})


def parse_queue(name: str) -> tuple[Priority, str]:
    """Inverse of `queue_name`: `'p1.research'` -> `(Priority.P1, 'research')`."""
    prefix, sep, role = name.partition(".")
    if not sep or not role:
        raise ValueError(f"{name!r} is not a swarm queue name")
    return Priority(prefix), role
