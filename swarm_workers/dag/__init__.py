"""Swarms as DAGs of agent tasks, compiled to Celery canvases.

Usage::

    dag = client.submit_dag([
        Node("a", "Research A", role="research", priority="P1"),
        Node("b", "Research B", role="research"),
        Node("s", "Summarise {{ a.output }} and {{ b.output }}", role="summarize", deps=["a", "b"]),
    ])
    dag.wait(timeout=600).outputs["s"]

See `docs/dags.md`: the file format, the template syntax, failure policies, and
what a DAG that no single canvas expresses costs.
"""

from swarm_workers.dag.handle import DagHandle, DagStatus, NodeStatus
from swarm_workers.dag.model import DagSpec, Node, OnFailure, load_dag, parse_dag
from swarm_workers.dag.outcome import NodeState

__all__ = [
    "DagHandle",
    "DagSpec",
    "DagStatus",
    "Node",
    "NodeState",
    "NodeStatus",
    "OnFailure",
    "load_dag",
    "parse_dag",
]
