"""Model-directed swarms: a supervisor's `swarm__spawn` tool, its ledger, and its tree."""

from swarm_workers.swarm.spawn import (
    SPAWN_TOOL,
    Lineage,
    Ready,
    RoundRecord,
    Spawner,
    Waiting,
)

__all__ = ["SPAWN_TOOL", "Lineage", "Ready", "RoundRecord", "Spawner", "Waiting"]
