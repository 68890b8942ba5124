"""One harness for every local fleet: the demo, the benchmarks and the test fixtures.

- `environment`: the explicit environment a child starts with (an allowlist, never
  the caller's `SWARM_*` or `REDIS_URL`).
- `process`: `ManagedProcess` / `ProcessGroup`: spawn, wait until ready, stop
  (SIGTERM, then SIGKILL after a grace), newest first.
- `services`: Redis, the fake provider and fake MCP servers, each a handle that can
  probe and stop its process.
- `workers`: `WorkerSpec` -> a `swarm worker` process, ready once it heartbeats.
- `fleet`: `FleetSpec` -> `LocalFleet`, a whole fleet with its swarm.toml.
- `toml`: writes that swarm.toml.
"""

from swarm_workers.localfleet.environment import (
    ALLOWED_VARIABLES,
    TAG_VARIABLE,
    child_env,
    is_fleet_variable,
)
from swarm_workers.localfleet.fleet import (
    FakeLLMSpec,
    FleetSpec,
    LocalFleet,
    McpServerSpec,
    file_settings,
)
from swarm_workers.localfleet.process import (
    ManagedProcess,
    ProcessExited,
    ProcessGroup,
    free_port,
    wait_until,
)
from swarm_workers.localfleet.services import (
    FakeProvider,
    McpHttpServer,
    RedisServer,
    find_redis_server,
    redis_server_argv,
    start_fake_llm,
    start_mcp_http,
    start_redis,
)
from swarm_workers.localfleet.toml import dumps_toml, write_toml
from swarm_workers.localfleet.workers import Worker, WorkerSpec, start_worker

__all__ = [
    "ALLOWED_VARIABLES",
    "TAG_VARIABLE",
    "FakeLLMSpec",
    "FakeProvider",
    "FleetSpec",
    "LocalFleet",
    "ManagedProcess",
    "McpHttpServer",
    "McpServerSpec",
    "ProcessExited",
    "ProcessGroup",
    "RedisServer",
    "Worker",
    "WorkerSpec",
    "child_env",
    "dumps_toml",
    "file_settings",
    "find_redis_server",
    "free_port",
    "is_fleet_variable",
    "redis_server_argv",
    "start_fake_llm",
    "start_mcp_http",
    "start_redis",
    "start_worker",
    "wait_until",
    "write_toml",
]
