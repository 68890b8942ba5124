"""The child process of an isolated run (see `execution.isolation`).

    python -m swarm_workers.execution.isolated_child < request.json > outcome.json

Reads the parent's settings, the task and the time left from stdin; runs the agent
loop under the same failpoints as a worker (resuming from the task's checkpoint, and
saving its own under the parent's lease); writes the `AgentOutcome` as JSON.
"""

from __future__ import annotations

import json
import os
import sys

from swarm_workers.agent.loop import run_agent
from swarm_workers.config import given_settings
from swarm_workers.deadline import Deadline
from swarm_workers.execution.failpoints import check_failpoints
from swarm_workers.execution.isolation import OUTCOME_JSON
from swarm_workers.execution.runtime import Runtime
from swarm_workers.models import AgentTask


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    settings = given_settings(request["settings"])
    task = AgentTask.from_wire(request["task"])
    deadline = Deadline.start(request["remaining_s"])
    runtime = Runtime.build(settings, request["worker"])
    try:
        check_failpoints(task, settings)
        outcome = run_agent(
            task,
            runtime,
            deadline,
            durable=runtime.checkpoints.writer(task.id, request.get("token", "")),
            spawner=runtime.spawner,
        )
    finally:
        runtime.close()
    sys.stdout.buffer.write(OUTCOME_JSON.dump_json(outcome))
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: the parent has what it needs


if __name__ == "__main__":
    main()
