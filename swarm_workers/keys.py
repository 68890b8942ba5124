"""Every Redis key the fleet writes, named in one place.

All keys start with the configured `key_prefix` (default `swarm`). Keys that one Lua
script touches together share a hash tag (`{...}`), so each script's keys sit in one
slot and the scripts run unchanged on Redis Cluster.

    <p>:result:{<task_id>}            a task's recorded `TaskResult` (the only copy)
    <p>:running:{<task_id>}           the lease of the delivery running the task
    <p>:attempts:{<task_id>}          runs started and not finished (cut short)
    <p>:cancel:{<task_id>}            a cancel asked for, until the task records it
    <p>:checkpoint:{<task_id>}        the agent loop's last completed step (until it records)
    <p>:checkpoint:{<task_id>}:blobs  large tool outputs of that checkpoint, stored once
    <p>:spawn:{<task_id>}             a supervisor's spawn rounds and the children it waits on
    <p>:swarm:{<root_id>}             a swarm root's totals: sub-agents spawned, budget left
    <p>:cancels                       pub/sub: cancels for running tasks, instantly
    <p>:idem:{<digest>}               an idempotency key -> the task or DAG it made
    {<p>:dead:<role>}:index / :entries / :dropped
                                      dead letters: ids by time, entries, drops
    <p>:dag:{<dag_id>}                a DAG's graph (`DagRecord`)
    <p>:dag:{<dag_id>}:tasks          hash: node -> its `AgentTask` (one transaction)
    {<p>:rl:<model>}:rpm / :tpm       token buckets (one tag per model, or
    {<p>:rl}:<model>:rpm / :tpm       one tag for all when a global limit is set)
    {<p>:breaker:<server>}:state ...  a circuit breaker: state, probe, failures
    <p>:tools:view:<server>           the fleet's last listing of a server
    <p>:tools:forced:<server>         a refresh asked for by any worker
    <p>:tools:lock:<server>:<method>  one worker lists at a time
    <p>:mcp-cache:<digest>            MCP response cache entries

Celery and kombu own the queue lists (`p0.<role>` ...), `unacked`, `unacked_index`
and `celery-task-meta-*` / chord keys; `KOMBU_UNACKED` names the hash this project reads.
The fleet's transport (`broker`) adds two lists beside each queue, unprefixed as the
queue is:

    <queue>.bell                      rung by each publish; idle consumers wait on it
    <queue>.undecodable               messages the transport could not read, kept

>>> keys = Keys("swarm")
>>> keys.result("t1")
'swarm:result:{t1}'
>>> keys.breaker("docs")
('{swarm:breaker:docs}:state', '{swarm:breaker:docs}:probe', '{swarm:breaker:docs}:failures')
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KOMBU_UNACKED", "KOMBU_UNACKED_INDEX", "Keys", "queue_bell", "queue_undecodable"]

KOMBU_UNACKED = "unacked"
"""kombu's hash of delivered, unacknowledged messages (tasks running now, with prefetch off)."""
KOMBU_UNACKED_INDEX = "unacked_index"


def queue_bell(queue: str) -> str:
    """The list a publish to `queue` rings and an idle consumer of it waits on.

    >>> queue_bell("p0.research")
    'p0.research.bell'
    """
    return f"{queue}.bell"


def queue_undecodable(queue: str) -> str:
    """Where the transport moves a message on `queue` that is not a kombu message."""
    return f"{queue}.undecodable"


@dataclass(frozen=True)
class Keys:
    """The key names under one prefix."""

    prefix: str = "swarm"

    # ----------------------------------------------------------------- tasks

    # A task's keys share its id as hash tag: the scripts that start and end a run
    # touch all three at once.

    def result(self, task_id: str) -> str:
        return f"{self.prefix}:result:{{{task_id}}}"

    def result_pattern(self) -> str:
        return f"{self.prefix}:result:*"

    def lease(self, task_id: str) -> str:
        return f"{self.prefix}:running:{{{task_id}}}"

    def attempts(self, task_id: str) -> str:
        return f"{self.prefix}:attempts:{{{task_id}}}"

    def cancel(self, task_id: str) -> str:
        return f"{self.prefix}:cancel:{{{task_id}}}"

    def task_keys(self, task_id: str) -> list[str]:
        """result, lease, attempts, cancel: what the run scripts touch, in that order."""
        return [
            self.result(task_id),
            self.lease(task_id),
            self.attempts(task_id),
            self.cancel(task_id),
        ]

    def checkpoint(self, task_id: str) -> str:
        return f"{self.prefix}:checkpoint:{{{task_id}}}"

    def checkpoint_blobs(self, task_id: str) -> str:
        return f"{self.prefix}:checkpoint:{{{task_id}}}:blobs"

    def spawn(self, task_id: str) -> str:
        return f"{self.prefix}:spawn:{{{task_id}}}"

    def swarm_root(self, root_id: str) -> str:
        return f"{self.prefix}:swarm:{{{root_id}}}"

    def run_state_keys(self, task_id: str) -> list[str]:
        """checkpoint, blobs, spawn ledger, swarm totals: removed when the task records."""
        return [
            self.checkpoint(task_id),
            self.checkpoint_blobs(task_id),
            self.spawn(task_id),
            self.swarm_root(task_id),
        ]

    def cancels_channel(self) -> str:
        return f"{self.prefix}:cancels"

    def idempotency(self, digest: str) -> str:
        return f"{self.prefix}:idem:{{{digest}}}"

    # ----------------------------------------------------------------- dead letters

    def dead_letters(self, role: str) -> tuple[str, str, str]:
        """(index, entries, dropped) of one role's dead letters, in one slot."""
        tag = f"{{{self.prefix}:dead:{role}}}"
        return f"{tag}:index", f"{tag}:entries", f"{tag}:dropped"

    # ----------------------------------------------------------------- DAGs

    def dag(self, dag_id: str) -> str:
        return f"{self.prefix}:dag:{{{dag_id}}}"

    def dag_tasks(self, dag_id: str) -> str:
        return f"{self.prefix}:dag:{{{dag_id}}}:tasks"

    # ----------------------------------------------------------------- rate limits

    def bucket_tag(self, model: str | None) -> str:
        """The base of a model's bucket keys; `None`: the one tag shared by all models
        (used when a global limit joins every call, so all keys must share a slot)."""
        if model is None:
            return f"{{{self.prefix}:rl}}"
        return f"{{{self.prefix}:rl:{model}}}"

    # ----------------------------------------------------------------- tools

    def breaker(self, server: str) -> tuple[str, str, str]:
        """(state, probe, failures) of one server's breaker, in one slot."""
        tag = f"{{{self.prefix}:breaker:{server}}}"
        return f"{tag}:state", f"{tag}:probe", f"{tag}:failures"

    def breaker_pattern(self) -> str:
        return f"{{{self.prefix}:breaker:*}}:state"

    def tool_view(self, server: str) -> str:
        return f"{self.prefix}:tools:view:{server}"

    def tool_forced(self, server: str) -> str:
        return f"{self.prefix}:tools:forced:{server}"

    def tool_lock(self, server: str, method: str) -> str:
        return f"{self.prefix}:tools:lock:{server}:{method}"

    def mcp_cache(self, digest: str) -> str:
        return f"{self.prefix}:mcp-cache:{digest}"

    def mcp_cache_pattern(self) -> str:
        return f"{self.prefix}:mcp-cache:*"
