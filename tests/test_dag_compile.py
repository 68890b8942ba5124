"""DAG -> canvas, and every rejection at submit: fast, no workers.

The planner's contract, checked on hand-made shapes and on random DAGs: each node
appears exactly once, starts only after all its deps, and series-parallel DAGs are
expressed exactly (no node waits for anything it does not depend on).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import chord, group
from celery.canvas import _chain

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.dag import DagSpec, Node, load_dag, parse_dag
from swarm_workers.dag.canvas import to_canvas
from swarm_workers.dag.compile import (
    Leaf,
    Parallel,
    Series,
    Step,
    find_cycle,
    plan,
    topological_order,
    validate,
)
from swarm_workers.dag.outcome import NodeState, Outcome, blocked
from swarm_workers.dag.template import references, render
from swarm_workers.errors import (
    ConfigError,
    DagCycle,
    DagError,
    DagTooLarge,
    DuplicateNode,
    InvalidTask,
    SwarmError,
    UnknownDependency,
    UnknownReference,
    UnknownRole,
)
from swarm_workers.queues import ALL_PRIORITIES, queue_name

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- planning


def runs_after(step: Step, before: frozenset[str] = frozenset()) -> dict[str, frozenset[str]]:
    """For each node, the nodes a canvas of this plan finishes before it starts."""
    if isinstance(step, Leaf):
        return {step.node: before}
    if isinstance(step, Parallel):
        found: dict[str, frozenset[str]] = {}
        for branch in step.branches:
            found.update(runs_after(branch, before))
        return found
    found = {}
    for part in step.steps:
        inner = runs_after(part, before)
        found.update(inner)
        before = before | frozenset(inner)
    return found


def leaves(step: Step) -> list[str]:
    if isinstance(step, Leaf):
        return [step.node]
    children = step.branches if isinstance(step, Parallel) else step.steps
    return [node for child in children for node in leaves(child)]


def ancestors(deps: dict[str, tuple[str, ...]]) -> dict[str, frozenset[str]]:
    found: dict[str, frozenset[str]] = {}
    for node in topological_order(deps):
        found[node] = frozenset(deps[node]).union(*(found[d] for d in deps[node]))
    return found


def check_plan(deps: dict[str, tuple[str, ...]]) -> tuple[int, int]:
    """Assert the plan's contract; return (extra waits, level splits)."""
    result = plan(deps)
    assert sorted(leaves(result.step)) == sorted(deps)  # each node exactly once
    after = runs_after(result.step)
    anc = ancestors(deps)
    for node in deps:
        assert anc[node] <= after[node], f"{node} may start before one of its deps"
    assert result.extra_waits == sum(len(after[n] - anc[n]) for n in deps)
    return result.extra_waits, result.levels_split


def test_fan_out_fan_in_is_a_group_then_the_fan_in_node() -> None:
    result = plan({"a": (), "b": (), "c": (), "s": ("a", "b", "c")})
    assert result.step == Series((Parallel((Leaf("a"), Leaf("b"), Leaf("c"))), Leaf("s")))
    assert (result.extra_waits, result.levels_split) == (0, 0)


def test_diamond_is_exact() -> None:
    result = plan({"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")})
    assert result.step == Series((Leaf("a"), Parallel((Leaf("b"), Leaf("c"))), Leaf("d")))
    assert result.extra_waits == 0


def test_parallel_branches_of_different_lengths_are_exact() -> None:
    deps = {"a": (), "b": ("a",), "c": ("b",), "x": (), "s": ("c", "x")}
    result = plan(deps)
    assert result.step == Series(
        (Parallel((Series((Leaf("a"), Leaf("b"), Leaf("c"))), Leaf("x"))), Leaf("s"))
    )
    assert check_plan(deps) == (0, 0)


def test_parents_in_different_branches_split_a_level_and_count_the_cost() -> None:
    # d's parents a and b sit in different branches (c only needs a): the "N" shape.
    deps = {"a": (), "b": (), "c": ("a",), "d": ("a", "b"), "e": ("c", "d")}
    result = plan(deps)
    assert result.levels_split == 1
    assert result.extra_waits == 1  # c waits for b
    assert result.step == Series(
        (
            Series(
                (Parallel((Leaf("a"), Leaf("b"))), Parallel((Leaf("c"), Leaf("d")))), barrier=True
            ),
            Leaf("e"),
        )
    )
    check_plan(deps)


def test_disconnected_dag_is_a_group() -> None:
    assert plan({"a": (), "b": ("a",), "x": ()}).step == Parallel(
        (Series((Leaf("a"), Leaf("b"))), Leaf("x"))
    )


def random_dag(rng: random.Random, size: int, density: float) -> dict[str, tuple[str, ...]]:
    names = [f"n{i}" for i in range(size)]
    rng.shuffle(names)  # declaration order is not the topological order
    deps: dict[str, tuple[str, ...]] = {}
    for i, name in enumerate(names):
        deps[name] = tuple(names[j] for j in range(i) if rng.random() < density)
    return dict(rng.sample(list(deps.items()), len(deps)))


def random_series_parallel(rng: random.Random, budget: int) -> dict[str, tuple[str, ...]]:
    """A random series-parallel DAG built by composition: it must plan exactly."""
    counter = iter(range(10_000))

    def build(size: int) -> tuple[dict[str, tuple[str, ...]], list[str], list[str]]:
        if size == 1:
            name = f"n{next(counter)}"
            return {name: ()}, [name], [name]
        left = rng.randint(1, size - 1)
        a, a_src, a_sink = build(left)
        b, b_src, b_sink = build(size - left)
        if rng.random() < 0.5:  # parallel
            return {**a, **b}, a_src + b_src, a_sink + b_sink
        joined = {**a, **{n: d + tuple(a_sink) if n in b_src else d for n, d in b.items()}}
        return joined, a_src, b_sink

    return build(budget)[0]


@pytest.mark.parametrize("seed", range(40))
def test_random_dags_keep_the_plan_contract(seed: int) -> None:
    rng = random.Random(seed)
    check_plan(random_dag(rng, rng.randint(1, 60), rng.choice([0.02, 0.1, 0.3, 0.7])))


@pytest.mark.parametrize("seed", range(40))
def test_series_parallel_dags_plan_exactly(seed: int) -> None:
    rng = random.Random(seed)
    assert check_plan(random_series_parallel(rng, rng.randint(1, 60))) == (0, 0)


def test_planning_500_nodes_is_fast() -> None:
    import time

    deps = random_dag(random.Random(7), 500, 0.01)
    started = time.perf_counter()
    check_plan(deps)
    assert time.perf_counter() - started < 5


# --------------------------------------------------------------------------- canvas


def sig(node: str) -> object:
    from celery import Celery

    return Celery(set_as_current=False).signature(
        "swarm.dag_node", args=("dag", node), immutable=True, task_id=f"dag.{node}"
    )


def shape(canvas: object) -> str:
    """A canvas as text: `chord([a, b], s)`; also checks every signature is immutable."""
    if isinstance(canvas, chord):
        header = canvas.tasks.tasks if isinstance(canvas.tasks, group) else canvas.tasks
        return f"chord([{', '.join(map(shape, header))}], {shape(canvas.body)})"
    if isinstance(canvas, group):
        return f"group({', '.join(map(shape, canvas.tasks))})"
    if isinstance(canvas, _chain):
        return f"chain({', '.join(map(shape, canvas.tasks))})"
    assert canvas.immutable  # type: ignore[attr-defined]
    return str(canvas.args[1])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("deps", "expected"),
    [
        ({"a": (), "b": (), "s": ("a", "b")}, "chord([a, b], s)"),
        ({"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")}, "chain(a, chord([b, c], d))"),
        ({"a": (), "b": (), "s": ("a", "b"), "t": ("s",)}, "chain(chord([a, b], chain(s, t)))"),
        ({"a": (), "b": ("a",), "x": (), "s": ("b", "x")}, "chord([chain(a, b), x], s)"),
        (
            {"a": (), "b": (), "c": ("a", "b"), "d": ("a", "b"), "e": ("c", "d")},
            "chord([a, b], chord([c, d], e))",
        ),
        ({"a": (), "b": ("a",), "x": ()}, "group(chain(a, b), x)"),
        (  # the N shape: a level split, then the same forms
            {"a": (), "b": (), "c": ("a",), "d": ("a", "b"), "e": ("c", "d")},
            "chord([a, b], chord([c, d], e))",
        ),
    ],
)
def test_canvas_shapes(deps: dict[str, tuple[str, ...]], expected: str) -> None:
    assert shape(to_canvas(plan(deps).step, sig)) == expected


# --------------------------------------------------------------------------- validation


def spec(*nodes: Node, **fields: object) -> DagSpec:
    return DagSpec.of(list(nodes), **fields)


def test_cycle_is_named() -> None:
    with pytest.raises(DagCycle) as info:
        validate(
            spec(
                Node("a", "x", deps=["c"]), Node("b", "x", deps=["a"]), Node("c", "x", deps=["b"])
            ),
            10,
        )
    assert info.value.cycle in (["a", "c", "b", "a"], ["c", "b", "a", "c"], ["b", "a", "c", "b"])
    assert "dependency cycle: " in str(info.value)


def test_self_dependency_is_a_cycle() -> None:
    assert find_cycle({"a": ("a",)}) == ["a", "a"]


@pytest.mark.parametrize(
    ("nodes", "error", "needle"),
    [
        ([Node("a", "x", deps=["zz"])], UnknownDependency, "'a' depends on unknown node 'zz'"),
        ([Node("a", "x"), Node("a", "y")], DuplicateNode, "'a' appears more than once"),
        ([Node(f"n{i}", "x") for i in range(4)], DagTooLarge, "4 nodes; the limit is 3"),
        ([Node("bad id", "x")], InvalidTask, "nodes.bad id.id"),
        ([Node("a", "x"), Node("b", "{{ a.output }}")], UnknownReference, "not one of this"),
        ([Node("b", "{{ zz.output }}")], UnknownReference, "there is no node 'zz'"),
        ([Node("a", "x"), Node("b", "{{ a.usage }}", deps=["a"])], UnknownReference, "field"),
        ([Node("a", "x"), Node("b", "{{ a }}", deps=["a"])], UnknownReference, "a.output"),
    ],
)
def test_structural_rejections(nodes: list[Node], error: type[DagError], needle: str) -> None:
    with pytest.raises(error) as info:
        validate(spec(*nodes), 3)
    assert needle in str(info.value)


def test_other_braces_are_not_references() -> None:
    validate(spec(Node("a", 'Render {{ title }} and {"k": 1}')), 3)


# --------------------------------------------------------------------------- templates


def test_template_substitutes_only_references_and_never_rescans_outputs() -> None:
    text = render(
        "A={{a.output}} B={{ b . output }} {{ other }}", {"a": "{{ b.output }}", "b": "2"}
    )
    assert text == "A={{ b.output }} B=2 {{ other }}"


def test_prompt_without_references_gets_deps_outputs_appended_in_deps_order() -> None:
    text = render("Summarise.", {"b": "beta", "a": "alpha"})
    assert text.startswith("Summarise.\n\nOutputs of the tasks this one depends on:")
    assert text.index("### b\nbeta") < text.index("### a\nalpha")
    assert render("No deps.", {}) == "No deps."


def test_references_are_listed_in_order() -> None:
    assert [r.node for r in references("{{ x.output }} {{y-1.output}}")] == ["x", "y-1"]


# --------------------------------------------------------------------------- outcomes


def test_blocked_node_is_failed_if_any_dep_failed_fatally_else_skipped() -> None:
    fatal = Outcome.failed("a", "ContextOverflow: too big", "fail")
    optional = Outcome.failed("b", "ProviderRejected: no", "skip")
    done = Outcome(NodeState.DONE)
    assert blocked([("x", done)]) is None
    skipped = blocked([("x", done), ("b", optional)])
    assert skipped is not None
    assert skipped.state is NodeState.SKIPPED
    assert not skipped.fatal
    assert skipped.reason == "upstream node 'b' failed: ProviderRejected: no"
    failed = blocked([("b", optional), ("a", fatal)])
    assert failed is not None
    assert failed.state is NodeState.FAILED
    assert failed.origin == "a"
    # Further down, the reason still names where the failure started.
    further = blocked([("m", failed)])
    assert further is not None
    assert further.reason == "upstream node 'a' failed: ContextOverflow: too big"


# --------------------------------------------------------------------------- YAML


def test_example_file_loads() -> None:
    loaded = load_dag(ROOT / "examples" / "swarm.yaml")
    assert loaded.on_failure == "fail"
    assert {n.id for n in loaded.nodes} >= {"summary"}
    validate(loaded, 500)


@pytest.mark.parametrize(
    ("text", "needle", "line"),
    [
        ("nodes:\n  - id: a\n    prompt: x\n    deps: 3\n", "nodes.0.deps", 4),
        ("nodes:\n  - id: a\n    promt: x\n", "nodes.0", 2),
        ("on_failure: maybe\nnodes:\n  - id: a\n    prompt: x\n", "on_failure", 1),
        ("nodes: [\n", "invalid YAML", 2),
        ("- just a list\n", "a mapping with a `nodes` list", None),
    ],
)
def test_bad_dag_file_names_key_and_line(text: str, needle: str, line: int | None) -> None:
    with pytest.raises(ConfigError) as info:
        parse_dag(text, "swarm.yaml")
    assert needle in str(info.value)
    if line is not None:
        assert info.value.line == line, str(info.value)


# --------------------------------------------------------------------------- submit rejections

ROLES = {"research": {}, "summarize": {}}


@pytest.fixture
def client(redis_url: str) -> Iterator[SwarmClient]:
    settings = load_settings(
        None,
        redis_url=redis_url,
        roles=ROLES,
        limits={"max_dag_nodes": 5, "max_payload_bytes": 4096},
    )
    with SwarmClient(settings=settings) as client:
        yield client


OK = [Node("a", "x", role="research"), Node("s", "{{ a.output }}", role="summarize", deps=["a"])]


@pytest.mark.parametrize(
    ("nodes", "error", "needle"),
    [
        ([*OK, Node("c", "x", deps=["c"])], DagCycle, "dependency cycle: c -> c"),
        ([*OK, Node("c", "x", deps=["nope"])], UnknownDependency, "unknown node 'nope'"),
        ([*OK, Node("a", "again")], DuplicateNode, "'a'"),
        ([Node(f"n{i}", "x") for i in range(6)], DagTooLarge, "6 nodes; the limit is 5"),
        ([*OK, Node("w", "x", role="writer")], UnknownRole, "node 'w': role: unknown role"),
        ([*OK, Node("p", "x", priority="P3")], InvalidTask, "node 'p': priority"),
        ([*OK, Node("b", "x", budget=0)], InvalidTask, "node 'b': budget"),
        ([*OK, Node("big", "x" * 5000)], InvalidTask, "node 'big': payload"),
        ([*OK, Node("t", "{{ s.output }}")], UnknownReference, "'s' is not one of"),
    ],
)
def test_rejected_dag_enqueues_and_stores_nothing(
    client: SwarmClient,
    redis_conn: redis.Redis,
    nodes: list[Node],
    error: type[SwarmError],
    needle: str,
) -> None:
    with pytest.raises(error) as info:
        client.submit_dag(nodes)
    assert needle in str(info.value)
    assert all(redis_conn.llen(queue_name(p, r)) == 0 for r in ROLES for p in ALL_PRIORITIES)
    assert redis_conn.keys("swarm:dag:*") == []


def test_invalid_node_error_keeps_its_type_and_names_the_node(client: SwarmClient) -> None:
    with pytest.raises(UnknownRole) as info:
        client.submit_dag([Node("w", "x", role="writer")])
    assert info.value.field == "nodes.w.role"
    assert info.value.role == "writer"


def test_accepted_dag_routes_each_node_to_its_role_and_priority_queue(
    client: SwarmClient, redis_conn: redis.Redis
) -> None:
    dag = client.submit_dag(
        [
            Node("a", "x", role="research", priority="P0"),
            Node("b", "x", role="summarize", priority="p2"),
            Node("s", "x", role="summarize", deps=["a", "b"]),
        ]
    )
    # The first wave (the chord header) is queued; the fan-in waits in its message.
    assert redis_conn.llen("p0.research") == 1
    assert redis_conn.llen("p2.summarize") == 1
    assert dag.record.nodes["s"].priority.value == "P1"  # the role's default
    status = dag.status()
    assert status.state == "running"
    assert {n.state for n in status.nodes.values()} == {NodeState.PENDING}
    # Celery's client-side bookkeeping for the header results is released.
    backend = client.app.backend
    assert all(not mapping for mapping in backend._pending_results)
    assert not backend.result_consumer.subscribed_to
