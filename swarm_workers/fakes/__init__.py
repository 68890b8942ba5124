"""Fakes a user would also run: peers over HTTP that import nothing from swarm_workers."""
