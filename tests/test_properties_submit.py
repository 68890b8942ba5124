"""Property tests of the submit boundary (`SwarmClient.build_task` / `submit`): whatever
a caller passes, the answer is a task or an `InvalidTask` naming the field, and a refused
submit leaves Redis exactly as it was. Also: a Redis that refuses or does not answer is a
`BrokerUnavailable` within the bound the README documents."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.errors import BrokerUnavailable, InvalidTask, SwarmError
from swarm_workers.models import AgentTask
from swarm_workers.queues import ALL_PRIORITIES, queue_name

ROLES = {"research": {}, "summarize": {"default_priority": "P2"}}
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# README, "Using it from Python": a submit against a Redis that does not answer fails
# within one connect (5 s) or read (30 s) timeout of the producer's connections.
DOCUMENTED_BOUND_S = 35.0


@pytest.fixture
def client(redis_url: str) -> Iterator[SwarmClient]:
    with SwarmClient(settings=load_settings(None, redis_url=redis_url, roles=ROLES)) as client:
        yield client


def census(conn: redis.Redis) -> tuple[list[bytes], dict[str, int]]:
    """Every key (SCAN) and the depth of every queue."""
    keys = sorted(conn.scan_iter(count=1000))
    depths = {
        queue_name(p, r): int(conn.llen(queue_name(p, r))) for r in ROLES for p in ALL_PRIORITIES
    }
    return keys, depths


bad_text = st.sampled_from(["\x00", "a\x00", "\ud800", "x\udcff y", "\udfff\x00"])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=5),
)
anything = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), scalars, max_size=3),
)
messages = st.one_of(
    st.none(),
    anything,
    st.lists(
        st.one_of(
            anything,
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "system", "assistant", "robot"]),
                    "content": st.one_of(st.text(max_size=30), scalars),
                }
            ),
        ),
        max_size=3,
    ),
)
options = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(st.sampled_from(["research", "summarize", "", "writer"]), scalars),
        "priority": st.one_of(st.sampled_from(["P0", "p1", "P2", "P3"]), scalars),
        "messages": messages,
        "budget": st.one_of(st.integers(min_value=-5, max_value=300_000), scalars),
        "deps": st.one_of(st.lists(st.one_of(st.text(max_size=10), scalars), max_size=3), anything),
        "metadata": st.one_of(
            st.dictionaries(st.one_of(st.text(max_size=8), scalars), scalars, max_size=3), anything
        ),
        "task_id": st.one_of(st.text(max_size=20), scalars),
    },
)
prompts = st.one_of(st.none(), st.text(max_size=60), scalars)


@PROPERTY
@given(prompt=prompts, opts=options)
def test_any_submit_is_a_task_or_an_invalid_task_and_a_refusal_writes_nothing(
    client: SwarmClient, redis_conn: redis.Redis, prompt: Any, opts: dict[str, Any]
) -> None:
    redis_conn.flushdb()
    before = census(redis_conn)
    try:
        handle = client.submit(prompt, **opts)
    except InvalidTask as exc:
        refused: InvalidTask | None = exc
    else:
        refused = None
    if refused is not None:
        assert refused.field, refused
        assert census(redis_conn) == before
        return
    task = handle.task
    assert task is not None
    wire = json.dumps(task.to_wire(), ensure_ascii=False).encode("utf-8")  # valid UTF-8
    assert b"\x00" not in wire.replace(b"\\u0000", b"")
    assert AgentTask.from_wire(json.loads(wire)) == task
    assert not isinstance(opts.get("budget"), bool)
    depths = census(redis_conn)[1]
    assert depths[queue_name(task.priority, task.role)] == 1 and sum(depths.values()) == 1


@PROPERTY
@given(
    where=st.sampled_from(["prompt", "messages", "metadata"]),
    good=st.text(max_size=20),
    bad=bad_text,
    index=st.integers(min_value=0, max_value=2),
)
def test_nul_and_lone_surrogates_are_refused_naming_the_field(
    client: SwarmClient, redis_conn: redis.Redis, where: str, good: str, bad: str, index: int
) -> None:
    redis_conn.flushdb()
    text = good[: len(good) // 2] + bad + good[len(good) // 2 :]
    kwargs: dict[str, Any] = {}
    if where == "prompt":
        prompt, field = text, "prompt"
    elif where == "messages":
        prompt = None
        kwargs["messages"] = [{"role": "user", "content": "fine"}] * index + [
            {"role": "user", "content": text}
        ]
        field = f"messages.{index}.content"
    else:
        prompt = "fine"
        kwargs["metadata"] = {"ok": 1, "note": text}
        field = "metadata.note"
    with pytest.raises(InvalidTask) as info:
        client.submit(prompt, **kwargs)
    assert info.value.field == field
    assert redis_conn.dbsize() == 0


@PROPERTY
@given(
    budget=st.one_of(
        st.booleans(), st.text(max_size=5), st.floats(), st.integers(min_value=131_073)
    )
)
def test_budgets_that_are_not_token_counts_in_the_window_are_refused(
    client: SwarmClient, budget: Any
) -> None:
    with pytest.raises(InvalidTask) as info:
        client.build_task("x", budget=budget)
    assert info.value.field == "budget"


def test_budget_is_bounded_by_the_role_model_context_window(client: SwarmClient) -> None:
    assert client.build_task("x", budget=131_072).output_budget == 131_072  # fake-gpt's window
    with pytest.raises(InvalidTask, match="131072-token context window"):
        client.build_task("x", budget=131_073)


@pytest.mark.parametrize("priority", ["P0", "P1"])
def test_submit_to_a_port_where_nothing_listens_is_broker_unavailable(priority: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    settings_ = load_settings(None, redis_url=f"redis://127.0.0.1:{port}/0")
    with SwarmClient(settings=settings_) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as info:
            client.submit("hello", priority=priority)
        elapsed = time.monotonic() - started
    assert isinstance(info.value, SwarmError)
    assert not info.value.maybe_sent and info.value.task_id
    assert elapsed < DOCUMENTED_BOUND_S * 3


@pytest.mark.slow
def test_submit_to_a_redis_that_never_accepts_is_broker_unavailable_within_the_bound() -> None:
    """A listener whose accept queue is full: the kernel drops the SYN, the connect
    times out (the case of a host that went away)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        try:
            settings_ = load_settings(None, redis_url=f"redis://127.0.0.1:{port}/0")
            with SwarmClient(settings=settings_) as client:
                started = time.monotonic()
                with pytest.raises(BrokerUnavailable):
                    client.submit("hello", priority="P0")
                elapsed = time.monotonic() - started
        finally:
            for filler in fillers:
                filler.close()
    assert elapsed < DOCUMENTED_BOUND_S * 3
