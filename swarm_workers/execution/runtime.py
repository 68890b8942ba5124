"""What one worker process holds for all its pool threads, built once, shared.

Nothing in here is state another worker needs: counters, locks and caches that matter
to the fleet live in Redis; this is connection pools and clients only.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Protocol

import redis

from swarm_workers.agent.checkpoint import CheckpointStore
from swarm_workers.agent.clients import LLMClient
from swarm_workers.config import Settings
from swarm_workers.dag.prepare import PreparedDag
from swarm_workers.deadletters import DeadLetterStore
from swarm_workers.execution.claims import Claims
from swarm_workers.models import AgentTask
from swarm_workers.ratelimit.base import Limiter, build_limiter
from swarm_workers.redis_client import redis_client
from swarm_workers.results import ResultStore
from swarm_workers.swarm import Spawner
from swarm_workers.tools.base import Toolset
from swarm_workers.tools.registry import build_toolset

__all__ = ["Runtime", "Sender"]


class Sender(Protocol):
    """Sends what a swarm needs on the broker; the Celery edge provides it (`tasks.py`)."""

    def send_children(self, dag: PreparedDag) -> None:
        """A spawn round's sub-agents, as a DAG on their roles' queues."""
        ...

    def position(self) -> str | None:
        """Where the delivery running in this thread sits in a DAG's canvas (opaque
        text), or None outside one: kept with a supervisor's ledger when it suspends."""
        ...

    def send_continuation(self, task: AgentTask, message_id: str, position: str | None) -> None:
        """Another delivery of a supervisor's task, on its own queue, in `position`: so
        what depends on the task in its DAG waits for this delivery's outcome."""
        ...


@dataclass
class Runtime:
    """Per-process resources, built once at worker start and shared by its threads."""

    settings: Settings
    redis: redis.Redis
    tools: Toolset
    limiter: Limiter
    llm: LLMClient  # the chat-completions client; each pool thread its own connection
    results: ResultStore
    claims: Claims
    deadletters: DeadLetterStore
    checkpoints: CheckpointStore
    spawner: Spawner
    worker_name: str = field(default_factory=socket.gethostname)
    sender: Sender | None = None  # set by the Celery edge; none in an isolated child

    @classmethod
    def build(
        cls, settings: Settings, worker_name: str | None = None, *, threads: int | None = None
    ) -> Runtime:
        """`threads`: the worker's pool size (default: the largest role concurrency)."""
        client = redis_client(settings.redis_url)
        worker = settings.worker
        threads = threads or max(role.concurrency for role in settings.roles.values())
        return cls(
            settings=settings,
            redis=client,
            tools=build_toolset(settings, client),
            limiter=build_limiter(settings, client),
            llm=LLMClient(settings.llm, threads),
            results=ResultStore.from_settings(settings, client),
            claims=Claims(
                client,
                settings.keys,
                lease_ttl_s=worker.lease_ttl_s,
                result_ttl_s=settings.limits.result_ttl_s,
                # A run count outlives the longest a crashed run's message can take to
                # come back, for every attempt allowed.
                attempts_ttl_s=worker.visibility_timeout_s * (worker.max_attempts + 1),
            ),
            deadletters=DeadLetterStore(client, settings),
            checkpoints=CheckpointStore(client, settings.keys, settings.limits.result_ttl_s),
            spawner=Spawner(client, settings),
            worker_name=worker_name or socket.gethostname(),
        )

    def close(self) -> None:
        self.claims.close()
        self.tools.close()
        self.redis.close()
        self.llm.close()
