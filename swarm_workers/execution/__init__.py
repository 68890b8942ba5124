"""Running tasks on a worker, without Celery: the process runtime, a run's claim on its
task id, and the bodies of the agent and DAG-node tasks."""

from swarm_workers.execution.dag_node import run_node
from swarm_workers.execution.runtime import Runtime
from swarm_workers.execution.task import Requeue, execute

__all__ = ["Requeue", "Runtime", "execute", "run_node"]
