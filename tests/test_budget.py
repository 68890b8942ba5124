"""Token counting, output budgets, context fit and cost: plain arithmetic, no I/O.

The machine running the tests has no network: tiktoken must never be asked to
download, and `auto` must fall back to the estimate at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from swarm_workers.agent.budget import (
    MIN_COMPLETION_TOKENS,
    TOKENIZER_ENV,
    OutputBudget,
    TokenCounter,
    context_window,
    cost_usd,
    estimate_tokens,
    token_counter,
)
from swarm_workers.config import LLMSettings, ModelPrice
from swarm_workers.errors import ConfigError, ContextOverflow
from swarm_workers.fakes.llm_server import ChatRequest, estimate_prompt_tokens


@pytest.fixture(autouse=True)
def _empty_tiktoken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No BPE file is cached: whatever tiktoken would need, it would have to download."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.delenv(TOKENIZER_ENV, raising=False)


def test_estimate_is_four_characters_a_token_rounded_up() -> None:
    assert [estimate_tokens("x" * n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_prompt_estimate_matches_the_fake_providers_usage_rule() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Find redis. " * 7},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "kb__search", "arguments": '{"q": "redis"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "an in-memory store"},
    ]
    ours = TokenCounter(None).count_prompt(messages)
    theirs = estimate_prompt_tokens(
        ChatRequest.model_validate({"model": "m", "messages": messages})
    )
    assert ours == theirs


def test_tools_are_counted() -> None:
    messages = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}
    counter = TokenCounter(None)
    assert counter.count_prompt(messages, [tool]) - counter.count_prompt(messages) == (
        estimate_tokens(json.dumps([tool]))
    )


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", "fake-gpt", "kimi-k2-0905"])
def test_auto_falls_back_to_the_estimate_at_once_when_offline(model: str) -> None:
    started = time.monotonic()
    counter = token_counter(model)
    assert counter.method == "estimate"
    assert counter.count("twelve chars") == 3
    assert time.monotonic() - started < 0.5  # no download attempt, no DNS wait


def test_the_method_can_be_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKENIZER_ENV, "estimate")
    assert token_counter("gpt-4o").method == "estimate"
    assert token_counter("gpt-4o", "estimate").method == "estimate"
    monkeypatch.setenv(TOKENIZER_ENV, "bpe-please")
    with pytest.raises(ConfigError, match=TOKENIZER_ENV):
        token_counter("gpt-4o")


def test_a_cached_encoding_file_is_what_auto_looks_for(tmp_path: Path) -> None:
    # tiktoken's own cache key: sha1 of the URL its constructor loads.
    import hashlib

    from swarm_workers.agent import budget

    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    cache = tmp_path / "tiktoken"
    assert not budget._bpe_is_cached("o200k_base")
    cache.mkdir()
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"")
    assert budget._bpe_is_cached("o200k_base")
    assert budget._bpe_is_cached("o200k_harmony")
    assert not budget._bpe_is_cached("cl100k_base")
    assert not budget._bpe_is_cached("gpt2")  # two files, never assumed cached


def test_tiktoken_counter_counts_with_the_encoding() -> None:
    class Chars:
        """An encoding stand-in: one token per character."""

        def encode(self, text: str, disallowed_special: Any = ()) -> list[int]:
            return [ord(c) for c in text]

    counter = TokenCounter(Chars())
    assert counter.method == "tiktoken"
    assert counter.count("hello") == 5
    assert counter.count_prompt([{"role": "user", "content": "hello"}]) == 3 + 4 + 5


def test_output_budget_arithmetic() -> None:
    budget = OutputBudget(total=100)
    assert (budget.remaining, budget.exhausted) == (100, False)
    budget = budget.charge(60).charge(30)
    assert (budget.spent, budget.remaining, budget.exhausted) == (90, 10, False)
    over = budget.charge(25)
    assert (over.remaining, over.exhausted) == (0, True)
    assert budget.charge(-5) == budget


def test_max_tokens_is_the_budget_left_cut_to_the_context_room() -> None:
    budget = OutputBudget(total=8000, spent=1000)
    assert budget.max_tokens("m", prompt_tokens=1000, context=100_000) == 7000
    assert budget.max_tokens("m", prompt_tokens=95_000, context=100_000) == 5000
    assert budget.max_tokens("m", prompt_tokens=99_984, context=100_000) == MIN_COMPLETION_TOKENS


def test_a_prompt_that_cannot_fit_overflows() -> None:
    budget = OutputBudget(total=8000)
    with pytest.raises(ContextOverflow) as overflow:
        budget.max_tokens("kimi", prompt_tokens=99_990, context=100_000)
    assert overflow.value.model == "kimi"
    assert overflow.value.prompt_tokens == 99_990
    assert overflow.value.context == 100_000
    assert "100000-token context of kimi" in str(overflow.value)
    with pytest.raises(ContextOverflow):
        budget.max_tokens("kimi", prompt_tokens=120_000, context=100_000)
    # A budget smaller than the floor needs only itself.
    assert OutputBudget(total=5).max_tokens("kimi", prompt_tokens=99_995, context=100_000) == 5


def test_context_window_and_cost() -> None:
    settings = LLMSettings(
        context_windows={"big": 1_000_000},
        default_context_window=4096,
        prices={"big": ModelPrice(input=3.0, output=15.0)},
    )
    assert context_window(settings, "big") == 1_000_000
    assert context_window(settings, "other") == 4096
    assert cost_usd(settings.prices, "big", 1_000_000, 0) == 3.0
    assert cost_usd(settings.prices, "big", 2000, 1000) == pytest.approx(0.021)
    assert cost_usd(settings.prices, "other", 10**9, 10**9) == 0.0
