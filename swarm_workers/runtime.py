"""What one worker process holds for all its pool threads, built once, shared.

Nothing in here is state another worker needs: counters, locks and caches that matter
to the fleet live in Redis; this is connection pools and clients only.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import openai
import redis

from swarm_workers.agent.llm import build_llm_client
from swarm_workers.config import Settings
from swarm_workers.ratelimit.base import Limiter, build_limiter
from swarm_workers.redis_client import redis_client
from swarm_workers.tools.base import Toolset
from swarm_workers.tools.registry import build_toolset

__all__ = ["Runtime", "redis_client"]


@dataclass
class Runtime:
    """Per-process resources, built lazily on the first task and reused."""

    settings: Settings
    redis: redis.Redis
    tools: Toolset
    limiter: Limiter
    llm: openai.OpenAI  # one pooled chat-completions client for every pool thread
    worker_name: str = field(default_factory=socket.gethostname)

    @classmethod
    def build(cls, settings: Settings, worker_name: str | None = None) -> Runtime:
        client = redis_client(settings.redis_url)
        return cls(
            settings=settings,
            redis=client,
            tools=build_toolset(settings, client),
            limiter=build_limiter(settings, client),
            llm=build_llm_client(settings.llm),
            worker_name=worker_name or socket.gethostname(),
        )

    def key(self, *parts: str) -> str:
        return ":".join((self.settings.key_prefix, *parts))

    def close(self) -> None:
        self.tools.close()
        self.redis.close()
        self.llm.close()
