"""swarm_workers: a production worker fleet for LLM agent swarms on Celery and Redis.

Usage, with a worker running (`swarm worker`; README "Using it from Python")::

    from swarm_workers import SwarmClient

    client = SwarmClient("redis://127.0.0.1:6379/0")
    client.submit("Summarise X", priority="P0").result(timeout=60).output
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarm_workers.cancellation import CancelReport
    from swarm_workers.client import Replayed, SwarmClient, TaskHandle
    from swarm_workers.config import Settings, load_settings
    from swarm_workers.dag import DagHandle, DagSpec, DagStatus, Node
    from swarm_workers.deadletters import DeadLetter
    from swarm_workers.errors import (
        Backpressure,
        BrokerUnavailable,
        ConfigError,
        DagError,
        InvalidDag,
        InvalidTask,
        PayloadTooLarge,
        ProviderError,
        RateLimited,
        ResultTimeout,
        SwarmError,
        TaskCancelled,
        ToolError,
        UnknownRole,
    )
    from swarm_workers.models import AgentTask, Priority, TaskResult, TaskState, TaskStatus

# Imported on first use: `python -m swarm_workers.fakes...` must not pay for Celery.
_EXPORTS = {
    "BrokerUnavailable": "errors",
    "CancelReport": "cancellation",
    "DeadLetter": "deadletters",
    "InvalidDag": "errors",
    "Replayed": "client",
    "TaskCancelled": "errors",
    "DagHandle": "dag",
    "DagSpec": "dag",
    "DagStatus": "dag",
    "Node": "dag",
    "AgentTask": "models",
    "Backpressure": "errors",
    "ConfigError": "errors",
    "DagError": "errors",
    "InvalidTask": "errors",
    "PayloadTooLarge": "errors",
    "Priority": "models",
    "ProviderError": "errors",
    "RateLimited": "errors",
    "ResultTimeout": "errors",
    "Settings": "config",
    "SwarmClient": "client",
    "SwarmError": "errors",
    "TaskHandle": "client",
    "TaskResult": "models",
    "TaskState": "models",
    "TaskStatus": "models",
    "ToolError": "errors",
    "UnknownRole": "errors",
    "load_settings": "config",
}

__all__ = [
    "AgentTask",
    "Backpressure",
    "BrokerUnavailable",
    "CancelReport",
    "ConfigError",
    "DagError",
    "DagHandle",
    "DagSpec",
    "DagStatus",
    "DeadLetter",
    "InvalidDag",
    "InvalidTask",
    "Node",
    "PayloadTooLarge",
    "Priority",
    "ProviderError",
    "RateLimited",
    "Replayed",
    "ResultTimeout",
    "Settings",
    "SwarmClient",
    "SwarmError",
    "TaskCancelled",
    "TaskHandle",
    "TaskResult",
    "TaskState",
    "TaskStatus",
    "ToolError",
    "UnknownRole",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'swarm_workers' has no attribute {name!r}") from None
    return getattr(importlib.import_module(f"swarm_workers.{module}"), name)
