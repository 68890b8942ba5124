"""What a user writes: `Node`s in a `DagSpec`, in Python or in a YAML file.

>>> spec = DagSpec(nodes=(
...     Node("a", "Research topic A", role="default", priority="P1"),
...     Node("b", "Research topic B"),
...     Node("s", "Summarise {{ a.output }} and {{ b.output }}", deps=["a", "b"]),
... ))
>>> [n.id for n in spec.nodes]
['a', 'b', 's']

The same DAG as a file (`swarm run swarm.yaml`)::

    on_failure: fail            # or skip; a node may override it
    nodes:
      - id: a
        prompt: Research topic A
      - id: s
        deps: [a]
        prompt: "Summarise {{ a.output }}"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from swarm_workers.errors import ConfigError

__all__ = ["NODE_ID_PATTERN", "DagSpec", "Node", "OnFailure", "load_dag", "parse_dag"]

NODE_ID_PATTERN = r"[A-Za-z_][A-Za-z0-9_-]{0,63}"
"""Node ids: also what a prompt template names (`{{ fetch-docs.output }}`)."""

OnFailure = Literal["fail", "skip"]
"""What a node's failure does to its dependents: fail them too, or skip them."""

Scalar = str | int | float | bool | None


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Node:
    """One agent task of a DAG: its own prompt, role, priority, budget and deps.

    >>> Node("s", "Summarise {{ a.output }}", role="summarize", priority="P2", deps=["a"])
    Node(id='s', role='summarize', priority='P2', deps=['a'], prompt_chars=24)

    Role, priority and budget default to the role's, as for `SwarmClient.submit`; they
    are checked at submit time, with the ids, deps and templates (see `compile.validate`).

    `on_failure` (None: the DAG's) says what this node's failure does to the nodes
    that depend on it, directly or not: `fail` them, or `skip` them.
    """

    id: str
    prompt: str
    role: str | None = None
    priority: str | None = None  # P0, P1 or P2 (any case); checked at submit
    budget: int | None = None
    deps: Sequence[str] = ()  # any sequence; stored as a tuple
    on_failure: OnFailure | None = None
    metadata: Mapping[str, Scalar] = Field(default_factory=dict)

    @field_validator("deps", mode="after")
    @classmethod
    def _tuple(cls, deps: Sequence[str]) -> tuple[str, ...]:
        return tuple(deps)  # hashable, and safe from the caller's later changes

    def __repr__(self) -> str:  # never the prompt: it may be private
        return (
            f"Node(id={self.id!r}, role={self.role!r}, priority={self.priority!r}, "
            f"deps={list(self.deps)!r}, prompt_chars={len(self.prompt)})"
        )


class DagSpec(BaseModel):
    """A whole DAG: its nodes and the default failure policy.

    >>> DagSpec(nodes=(Node("a", "hi"),), on_failure="skip").on_failure
    'skip'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: tuple[Node, ...] = Field(min_length=1)
    on_failure: OnFailure = "fail"
    name: str | None = Field(None, max_length=200)

    def policy_of(self, node: Node) -> OnFailure:
        return node.on_failure or self.on_failure

    @classmethod
    def of(cls, nodes: Sequence[Node] | DagSpec, **fields: Any) -> DagSpec:
        """A spec from either a spec or a list of nodes (what `submit_dag` accepts)."""
        if isinstance(nodes, DagSpec):
            if not fields:
                return nodes
            fields = {"on_failure": nodes.on_failure, "name": nodes.name, **fields}
            nodes = nodes.nodes
        return cls(nodes=tuple(nodes), **fields)


def load_dag(path: str | Path) -> DagSpec:
    """Read a DAG file; raises ConfigError naming the key and line that is wrong."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read DAG file {file}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not valid UTF-8 (byte offset {exc.start})") from exc
    return parse_dag(text, source=str(file))


def parse_dag(text: str, source: str = "<string>") -> DagSpec:
    """Parse the YAML text of a DAG (see the module docstring for the format)."""
    try:
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(
            f"{source}: invalid YAML: {getattr(exc, 'problem', exc)}",
            line=mark.line + 1 if mark is not None else None,
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a DAG file is a mapping with a `nodes` list")
    try:
        return DagSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        more = len(exc.errors()) - 1
        raise ConfigError(
            f"{first['msg']} (in {source})" + (f" [{more} more error(s)]" if more else ""),
            key=".".join(loc) or None,
            line=_line_of(tree, loc),
        ) from exc


def _line_of(tree: yaml.Node | None, loc: list[str]) -> int | None:
    """The 1-based line of the deepest YAML node that `loc` reaches."""
    node, line = tree, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part]
            if not found:
                break
            node = found[0]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        else:
            break
        line = node.start_mark.line + 1
    return line
