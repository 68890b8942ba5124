"""A snapshot of the fleet for operators: what `swarm status` and the demo show.

Every number is read from Redis (queues, buckets, breakers, the tool registry's
published view) or, for workers online, one Celery ping broadcast with a short
timeout: nothing here depends on a particular worker being up.
"""

from __future__ import annotations

import redis
from pydantic import BaseModel, ConfigDict

from swarm_workers.celery_app import SwarmCelery, ping_workers
from swarm_workers.config import Settings
from swarm_workers.deadletters import DeadLetterStore
from swarm_workers.exporter import queue_depths
from swarm_workers.queues import queue_name
from swarm_workers.ratelimit.bucket import bucket_levels
from swarm_workers.tools.report import tool_rows

__all__ = ["FleetStatus", "fleet_status"]


class FleetStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    queues: dict[str, int]  # queue name -> messages waiting
    workers: list[str] | None  # Celery node names that answered; None: not asked
    buckets: dict[str, dict[str, float]]  # model -> {"rpm": 0.83, "tpm": 0.41}, fraction full
    breakers: dict[str, str]  # MCP server -> closed | half_open | open
    registry_age_s: dict[str, float | None]  # MCP server -> age of the shared tool list
    dead_letters: dict[str, int] = {}  # role -> tasks kept as failed for good


def fleet_status(
    settings: Settings,
    client: redis.Redis,
    *,
    app: SwarmCelery | None = None,
    ping_timeout_s: float = 1.0,
) -> FleetStatus:
    """Read the fleet's state; `app` adds the workers that answer a ping."""
    depths = queue_depths(client, list(settings.roles))
    workers = ping_workers(app, ping_timeout_s) if app is not None else None
    breakers: dict[str, str] = {}
    ages: dict[str, float | None] = {}
    for row in tool_rows(settings, client):
        breakers[row.server] = row.breaker
        ages[row.server] = row.cache_age_s
    return FleetStatus(
        queues={queue_name(p, role): depth for (role, p), depth in depths.items()},
        workers=workers,
        buckets={
            model: bucket_levels(client, settings, model) for model in settings.ratelimit.models
        }
        if settings.ratelimit.enabled
        else {},
        breakers=breakers,
        registry_age_s=ages,
        dead_letters=DeadLetterStore(client, settings).counts(),
    )
