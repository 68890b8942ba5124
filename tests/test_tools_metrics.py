"""Tool-call metrics: the model names tools, but only configured servers name series."""

from __future__ import annotations

from datetime import UTC, datetime

from swarm_workers.metrics import REGISTRY, observe_result
from swarm_workers.models import Priority, TaskResult, Timings, ToolCallRecord
from swarm_workers.tools.base import LocalToolset


def _series() -> set[tuple[tuple[str, str], ...]]:
    found = set()
    for metric in REGISTRY.collect():
        if metric.name == "swarm_tool_calls":
            for sample in metric.samples:
                if sample.name == "swarm_tool_calls_total":
                    found.add(tuple(sorted(sample.labels.items())))
    return found


def _result(names: list[str]) -> TaskResult:
    now = datetime.now(UTC)
    calls = tuple(
        ToolCallRecord(name=n, arguments="{}", latency_s=0.0, ok=i % 2 == 0)
        for i, n in enumerate(names)
    )
    return TaskResult(
        task_id="t",
        role="default",
        priority=Priority.P1,
        status="succeeded",
        tool_calls=calls,
        timings=Timings(submitted_at=now, started_at=now, finished_at=now),
    )


def test_invented_tool_names_add_no_series() -> None:
    LocalToolset(server="calc")  # a configured toolset: its server may name a series
    observe_result(_result(["calc__add", "calc__add"]))
    before = _series()
    invented = [f"made{i}__up" for i in range(500)] + [f"nosuch{i}" for i in range(500)]
    observe_result(_result(invented))
    added = _series() - before
    assert added <= {
        (("outcome", "ok"), ("server", "unknown")),
        (("outcome", "error"), ("server", "unknown")),
    }
    servers = {dict(labels)["server"] for labels in _series()}
    assert "calc" in servers
    assert not any(s.startswith(("made", "nosuch")) for s in servers)
