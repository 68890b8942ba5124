"""The fleet's tool registry (placeholder until the MCP registry lands)."""

from __future__ import annotations

import redis

from swarm_workers.config import Settings
from swarm_workers.tools.base import LocalToolset, Toolset

__all__ = ["build_toolset"]


def build_toolset(settings: Settings, client: redis.Redis) -> Toolset:
    return LocalToolset()
