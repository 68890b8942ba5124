"""Running tasks on a worker, without Celery: the process runtime, a run's claim on its
task id, and the bodies of the agent and DAG-node tasks."""

from swarm_workers.execution.dag_node import run_node
from swarm_workers.execution.runtime import Runtime, Sender
from swarm_workers.execution.task import Requeue, Suspended, execute

__all__ = ["Requeue", "Runtime", "Sender", "Suspended", "execute", "run_node"]
