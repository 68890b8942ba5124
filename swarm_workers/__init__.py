"""swarm_workers: a production worker fleet for LLM agent swarms on Celery and Redis.

>>> from swarm_workers import SwarmClient
>>> client = SwarmClient("redis://127.0.0.1:6379/0")     # doctest: +SKIP
>>> client.submit("Summarise X", priority="P0").result(timeout=60).output  # doctest: +SKIP
"""

from swarm_workers.client import SwarmClient, TaskHandle
from swarm_workers.config import Settings, load_settings
from swarm_workers.errors import (
    Backpressure,
    ConfigError,
    DagError,
    InvalidTask,
    PayloadTooLarge,
    ProviderError,
    RateLimited,
    ResultTimeout,
    SwarmError,
    ToolError,
    UnknownRole,
)
from swarm_workers.models import AgentTask, Priority, TaskResult, TaskState, TaskStatus

__all__ = [
    "AgentTask",
    "Backpressure",
    "ConfigError",
    "DagError",
    "InvalidTask",
    "PayloadTooLarge",
    "Priority",
    "ProviderError",
    "RateLimited",
    "ResultTimeout",
    "Settings",
    "SwarmClient",
    "SwarmError",
    "TaskHandle",
    "TaskResult",
    "TaskState",
    "TaskStatus",
    "ToolError",
    "UnknownRole",
    "load_settings",
]
