"""Token arithmetic for the agent loop: prompt size, output budget, context fit, cost.

Prompt size is counted *before* each call, so a prompt that cannot fit the model's
context fails with `ContextOverflow` instead of a paid 400, and so the limiter can
reserve `prompt + max_tokens` up front.

How tokens are counted (pin with ``SWARM_TOKENIZER=auto|tiktoken|estimate``):

- ``tiktoken``: the model's BPE encoding. tiktoken downloads its BPE files on first use;
  a worker may have no network, so ``auto`` (the default) uses tiktoken only when the
  model has a known encoding *and* its file is already in tiktoken's local cache
  (``TIKTOKEN_CACHE_DIR``, ``DATA_GYM_CACHE_DIR`` or ``$TMP/data-gym-cache``). It never
  starts a download. Pinning ``tiktoken`` allows the download (and uses ``o200k_base``
  for models tiktoken does not know).
- ``estimate``: ``ceil(chars / 4)`` per text, plus 4 tokens per message and 3 to prime
  the reply, plus the tools' JSON at the same rate. English prose averages about four
  characters a token; code and non-Latin scripts run denser, so treat it as a floor
  for those. The fake provider uses the same rule for its ``usage``.

>>> budget = OutputBudget(total=100).charge(60)
>>> budget.remaining, budget.exhausted
(40, False)
>>> estimate_tokens("four")
1
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import tiktoken
import tiktoken.model

from swarm_workers.config import LLMSettings, ModelPrice
from swarm_workers.errors import ConfigError, ContextOverflow

__all__ = [
    "MIN_COMPLETION_TOKENS",
    "TOKENIZER_ENV",
    "OutputBudget",
    "TokenCounter",
    "TokenizerMethod",
    "context_window",
    "cost_usd",
    "estimate_tokens",
    "token_counter",
]

log = logging.getLogger(__name__)

TOKENIZER_ENV = "SWARM_TOKENIZER"
TokenizerMethod = Literal["auto", "tiktoken", "estimate"]

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4  # role, separators: what chat formats add around each message
REPLY_PRIMING = 3  # the assistant header every reply starts with
# A call allowed fewer completion tokens than this (and than the budget left) cannot say
# anything useful: better a clear ContextOverflow than a paid, truncated answer.
MIN_COMPLETION_TOKENS = 16

_FALLBACK_ENCODING = "o200k_base"  # for a pinned `tiktoken` and a model tiktoken does not know
_BLOB = "https://openaipublic.blob.core.windows.net/encodings/"
# Where tiktoken's constructors fetch each encoding (its cache key is sha1 of this URL).
_BPE_URLS = {
    "r50k_base": _BLOB + "r50k_base.tiktoken",
    "p50k_base": _BLOB + "p50k_base.tiktoken",
    "p50k_edit": _BLOB + "p50k_base.tiktoken",
    "cl100k_base": _BLOB + "cl100k_base.tiktoken",
    "o200k_base": _BLOB + "o200k_base.tiktoken",
    "o200k_harmony": _BLOB + "o200k_base.tiktoken",
}


def estimate_tokens(text: str) -> int:
    """About four characters a token, rounded up."""
    return -(-len(text) // CHARS_PER_TOKEN)


class TokenCounter:
    """Counts a chat request's prompt tokens with tiktoken or the documented estimate.

    >>> TokenCounter(encoding=None).count_prompt([{"role": "user", "content": "hi"}])
    8
    """

    def __init__(self, encoding: Any | None = None) -> None:
        self._encoding = encoding

    @property
    def method(self) -> Literal["tiktoken", "estimate"]:
        return "estimate" if self._encoding is None else "tiktoken"

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self._encoding is None:
            return estimate_tokens(text)
        return len(self._encoding.encode(text, disallowed_special=()))

    def count_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> int:
        total = REPLY_PRIMING
        for message in messages:
            total += MESSAGE_OVERHEAD + self.count(_message_text(message))
        if tools:
            total += self.count(json.dumps(list(tools)))
        return total


def _message_text(message: Mapping[str, Any]) -> str:
    """Everything in a message that the model reads as tokens."""
    parts: list[str] = []
    content = message.get("content")
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        parts.extend(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    if isinstance(name := message.get("name"), str):
        parts.append(name)
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            parts.append(str(function.get("name", "")) + str(function.get("arguments", "")))
    return "".join(parts)


def token_counter(model: str, method: TokenizerMethod | None = None) -> TokenCounter:
    """The counter for `model`; `method` defaults to ``$SWARM_TOKENIZER`` or ``auto``."""
    chosen = method or os.environ.get(TOKENIZER_ENV, "auto").strip().lower() or "auto"
    if chosen == "estimate":
        return TokenCounter(None)
    if chosen not in ("auto", "tiktoken"):
        raise ConfigError(f"{chosen!r} is not one of auto, tiktoken, estimate", key=TOKENIZER_ENV)
    try:
        name = tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        if chosen == "auto":
            return TokenCounter(None)
        name = _FALLBACK_ENCODING
    if chosen == "auto" and not _bpe_is_cached(name):
        return TokenCounter(None)
    return TokenCounter(_load_encoding(name))


def _bpe_is_cached(encoding: str) -> bool:
    """Whether tiktoken can build `encoding` from its local cache, without a download."""
    url = _BPE_URLS.get(encoding)
    if url is None:
        return False
    cache_dir = os.environ.get(
        "TIKTOKEN_CACHE_DIR",
        os.environ.get("DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")),
    )
    if not cache_dir:  # caching disabled: every load would download
        return False
    return os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))


@functools.lru_cache(maxsize=8)
def _load_encoding(name: str) -> Any | None:
    """tiktoken's encoding, loaded once per process; None (the estimate) if it fails."""
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # no network, corrupt cache: the estimate is good enough
        log.warning("tiktoken encoding %s unavailable (%s); estimating tokens", name, exc)
        return None


@dataclass(frozen=True)
class OutputBudget:
    """The completion tokens a task's whole loop may spend, and what it has spent."""

    total: int
    spent: int = 0

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.spent)

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.total

    def charge(self, completion_tokens: int) -> OutputBudget:
        return OutputBudget(self.total, self.spent + max(0, completion_tokens))

    def max_tokens(self, model: str, prompt_tokens: int, context: int) -> int:
        """`max_tokens` for the next call: the budget left, cut to the room in the context.

        Raises ContextOverflow when the room left is below what a useful answer needs
        (`MIN_COMPLETION_TOKENS`, or the whole remaining budget if that is smaller).
        """
        room = context - prompt_tokens
        needed = min(self.remaining, MIN_COMPLETION_TOKENS)
        if room < max(needed, 1):
            raise ContextOverflow(model, prompt_tokens, needed, context)
        return min(self.remaining, room)


def context_window(settings: LLMSettings, model: str) -> int:
    return settings.context_windows.get(model, settings.default_context_window)


def cost_usd(
    prices: Mapping[str, ModelPrice], model: str, prompt_tokens: int, completion_tokens: int
) -> float:
    """USD for this usage at the model's price per million tokens; 0 with no price."""
    price = prices.get(model)
    if price is None:
        return 0.0
    return (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000
