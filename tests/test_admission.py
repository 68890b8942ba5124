"""Admission control: a producer is refused while the queue is above its high-water mark."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from swarm_workers.celery_app import create_app
from swarm_workers.client import SwarmClient
from swarm_workers.config import AdmissionSettings, Settings, load_settings
from swarm_workers.errors import Backpressure
from swarm_workers.models import Priority
from swarm_workers.queues import RUN_AGENT, queue_name
from swarm_workers.ratelimit.admission import (
    MAX_RETRY_S,
    MIN_RETRY_S,
    AdmissionControl,
    retry_delay,
)

MARKS = {"P0": None, "P1": 5, "P2": 3}


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return load_settings(
        None,
        redis_url=redis_url,
        roles={"research": {}},
        admission={"high_water": MARKS, "drain_rate_per_s": 2.0},
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[SwarmClient]:
    with SwarmClient(settings=settings) as client:
        yield client


def test_retry_delay_is_the_excess_over_the_drain_rate_within_bounds() -> None:
    assert retry_delay(120, 100, 10.0) == pytest.approx(2.1)
    assert retry_delay(100, 100, 50.0) == MIN_RETRY_S
    assert retry_delay(10**9, 100, 1.0) == MAX_RETRY_S


def test_the_depth_read_is_the_list_kombu_publishes_to(
    settings: Settings, redis_conn: redis.Redis
) -> None:
    app = create_app(settings)
    queue = queue_name(Priority.P2, "research")
    admission = AdmissionControl(redis_conn, settings.admission)
    try:
        for i in range(2):
            app.send_task(RUN_AGENT, args=[{}], task_id=f"t{i}", queue=queue)
            admission.check(queue)  # 1, then 2 tasks: under the mark of 3
        app.send_task(RUN_AGENT, args=[{}], task_id="t2", queue=queue)
    finally:
        app.close()
    assert redis_conn.llen(queue) == 3
    with pytest.raises(Backpressure) as info:
        admission.check(queue)
    error = info.value
    assert (error.queue, error.depth, error.limit) == (queue, 3, 3)
    assert error.retry_after == MIN_RETRY_S  # 1 over the mark at 2/s: 0.5 s, bounded to 1 s
    assert "p2.research holds 3 tasks (high-water mark 3)" in str(error)


def test_submit_refuses_above_the_mark_and_enqueues_nothing(
    client: SwarmClient, redis_conn: redis.Redis
) -> None:
    p2 = queue_name(Priority.P2, "research")
    for _ in range(3):
        client.submit("work", role="research", priority="P2")
    with pytest.raises(Backpressure) as info:
        client.submit("one too many", role="research", priority="P2")
    assert info.value.depth == 3
    assert redis_conn.llen(p2) == 3
    redis_conn.rpush(p2, *[b"{}"] * 7)  # a backlog: 10 tasks, 8 over the mark at 2/s
    with pytest.raises(Backpressure) as info:
        client.submit("again", role="research", priority="P2")
    assert info.value.retry_after == pytest.approx(4.0)
    assert redis_conn.llen(p2) == 10
    client.submit("other levels have their own marks", role="research", priority="P1")
    assert redis_conn.llen(queue_name(Priority.P1, "research")) == 1


def test_p0_without_a_mark_never_reads_redis() -> None:
    # nothing listens on port 1
    nowhere = redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    marks = {Priority.P0: None, Priority.P2: 3}
    admission = AdmissionControl(nowhere, AdmissionSettings(high_water=marks))
    admission.check("p0.research")
    with pytest.raises(redis.ConnectionError):
        admission.check("p2.research")


def test_a_name_that_is_not_a_swarm_queue_is_refused(redis_conn: redis.Redis) -> None:
    with pytest.raises(ValueError, match="not a swarm queue name"):
        AdmissionControl(redis_conn, AdmissionSettings()).check("celery")
