"""The configured MCP servers, re-read from the config file when it changes.

Servers added to `swarm.toml` join a running fleet without a restart: the registry
asks a `ServersSource` for the server list on every refresh. The file is the one the
settings were read from (`Settings.config_path`), never an environment variable.

Usage::

    source = servers_source(load_settings("swarm.toml"))
    sorted(source())
    # -> ['docs', 'files']
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from swarm_workers.config import MCPServerSettings, Settings, load_settings
from swarm_workers.errors import ConfigError

__all__ = ["ServersSource", "config_file_servers", "servers_source"]

log = logging.getLogger(__name__)

ServersSource = Callable[[], Mapping[str, MCPServerSettings]]


def config_file_servers(
    path: str | Path, fallback: Mapping[str, MCPServerSettings]
) -> ServersSource:
    """The `[tools.servers]` of a config file, re-read when the file changes.

    A file that does not parse keeps the last good list (logged), so an operator's
    half-saved edit never disconnects the fleet.
    """
    file = Path(path)
    mtime: int | None = None
    servers: dict[str, MCPServerSettings] = dict(fallback)

    def read() -> Mapping[str, MCPServerSettings]:
        nonlocal mtime, servers
        try:
            current = file.stat().st_mtime_ns
        except OSError:
            return servers
        if current != mtime:
            mtime = current
            try:
                servers = dict(load_settings(file).tools.servers)
            except ConfigError as exc:
                log.warning("mcp registry: %s does not load, keeping its servers: %s", file, exc)
        return servers

    return read


def servers_source(settings: Settings) -> ServersSource:
    """Where a worker's registry reads its servers: the settings' own file, watched, when
    they came from one and still match it; otherwise the settings as they are (built in
    code, or with servers the file does not have)."""
    fixed = dict(settings.tools.servers)
    path = settings.config_path
    if path is None:
        return lambda: fixed
    watched = config_file_servers(path, fixed)
    if dict(watched()) != fixed:
        log.info("mcp registry: servers differ from %s; not watching that file", path)
        return lambda: fixed
    return watched
