"""Sending: the envelope the client writes is Celery's, batches go all or none."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.errors import Backpressure, InvalidTask
from swarm_workers.localfleet import child_env
from swarm_workers.queues import RUN_AGENT

from .conftest import ROOT, WorkerFactory


@pytest.fixture
def client(redis_url: str) -> Iterator[SwarmClient]:
    settings = load_settings(None, redis_url=redis_url, admission={"high_water": {"P2": 10}})
    with SwarmClient(settings=settings) as client:
        yield client


def _census(conn: redis.Redis) -> dict[str, int]:
    return {key.decode(): conn.llen(key) for key in conn.scan_iter(match="p?.*")}


def _decoded(raw: bytes) -> dict[str, object]:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_the_envelope_is_the_one_celery_writes(
    client: SwarmClient, redis_conn: redis.Redis
) -> None:
    ours = client.build_task("same task", priority="P1")
    client.enqueue(ours)
    theirs = client.build_task("same task", priority="P1")
    client.app.send_task(
        RUN_AGENT,
        args=[theirs.to_wire()],
        task_id=theirs.id,
        queue="p1.default",
        argsrepr=theirs.redacted(),
        kwargsrepr="{}",
        ignore_result=True,
    )
    newer, older = (_decoded(raw) for raw in redis_conn.lrange("p1.default", 0, -1))
    assert newer["headers"]["id"] == theirs.id  # LPUSH: the newest is first
    for message, task in ((older, ours), (newer, theirs)):
        assert message["properties"]["correlation_id"] == task.id
        message["headers"].update(id=None, root_id=None, argsrepr=None, origin=None)
        message["properties"].update(
            correlation_id=None, delivery_tag=None, reply_to=None, argsrepr=None
        )
        message["body"][0][0].update(id=None, submitted_at=None)
    assert older == newer


def test_a_batch_is_sent_whole_and_runs(
    client: SwarmClient, start_worker: WorkerFactory, redis_conn: redis.Redis
) -> None:
    items = [{"prompt": f"batch {i}", "priority": "P1"} for i in range(30)]
    handles = client.submit_many(items)
    assert redis_conn.llen("p1.default") == 30
    start_worker(concurrency=8)
    results = [h.result(timeout=60) for h in handles]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    assert len({r.task_id for r in results}) == 30


def test_a_batch_over_two_queues_keeps_the_order_of_each(
    client: SwarmClient, redis_conn: redis.Redis
) -> None:
    """Each queue gets its tasks in one LPUSH of many values: a worker (RPOP) must still
    take them in the order they were submitted."""
    items = [{"prompt": f"order {i}", "priority": "P1" if i % 3 else "P0"} for i in range(12)]
    handles = client.submit_many(items)
    for queue, level in (("p0.default", "P0"), ("p1.default", "P1")):
        taken = [_decoded(raw)["headers"]["id"] for raw in redis_conn.lrange(queue, 0, -1)][::-1]
        assert taken == [
            h.id for h, item in zip(handles, items, strict=True) if item["priority"] == level
        ]


def test_one_bad_item_sends_nothing(client: SwarmClient, redis_conn: redis.Redis) -> None:
    before = _census(redis_conn)
    items: list[dict[str, object]] = [{"prompt": "fine"}, {"prompt": "fine", "priority": "P7"}]
    with pytest.raises(InvalidTask) as info:
        client.submit_many(items)
    assert info.value.field == "tasks.1.priority"
    with pytest.raises(InvalidTask) as unknown:
        client.submit_many([{"prompt": "x", "colour": "red"}])
    assert unknown.value.field == "tasks.0"
    assert _census(redis_conn) == before


def test_a_batch_over_the_mark_is_refused_whole(
    client: SwarmClient, redis_conn: redis.Redis
) -> None:
    client.submit_many([{"prompt": f"p{i}", "priority": "P2"} for i in range(6)])
    with pytest.raises(Backpressure):
        client.submit_many([{"prompt": f"q{i}", "priority": "P2"} for i in range(5)])
    assert redis_conn.llen("p2.default") == 6
    client.submit_many([{"prompt": f"r{i}", "priority": "P2"} for i in range(4)])
    assert redis_conn.llen("p2.default") == 10


def test_swarm_submit_file(client: SwarmClient, tmp_path: Path, redis_conn: redis.Redis) -> None:
    good = tmp_path / "tasks.jsonl"
    good.write_text(
        "\n".join(json.dumps({"prompt": f"file {i}", "priority": "P0"}) for i in range(3))
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    env = child_env({"REDIS_URL": client.settings.redis_url})
    argv = [sys.executable, "-m", "swarm_workers.cli", "submit", "--file"]
    done = subprocess.run(
        [*argv, str(good)], env=env, capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 3
    refused = subprocess.run(
        [*argv, str(bad)], env=env, capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert refused.returncode == 2
    assert "bad.jsonl:2" in refused.stderr
    assert redis_conn.llen("p0.default") == 3
