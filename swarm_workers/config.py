"""One validated settings object for the whole fleet.

Sources, strongest first: what the caller passes in code (`load_settings(...,
redis_url=...)`, `SwarmClient("redis://...")`), then the environment
(`SWARM_<SECTION>_<FIELD>`, e.g. `SWARM_LLM_BASE_URL`, plus `REDIS_URL`), then
`swarm.toml` (path from `--config` or `SWARM_CONFIG`), then defaults. Defaults work
with no file at all: one role, `default`, and a Redis on localhost.

>>> settings = load_settings(None)
>>> settings.role("default").budget_for(Priority.P0)
8000
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from swarm_workers.errors import ConfigError, UnknownRole
from swarm_workers.keys import Keys
from swarm_workers.models import Priority, RoleName

__all__ = [
    "DEFAULT_BUDGETS",
    "AdmissionSettings",
    "BreakerSettings",
    "DeadLetterSettings",
    "LLMSettings",
    "LimitsSettings",
    "MCPServerSettings",
    "ModelLimit",
    "ModelPrice",
    "RateLimitSettings",
    "RoleSettings",
    "Settings",
    "ToolsSettings",
    "WorkerSettings",
    "given_settings",
    "load_settings",
]

# Output-token budgets per priority (field report: research costs 15-20x summarise).
DEFAULT_BUDGETS: dict[Priority, int] = {Priority.P0: 8000, Priority.P1: 4096, Priority.P2: 2048}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoleSettings(_Section):
    """A worker pool's specialisation: model, prompt, tools, defaults."""

    model: str | None = Field(None, description="Model for this role; defaults to llm.model.")
    system_prompt: str = "You are a helpful agent in a worker swarm. Answer concisely."
    tools: tuple[str, ...] = Field((), description="Allowed tools: `server__tool` or `server__*`.")
    resources: tuple[str, ...] = Field((), description="MCP resource URIs attached to the prompt.")
    default_priority: Priority = Priority.P1
    concurrency: int = Field(64, ge=1, le=2000, description="Threads in the worker's pool.")
    max_steps: int = Field(8, ge=1, le=100)
    budgets: dict[Priority, int] = Field(default_factory=dict)

    @field_validator("budgets")
    @classmethod
    def _positive(cls, budgets: dict[Priority, int]) -> dict[Priority, int]:
        for priority, budget in budgets.items():
            if budget <= 0:
                raise ValueError(f"budget for {priority.value} must be > 0, got {budget}")
        return budgets

    def budget_for(self, priority: Priority) -> int:
        return self.budgets.get(priority, DEFAULT_BUDGETS[priority])


class ModelPrice(_Section):
    """USD per one million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class LLMSettings(_Section):
    base_url: str = "http://127.0.0.1:8400/v1"
    api_key: SecretStr | None = None
    api_key_file: Path | None = Field(None, description="Read the key from this file.")
    model: str = "fake-gpt"
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_retries: int = Field(6, ge=0, le=20)
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    max_connections: int = Field(512, ge=1)
    context_windows: dict[str, int] = Field(
        default_factory=lambda: {"kimi-k2-0905": 262_144, "fake-gpt": 131_072}
    )
    default_context_window: int = Field(131_072, ge=1024)
    prices: dict[str, ModelPrice] = Field(default_factory=dict)

    def resolved_api_key(self) -> str:
        """The key, from the file when one is named. Never logged."""
        if self.api_key_file is not None:
            try:
                return self.api_key_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read {self.api_key_file}: {exc.strerror}", key="llm.api_key_file"
                ) from exc
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return "unset"  # the fake provider and many local gateways accept any key


class ModelLimit(_Section):
    rpm: int = Field(gt=0, description="Requests per minute for the whole fleet.")
    tpm: int = Field(gt=0, description="Tokens (prompt + completion) per minute.")


class RateLimitSettings(_Section):
    enabled: bool = True
    models: dict[str, ModelLimit] = Field(default_factory=dict)
    burst_s: float = Field(6.0, gt=0, description="Bucket capacity, in seconds of refill.")
    reserve: dict[Priority, float] = Field(
        default_factory=lambda: {Priority.P0: 0.0, Priority.P1: 0.10, Priority.P2: 0.30}
    )
    max_wait_s: dict[Priority, float] = Field(
        default_factory=lambda: {Priority.P0: 300.0, Priority.P1: 120.0, Priority.P2: 60.0}
    )

    @model_validator(mode="after")
    def _buckets_refill(self) -> RateLimitSettings:
        # The same rule the bucket applies when a worker builds it (ratelimit/bucket.py
        # `buckets_for`): a bucket holds `limit * burst_s / 60` (at least one request for
        # rpm) and must leave room to refill inside the limit. Checked here so that every
        # command refuses the config, not only a worker at start.
        for model, limit in self.models.items():
            for kind, per_minute, minimum in (("rpm", limit.rpm, 1.0), ("tpm", limit.tpm, 0.0)):
                capacity = max(minimum, per_minute * self.burst_s / 60.0)
                if capacity >= per_minute:
                    raise ValueError(
                        f"models.{model}.{kind} = {per_minute}: a bucket of {capacity:g} leaves "
                        "no refill inside the limit; lower burst_s below 60 s or raise the limit"
                    )
        return self


class AdmissionSettings(_Section):
    """High-water marks per priority (None: unbounded)."""

    high_water: dict[Priority, int | None] = Field(
        default_factory=lambda: {Priority.P0: None, Priority.P1: 50_000, Priority.P2: 20_000}
    )
    drain_rate_per_s: float = Field(
        50.0, gt=0, description="Assumed drain rate used to suggest a retry delay."
    )


class MCPServerSettings(_Section):
    """One MCP server: a streamable-HTTP URL or a stdio command."""

    transport: Literal["http", "stdio"] = "http"
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    bearer_token_env: str | None = Field(None, description="Env var holding a bearer token.")
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _transport_fields(self) -> MCPServerSettings:
        if self.transport == "http" and not self.url:
            raise ValueError("an http server needs url")
        if self.transport == "stdio" and not self.command:
            raise ValueError("a stdio server needs command")
        return self


class BreakerSettings(_Section):
    failures: int = Field(5, ge=1, description="Failures in `window_s` that open the breaker.")
    window_s: float = Field(30.0, gt=0)
    slow_call_ms: float = Field(800.0, gt=0, description="A call slower than this is a failure.")
    cooldown_s: float = Field(10.0, gt=0)


class ToolsSettings(_Section):
    servers: dict[str, MCPServerSettings] = Field(default_factory=dict)
    registry_ttl_s: float = Field(300.0, gt=0)
    max_output_chars: int = Field(16_000, ge=256)
    call_timeout_s: float = Field(30.0, gt=0)
    breaker: BreakerSettings = BreakerSettings()

    @field_validator("servers")
    @classmethod
    def _server_names(cls, servers: dict[str, Any]) -> dict[str, Any]:
        for name in servers:
            # `__` separates server from tool in the names the model sees.
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", name) or "__" in name:
                raise ValueError(f"server name {name!r} must match [a-z0-9][a-z0-9-]{{0,31}}")
        return servers


class WorkerSettings(_Section):
    # Unacked tasks of a dead worker come back after this long. It must exceed the
    # longest task (time limit) or a slow task is delivered twice.
    visibility_timeout_s: int = Field(3600, ge=5)
    task_time_limit_s: int = Field(1800, ge=1)
    max_attempts: int = Field(
        3, ge=1, description="Runs cut short by a dying worker before a task is given up."
    )
    # A running task's lease on its id: renewed every third of this while the run lives,
    # so a dead worker's task can be taken over after at most this long.
    lease_ttl_s: float = Field(30.0, ge=1, le=3600)
    # A task whose earlier run was cut short runs in a child process (`isolation`).
    isolate_suspects: bool = True
    heartbeat_file: Path = Path("/tmp/swarm-worker.heartbeat")
    heartbeat_interval_s: float = Field(5.0, gt=0)
    metrics_port: int | None = Field(None, ge=0, le=65535)

    @model_validator(mode="after")
    def _visibility_exceeds_time_limit(self) -> WorkerSettings:
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed "
                f"task_time_limit_s ({self.task_time_limit_s}) or long tasks run twice"
            )
        if self.lease_ttl_s >= self.visibility_timeout_s:
            raise ValueError(
                f"lease_ttl_s ({self.lease_ttl_s:g}) must be below visibility_timeout_s "
                f"({self.visibility_timeout_s}): a dead worker's task comes back after the "
                "visibility timeout and must find its lease lapsed"
            )
        return self


class LimitsSettings(_Section):
    max_payload_bytes: int = Field(256 * 1024, ge=1024)
    max_dag_nodes: int = Field(500, ge=1)
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    # A second submit with the same idempotency key within this window enqueues nothing.
    idempotency_window_s: int = Field(24 * 3600, ge=1)


class DeadLetterSettings(_Section):
    """Tasks that failed for good, kept per role until replayed or purged."""

    retention_s: int = Field(30 * 24 * 3600, ge=60)
    max_per_role: int = Field(10_000, ge=1, le=10_000_000)


class Settings(BaseSettings):
    """Everything a producer, worker or operator command needs."""

    model_config = SettingsConfigDict(
        env_prefix="SWARM_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        frozen=True,
    )

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("SWARM_REDIS_URL", "REDIS_URL", "redis_url"),
    )
    key_prefix: str = Field("swarm", pattern=r"^[a-z][a-z0-9_-]*$")
    # The file these settings were read from (set by `load_settings`), for the tool
    # registry's hot reload of `[tools.servers]`; None when built without a file.
    config_path: Path | None = None
    # Fault injection for the fault suite (`execution.failpoints`): "crash" or "".
    failpoints: str = Field("", pattern=r"^(crash)?$")
    redact_prompts: bool = True
    roles: dict[RoleName, RoleSettings] = Field(default_factory=lambda: {"default": RoleSettings()})
    llm: LLMSettings = LLMSettings()
    ratelimit: RateLimitSettings = RateLimitSettings()
    admission: AdmissionSettings = AdmissionSettings()
    tools: ToolsSettings = ToolsSettings()
    worker: WorkerSettings = WorkerSettings()
    limits: LimitsSettings = LimitsSettings()
    # One word, as every section: the environment splits SWARM_<SECTION>_<FIELD> once.
    deadletters: DeadLetterSettings = DeadLetterSettings()

    @field_validator("roles")
    @classmethod
    def _some_role(cls, roles: dict[str, RoleSettings]) -> dict[str, RoleSettings]:
        if not roles:
            raise ValueError("at least one role must be configured")
        return roles

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init kwargs; the environment overrides them.
        # (`load_settings` then lays the caller's own overrides over both.)
        return (env_settings, init_settings)

    def role(self, name: str) -> RoleSettings:
        try:
            return self.roles[name]
        except KeyError:
            raise UnknownRole(name, sorted(self.roles)) from None

    def model_for(self, role: str) -> str:
        return self.role(role).model or self.llm.model

    @property
    def failpoint_set(self) -> frozenset[str]:
        return frozenset(p for p in self.failpoints.split(",") if p)

    @property
    def keys(self) -> Keys:
        """The names of every Redis key under this fleet's prefix."""
        return Keys(self.key_prefix)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read `path` (or `$SWARM_CONFIG`, or nothing), apply the environment, validate.

    Raises ConfigError naming the key and the line of the file where it can.
    """
    if path is None and os.environ.get("SWARM_CONFIG"):
        path = os.environ["SWARM_CONFIG"]
    data: dict[str, Any] = {}
    text = ""
    if path is not None:
        file = Path(path)
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: invalid TOML: {exc}") from exc
        data["config_path"] = file
    try:
        settings = Settings(**data)
        if not overrides:
            return settings
        # Validated again from exactly these values: what the caller passed in code wins.
        return given_settings(_merged(settings.model_dump(), overrides))
    except SettingsError as exc:  # e.g. SWARM_ROLES holding JSON that does not parse
        raise ConfigError(f"environment: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        # The offending input is not echoed: it may be an API key or a header.
        raise ConfigError(
            first["msg"]
            + (f" [{len(exc.errors()) - 1} more error(s)]" if len(exc.errors()) > 1 else ""),
            key=key,
            line=_line_of(text, [str(part) for part in first["loc"]]) if text else None,
        ) from exc


class _GivenSettings(Settings):
    """Settings from exactly what they are given: no environment, no file."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def given_settings(data: dict[str, Any]) -> Settings:
    """Settings from these values alone, validated: for values another process already
    resolved (an isolated run's parent), or laid over the environment by code."""
    return _GivenSettings(**data)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`, sections merged key by key rather than replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _line_of(text: str, loc: list[str]) -> int | None:
    """Best-effort line of a dotted key in TOML source: the table header, then the key."""
    lines = text.splitlines()
    best: int | None = None
    start = 0
    # Find the deepest table header that is a prefix of loc, e.g. [roles.research].
    for depth in range(len(loc), 0, -1):
        header = re.compile(
            r"^\s*\[+\s*" + r"\s*\.\s*".join(map(re.escape, loc[:depth])) + r"\s*\]+"
        )
        for number, line in enumerate(lines):
            if header.match(line):
                best, start = number + 1, number + 1
                rest = loc[depth:]
                break
        else:
            continue
        break
    else:
        rest = loc
    if rest:
        key = re.compile(r"^\s*" + re.escape(rest[0]) + r"\s*[.=]")
        for number in range(start, len(lines)):
            if lines[number].lstrip().startswith("[") and number >= start and best is not None:
                break
            if key.match(lines[number]):
                return number + 1
    return best
