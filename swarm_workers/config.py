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

import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
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
    "DEFAULT_LLM_BASE_URL",
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
    "bucket_token_capacity",
    "given_settings",
    "load_settings",
]

log = logging.getLogger(__name__)

# Output-token budgets per priority (field report: research costs 15-20x summarise).
DEFAULT_BUDGETS: dict[Priority, int] = {Priority.P0: 8000, Priority.P1: 4096, Priority.P2: 2048}

# A model whose token bucket cannot admit one request this large is refused at load:
# every one of its tasks would fail (the same floor as `llm.default_context_window`).
MIN_REQUEST_TOKENS = 1024


class _Section(BaseModel):
    # TOML reads `nan` and `inf` as floats; no timeout, rate or fraction here means either.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SpawnSettings(_Section):
    """What a supervisor role's `swarm__spawn` may do (`spawn = true`: these defaults).

    >>> SpawnSettings(max_per_spawn=20, tree_budget=200_000).max_depth
    1
    """

    max_per_spawn: int = Field(100, ge=1, le=1000, description="Sub-agents in one call.")
    max_total: int = Field(500, ge=1, description="Sub-agents in the whole tree of one root.")
    max_depth: int = Field(
        1, ge=1, le=8, description="Levels of sub-agents below the root (1: children only)."
    )
    tree_budget: int | None = Field(
        None, ge=1, description="Output tokens the whole tree's sub-agents may draw."
    )


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
    spawn: SpawnSettings | None = Field(
        None, description="A supervisor: offered `swarm__spawn` (`spawn = true` for defaults)."
    )

    @field_validator("spawn", mode="before")
    @classmethod
    def _spawn_flag(cls, value: object) -> object:
        if value is True:
            return SpawnSettings()
        if value is False:
            return None
        return value

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


DEFAULT_LLM_BASE_URL = "http://127.0.0.1:8400/v1"
"""Where `swarm fake-llm` listens by default: the endpoint when none is configured."""


class LLMSettings(_Section):
    base_url: str = DEFAULT_LLM_BASE_URL
    api_key: SecretStr | None = None
    api_key_file: Path | None = Field(None, description="Read the key from this file.")
    model: str = "fake-gpt"
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_retries: int = Field(6, ge=0, le=20)
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    max_connections: int | None = Field(
        None,
        ge=1,
        description="Connections to the provider per worker process; default: one per pool "
        "thread. Fewer makes calls wait for a connection (the worker warns at start).",
    )
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
    # The share of each bucket a take must leave behind: in [0, 1). A negative reserve
    # would let a take drive an empty bucket into debt.
    reserve: dict[Priority, Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: {Priority.P0: 0.0, Priority.P1: 0.10, Priority.P2: 0.30}
    )
    max_wait_s: dict[Priority, Annotated[float, Field(ge=0)]] = Field(
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
    # A task whose earlier run was cut short runs in a child process (`isolation`),
    # at most this many at a time per worker process (each holds a model call, mostly
    # waiting, and some tens of MB).
    isolate_suspects: bool = True
    isolation_slots: int = Field(8, ge=1, le=256)
    # How long a run retries Redis (a failover, a dropped connection) before its message
    # goes back on the queue with the run uncounted.
    redis_retry_s: float = Field(30.0, ge=0, le=600)
    # Task events (received, started, succeeded) from the start. Off by default: they
    # cost CPU a task and only a monitor reads them, and Flower turns them on in every
    # worker while it runs (its `enable_events`, a control broadcast every few seconds).
    task_events: bool = False
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

    # Context windows lowered to what the model's token bucket can admit: model ->
    # (configured window, window used). `load_settings` says so; see `_fit_windows`.
    _capped_windows: dict[str, tuple[int, int]] = PrivateAttr(default_factory=dict)

    @field_validator("roles")
    @classmethod
    def _some_role(cls, roles: dict[str, RoleSettings]) -> dict[str, RoleSettings]:
        if not roles:
            raise ValueError("at least one role must be configured")
        return roles

    @model_validator(mode="after")
    def _fit_windows(self) -> Settings:
        """One request never needs more than its model's context window, and the token
        bucket refuses any request above its capacity (`tpm * burst_s / 60`). Where a
        role's model has a window larger than its bucket, the window used is lowered to
        the capacity: a call's `max_tokens` is then cut to fit, and a prompt too large
        for any bucket fails before anything is reserved or paid for (ContextOverflow),
        instead of every large call failing with RequestTooLarge. `load_settings` logs
        each lowered window with the `burst_s` that would keep it whole. A bucket too
        small for any useful request (< MIN_REQUEST_TOKENS) is refused here.
        """
        windows = dict(self.llm.context_windows)
        capped: dict[str, tuple[int, int]] = {}
        for model in sorted({self.model_for(role) for role in self.roles}):
            capacity = bucket_token_capacity(self.ratelimit, model)
            if capacity is None:
                continue
            limited = model if model in self.ratelimit.models else "*"
            if capacity < MIN_REQUEST_TOKENS:
                raise _keyed(
                    f"ratelimit.models.{limited}.tpm",
                    f"the token bucket holds {capacity:g} tokens (tpm x burst_s / 60), less "
                    f"than the {MIN_REQUEST_TOKENS} one request of role model {model} may "
                    "need: raise ratelimit.burst_s or the tpm",
                )
            window = windows.get(model, self.llm.default_context_window)
            if window > capacity:
                windows[model] = int(capacity)
                capped[model] = (window, int(capacity))
        if capped:
            llm = self.llm.model_copy(update={"context_windows": windows})
            object.__setattr__(self, "llm", llm)  # frozen: set once, while validating
            self._capped_windows = capped
        for name, role in self.roles.items():
            model = self.model_for(name)
            window = windows.get(model, self.llm.default_context_window)
            for priority, budget in role.budgets.items():
                if budget > window:
                    raise _keyed(
                        f"roles.{name}.budgets.{priority.value}",
                        f"{budget} tokens exceeds the {window}-token context window of {model}"
                        + (" (lowered to fit its token bucket)" if model in capped else ""),
                    )
        return self

    @property
    def capped_context_windows(self) -> dict[str, tuple[int, int]]:
        """Models whose context window was lowered to fit their token bucket:
        model -> (configured window, window used)."""
        return dict(self._capped_windows)

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
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:  # TOML is UTF-8, whatever the locale
            raise ConfigError(
                f"{file}: not valid UTF-8 (byte offset {exc.start}); TOML files are UTF-8"
            ) from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: invalid TOML: {exc}") from exc
        data["config_path"] = file
    try:
        settings = Settings(**data)
        if overrides:
            # Validated again from exactly these values: what the caller passed in code wins.
            settings = given_settings(_merged(settings.model_dump(), overrides))
    except SettingsError as exc:  # e.g. SWARM_ROLES holding JSON that does not parse
        raise ConfigError(f"environment: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        if first["type"] == _KEYED:  # a check across sections names its own key
            loc = str((first.get("ctx") or {})["key"]).split(".")
        key = ".".join(loc)
        # The offending input is not echoed: it may be an API key or a header.
        raise ConfigError(
            first["msg"]
            + (f" [{len(exc.errors()) - 1} more error(s)]" if len(exc.errors()) > 1 else ""),
            key=key,
            line=_line_of(text, loc) if text else None,
        ) from exc
    for model, (window, used) in settings.capped_context_windows.items():
        burst = _burst_for(settings.ratelimit, model, window)
        log.warning(
            "llm.context_windows.%s: using %d tokens, not %d: the model's token bucket "
            "(tpm x burst_s / 60) cannot admit a larger request; %s",
            model,
            used,
            window,
            f"set ratelimit.burst_s to {burst:.1f} or more to allow the whole window"
            if burst < 60
            else "the tpm is below one whole-window request, so no burst_s can allow it",
        )
    return settings


_KEYED = "config_key"


def _keyed(key: str, message: str) -> PydanticCustomError:
    """A validation error for a check across sections, naming the key at fault."""
    return PydanticCustomError(_KEYED, "{message}", {"key": key, "message": message})


def bucket_token_capacity(ratelimit: RateLimitSettings, model: str) -> float | None:
    """The most tokens one request for `model` may take from the fleet's token buckets
    (its own limit's and the global `"*"` one's: `tpm * burst_s / 60`), or None when
    nothing limits it. The same formula as `ratelimit.bucket.buckets_for`.

    >>> limits = RateLimitSettings(models={"m": ModelLimit(rpm=500, tpm=1_000_000)})
    >>> bucket_token_capacity(limits, "m")
    100000.0
    """
    if not ratelimit.enabled:
        return None
    limits = [ratelimit.models[m] for m in (model, "*") if m in ratelimit.models]
    if not limits:
        return None
    return min(limit.tpm * ratelimit.burst_s / 60 for limit in limits)


def _burst_for(ratelimit: RateLimitSettings, model: str, tokens: int) -> float:
    """The `burst_s` at which the tightest limit of `model` holds `tokens`."""
    tpm = min(ratelimit.models[m].tpm for m in (model, "*") if m in ratelimit.models)
    return tokens * 60 / tpm


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
    """`over` laid on `base`: a section (`llm`, `worker`, ...) is merged key by key, so
    `llm={"base_url": ...}` keeps the environment's API key; anything else (`roles`,
    `redis_url`) is replaced whole, as written."""
    merged = dict(base)
    for key, value in over.items():
        field = Settings.model_fields.get(key)
        section = (
            field is not None
            and isinstance(field.annotation, type)
            and issubclass(field.annotation, BaseModel)
        )
        if section and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
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
