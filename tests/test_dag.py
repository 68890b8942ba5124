"""DAGs on real `swarm worker` processes, a real Redis and the fake provider.

What each test proves about a run: every node ran exactly once (one recorded
attempt, one call to the provider), after all its deps (timings), with exactly its
deps' outputs. The last is checked end to end: the fake provider's reply is a pure
function of the messages, so a node's output equals the reply to its role's system
prompt plus its prompt rendered with its deps' expected outputs, and nothing else.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from swarm_workers.client import SwarmClient
from swarm_workers.config import Settings, load_settings
from swarm_workers.dag import DagStatus, Node, NodeState
from swarm_workers.dag.compile import topological_order
from swarm_workers.dag.template import render
from swarm_workers.fakes.llm_server import ChatRequest, FakeLLMConfig, compose_reply
from swarm_workers.queues import DAG_NODE

from .conftest import ROOT, FakeLLM, WorkerFactory, spawn_fake_llm, wait_until

ROLES = {
    "research": {"concurrency": 8},
    "summarize": {"concurrency": 8, "default_priority": "P2"},
    # A model whose context a long prompt cannot fit: the agent loop fails such a
    # node with ContextOverflow before calling the provider (a deterministic failure).
    "tiny": {"model": "tiny-model", "concurrency": 2},
}
ALL_ROLES = tuple(ROLES)
TOO_LONG = "Read all of this. " * 400  # ~1800 tokens > the 1024-token context of tiny-model


def write_config(
    make: Callable[..., Path], fake: FakeLLM, workers: WorkerFactory, **sections: Any
) -> Path:
    """This test's config; its workers talk to `fake` (so its stats count their calls)."""
    workers.env["SWARM_LLM_BASE_URL"] = fake.base_url
    return make(
        roles=ROLES,
        llm={
            "base_url": fake.base_url,
            "context_windows": {"fake-gpt": 131_072, "tiny-model": 1024},
        },
        **sections,
    )


@pytest.fixture
def config(
    swarm_config: Callable[..., Path], fake_llm: FakeLLM, start_worker: WorkerFactory
) -> Path:
    return write_config(swarm_config, fake_llm, start_worker)


@pytest.fixture
def client(config: Path, redis_url: str) -> Iterator[SwarmClient]:
    with SwarmClient(settings=load_settings(config, redis_url=redis_url)) as client:
        yield client


# --------------------------------------------------------------------------- checks


def expected_output(settings: Settings, role: str, prompt: str) -> str:
    """What the fake provider answers a one-step agent of `role` given `prompt`."""
    request = ChatRequest(
        model=settings.model_for(role),
        messages=[
            {"role": "system", "content": settings.role(role).system_prompt},
            {"role": "user", "content": prompt},
        ],
    )
    reply = compose_reply(request, FakeLLMConfig())
    assert reply.content is not None
    return reply.content


def expected_outputs(settings: Settings, nodes: list[Node]) -> dict[str, str]:
    by_id = {n.id: n for n in nodes}
    outputs: dict[str, str] = {}
    for node_id in topological_order({n.id: n.deps for n in nodes}):
        node = by_id[node_id]
        prompt = render(node.prompt, {d: outputs[d] for d in node.deps})
        outputs[node_id] = expected_output(settings, node.role or "research", prompt)
    return outputs


def assert_ran_exactly(status: DagStatus, nodes: list[Node], settings: Settings) -> None:
    """Succeeded; each node once, after its deps, with exactly its deps' outputs."""
    assert status.state == "succeeded", {n.node: n.reason for n in status.failed}
    expected = expected_outputs(settings, nodes)
    for node in nodes:
        result = status.nodes[node.id].result
        assert result is not None, node.id
        assert result.ok, (node.id, result.error)
        assert result.attempts == 1, node.id
        assert result.output == expected[node.id], f"{node.id} did not see exactly its deps"
        for dep in node.deps:
            dep_result = status.nodes[dep].result
            assert dep_result is not None
            assert dep_result.timings.finished_at <= result.timings.started_at, (dep, node.id)


def queued(conn: redis.Redis) -> dict[str, int]:
    found = {}
    for role in ROLES:
        for p in ("p0", "p1", "p2"):
            depth = int(conn.llen(f"{p}.{role}"))
            if depth:
                found[f"{p}.{role}"] = depth
    return found


# --------------------------------------------------------------------------- shapes


def test_fan_out_fan_in_routes_each_node_to_its_role_and_priority(
    client: SwarmClient,
    config: Path,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
    redis_conn: redis.Redis,
) -> None:
    nodes = [
        Node("a", "Research apples.", role="research", priority="P1"),
        Node("b", "Research bananas.", role="research", priority="P0", budget=512),
        Node("c", "Research cherries.", role="research", priority="P2"),
        Node(
            "s",
            "Summarise: {{ a.output }} | {{ b.output }} | {{ c.output }}",
            role="summarize",
            deps=["a", "b", "c"],
        ),
    ]
    start_worker(["research"], config=config)
    dag = client.submit_dag(nodes)
    # Only a research worker runs: the fan-in waits on its own role's P2 queue.
    wait_until(lambda: queued(redis_conn) == {"p2.summarize": 1}, 30, "the fan-in to be queued")
    status = dag.status()
    states = [n.state for n in status.nodes.values()]
    assert states == [NodeState.DONE] * 3 + [NodeState.PENDING], status.model_dump_json(indent=1)
    assert [status.nodes[n].priority.value for n in "abcs"] == ["P1", "P0", "P2", "P2"]

    start_worker(["summarize"], config=config)
    final = dag.wait(timeout=60)
    assert_ran_exactly(final, nodes, client.settings)
    assert fake_llm.stats()["requests"] == 4
    assert final.outputs["s"] == final.nodes["s"].result.output  # type: ignore[union-attr]


def test_diamond(
    client: SwarmClient, config: Path, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    nodes = [
        Node("a", "Pick a topic.", role="research"),
        Node("b", "Argue for it.", role="research", deps=["a"]),  # outputs appended
        Node("c", "Argue against {{ a.output }}", role="research", deps=["a"]),
        Node("d", "Weigh {{ b.output }} vs {{ c.output }}", role="summarize", deps=["b", "c"]),
    ]
    start_worker(ALL_ROLES, config=config)
    status = client.submit_dag(nodes).wait(timeout=60)
    assert_ran_exactly(status, nodes, client.settings)
    assert fake_llm.stats()["requests"] == 4


def test_three_level_dag_whose_parents_sit_in_different_branches(
    client: SwarmClient, config: Path, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # d's parents (a, b) sit in different branches: c needs only a. No single canvas
    # runs this exactly: level split (c also waits for b), and c still sees only a.
    nodes = [
        Node("a", "Level 0, a.", role="research"),
        Node("b", "Level 0, b.", role="research"),
        Node("c", "Level 1 from {{ a.output }}", role="research", deps=["a"]),
        Node("d", "Level 1 from both.", role="research", deps=["a", "b"]),
        Node("e", "Level 2: {{ c.output }} + {{ d.output }}", role="summarize", deps=["c", "d"]),
    ]
    start_worker(ALL_ROLES, config=config)
    dag = client.submit_dag(nodes)
    assert (dag.record.levels_split, dag.record.extra_waits) == (1, 1)
    assert_ran_exactly(dag.wait(timeout=60), nodes, client.settings)
    assert fake_llm.stats()["requests"] == 5


def random_nodes(rng: random.Random, size: int) -> list[Node]:
    """About 2.5 deps a node; half the prompts name their deps, half get them appended."""
    nodes = []
    for i in range(size):
        deps = [f"n{j}" for j in range(i) if rng.random() < 2.5 / (i + 1)]
        named = " and ".join(f"{{{{ {d}.output }}}}" for d in deps)
        prompt = f"Step {i} on {named}." if named and rng.random() < 0.5 else f"Step {i}."
        role = rng.choice(["research", "summarize"])
        priority = rng.choice(["P0", "P1", "P2"])
        nodes.append(Node(f"n{i}", prompt, role=role, priority=priority, deps=deps))
    return nodes


def test_random_dags_run_each_node_once_after_its_deps(
    client: SwarmClient, config: Path, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    rng = random.Random(2026)
    dags = [random_nodes(rng, rng.randint(4, 20)) for _ in range(8)]
    start_worker(ALL_ROLES, config=config, concurrency=8)
    handles = [client.submit_dag(nodes) for nodes in dags]
    assert sum(h.record.levels_split for h in handles) > 0  # some need a level split
    for nodes, handle in zip(dags, handles, strict=True):
        assert_ran_exactly(handle.wait(timeout=90), nodes, client.settings)
    assert fake_llm.stats()["requests"] == sum(len(nodes) for nodes in dags)


# --------------------------------------------------------------------------- failures


def failing_dag() -> list[Node]:
    return [
        Node("big", TOO_LONG, role="tiny"),
        Node("after", "Continue from big.", role="research", deps=["big"]),
        Node("last", "Finish.", role="summarize", deps=["after"]),
        Node("free", "Independent work.", role="research"),
        Node("join", "Join big and free.", role="summarize", deps=["big", "free"]),
    ]


def test_failed_node_fails_its_dependents_at_once(
    client: SwarmClient,
    config: Path,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
    redis_conn: redis.Redis,
) -> None:
    start_worker(["tiny", "research"], config=config)  # nobody serves summarize yet
    dag = client.submit_dag(failing_dag())
    status = dag.wait(timeout=60)

    assert status.state == "failed"
    big = status.nodes["big"]
    assert big.state is NodeState.FAILED
    assert big.origin == "big"
    assert big.reason is not None
    assert big.reason.startswith("ContextOverflow: ")
    for name in ("after", "last", "join"):
        node = status.nodes[name]
        assert node.state is NodeState.FAILED, name
        assert node.origin == "big"
        assert node.reason == f"upstream node 'big' failed: {big.reason}"
    assert status.nodes["free"].state is NodeState.DONE
    # Decided before the summarize nodes could run: nobody serves their queue yet.
    assert status.nodes["last"].result is None
    assert status.nodes["join"].result is None
    wait_until(lambda: queued(redis_conn) == {"p2.summarize": 2}, 30, "last and join queued")

    start_worker(["summarize"], config=config)
    wait_until(
        lambda: all(dag.status().nodes[n].result for n in ("after", "last", "join")),
        30,
        "the blocked nodes to be recorded",
    )
    recorded = dag.status()
    for name in ("after", "last", "join"):
        result = recorded.nodes[name].result
        assert result is not None
        assert result.error is not None
        assert result.error.type == "UpstreamFailed"
        assert "upstream node 'big' failed: ContextOverflow" in result.error.message
        assert recorded.nodes[name].reason == status.nodes[name].reason
    assert fake_llm.stats()["requests"] == 1  # only `free`: no blocked node called the model


def test_skip_policy_skips_dependents_and_the_dag_succeeds(
    client: SwarmClient, config: Path, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    start_worker(ALL_ROLES, config=config)
    status = client.submit_dag(failing_dag(), on_failure="skip").wait(timeout=60)
    assert status.state == "succeeded"
    assert [n.node for n in status.failed] == ["big"]
    assert sorted(n.node for n in status.skipped) == ["after", "join", "last"]
    for node in status.skipped:
        assert node.reason is not None
        assert node.reason.startswith("upstream node 'big' failed")
    assert status.nodes["free"].state is NodeState.DONE
    assert fake_llm.stats()["requests"] == 1


def test_per_node_policy_overrides_the_dag_and_fail_wins_over_skip(
    client: SwarmClient, config: Path, start_worker: WorkerFactory
) -> None:
    nodes = [
        Node("optional", TOO_LONG, role="tiny", on_failure="skip"),
        Node("needed", TOO_LONG, role="tiny"),
        Node("uses_optional", "x", role="research", deps=["optional"]),
        Node("uses_both", "y", role="research", deps=["optional", "needed"]),
        Node("free", "z", role="research"),
    ]
    start_worker(ALL_ROLES, config=config)
    status = client.submit_dag(nodes, on_failure="fail").wait(timeout=60)
    assert status.state == "failed"
    assert status.nodes["uses_optional"].state is NodeState.SKIPPED
    assert status.nodes["uses_both"].state is NodeState.FAILED
    assert status.nodes["uses_both"].origin == "needed"
    assert status.nodes["free"].state is NodeState.DONE


# --------------------------------------------------------------------------- idempotent headers


def test_redis_backend_counts_a_redelivered_chord_header_once(
    client: SwarmClient, redis_conn: redis.Redis
) -> None:
    """celery/backends/redis.py CHORD_PART_RETURN_LUA: SISMEMBER on `<tid>:<index>`.

    A second return of the same header task adds nothing, even with a different
    value; the body is published once, and a copy arriving after the chord fired
    (the `.c` done marker) is dropped.
    """
    backend = client.app.backend
    body = client.app.signature(
        DAG_NODE, args=("d", "s"), immutable=True, task_id="d.s", queue="p2.summarize"
    )
    group_id = "test-group"
    backend.set_chord_size(group_id, 2)
    joined = backend.get_key_for_group(group_id, ".j")

    def part_return(task_id: str, index: int, value: object) -> None:
        request = SimpleNamespace(id=task_id, group=group_id, group_index=index, chord=body)
        backend.on_chord_part_return(request, "SUCCESS", value)

    part_return("d.a", 0, {"output": "A"})
    part_return("d.a", 0, {"output": "A"})  # redelivered: the same bytes
    assert redis_conn.zcard(joined) == 1
    part_return("d.a", 0, {"output": "A, run again"})  # even a different result
    assert redis_conn.zcard(joined) == 1
    assert redis_conn.llen("p2.summarize") == 0  # 1 of 2: the body waits

    part_return("d.b", 1, {"output": "B"})
    assert redis_conn.llen("p2.summarize") == 1  # the body, once
    part_return("d.a", 0, {"output": "A"})  # a late copy after the chord fired
    assert redis_conn.llen("p2.summarize") == 1
    message = json.loads(redis_conn.lindex("p2.summarize", 0))
    assert message["headers"]["id"] == "d.s"


def test_duplicate_header_message_returns_the_stored_result(
    client: SwarmClient,
    config: Path,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
    redis_conn: redis.Redis,
) -> None:
    nodes = [
        Node("a", "Header a.", role="research"),
        Node("b", "Header b.", role="research"),
        Node("s", "Fan in.", role="summarize", deps=["a", "b"]),
    ]
    dag = client.submit_dag(nodes)
    # What kombu's restore of an unacked message does: the very same message again.
    (first, _) = redis_conn.lrange("p1.research", 0, -1)
    redis_conn.rpush("p1.research", first)
    start_worker(ALL_ROLES, config=config, concurrency=1)  # one at a time: a true redelivery
    status = dag.wait(timeout=60)
    assert_ran_exactly(status, nodes, client.settings)
    wait_until(lambda: not queued(redis_conn), 10, "the duplicate to be consumed")
    assert fake_llm.stats()["requests"] == 3  # the copy did not call the model
    assert status.nodes["s"].result is not None
    assert status.nodes["s"].result.attempts == 1  # the body ran once


@pytest.mark.slow
def test_sigkill_during_header_tasks_still_runs_every_node_once(
    swarm_config: Callable[..., Path],
    redis_url: str,
    start_worker: WorkerFactory,
    redis_conn: redis.Redis,
) -> None:
    slow = spawn_fake_llm("--latency-ms", "3000")
    try:
        config = write_config(
            swarm_config,
            slow,
            start_worker,
            # Room in the time limit for the redeliveries' isolated child processes to
            # start on a loaded machine (they ran beside a crash, so they are suspects).
            worker={"visibility_timeout_s": 16, "task_time_limit_s": 15, "lease_ttl_s": 2},
        )
        nodes = [
            Node("a", "Slow header a.", role="research"),
            Node("b", "Slow header b.", role="research"),
            Node("s", "Fan in {{ a.output }} {{ b.output }}", role="summarize", deps=["a", "b"]),
        ]
        with SwarmClient(settings=load_settings(config, redis_url=redis_url)) as client:
            doomed = start_worker(ALL_ROLES, config=config, concurrency=2)
            dag = client.submit_dag(nodes)

            def both_calling_the_model() -> bool:
                states = dag.status().nodes
                running = states["a"].state is states["b"].state is NodeState.RUNNING
                return running and slow.stats()["requests"] == 2

            wait_until(both_calling_the_model, 30, "both header tasks to call the model")
            doomed.signal(signal.SIGKILL)
            assert doomed.wait(10) == -signal.SIGKILL
            assert redis_conn.hlen("unacked") == 2  # held for the dead worker

            start_worker(ALL_ROLES, config=config, concurrency=2)
            status = dag.wait(timeout=90)
            assert status.state == "succeeded"
            expected = expected_outputs(client.settings, nodes)
            attempts = {n: status.nodes[n].result.attempts for n in "abs"}  # type: ignore[union-attr]
            assert attempts == {"a": 2, "b": 2, "s": 1}
            assert {n: status.nodes[n].result.output for n in "abs"} == expected  # type: ignore[union-attr]
            assert slow.stats()["requests"] == 5  # a, b twice (the first calls died), s once
            wait_until(lambda: redis_conn.hlen("unacked") == 0, 20, "every message acked")
            assert not queued(redis_conn)
    finally:
        slow.stop()


# --------------------------------------------------------------------------- the CLI


def test_swarm_run_example_file(
    config: Path, redis_url: str, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    start_worker(ALL_ROLES, config=config)
    env = {**os.environ, "REDIS_URL": redis_url, "SWARM_CONFIG": str(config)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm_workers.cli",
            "run",
            str(ROOT / "examples" / "swarm.yaml"),
            "--wait",
            "--json",
            "--timeout",
            "60",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    status = json.loads(done.stdout)
    assert status["state"] == "succeeded"
    assert {n["state"] for n in status["nodes"].values()} == {"done"}
    assert fake_llm.stats()["requests"] == 5

    with SwarmClient(settings=load_settings(config, redis_url=redis_url)) as client:
        again = client.dag(status["dag_id"]).status()
    assert again.outputs == {k: v["result"]["output"] for k, v in status["nodes"].items()}


def test_swarm_run_rejects_a_bad_dag_before_touching_redis(tmp_path: Path, config: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - id: a\n    prompt: x\n    deps: [nope]\n")
    env = {**os.environ, "SWARM_CONFIG": str(config), "REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, "-m", "swarm_workers.cli", "run", str(bad)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2
    assert "UnknownDependency" in done.stderr
    assert "'nope'" in done.stderr
