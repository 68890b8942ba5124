"""Property tests of the DAG boundary: the spec (Python and YAML), the compiler
(`compile.validate`, `plan`) and `submit_dag`. Every bad DAG is a typed error and leaves
Redis as it was; every good one plans each node once, after all of its deps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm_workers.client import SwarmClient
from swarm_workers.config import load_settings
from swarm_workers.dag import DagSpec, Node
from swarm_workers.dag.compile import Leaf, Parallel, Step, nodes_of, plan, validate
from swarm_workers.dag.model import load_dag, parse_dag
from swarm_workers.errors import ConfigError, DagError, InvalidTask, SwarmError
from swarm_workers.queues import ALL_PRIORITIES, queue_name

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ROLES = {"research": {}, "summarize": {}}

ids = st.one_of(st.sampled_from(list("abcdef")), st.text(max_size=6))
good_text = st.text(max_size=12)
prompts = st.one_of(
    good_text,
    st.builds(lambda ref, text: f"{text}{{{{ {ref}.output }}}}", ids, good_text),
    st.sampled_from(["\x00", "x\ud800", "{{ a.output ", "{{ }}"]),
)
nodes = st.builds(
    Node,
    id=ids,
    prompt=prompts,
    role=st.one_of(st.none(), st.sampled_from(["research", "summarize", "writer"])),
    priority=st.one_of(st.none(), st.sampled_from(["P0", "p2", "P9"])),
    budget=st.one_of(st.none(), st.integers(min_value=-2, max_value=200_000)),
    deps=st.lists(ids, max_size=3),
    on_failure=st.one_of(st.none(), st.sampled_from(["fail", "skip"])),
    metadata=st.dictionaries(
        st.text(max_size=4), st.one_of(st.integers(), st.text(max_size=4)), max_size=2
    ),
)
specs = st.builds(
    DagSpec,
    nodes=st.lists(nodes, min_size=1, max_size=8).map(tuple),
    on_failure=st.sampled_from(["fail", "skip"]),
    name=st.one_of(st.none(), st.text(max_size=10)),
)


@pytest.fixture
def client(redis_url: str) -> Iterator[SwarmClient]:
    settings_ = load_settings(None, redis_url=redis_url, roles=ROLES, limits={"max_dag_nodes": 6})
    with SwarmClient(settings=settings_) as client:
        yield client


def census(conn: redis.Redis) -> tuple[list[bytes], dict[str, int]]:
    keys = sorted(conn.scan_iter(count=1000))
    depths = {
        queue_name(p, r): int(conn.llen(queue_name(p, r))) for r in ROLES for p in ALL_PRIORITIES
    }
    return keys, depths


def _finish_before(step: Step) -> dict[str, set[str]]:
    """For each node, the nodes the plan finishes before it starts."""
    found: dict[str, set[str]] = {}

    def walk(step: Step, before: set[str]) -> None:
        if isinstance(step, Leaf):
            found[step.node] = set(before)
        elif isinstance(step, Parallel):
            for branch in step.branches:
                walk(branch, before)
        else:
            done = set(before)
            for part in step.steps:
                walk(part, done)
                done |= set(nodes_of(part))

    walk(step, set())
    return found


@PROPERTY
@given(spec=specs, max_nodes=st.integers(min_value=1, max_value=10))
def test_validate_and_plan_refuse_typed_or_plan_every_node_after_its_deps(
    spec: DagSpec, max_nodes: int
) -> None:
    try:
        deps = validate(spec, max_nodes)
    except (DagError, InvalidTask):
        return
    planned = plan(deps)
    order = nodes_of(planned.step)
    assert sorted(order) == sorted(deps)  # every node exactly once
    before = _finish_before(planned.step)
    for node, parents in deps.items():
        ancestors: set[str] = set()
        stack = list(parents)
        while stack:
            parent = stack.pop()
            if parent not in ancestors:
                ancestors.add(parent)
                stack.extend(deps[parent])
        assert ancestors <= before[node], (node, ancestors, before[node])
        assert node not in ancestors
    assert planned.extra_waits == sum(len(before[n] - _ancestors(deps, n)) for n in deps)


def _ancestors(deps: dict[str, tuple[str, ...]], node: str) -> set[str]:
    seen: set[str] = set()
    stack = list(deps[node])
    while stack:
        parent = stack.pop()
        if parent not in seen:
            seen.add(parent)
            stack.extend(deps[parent])
    return seen


@PROPERTY
@given(spec=specs)
def test_submit_dag_is_a_handle_or_a_typed_error_and_a_refusal_writes_nothing(
    client: SwarmClient, redis_conn: redis.Redis, spec: DagSpec
) -> None:
    redis_conn.flushdb()
    before = census(redis_conn)
    try:
        handle = client.submit_dag(spec)
    except (DagError, InvalidTask) as exc:
        refused: SwarmError | None = exc
    else:
        refused = None
    if refused is not None:
        assert census(redis_conn) == before, refused
        return
    assert set(handle.record.nodes) == {node.id for node in spec.nodes}
    assert redis_conn.dbsize() > 0


@pytest.mark.parametrize(
    ("nodes", "options", "field"),
    [
        ("abc", {}, "nodes"),
        (None, {}, "nodes"),
        ([Node("a", "x"), 5], {}, "nodes.1"),
        ([Node("a", "x")], {"on_failure": "explode"}, "on_failure"),
        ([Node("a", "x")], {"name": "bad\ud800"}, "name"),
        ([], {}, "nodes"),
    ],
)
def test_a_malformed_spec_is_invalid_dag_naming_the_field(
    client: SwarmClient, redis_conn: redis.Redis, nodes: Any, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(DagError) as info:
        client.submit_dag(nodes, **options)
    assert getattr(info.value, "field", "").startswith(field), info.value
    assert redis_conn.dbsize() == 0


def test_a_node_prompt_with_a_nul_is_refused_naming_the_node(client: SwarmClient) -> None:
    with pytest.raises(InvalidTask) as info:
        client.submit_dag([Node("a", "ok"), Node("b", "b\x00d", deps=["a"])])
    assert info.value.field == "nodes.b.prompt"


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
yaml_docs = st.one_of(
    st.text(max_size=80),
    yaml_values.map(yaml.safe_dump),
    st.builds(
        lambda nodes, policy: yaml.safe_dump({"nodes": nodes, "on_failure": policy}),
        st.lists(
            st.dictionaries(
                st.sampled_from(["id", "prompt", "deps", "role", "budget", "x"]),
                yaml_values,
                max_size=4,
            ),
            max_size=3,
        ),
        yaml_values,
    ),
)


@PROPERTY
@given(text=yaml_docs)
def test_parse_dag_is_a_spec_or_a_config_error(text: str) -> None:
    try:
        spec = parse_dag(text)
    except ConfigError:
        return
    assert spec.nodes


@PROPERTY
@given(data=st.one_of(yaml_docs.map(str.encode), st.binary(max_size=60)))
def test_load_dag_of_any_bytes_is_a_spec_or_a_config_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "dag.yaml"
    path.write_bytes(data)
    with contextlib.suppress(ConfigError):
        assert load_dag(path).nodes
