"""Settings: defaults, the file, the environment, and errors that name key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm_workers.config import load_settings
from swarm_workers.errors import ConfigError, UnknownRole
from swarm_workers.models import Priority


def test_defaults_work_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARM_CONFIG", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    settings = load_settings(None)
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert list(settings.roles) == ["default"]
    role = settings.role("default")
    assert [role.budget_for(p) for p in Priority] == [8000, 4096, 2048]


def test_file_roles_and_budget_overrides(tmp_path: Path) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text(
        '[roles.research]\nmodel = "kimi-k2-0905"\nconcurrency = 300\n'
        'tools = ["docs__*"]\ndefault_priority = "p2"\nbudgets = { P0 = 12000 }\n'
        "[roles.summarize]\nmax_steps = 3\n"
    )
    settings = load_settings(path)
    research = settings.role("research")
    assert research.concurrency == 300
    assert research.default_priority is Priority.P2
    assert research.budget_for(Priority.P0) == 12000
    assert research.budget_for(Priority.P1) == 4096
    assert settings.model_for("summarize") == settings.llm.model
    assert settings.model_for("research") == "kimi-k2-0905"
    with pytest.raises(UnknownRole, match="research, summarize"):
        settings.role("nope")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text(
        'redis_url = "redis://file:6379/0"\n[llm]\nbase_url = "http://file/v1"\n'
        'model = "from-file"\n'
    )
    monkeypatch.setenv("SWARM_CONFIG", str(path))
    monkeypatch.setenv("SWARM_LLM_BASE_URL", "http://env/v1")
    monkeypatch.setenv("SWARM_LLM_API_KEY", "sk-env")
    monkeypatch.setenv("REDIS_URL", "redis://env:6379/1")
    settings = load_settings(None)
    assert settings.llm.base_url == "http://env/v1"
    assert settings.llm.model == "from-file"  # not overridden: kept from the file
    assert settings.llm.resolved_api_key() == "sk-env"
    assert "sk-env" not in repr(settings)
    assert settings.redis_url == "redis://env:6379/1"


def test_api_key_from_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk-from-file\n")
    settings = load_settings(None, llm={"api_key_file": str(key)})
    assert settings.llm.resolved_api_key() == "sk-from-file"


def test_invalid_value_names_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text(
        '[roles.research]\nmodel = "m"\n\n[roles.writer]\nsystem_prompt = "x"\nconcurrency = 0\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.key == "roles.writer.concurrency"
    assert info.value.line == 6
    assert "line 6" in str(info.value) and "greater than or equal to 1" in str(info.value)


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text("[worker]\nvisibility_timeout_s = 7200\nconcurency = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.key == "worker.concurency"
    assert info.value.line == 3


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text('[roles.a]\nmodel = "x"\nbroken = \n')
    with pytest.raises(ConfigError, match="line 3"):
        load_settings(path)


def test_visibility_timeout_must_exceed_time_limit() -> None:
    with pytest.raises(ConfigError, match="run twice"):
        load_settings(None, worker={"visibility_timeout_s": 60, "task_time_limit_s": 120})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml")
