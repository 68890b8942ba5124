"""The checks a DAG must pass before anything is sent, and its plan as series and
parallel steps (which `dag.canvas` turns into Celery chords, chains and groups).

Steps, each usable alone:

1. `validate(spec, max_nodes)`: size, ids, duplicates, unknown deps, cycles (named),
   template references. Raises a `DagError` (or `InvalidTask` for a bad id).
2. `plan(deps)`: the DAG as a tree of `Series` / `Parallel` / `Leaf` steps. A DAG that
   is series-parallel (fan-out, fan-in, diamonds, chains of those) is expressed
   exactly: no node waits for anything but its (transitive) deps. Where a connected
   part is not (a node whose parents sit in different branches, the "N" shape: c
   depends on a, d on a and b), its sources are split off as one level (`Series(barrier=True)`):
   the rest of that part waits for all of them, even those it does not depend on.
   `Plan.extra_waits` counts such (node, non-ancestor it waits for) pairs.
See `dag.canvas` for the third step, the Celery canvas.

Every node signature is immutable and carries only `(dag_id, node)`: results are
never passed along the canvas; a node reads exactly its deps' outputs from Redis by
their task ids. So a chord body that waits for more than its deps (a level split)
still sees only its deps, and messages carry no prompt and no output.

>>> plan({"a": (), "b": (), "s": ("a", "b")}).step
Series(steps=(Parallel(branches=(Leaf(node='a'), Leaf(node='b'))), Leaf(node='s')), barrier=False)
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from swarm_workers.dag import template
from swarm_workers.dag.model import NODE_ID_PATTERN, DagSpec
from swarm_workers.errors import (
    DagCycle,
    DagTooLarge,
    DuplicateNode,
    InvalidTask,
    UnknownDependency,
    UnknownReference,
)

__all__ = [
    "Leaf",
    "Parallel",
    "Plan",
    "Series",
    "Step",
    "find_cycle",
    "nodes_of",
    "plan",
    "topological_order",
    "validate",
]

_NODE_ID = re.compile(NODE_ID_PATTERN)


# --------------------------------------------------------------------------- validation


def validate(spec: DagSpec, max_nodes: int) -> dict[str, tuple[str, ...]]:
    """Check the DAG's structure and templates; return its deps by node, in order.

    Roles, priorities and budgets are checked by `SwarmClient.build_task`.
    """
    if len(spec.nodes) > max_nodes:
        raise DagTooLarge(len(spec.nodes), max_nodes)
    deps: dict[str, tuple[str, ...]] = {}
    for node in spec.nodes:
        if not _NODE_ID.fullmatch(node.id):
            raise InvalidTask(
                f"nodes.{node.id}.id",
                f"node id {node.id!r} must match {NODE_ID_PATTERN} (it is used in templates)",
            )
        if node.id in deps:
            raise DuplicateNode(node.id)
        deps[node.id] = tuple(dict.fromkeys(node.deps))  # a dep named twice counts once
    for node_id, parents in deps.items():
        for parent in parents:
            if parent not in deps:
                raise UnknownDependency(node_id, parent)
    cycle = find_cycle(deps)
    if cycle:
        raise DagCycle(cycle)
    for node in spec.nodes:
        found = template.problems(node.prompt, deps[node.id], deps)
        if found:
            raise UnknownReference(node.id, found[0])
    return deps


def find_cycle(deps: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle as `[a, b, ..., a]` (a depends on b ...), or None."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(deps, white)
    for start in deps:
        if color[start] != white:
            continue
        path = [start]
        stack = [iter(deps[start])]
        color[start] = grey
        while stack:
            parent = next(stack[-1], None)
            if parent is None:
                color[path.pop()] = black
                stack.pop()
            elif color[parent] == grey:
                return [*path[path.index(parent) :], parent]
            elif color[parent] == white:
                color[parent] = grey
                path.append(parent)
                stack.append(iter(deps[parent]))
    return None


def topological_order(deps: Mapping[str, Sequence[str]]) -> list[str]:
    """Nodes with every dep before its dependents; ties keep declaration order."""
    remaining = {node: len(parents) for node, parents in deps.items()}
    children: dict[str, list[str]] = {node: [] for node in deps}
    for node, parents in deps.items():
        for parent in parents:
            children[parent].append(node)
    index = {node: i for i, node in enumerate(deps)}
    ready = [node for node, count in remaining.items() if count == 0]
    order: list[str] = []
    while ready:
        ready.sort(key=index.__getitem__, reverse=True)
        node = ready.pop()
        order.append(node)
        for child in children[node]:
            remaining[child] -= 1
            if remaining[child] == 0:
                ready.append(child)
    if len(order) != len(deps):
        raise DagCycle(find_cycle(deps) or sorted(set(deps) - set(order)))
    return order


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Leaf:
    node: str


@dataclass(frozen=True)
class Parallel:
    branches: tuple[Step, ...]


@dataclass(frozen=True)
class Series:
    """Steps one after another. `barrier`: a level split, later steps may over-wait."""

    steps: tuple[Step, ...]
    barrier: bool = False


Step = Leaf | Parallel | Series


@dataclass(frozen=True)
class Plan:
    """The step tree, and what it costs compared to running each node after its deps.

    `extra_waits`: pairs (node, other) where the node waits for `other` without
    depending on it; 0 means the canvas is exact. `levels_split`: level splits made.
    """

    step: Step
    extra_waits: int
    levels_split: int


def plan(deps: Mapping[str, Sequence[str]]) -> Plan:
    """Decompose a validated DAG into series and parallel steps (see module doc)."""
    order = topological_order(deps)
    bit = {node: 1 << i for i, node in enumerate(order)}
    # ancestors[n]: every node n transitively depends on, as a bitset over `order`.
    ancestors: dict[str, int] = {}
    for node in order:
        mask = 0
        for parent in deps[node]:
            mask |= bit[parent] | ancestors[parent]
        ancestors[node] = mask
    neighbours: dict[str, int] = {node: 0 for node in order}
    for node in order:
        for parent in deps[node]:
            neighbours[node] |= bit[parent]
            neighbours[parent] |= bit[node]
    planner = _Planner(order, bit, ancestors, neighbours)
    step = planner.decompose(order)
    waits = sum(
        (waited & ~ancestors[node]).bit_count() for node, waited in _waited(step, bit).items()
    )
    return Plan(step=step, extra_waits=waits, levels_split=planner.splits)


@dataclass
class _Planner:
    order: list[str]
    bit: dict[str, int]
    ancestors: dict[str, int]
    neighbours: dict[str, int]
    splits: int = 0

    def decompose(self, nodes: list[str]) -> Step:
        """`nodes` in topological order -> a step that runs each after its deps."""
        if len(nodes) == 1:
            return Leaf(nodes[0])
        components = self._components(nodes)
        if len(components) > 1:
            return Parallel(tuple(self.decompose(c) for c in components))
        parts = self._series_parts(nodes)
        if len(parts) > 1:
            return Series(tuple(self.decompose(p) for p in parts))
        # Connected and not a series: no canvas runs exactly this. Split off the sources.
        self.splits += 1
        members = self._mask(nodes)
        sources = [n for n in nodes if not self.ancestors[n] & members]
        rest = [n for n in nodes if self.ancestors[n] & members]
        return Series((self.decompose(sources), self.decompose(rest)), barrier=True)

    def _mask(self, nodes: list[str]) -> int:
        mask = 0
        for node in nodes:
            mask |= self.bit[node]
        return mask

    def _components(self, nodes: list[str]) -> list[list[str]]:
        """Weakly connected components (edges inside `nodes`), each in topological order."""
        members = self._mask(nodes)
        seen = 0
        found: list[list[str]] = []
        for start in nodes:
            if seen & self.bit[start]:
                continue
            component, frontier = self.bit[start], self.bit[start]
            while frontier:
                grown = 0
                for node in nodes:
                    if frontier & self.bit[node]:
                        grown |= self.neighbours[node]
                frontier = grown & members & ~component
                component |= frontier
            seen |= component
            found.append([n for n in nodes if component & self.bit[n]])
        return found

    def _series_parts(self, nodes: list[str]) -> list[list[str]]:
        """Cut `nodes` wherever every node before the cut is an ancestor of every node after.

        Such a cut is a prefix of every topological order, so trying the prefixes of
        one order finds them all.
        """
        cuts = [0]
        before = 0
        for i in range(1, len(nodes)):
            before |= self.bit[nodes[i - 1]]
            if all(self.ancestors[n] & before == before for n in nodes[i:]):
                cuts.append(i)
        cuts.append(len(nodes))
        return [nodes[a:b] for a, b in itertools.pairwise(cuts)]


def _waited(step: Step, bit: Mapping[str, int], before: int = 0) -> dict[str, int]:
    """For each node, the set of nodes that finish before it starts in this plan."""
    if isinstance(step, Leaf):
        return {step.node: before}
    if isinstance(step, Parallel):
        found: dict[str, int] = {}
        for branch in step.branches:
            found.update(_waited(branch, bit, before))
        return found
    found = {}
    for part in step.steps:
        found.update(_waited(part, bit, before))
        for node in nodes_of(part):
            before |= bit[node]
    return found


def nodes_of(step: Step) -> list[str]:
    if isinstance(step, Leaf):
        return [step.node]
    children = step.branches if isinstance(step, Parallel) else step.steps
    return [node for child in children for node in nodes_of(child)]
