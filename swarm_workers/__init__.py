"""swarm_workers."""
