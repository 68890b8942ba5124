"""Suspect runs in a child process (`execution.isolation`), apart from a worker."""

from __future__ import annotations

import pytest
import redis

from swarm_workers.config import load_settings
from swarm_workers.deadline import Deadline
from swarm_workers.execution.isolation import run_isolated
from swarm_workers.execution.runtime import Runtime
from swarm_workers.localfleet import free_port
from swarm_workers.models import AgentTask, Priority


def test_redis_down_in_an_isolated_run_is_a_redis_error_not_a_failure() -> None:
    """The child finds Redis down (here: reading the task's checkpoint). In a worker's
    own thread that `RedisError` puts the message back on its queue; from the child it
    must do the same, not become an `InternalError` that fails the task for good. A
    Redis restart under a fault test caught this."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = load_settings(None, redis_url=nowhere, llm={"base_url": "http://127.0.0.1:9/v1"})
    runtime = Runtime.build(settings, "isolation-test")
    task = AgentTask(role="default", priority=Priority.P1, prompt="hi", output_budget=64)
    try:
        with pytest.raises(redis.RedisError, match="isolated run"):
            run_isolated(task, runtime, Deadline.start(30.0), token="a-lease-token")
    finally:
        runtime.close()
