"""The worker process's chat-completions clients: one per group of pool threads.

One client for a thousand calls in flight is one HTTP connection pool, and httpcore's
pool does its bookkeeping under one lock with a scan over every connection and waiting
request, on each request and on each response close: at 1,000 calls in flight a third
of the worker's CPU went to that scan and its lock (bench/README.md, *Model calls in
flight*). Giving each group of up to `THREADS_PER_CLIENT` threads its own client keeps
every pool small; a thread keeps the client it was first given, so a group's calls never
need more connections than the group has threads.

>>> from swarm_workers.config import LLMSettings
>>> clients = LLMClients(LLMSettings(base_url="http://127.0.0.1:8400/v1"), threads=1000)
>>> clients.size, clients.connections_each
(16, 63)
>>> clients.get() is clients.get()
True
>>> clients.close()
"""

from __future__ import annotations

import itertools
import math
import threading

import openai

from swarm_workers.agent.llm import build_llm_client
from swarm_workers.config import LLMSettings

__all__ = ["THREADS_PER_CLIENT", "LLMClients"]

# Small enough that a pool's scan stays cheap, large enough that a worker of the default
# 64 threads still has one client.
THREADS_PER_CLIENT = 64


class LLMClients:
    """`get()`: this thread's client. Connections are split evenly across the clients:
    `llm.max_connections` when set, else one per thread."""

    def __init__(self, settings: LLMSettings, threads: int) -> None:
        connections = settings.max_connections or threads
        self.size = max(1, math.ceil(min(threads, connections) / THREADS_PER_CLIENT))
        self.connections_each = math.ceil(connections / self.size)
        each = settings.model_copy(update={"max_connections": self.connections_each})
        self._clients = [build_llm_client(each) for _ in range(self.size)]
        self._next = itertools.count()
        self._mine = threading.local()

    def get(self) -> openai.OpenAI:
        client: openai.OpenAI | None = getattr(self._mine, "client", None)
        if client is None:
            # itertools.count's next() is atomic under the GIL: threads spread evenly.
            client = self._clients[next(self._next) % self.size]
            self._mine.client = client
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
