"""Write a swarm.toml from a nested dict (only what our config uses).

>>> print(dumps_toml({"redis_url": "redis://h/0", "roles": {"a": {"tools": ["x__*"]}}}))
"redis_url" = "redis://h/0"
[roles]
"a" = {"tools" = ["x__*"]}
<BLANKLINE>
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["dumps_toml", "write_toml"]

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f'"{k}" = {_scalar(v)}' for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_table(value: Any) -> bool:
    """A mapping of mappings becomes `[a.b]` tables; anything else stays inline."""
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, Mapping) for v in value.values())
    )


def _key(name: str) -> str:
    return name if _BARE.match(name) else _scalar(name)


def dumps_toml(data: Mapping[str, Any]) -> str:
    lines: list[str] = []

    def table(prefix: str, body: Mapping[str, Any]) -> None:
        plain = {k: v for k, v in body.items() if not _is_table(v)}
        if prefix and plain:
            lines.append(f"[{prefix}]")
        for key, value in plain.items():
            lines.append(f'"{key}" = {_scalar(value)}')
        for key, value in body.items():
            if key not in plain:
                table(f"{prefix}.{_key(key)}" if prefix else _key(key), value)

    table("", data)
    return "\n".join(lines) + "\n"


def write_toml(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(dumps_toml(data))
    return path
