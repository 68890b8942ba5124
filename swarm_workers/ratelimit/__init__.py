"""Cluster-wide backpressure: the Redis token bucket and producer admission control."""

from swarm_workers.ratelimit.admission import AdmissionControl
from swarm_workers.ratelimit.base import build_limiter
from swarm_workers.ratelimit.bucket import (
    Bucket,
    BucketReservation,
    RedisTokenBucket,
    RequestTooLarge,
    TokenBucketLimiter,
    bucket_levels,
)
from swarm_workers.ratelimit.limiter import Limiter, Reservation, Unlimited

__all__ = [
    "AdmissionControl",
    "Bucket",
    "BucketReservation",
    "Limiter",
    "RedisTokenBucket",
    "RequestTooLarge",
    "Reservation",
    "TokenBucketLimiter",
    "Unlimited",
    "bucket_levels",
    "build_limiter",
]
