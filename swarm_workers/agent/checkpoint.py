"""Durable agent loops: the conversation after each completed step, kept in Redis.

After every model reply and after the answers to its tool calls, the loop saves a
`Checkpoint` under the task id (`<prefix>:checkpoint:{<id>}`). A later delivery of the
same task (its worker died, or a supervisor is continued after its sub-agents finished)
loads it and goes on from there: model turns already paid for are not made again, tool
calls already answered are not repeated. A reply whose tool calls were not all answered
when the run stopped has them run on resume.

Size is bounded: a tool output above `BLOB_CHARS` is stored once, by its sha256, in a
hash beside the checkpoint (`...:blobs`), and the checkpoint holds a reference. Both keys
expire with the task's result (`limits.result_ttl_s`) and are deleted when the task
records its outcome (`execution/finish.lua`), so a finished task leaves its result only.

Saves are fenced by the run's lease token (`checkpoint.lua`): a run that lost its lease
cannot overwrite what its successor resumes from; it stops with `LeaseLost`.

Usage::

    store = CheckpointStore(redis.Redis(), Keys("swarm"), ttl_s=86400)
    writer = store.writer("3f2a...", token="9c1e...")
    writer.load().steps
    # -> 3
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from importlib import resources
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from swarm_workers.errors import LeaseLost
from swarm_workers.keys import Keys
from swarm_workers.models import AgentTask, LLMCall, ToolCallRecord, Usage, utcnow

__all__ = ["BLOB_CHARS", "Checkpoint", "CheckpointStore", "CheckpointWriter"]

BLOB_CHARS = 2048
"""Tool outputs longer than this are stored once, apart, and referenced."""

_SAVE = resources.files(__package__).joinpath("checkpoint.lua").read_text()
_BLOB = "$blob"


class Checkpoint(BaseModel):
    """A loop's state after its last completed step."""

    model_config = ConfigDict(frozen=True)

    task: AgentTask
    started_at: datetime = Field(default_factory=utcnow)  # the first run's start
    steps: int = 0
    messages: tuple[dict[str, Any], ...] = ()
    calls: tuple[LLMCall, ...] = ()
    tools: tuple[ToolCallRecord, ...] = ()
    output: str | None = None
    own_model_s: float = 0.0

    @property
    def usage(self) -> Usage:
        """What the model calls made so far cost, in tokens."""
        return Usage(
            prompt_tokens=sum(c.prompt_tokens for c in self.calls),
            completion_tokens=sum(c.completion_tokens for c in self.calls),
            calls=self.calls,
        )


class CheckpointStore:
    """Loads and saves checkpoints with one Redis client."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int) -> None:
        self.redis = client
        self.keys = keys
        self.ttl_s = ttl_s
        self._save = client.register_script(_SAVE)

    def writer(self, task_id: str, token: str = "", *, fresh: bool = False) -> CheckpointWriter:
        """The checkpoints of one run of `task_id`, fenced by its lease `token`.
        `fresh`: the caller knows there is none to load (the begin script said so)."""
        return CheckpointWriter(self, task_id, token, fresh=fresh)

    def load(self, task_id: str) -> Checkpoint | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.checkpoint(task_id))
        pipe.hgetall(self.keys.checkpoint_blobs(task_id))
        raw, blobs = pipe.execute()
        if raw is None:
            return None
        stored = Checkpoint.model_validate_json(raw)
        texts = {k.decode(): v.decode() for k, v in blobs.items()}
        messages = tuple(_expand(m, texts) for m in stored.messages)
        return stored.model_copy(update={"messages": messages})


class CheckpointWriter:
    """Saves one run's checkpoints; remembers which blobs are stored already."""

    def __init__(
        self, store: CheckpointStore, task_id: str, token: str, *, fresh: bool = False
    ) -> None:
        self.store = store
        self.task_id = task_id
        self.token = token
        self.fresh = fresh
        self._stored: set[str] = set()

    def load(self) -> Checkpoint | None:
        if self.fresh:
            return None
        found = self.store.load(self.task_id)
        if found is not None:
            self._stored.update(_digests(found.messages))
        return found

    def save(self, checkpoint: Checkpoint) -> None:
        """Save; `LeaseLost` when this run no longer holds the task's lease."""
        new: dict[str, str] = {}
        messages = tuple(_shrink(m, new) for m in checkpoint.messages)
        blobs = [x for sha, text in new.items() if sha not in self._stored for x in (sha, text)]
        keys = self.store.keys
        saved = self.store._save(
            keys=[
                keys.lease(self.task_id),
                keys.checkpoint(self.task_id),
                keys.checkpoint_blobs(self.task_id),
            ],
            args=[
                self.token,
                self.store.ttl_s,
                checkpoint.model_copy(update={"messages": messages}).model_dump_json(),
                *blobs,
            ],
        )
        if not saved:
            raise LeaseLost(self.task_id, "another run holds the task now (checkpoint refused)")
        self._stored.update(new)


def _shrink(message: dict[str, Any], new: dict[str, str]) -> dict[str, Any]:
    content = message.get("content")
    if message.get("role") == "tool" and isinstance(content, str) and len(content) > BLOB_CHARS:
        sha = hashlib.sha256(content.encode()).hexdigest()
        new[sha] = content
        return {**message, "content": {_BLOB: sha}}
    return message


def _expand(message: dict[str, Any], texts: dict[str, str]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, dict) and _BLOB in content:
        return {**message, "content": texts.get(content[_BLOB], "(output expired)")}
    return message


def _digests(messages: tuple[dict[str, Any], ...]) -> set[str]:
    return {
        hashlib.sha256(m["content"].encode()).hexdigest()
        for m in messages
        if m.get("role") == "tool"
        and isinstance(m.get("content"), str)
        and len(m["content"]) > BLOB_CHARS
    }
