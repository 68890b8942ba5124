"""A node's prompt may name its dependencies' outputs: `{{ a.output }}`.

Syntax: `{{ <node>.output }}`, spaces optional, where `<node>` is one of the node's
own deps. Every `{{ <name>.<field> }}` is a reference and is checked at submit: an
unknown node, a node that is not a dep, or a field other than `output` is rejected.
`{{ <node> }}` for a node id is rejected too (a forgotten `.output`); any other
`{{ ... }}` text is left as it is.

A prompt with no reference gets its deps' outputs appended as context instead, in
the order of `deps`.

>>> [(r.node, r.field) for r in references("Compare {{ a.output }} with {{b.output}}")]
[('a', 'output'), ('b', 'output')]
>>> render("Compare {{ a.output }}", {"a": "apples"})
'Compare apples'
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from swarm_workers.dag.model import NODE_ID_PATTERN

__all__ = ["FIELDS", "Reference", "problems", "references", "render"]

FIELDS = ("output",)

_REFERENCE = re.compile(
    r"\{\{\s*(?P<node>" + NODE_ID_PATTERN + r")\s*(?:\.\s*(?P<field>[A-Za-z_]\w*)\s*)?\}\}"
)


@dataclass(frozen=True)
class Reference:
    node: str
    field: str | None
    text: str


def references(prompt: str) -> list[Reference]:
    """Every `{{ name }}` / `{{ name.field }}` in the prompt, in order."""
    return [Reference(m["node"], m["field"], m[0]) for m in _REFERENCE.finditer(prompt)]


def problems(prompt: str, deps: Collection[str], nodes: Collection[str]) -> list[str]:
    """What is wrong with a node's references, one sentence each (empty: all good)."""
    found = []
    for ref in references(prompt):
        if ref.field is None:
            if ref.node in nodes:
                found.append(f"{ref.text} names a node; write {{{{ {ref.node}.output }}}}")
            continue
        if ref.field not in FIELDS:
            found.append(f"{ref.text}: unknown field {ref.field!r} (known: {', '.join(FIELDS)})")
        elif ref.node not in nodes:
            found.append(f"{ref.text}: there is no node {ref.node!r}")
        elif ref.node not in deps:
            found.append(f"{ref.text}: {ref.node!r} is not one of this node's deps")
    return found


def render(prompt: str, outputs: Mapping[str, str]) -> str:
    """The prompt with its references replaced, or with the outputs appended.

    `outputs` maps each dep to its output, in the order of the node's deps.
    """
    if not outputs:
        return prompt
    if any(ref.field is not None for ref in references(prompt)):
        return _REFERENCE.sub(
            lambda m: outputs[m["node"]] if m["field"] is not None else m[0], prompt
        )
    context = "\n\n".join(f"### {node}\n{output}" for node, output in outputs.items())
    return f"{prompt}\n\nOutputs of the tasks this one depends on:\n\n{context}"
