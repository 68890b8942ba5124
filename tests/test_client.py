"""The producer's submit: validation before anything is sent, routing, redaction."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.errors import InvalidTask, PayloadTooLarge, UnknownRole
from swarm_workers.queues import ALL_PRIORITIES, queue_name

ROLES = {"research": {}, "summarize": {"default_priority": "P2", "budgets": {"P2": 999}}}


@pytest.fixture
def client(redis_url: str) -> Iterator[SwarmClient]:
    settings = load_settings(
        None, redis_url=redis_url, roles=ROLES, limits={"max_payload_bytes": 4096}
    )
    with SwarmClient(settings=settings) as client:
        yield client


def queued(conn: redis.Redis) -> dict[str, int]:
    return {
        queue_name(p, r): int(conn.llen(queue_name(p, r))) for r in ROLES for p in ALL_PRIORITIES
    }


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"prompt": "x", "role": "writer"}, UnknownRole, "role"),
        ({"prompt": "x", "priority": "P3"}, InvalidTask, "priority"),
        ({"prompt": "x", "priority": "urgent"}, InvalidTask, "priority"),
        ({"prompt": ""}, InvalidTask, "prompt"),
        ({"prompt": " \n"}, InvalidTask, "prompt"),
        ({"prompt": None}, InvalidTask, "prompt"),
        ({"prompt": "x", "budget": 0}, InvalidTask, "budget"),
        ({"prompt": "x", "budget": -5}, InvalidTask, "budget"),
        ({"prompt": "x" * 5000}, PayloadTooLarge, "payload"),
        ({"messages": [{"role": "robot", "content": "x"}]}, InvalidTask, "messages"),
    ],
)
def test_bad_input_is_a_typed_error_and_nothing_is_enqueued(
    client: SwarmClient,
    redis_conn: redis.Redis,
    kwargs: dict[str, object],
    error: type[Exception],
    field: str,
) -> None:
    prompt = kwargs.pop("prompt", None)
    with pytest.raises(error) as info:
        client.submit(prompt, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, InvalidTask)
    assert info.value.field.startswith(field), info.value
    assert sum(queued(redis_conn).values()) == 0
    assert redis_conn.dbsize() == 0


def test_submit_routes_to_the_role_priority_list(
    client: SwarmClient, redis_conn: redis.Redis
) -> None:
    client.submit("a", role="research", priority="p0")
    client.submit("b", role="research", priority="P1")
    handle = client.submit("c", role="summarize")  # role default: P2, budget 999
    assert handle.task.output_budget == 999
    assert handle.task.priority.value == "P2"
    depth = queued(redis_conn)
    assert depth["p0.research"] == 1 and depth["p1.research"] == 1
    assert depth["p2.summarize"] == 1
    assert sum(depth.values()) == 3


def test_message_is_json_with_a_redacted_argsrepr(
    client: SwarmClient, redis_conn: redis.Redis
) -> None:
    handle = client.submit("the secret launch plan", role="research", priority="P1")
    raw = redis_conn.lindex("p1.research", 0)
    assert raw is not None
    message = json.loads(raw)
    assert message["content-type"] == "application/json"
    headers = message["headers"]
    assert headers["id"] == handle.id
    assert headers["task"] == "swarm.run_agent"
    assert "secret" not in headers["argsrepr"]
    assert "role=research" in headers["argsrepr"]


def test_default_budget_per_priority(client: SwarmClient) -> None:
    budgets = [
        client.build_task("x", role="research", priority=p).output_budget
        for p in ("P0", "P1", "P2")
    ]
    assert budgets == [8000, 4096, 2048]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": "x", "budget": "100"}, "budget"),
        ({"prompt": "x", "budget": True}, "budget"),
        ({"prompt": "x", "budget": 10**9}, "budget"),
        ({"messages": ["hi"]}, "messages.0"),
        ({"messages": "hi"}, "messages"),
        ({"prompt": b"bytes"}, "prompt"),
        ({"prompt": "a\x00b"}, "prompt"),
        ({"prompt": "a\udcffb"}, "prompt"),
        (
            {
                "messages": [
                    {"role": "user", "content": "ok"},
                    {"role": "user", "content": "\ud800"},
                ]
            },
            "messages.1.content",
        ),
        ({"prompt": "x", "metadata": {"k": "v\x00"}}, "metadata.k"),
        ({"prompt": "x", "metadata": {"k": float("nan")}}, "metadata.k"),
        ({"prompt": "x", "deps": "abc"}, "deps"),
        ({"prompt": "x", "role": ""}, "role"),
    ],
)
def test_issue_14_inputs_are_typed_errors_naming_the_field(
    client: SwarmClient, redis_conn: redis.Redis, kwargs: dict[str, object], field: str
) -> None:
    prompt = kwargs.pop("prompt", None)
    with pytest.raises(InvalidTask) as info:
        client.submit(prompt, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field, info.value
    assert redis_conn.dbsize() == 0


def test_swarm_submit_stdin_that_is_not_utf8_is_refused(
    redis_url: str, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from swarm_workers.cli import app

    monkeypatch.delenv("SWARM_CONFIG", raising=False)
    monkeypatch.setenv("REDIS_URL", redis_url)
    result = CliRunner().invoke(app, ["submit", "-"], input=b"abc\xff\xfe")
    assert result.exit_code == 2
    assert "not valid UTF-8" in result.output
    assert redis_conn.dbsize() == 0
