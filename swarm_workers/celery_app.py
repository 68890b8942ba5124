"""Celery wiring: the one place that knows Celery's settings names.

Choices, each for a reason written in DESIGN.md:
- JSON only (no pickle): tasks and results are versioned pydantic wire models.
- `task_acks_late` + prefetch multiplier 1 + `worker_disable_prefetch`: a worker holds
  no more messages than it has free threads, so a late P0 never waits behind a hoard.
- kombu `queue_order_strategy="sorted"` with priority-first queue names gives strict
  priority; `priority_steps=[0]` makes each queue exactly one Redis list, named as the
  queue (what KEDA and `swarm status` read).
- No Celery `rate_limit`, no ETA retries: backpressure is the Redis token bucket.
"""

from __future__ import annotations

from celery import Celery
from kombu.entity import Exchange, Queue

from swarm_workers.config import Settings
from swarm_workers.queues import ALL_PRIORITIES, queue_name

__all__ = ["RUN_AGENT", "SwarmCelery", "create_app"]

RUN_AGENT = "swarm.run_agent"


class SwarmCelery(Celery):  # type: ignore[misc]
    """A Celery app that carries the swarm settings it was built from."""

    swarm_settings: Settings


def create_app(settings: Settings) -> SwarmCelery:
    app = SwarmCelery(
        "swarm_workers", broker=settings.redis_url, backend=settings.redis_url, set_as_current=False
    )
    app.swarm_settings = settings
    worker = settings.worker
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_queues=[
            Queue(
                queue_name(p, role),
                Exchange("swarm", type="direct"),
                routing_key=queue_name(p, role),
            )
            for role in settings.roles
            for p in ALL_PRIORITIES
        ],
        task_default_queue=queue_name(
            settings.role(next(iter(settings.roles))).default_priority, next(iter(settings.roles))
        ),
        task_default_exchange="swarm",
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_track_started=True,
        task_time_limit=worker.task_time_limit_s,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "queue_order_strategy": "sorted",
            "priority_steps": [0],
            "visibility_timeout": worker.visibility_timeout_s,
            "unacked_restore_interval": min(10, worker.visibility_timeout_s),
            "unacked_restore_throttle": 1,
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            "health_check_interval": 25,
        },
        result_backend_transport_options={
            "visibility_timeout": worker.visibility_timeout_s,
            # A chord header counted by (task id, index) in a sorted set: a redelivered
            # header adds nothing. Celery reads this here, not at the top level.
            "result_chord_ordered": True,
        },
        result_expires=settings.limits.result_ttl_s,
        result_extended=False,
        broker_channel_error_retry=True,
    )
    from swarm_workers import tasks
    from swarm_workers.dag import tasks as dag_tasks

    tasks.register(app)
    dag_tasks.register(app)
    return app
