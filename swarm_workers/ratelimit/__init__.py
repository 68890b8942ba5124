"""Cluster-wide backpressure: the Redis token bucket and producer admission control."""

from swarm_workers.ratelimit.base import Limiter, Reservation, Unlimited, build_limiter

__all__ = ["Limiter", "Reservation", "Unlimited", "build_limiter"]
