"""Celery wiring: the one place that knows Celery's settings names, and the few calls
the producer and operator commands make on an app (send a task, ping the workers).

Choices, each for a reason:
- JSON only (no pickle): tasks and results are versioned pydantic wire models.
- `task_acks_late` + prefetch multiplier 1 + `worker_disable_prefetch`: a worker holds
  no more messages than it has free threads, so a late P0 never waits behind a hoard.
- kombu `queue_order_strategy="sorted"` with priority-first queue names gives strict
  priority; `priority_steps=[0]` makes each queue exactly one Redis list, named as the
  queue (what KEDA and `swarm status` read).
- No Celery `rate_limit`, no ETA retries: backpressure is the Redis token bucket.
- Results ignored: a task's outcome is stored once by the worker (`results`); Celery
  keeps only what a chord needs to count its header, and writes no STARTED state.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from kombu.entity import Exchange, Queue

from swarm_workers.broker import ring_bell
from swarm_workers.config import Settings
from swarm_workers.models import AgentTask
from swarm_workers.queues import ALL_PRIORITIES, RUN_AGENT, queue_name
from swarm_workers.redis_client import redis_client

if TYPE_CHECKING:  # the worker's runtime; producers never load the execution stack
    from swarm_workers.execution import Runtime

__all__ = ["SwarmCelery", "create_app", "ping_workers", "send_agent_task", "send_agent_tasks"]


class SwarmCelery(Celery):  # type: ignore[misc]
    """A Celery app that carries the swarm settings it was built from, and, in a
    worker, the process runtime its tasks share."""

    swarm_settings: Settings
    swarm_runtime: Runtime | None = None
    swarm_redis: redis.Redis  # the producer's client for `send_agent_tasks`

    def close(self) -> None:
        self.swarm_redis.close()
        super().close()


def create_app(settings: Settings) -> SwarmCelery:
    app = SwarmCelery(
        "swarm_workers", broker=settings.redis_url, backend=settings.redis_url, set_as_current=False
    )
    app.swarm_settings = settings
    app.swarm_redis = redis_client(settings.redis_url, max_connections=64)
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
        task_ignore_result=True,
        task_track_started=False,
        task_time_limit=worker.task_time_limit_s,
        task_send_sent_event=True,
        # The app's setting wins over a worker's missing `--task-events` in Celery, so the
        # fleet's choice (`worker.task_events`) has to be made here.
        worker_send_task_events=worker.task_events,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # kombu's Redis transport, one client per channel instead of one per command.
        broker_transport="swarm_workers.broker:Transport",
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
        # One result backend (one Redis pool) for the process, not one per pool thread:
        # at 1,000 threads each built its own on its first task (bench/README.md).
        result_backend_thread_safe=True,
        result_extended=False,
        broker_channel_error_retry=True,
    )
    return app


def send_agent_task(app: SwarmCelery, task: AgentTask) -> None:
    """Enqueue one task on `p<N>.<role>`; nothing is kept on this side to wait on."""
    send_agent_tasks(app, [task])


def send_agent_tasks(app: SwarmCelery, tasks: Sequence[AgentTask]) -> None:
    """Enqueue tasks on their `p<N>.<role>` lists in one MULTI/EXEC: all or none.

    The messages are Celery's own (protocol 2, from `app.amqp.create_task_message`) in
    the envelope kombu's Redis transport writes for a publish to the default exchange
    (`exchange=""`, routing key = queue = list key, as `priority_steps=[0]` makes it),
    LPUSHed the way kombu's `Channel._put` does. `app.send_task` costs ~0.5 ms a message
    in kombu's publish path (routing, declare checks, a round trip each): an agent
    producer submitting in bulk is bound by that, not by Redis. What Celery adds on
    `send_task` and is left out: the `task-sent` event and the `before/after_task_publish`
    signals; Flower shows a task from the moment a worker receives it.
    `tests/test_client.py` checks the envelope against one `send_task` writes.
    """
    redact = app.swarm_settings.redact_prompts
    create = app.amqp.create_task_message
    by_queue: dict[str, list[str]] = {}
    for task in tasks:
        queue = queue_name(task.priority, task.role)
        argsrepr = task.redacted() if redact else None
        message = create(
            task.id,
            RUN_AGENT,
            [task.to_wire()],
            {},
            argsrepr=argsrepr,
            kwargsrepr="{}",
            ignore_result=True,
        )
        # The body is Celery's `[args, kwargs, embed]` in JSON, as kombu's json serializer
        # writes it, with the task's JSON the size check already encoded (`wire_json`).
        _args, kwargs, embed = message.body
        body = f"[[{task.wire_json}], {json.dumps(kwargs)}, {json.dumps(embed)}]"
        envelope = {
            "body": base64.b64encode(body.encode()).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": message.headers,
            "properties": {
                **message.properties,
                # send_task passes these on as publish properties too
                "argsrepr": argsrepr,
                "kwargsrepr": "{}",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        by_queue.setdefault(queue, []).append(json.dumps(envelope))
    # One LPUSH of many values per queue leaves the list as one LPUSH per message would
    # (in order, each at the head), for one command's cost.
    pipe = app.swarm_redis.pipeline(transaction=True)
    for queue, envelopes in by_queue.items():
        pipe.lpush(queue, *envelopes)
        ring_bell(pipe, queue)  # as the transport's own publish does: wakes an idle worker
    pipe.execute()


def ping_workers(app: SwarmCelery, timeout_s: float) -> list[str]:
    """The node names of the workers that answer a broadcast ping within `timeout_s`."""
    replies: list[dict[str, Any]] = app.control.ping(timeout=timeout_s) or []
    return sorted(name for reply in replies for name in reply)
