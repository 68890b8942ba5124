"""Property tests of the config loader: any TOML file or override is a `Settings` whose
bounds hold, or a `ConfigError` naming a key, which never echoes the API key."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm_workers.agent.budget import context_window
from swarm_workers.config import Settings, bucket_token_capacity, load_settings
from swarm_workers.errors import ConfigError
from tests.conftest import write_toml

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECRET = "sk-live-DO-NOT-PRINT-1234"

numbers = st.one_of(
    st.integers(min_value=-(10**7), max_value=10**7),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 0.5, 1, 0.99, -0.5, 59.9, 60]),
)
values = st.one_of(numbers, st.booleans(), st.text(max_size=6))
priorities = st.sampled_from(["P0", "P1", "P2", "p1", "P7"])
overrides = st.fixed_dictionaries(
    {},
    optional={
        "ratelimit": st.fixed_dictionaries(
            {},
            optional={
                "reserve": st.dictionaries(priorities, values, max_size=3),
                "max_wait_s": st.dictionaries(priorities, values, max_size=3),
                "burst_s": values,
                "models": st.dictionaries(
                    st.sampled_from(["fake-gpt", "*", "other"]),
                    st.fixed_dictionaries(
                        {
                            "rpm": st.integers(min_value=-5, max_value=10**6),
                            "tpm": st.integers(min_value=-5, max_value=10**7),
                        }
                    ),
                    max_size=2,
                ),
                "enabled": st.booleans(),
            },
        ),
        "llm": st.fixed_dictionaries(
            {"api_key": st.just(SECRET)},
            optional={
                "timeout_s": values,
                "context_windows": st.dictionaries(
                    st.sampled_from(["fake-gpt", "kimi-k2-0905"]), numbers, max_size=2
                ),
            },
        ),
        "roles": st.dictionaries(
            st.sampled_from(["default", "research", "Bad Name"]),
            st.fixed_dictionaries(
                {},
                optional={
                    "budgets": st.dictionaries(priorities, numbers, max_size=2),
                    "concurrency": values,
                },
            ),
            max_size=2,
        ),
        "worker": st.fixed_dictionaries(
            {}, optional={"lease_ttl_s": values, "task_time_limit_s": values}
        ),
    },
)


@pytest.fixture(autouse=True)
def _no_shell_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SWARM_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


def check_bounds(loaded: Settings) -> None:
    limits = loaded.ratelimit
    assert all(0 <= r < 1 for r in limits.reserve.values())
    assert all(w >= 0 and math.isfinite(w) for w in limits.max_wait_s.values())
    assert limits.burst_s > 0 and math.isfinite(limits.burst_s)
    for role in loaded.roles:
        model = loaded.model_for(role)
        window = context_window(loaded.llm, model)
        capacity = bucket_token_capacity(limits, model)
        assert capacity is None or window <= capacity  # one request up to the window fits
        assert all(b <= window for b in loaded.role(role).budgets.values())


def _load(path: Path | None = None, **data: Any) -> Settings | ConfigError:
    try:
        return load_settings(path, **data)
    except ConfigError as exc:
        return exc


@PROPERTY
@given(data=overrides)
def test_any_override_loads_within_bounds_or_is_a_config_error_naming_a_key(
    data: dict[str, Any],
) -> None:
    outcome = _load(**data)
    if isinstance(outcome, ConfigError):
        assert SECRET not in str(outcome)
        assert outcome.key is None or outcome.key.strip(".")
        return
    check_bounds(outcome)


@PROPERTY
@given(data=overrides)
def test_any_toml_file_loads_within_bounds_or_is_a_config_error(
    tmp_path: Path, data: dict[str, Any]
) -> None:
    path = write_toml(tmp_path / "swarm.toml", data)  # floats as repr: nan, inf are TOML
    outcome = _load(path)
    if isinstance(outcome, ConfigError):
        assert SECRET not in str(outcome)
        return
    check_bounds(outcome)


@PROPERTY
@given(data=st.one_of(st.text(max_size=120).map(str.encode), st.binary(max_size=60)))
def test_any_bytes_as_a_config_file_are_settings_or_a_config_error(
    tmp_path: Path, data: bytes
) -> None:
    path = tmp_path / "swarm.toml"
    path.write_bytes(data)
    assert isinstance(_load(path), Settings | ConfigError)


@pytest.mark.parametrize(
    ("ratelimit", "key"),
    [
        ({"reserve": {"P2": -0.5}}, "ratelimit.reserve.P2"),
        ({"reserve": {"P1": 1.0}}, "ratelimit.reserve.P1"),
        ({"max_wait_s": {"P0": -1}}, "ratelimit.max_wait_s.P0"),
        ({"max_wait_s": {"P0": float("inf")}}, "ratelimit.max_wait_s.P0"),
        ({"burst_s": float("nan")}, "ratelimit.burst_s"),
        ({"models": {"fake-gpt": {"rpm": 60, "tpm": 6000}}}, "ratelimit.models.fake-gpt.tpm"),
    ],
)
def test_ratelimit_bounds(ratelimit: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, ratelimit=ratelimit)
    assert info.value.key == key


def test_a_context_window_larger_than_the_bucket_is_lowered_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1M TPM at burst_s 6 holds 100 000 tokens: a 262 144-token window cannot be used
    whole. The window is lowered at load (a call's max_tokens then fits the bucket) and
    the log says which burst_s keeps it whole."""
    limits = {"models": {"kimi-k2-0905": {"rpm": 500, "tpm": 1_000_000}}}
    loaded = load_settings(None, llm={"model": "kimi-k2-0905"}, ratelimit=limits)
    assert context_window(loaded.llm, "kimi-k2-0905") == 100_000
    assert loaded.capped_context_windows == {"kimi-k2-0905": (262_144, 100_000)}
    assert "ratelimit.burst_s to 15.7 or more" in caplog.text
    whole = load_settings(None, llm={"model": "kimi-k2-0905"}, ratelimit={**limits, "burst_s": 16})
    assert context_window(whole.llm, "kimi-k2-0905") == 262_144
    # A model no role uses keeps its window.
    unused = load_settings(None, ratelimit=limits)
    assert context_window(unused.llm, "kimi-k2-0905") == 262_144


def test_a_role_budget_above_the_context_window_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, roles={"research": {"budgets": {"P0": 200_000}}})
    assert info.value.key == "roles.research.budgets.P0"
