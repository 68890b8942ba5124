"""Wire format of tasks and results: versioned JSON, round trips, refusals."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from swarm_workers.models import AgentTask, Priority, TaskResult, Timings, utcnow
from swarm_workers.queues import parse_queue, queue_name, worker_queues


def test_task_round_trips_through_json() -> None:
    task = AgentTask(
        role="research",
        priority=Priority.P0,
        prompt="find",
        output_budget=10,
        deps=("a",),
        metadata={"k": 1},
    )
    wire = json.loads(json.dumps(task.to_wire()))
    assert wire["v"] == 1 and wire["priority"] == "P0"
    assert AgentTask.from_wire(wire) == task


def test_unknown_wire_version_is_refused() -> None:
    wire = AgentTask(role="r", priority=Priority.P1, prompt="x", output_budget=1).to_wire()
    wire["v"] = 2
    with pytest.raises(ValidationError, match="wire version 2"):
        AgentTask.from_wire(wire)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": None}, "exactly one of prompt or messages"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one"),
        ({"prompt": "x", "output_budget": 0}, "greater than 0"),
    ],
)
def test_task_rejects(fields: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"role": "r", "priority": "P1", "output_budget": 5}
    with pytest.raises(ValidationError, match=message):
        AgentTask(**{**base, **fields})  # type: ignore[arg-type]


def test_redacted_repr_hides_the_prompt() -> None:
    task = AgentTask(role="r", priority=Priority.P2, prompt="secret plan", output_budget=5)
    assert "secret" not in task.redacted()
    assert "input_chars=11" in task.redacted()


def test_result_timings() -> None:
    now = utcnow()
    result = TaskResult(
        task_id="t",
        role="r",
        priority=Priority.P1,
        status="succeeded",
        timings=Timings(submitted_at=now, started_at=now, finished_at=now),
    )
    assert TaskResult.from_wire(json.loads(json.dumps(result.to_wire()))) == result
    assert result.timings.queue_wait_s == 0.0


def test_priority_parsing_and_queue_names() -> None:
    assert Priority("p1") is Priority.P1
    with pytest.raises(ValueError, match="P3"):
        Priority("P3")
    assert queue_name(Priority.P0, "research") == "p0.research"
    assert parse_queue("p2.summarize") == (Priority.P2, "summarize")
    # A worker serving two roles drains both P0 queues before any P1.
    assert worker_queues(["summarize", "research"]) == [
        "p0.research",
        "p0.summarize",
        "p1.research",
        "p1.summarize",
        "p2.research",
        "p2.summarize",
    ]
    assert worker_queues(["research"], [Priority.P0]) == ["p0.research"]


def test_wire_refuses_text_that_is_not_valid_utf8() -> None:
    """A payload from another producer is held to the same rule as a submit."""
    wire = AgentTask(role="r", priority=Priority.P1, prompt="x", output_budget=5).to_wire()
    for prompt in ("a\x00", "\udcff"):
        with pytest.raises(ValidationError, match="prompt"):
            AgentTask.from_wire({**wire, "prompt": prompt})
    with pytest.raises(ValidationError):
        AgentTask.from_wire({**wire, "output_budget": True})
