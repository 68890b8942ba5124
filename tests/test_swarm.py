"""Model-directed swarms on real workers: a supervisor's `swarm__spawn`, its limits, its
continuation, and what survives a worker SIGKILLed while the supervisor waits.

The shipped fake provider plays the models: `SPAWN n roles=a,b` makes a supervisor
spawn n sub-tasks and then synthesise from their results.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.dag.model import Node
from swarm_workers.errors import SpawnRefused
from swarm_workers.models import AgentTask, Priority, SubAgent, TaskResult, TaskState
from swarm_workers.swarm import Spawner
from swarm_workers.swarm.spawn import Waiting

from .conftest import FakeLLM, WorkerFactory, spawn_fake_llm, wait_until

ROLES = ("boss", "research", "summarize")


def _roles(**spawn: Any) -> dict[str, Any]:
    return {
        "boss": {"concurrency": 4, "spawn": spawn or True, "max_steps": 6},
        "research": {"concurrency": 4, "spawn": spawn or True},
        "summarize": {"concurrency": 4},
    }


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    fake = spawn_fake_llm("--latency-ms", "300")
    yield fake
    fake.stop()


@pytest.fixture
def fleet(
    redis_url: str, swarm_config: Callable[..., Path], llm: FakeLLM, start_worker: WorkerFactory
) -> Iterator[Callable[..., SwarmClient]]:
    """`fleet(roles=..., worker=..., workers=1, concurrency=24)`: workers started, a client."""
    start_worker.env["SWARM_LLM_BASE_URL"] = llm.base_url
    made: list[SwarmClient] = []

    def make(
        roles: dict[str, Any] | None = None,
        workers: int = 1,
        concurrency: int = 24,
        **sections: Any,
    ) -> SwarmClient:
        config = swarm_config(roles=roles or _roles(), **sections)
        for _ in range(workers):
            start_worker(ROLES, config=config, concurrency=concurrency)
        client = SwarmClient(settings=load_settings(config, redis_url=redis_url))
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _flat(agents: tuple[SubAgent, ...]) -> list[SubAgent]:
    return [x for a in agents for x in (a, *_flat(a.children))]


def test_a_supervisor_spawns_20_sub_agents_that_run_in_parallel(
    fleet: Callable[..., SwarmClient], llm: FakeLLM, redis_conn: redis.Redis
) -> None:
    client = fleet()
    handle = client.submit("SPAWN 20 roles=research,summarize", role="boss", priority="P1")
    result = handle.result(timeout=90)
    assert result.ok, result.error
    assert result.output is not None
    assert result.output.startswith("Synthesis: 1 round(s), 20 sub-agents, 20 succeeded")
    tree = result.swarm
    assert tree is not None and tree.rounds == 1 and tree.total_agents == 20
    assert {a.role for a in tree.children} == {"research", "summarize"}
    assert all(a.status == "succeeded" and a.run_s is not None for a in tree.children)
    # Each sub-agent ran once: one model call each, plus the supervisor's two turns.
    assert llm.stats()["completions"] == 20 + 2
    assert result.steps == 2 and result.steps_resumed == 1  # continued after the spawn
    # In parallel: the tree took much less than one agent doing it all in turn.
    assert tree.wall_s is not None and tree.wall_s * 3 < tree.sequential_s
    assert tree.critical_path_s <= tree.wall_s
    assert tree.completion_tokens == sum(a.completion_tokens for a in tree.children)
    # The supervisor's checkpoint, ledger and totals are gone with its outcome recorded.
    left = sorted(k.decode() for k in redis_conn.scan_iter(match=f"*{{{handle.id}}}*"))
    assert left == [f"swarm:result:{{{handle.id}}}"]


def _refused(result: TaskResult) -> str:
    assert result.ok, result.error
    assert result.output is not None and result.output.startswith("Spawn refused"), result.output
    return result.output


def test_sub_agents_per_spawn_limit(fleet: Callable[..., SwarmClient], llm: FakeLLM) -> None:
    client = fleet(roles=_roles(max_per_spawn=3))
    result = client.submit("SPAWN 4 roles=research", role="boss").result(timeout=60)
    assert "at most 3 per call" in _refused(result)
    assert result.swarm is None and llm.stats()["completions"] == 2  # no sub-agent ran


def test_sub_agents_per_tree_limit(fleet: Callable[..., SwarmClient]) -> None:
    client = fleet(roles=_roles(max_total=5))
    result = client.submit("SPAWN 3 roles=research rounds=2", role="boss").result(timeout=60)
    assert "tree limit" in _refused(result)
    assert result.swarm is not None and result.swarm.total_agents == 3  # round 1 only


def test_tree_token_budget(fleet: Callable[..., SwarmClient]) -> None:
    roles = _roles(tree_budget=150)
    roles["summarize"]["budgets"] = {"P1": 100}
    client = fleet(roles=roles)
    result = client.submit("SPAWN 2 roles=summarize", role="boss").result(timeout=60)
    assert "tree budget" in _refused(result)


def test_depth_limit_and_a_deeper_tree(fleet: Callable[..., SwarmClient]) -> None:
    client = fleet(roles=_roles())  # max_depth 1: children may not spawn
    prompt = "SPAWN 1 roles=research | SPAWN 2 roles=summarize"
    result = client.submit(prompt, role="boss").result(timeout=60)
    assert result.ok and result.swarm is not None
    (child,) = result.swarm.children
    assert "depth limit" in (client.result(child.task_id, timeout=5).output or "")

    client = fleet(roles=_roles(max_depth=2))
    result = client.submit(prompt, role="boss").result(timeout=60)
    assert result.ok and result.swarm is not None
    assert result.swarm.total_agents == 3  # one child, its two own
    (child,) = result.swarm.children
    assert [a.role for a in child.children] == ["summarize", "summarize"]
    assert (client.result(child.task_id, timeout=5).output or "").startswith(
        "Synthesis: 1 round(s), 2 sub-agents, 2 succeeded"
    )


@pytest.mark.parametrize(
    ("shape", "rounds"),
    [
        ("SPAWN 2 roles=research,summarize deps=2:1", 1),
        ("SPAWN 3 roles=research,summarize deps=3:1+2", 1),
        ("SPAWN 2 roles=research,summarize deps=2:1", 2),
    ],
    ids=["chain", "chord", "chain-two-rounds"],
)
def test_a_sibling_waits_for_the_real_result_of_a_spawning_sub_agent(
    fleet: Callable[..., SwarmClient], shape: str, rounds: int
) -> None:
    """c1 spawns (depth 2) and suspends, once or per round; its dependant starts only
    once c1 recorded, and reads c1's synthesis, not the suspension."""
    client = fleet(roles=_roles(max_depth=2))
    n = int(shape.split()[1])
    prompt = f"{shape} | SPAWN 2 roles=summarize rounds={rounds}"
    result = client.submit(prompt, role="boss").result(timeout=90)
    assert result.ok, result.error
    assert result.swarm is not None
    by_node = {a.task_id.rsplit(".", 1)[1]: a for a in result.swarm.children}
    assert by_node["c1"].status == "succeeded" and len(by_node["c1"].children) == 2 * rounds
    spawning = client.result(by_node["c1"].task_id, timeout=5)
    dependant = client.result(by_node[f"c{n}"].task_id, timeout=5)
    assert dependant.ok, dependant.error
    assert (spawning.output or "").startswith(
        f"Synthesis: {rounds} round(s), {2 * rounds} sub-agents, {2 * rounds} succeeded"
    )
    assert spawning.output in (dependant.output or "")  # its prompt quoted the real output
    assert dependant.timings.started_at >= spawning.timings.finished_at
    assert (result.output or "").startswith(f"Synthesis: 1 round(s), {n} sub-agents, {n} succeeded")


def test_a_supervisor_waiting_on_its_children_reads_as_waiting(
    fleet: Callable[..., SwarmClient], redis_url: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from swarm_workers.cli import app

    client = fleet(roles=_roles(max_depth=2), concurrency=3)  # the grandchildren queue
    handle = client.submit("SPAWN 2 roles=research | SPAWN 6 roles=summarize", role="boss")

    def nested_wait() -> bool:
        live = client.tree(handle.id)
        return live is not None and any(a.status == "waiting" for a in live.children)

    wait_until(nested_wait, 30, "a sub-agent waiting on sub-agents of its own")
    assert client.task(handle.id).status().state is TaskState.WAITING
    config = ["--config", str(tmp_path / "swarm.toml")]
    env = {"REDIS_URL": redis_url, "COLUMNS": "400"}
    shown = CliRunner().invoke(app, ["tree", handle.id, *config], env=env)
    assert shown.exit_code == 0, shown.output
    assert f"{handle.id} waiting:" in shown.output  # the root, then a sub-agent
    assert " waiting research r1" in shown.output
    shown = CliRunner().invoke(app, ["task", handle.id, *config], env=env)
    assert json.loads(shown.output)["state"] == "waiting"
    assert handle.result(timeout=90).ok
    assert client.status(handle.id).state is TaskState.SUCCEEDED


def test_a_producer_dag_node_that_spawns_runs_until_it_records(
    fleet: Callable[..., SwarmClient],
) -> None:
    """The same holds for a DAG a producer submitted: its dependant waits for the
    supervisor node's real result, and the node shows as running while it waits."""
    client = fleet()
    dag = client.submit_dag(
        [
            Node("lead", "SPAWN 6 roles=summarize", role="boss"),
            Node("after", "ECHO {{ lead.output }}", role="summarize", deps=["lead"]),
        ]
    )
    lead = dag.task_id("lead")
    wait_until(lambda: client.status(lead).state is TaskState.WAITING, 30, "lead to wait")
    nodes = dag.status().nodes
    assert nodes["lead"].state == "running" and nodes["after"].state == "pending"
    final = dag.wait(timeout=90)
    assert final.ok, final
    spawned = dag.result("lead").output or ""
    assert spawned.startswith("Synthesis: 1 round(s), 6 sub-agents, 6 succeeded")
    assert spawned in (dag.result("after").output or "")


def test_priority_is_inherited_and_never_raised(
    redis_conn: redis.Redis, redis_url: str, swarm_config: Callable[..., Path]
) -> None:
    settings = load_settings(swarm_config(roles=_roles()), redis_url=redis_url)
    spawner = Spawner(redis_conn, settings)
    boss = AgentTask(role="boss", priority=Priority.P1, prompt="x", output_budget=100)
    with pytest.raises(SpawnRefused, match="never raised"):
        spawner.answer(boss, "call_a", '{"tasks": [{"prompt": "y", "priority": "P0"}]}')
    spawner.answer(
        boss, "call_b", '{"tasks": [{"prompt": "y"}, {"prompt": "z", "priority": "P2"}]}'
    )
    (record,) = spawner.rounds(boss.id)
    tasks = spawner.prepared(record.dag_id).tasks
    assert [t.priority for t in tasks.values()] == [Priority.P1, Priority.P2]


def test_a_failing_sub_agent_is_a_failed_result_for_the_supervisor(
    fleet: Callable[..., SwarmClient],
) -> None:
    client = fleet()
    result = client.submit("SPAWN 3 roles=research fail=2", role="boss").result(timeout=60)
    assert result.ok, result.error
    assert (result.output or "").startswith(
        "Synthesis: 1 round(s), 3 sub-agents, 2 succeeded, 1 failed"
    )
    assert result.swarm is not None
    failed = [a for a in result.swarm.children if a.status == "failed"]
    assert len(failed) == 1 and failed[0].error is not None
    assert failed[0].error.type == "ProviderRejected"


def test_rounds_continue_the_same_supervisor(fleet: Callable[..., SwarmClient]) -> None:
    client = fleet()
    result = client.submit("SPAWN 3 roles=research rounds=2", role="boss").result(timeout=60)
    assert (result.output or "").startswith("Synthesis: 2 round(s), 6 sub-agents, 6 succeeded")
    assert result.swarm is not None and result.swarm.rounds == 2
    assert result.steps == 3 and result.steps_resumed == 2


def test_cancelling_the_root_cancels_the_tree_and_records_what_it_spent(
    fleet: Callable[..., SwarmClient],
) -> None:
    client = fleet(concurrency=2)  # most sub-agents wait in their queue
    handle = client.submit("SPAWN 12 roles=research", role="boss")
    wait_until(
        lambda: (t := client.tree(handle.id)) is not None and t.total_agents == 12, 30, "spawn"
    )
    live = client.tree(handle.id)
    assert live is not None
    client.cancel(handle.id)
    result = handle.result(timeout=60)
    assert result.status == "cancelled"
    children = [a.task_id for a in live.children]
    done = [client.result(child, timeout=30) for child in children]
    assert all(r.status in ("succeeded", "cancelled") for r in done)
    assert sum(r.status == "cancelled" for r in done) >= 6  # queued ones never ran
    # The root's own turn (from its checkpoint) and its tree, cancelled children included.
    assert result.steps == 1 and len(result.usage.calls) == 1
    assert result.usage.completion_tokens > 0 and result.model is not None
    assert result.error is not None and result.error.type == "TaskCancelled"
    tree = result.swarm
    assert tree is not None and tree.rounds == 1 and tree.total_agents == 12
    assert [a.status for a in tree.children] == [r.status for r in done]
    assert tree.completion_tokens == sum(r.usage.completion_tokens for r in done)


@pytest.mark.slow
def test_a_worker_sigkilled_while_the_supervisor_waits_loses_nothing(
    fleet: Callable[..., SwarmClient],
    start_worker: WorkerFactory,
    redis_conn: redis.Redis,
    tmp_path: Path,
) -> None:
    client = fleet(
        workers=2,
        concurrency=3,
        worker={"visibility_timeout_s": 8, "task_time_limit_s": 7, "lease_ttl_s": 2},
    )
    handle = client.submit("SPAWN 10 roles=research,summarize", role="boss")
    wait_until(
        lambda: (
            (t := client.tree(handle.id)) is not None
            and any(a.status == "running" for a in t.children)
            # The supervisor holds no worker thread while it waits: no lease.
            and client.status(handle.id).state is TaskState.WAITING
        ),
        30,
        "sub-agents to run while the supervisor waits",
    )
    doomed = start_worker.started[0]
    doomed.signal(signal.SIGKILL)
    assert doomed.wait(10) == -signal.SIGKILL
    start_worker(ROLES, config=tmp_path / "swarm.toml", concurrency=3)  # swarm_config's
    result = handle.result(timeout=120)
    assert result.ok, result.error
    assert (result.output or "").startswith("Synthesis: 1 round(s), 10 sub-agents, 10 succeeded")
    assert result.swarm is not None and all(a.status == "succeeded" for a in result.swarm.children)
    wait_until(lambda: redis_conn.hlen("unacked") == 0, 20, "every message acknowledged")


def test_concurrent_spawns_in_one_tree_never_pass_its_limits(
    redis_conn: redis.Redis, redis_url: str, swarm_config: Callable[..., Path]
) -> None:
    """The same call answered by racing deliveries draws once; supervisors of one tree
    spawning at once share its total and budget exactly, never past them."""
    config = swarm_config(roles=_roles(max_total=6, max_depth=2, tree_budget=6000))
    spawner = Spawner(redis_conn, load_settings(config, redis_url=redis_url))
    root = AgentTask(role="boss", priority=Priority.P1, prompt="x", output_budget=100)

    def answer(task: AgentTask, call: str, n: int) -> bool:
        raw = json.dumps({"tasks": [{"prompt": "y", "budget": 1000, "role": "summarize"}] * n})
        try:
            return isinstance(spawner.answer(task, call, raw), Waiting)
        except SpawnRefused:
            return False

    with ThreadPoolExecutor(8) as pool:  # one call, eight deliveries at once
        assert all(pool.map(lambda _: answer(root, "call_1", 3), range(8)))
    subs = [
        AgentTask(
            role="research",
            priority=Priority.P1,
            prompt="x",
            output_budget=100,
            metadata={"swarm_root": root.id, "swarm_parent": root.id, "swarm_depth": 1},
        )
        for _ in range(6)
    ]
    with ThreadPoolExecutor(12) as pool:  # six supervisors, each call delivered twice
        drawn = list(pool.map(lambda i: answer(subs[i % 6], "call_2", 1), range(12)))
    spawned = {t.id for t in subs if spawner.rounds(t.id)}
    assert len(spawned) == 3  # 3 + 3 = the tree's 6; the others were refused
    assert sum(drawn) == 6  # every delivery of an accepted call got its round
    children = [c for t in (root, *subs) for r in spawner.rounds(t.id) for c in r.children]
    assert len(children) == 6
    totals = redis_conn.hgetall(spawner.keys.swarm_root(root.id))
    assert int(totals[b"spawned"]) == 6 and int(totals[b"budget_left"]) == 0


def test_a_sub_supervisor_draws_from_the_roots_tree_budget_whatever_its_role_says(
    redis_conn: redis.Redis, redis_url: str, swarm_config: Callable[..., Path]
) -> None:
    roles = _roles(max_depth=2, tree_budget=1500)
    roles["research"]["spawn"] = {"max_depth": 2}  # no tree budget of its own
    spawner = Spawner(redis_conn, load_settings(swarm_config(roles=roles), redis_url=redis_url))
    root = AgentTask(role="boss", priority=Priority.P1, prompt="x", output_budget=100)
    sub = AgentTask(
        role="research",
        priority=Priority.P1,
        prompt="x",
        output_budget=100,
        metadata={"swarm_root": root.id, "swarm_parent": root.id, "swarm_depth": 1},
    )
    one = json.dumps({"tasks": [{"prompt": "y", "budget": 1000, "role": "summarize"}]})
    assert isinstance(spawner.answer(root, "call_1", one), Waiting)
    with pytest.raises(SpawnRefused, match="tree budget"):
        spawner.answer(sub, "call_2", one)  # 500 left of the root's 1500
