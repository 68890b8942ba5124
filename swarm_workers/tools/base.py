"""What the agent loop needs from tools, and an in-process implementation.

The loop talks to a `Toolset`; the MCP registry implements it for servers discovered at
run time, `LocalToolset` for plain Python callables (tests, embedded use). Errors meant
for the model are `ToolError`s: the loop hands their message back as the tool result.

>>> tools = LocalToolset()
>>> @tools.tool(description="Add two numbers")
... def add(a: int, b: int) -> int:
...     return a + b
>>> tools.call("local__add", {"a": 1, "b": 2}, timeout=1.0).content
'3'
"""

from __future__ import annotations

import fnmatch
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, TypeAdapter

from swarm_workers.config import RoleSettings
from swarm_workers.errors import InvalidToolArguments, ToolFailed, ToolNotAllowed, UnknownTool
from swarm_workers.metrics import allow_tool_servers

__all__ = [
    "DEFAULT_MAX_OUTPUT_CHARS",
    "LocalToolset",
    "ToolResult",
    "ToolSpec",
    "Toolset",
    "cap",
    "check_allowed",
    "is_allowed",
    "validate_arguments",
]


DEFAULT_MAX_OUTPUT_CHARS = 16_000  # `tools.max_output_chars`'s default


class ToolSpec(BaseModel):
    """A tool as the model sees it: fleet-unique name, description, JSON Schema."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str = ""
    parameters: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class ToolResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    content: str


@runtime_checkable
class Toolset(Protocol):
    """Tools a role may use. `call` is blocking and thread-safe (pool threads call it)."""

    def specs(self, allowed: Sequence[str]) -> list[ToolSpec]:
        """Tools whose name matches one of `allowed` (names or fnmatch patterns)."""
        ...

    def call(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        timeout: float,
        allowed: Sequence[str] | None = None,
        role: str | None = None,
    ) -> ToolResult:
        """Run a tool within `timeout` seconds, all waits included. Raises a ToolError
        subclass for anything the model should read.

        The toolset alone checks the call: `allowed`, the tool's argument schema, and
        the output cap (a longer result is cut, with a note the model can read).
        With `allowed` (the role's `tools` patterns), a name outside it raises
        ToolNotAllowed naming `role`; None means no allowlist is applied here.
        """
        ...

    def role_context(self, role: RoleSettings) -> str:
        """Text of the role's resources (`RoleSettings.resources`) for its system prompt."""
        ...

    def close(self) -> None:
        """Release connections (MCP sessions, stdio server processes) at worker shutdown."""
        ...


def is_allowed(name: str, allowed: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed)


def check_allowed(name: str, allowed: Sequence[str] | None, role: str | None) -> None:
    """ToolNotAllowed unless `name` matches the role's allowlist (None: no allowlist)."""
    if allowed is not None and not is_allowed(name, allowed):
        raise ToolNotAllowed(name, role or "this role")


def cap(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters, saying so, so the model knows it saw a part.

    >>> cap("abcdef", 3)
    'abc\\n[truncated: 6 characters, limit 3]'
    """
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[truncated: {len(text)} characters, limit {limit}]"


def validate_arguments(tool: str, schema: dict[str, Any], arguments: dict[str, Any]) -> None:
    """Check arguments against the tool's JSON Schema; the message names the bad path."""
    # Imported here: only a worker calling a tool needs it, and its import is ~0.1 s of
    # every producer's start (`swarm submit` imports this module through the client).
    import jsonschema
    from referencing.exceptions import Unresolvable

    try:
        jsonschema.validate(arguments, schema)
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidToolArguments(tool, f"{path}: {exc.message}") from None
    except jsonschema.SchemaError as exc:
        raise InvalidToolArguments(
            tool, f"the tool's own schema is invalid: {exc.message}"
        ) from None
    except (Unresolvable, RecursionError) as exc:
        # The schema comes from an MCP server: a $ref to nowhere, or one to itself.
        raise InvalidToolArguments(
            tool, f"the tool's own schema cannot be used ({type(exc).__name__})"
        ) from None
    except OverflowError:  # a number too large to check against `multipleOf`, say
        raise InvalidToolArguments(tool, "a number in the arguments is too large") from None


class LocalToolset:
    """Plain Python functions as tools, named `<server>__<function>`."""

    def __init__(
        self, server: str = "local", *, max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
    ) -> None:
        self._server = server
        self._max_output_chars = max_output_chars
        allow_tool_servers([server])
        self._tools: dict[str, tuple[ToolSpec, Callable[..., Any]]] = {}

    def tool(self, *, description: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            self.add(func, description=description or (inspect.getdoc(func) or ""))
            return func

        return register

    def add(self, func: Callable[..., Any], *, description: str = "") -> ToolSpec:
        params = {
            name: TypeAdapter(p.annotation).json_schema()
            for name, p in inspect.signature(func, eval_str=True).parameters.items()
        }
        required = [
            name
            for name, p in inspect.signature(func).parameters.items()
            if p.default is inspect.Parameter.empty
        ]
        schema = {
            "type": "object",
            "properties": params,
            "required": required,
            "additionalProperties": False,
        }
        spec = ToolSpec(
            name=f"{self._server}__{func.__name__}", description=description, parameters=schema
        )
        self._tools[spec.name] = (spec, func)
        return spec

    def specs(self, allowed: Sequence[str]) -> list[ToolSpec]:
        return [spec for name, (spec, _) in self._tools.items() if is_allowed(name, allowed)]

    def call(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        timeout: float,
        allowed: Sequence[str] | None = None,
        role: str | None = None,
    ) -> ToolResult:
        check_allowed(name, allowed, role)
        try:
            spec, func = self._tools[name]
        except KeyError:
            raise UnknownTool(name) from None
        validate_arguments(name, spec.parameters, arguments)
        try:
            value = func(**arguments)
        except Exception as exc:  # the model reads what went wrong, the task goes on
            raise ToolFailed(name, f"{type(exc).__name__}: {exc}") from exc
        text = value if isinstance(value, str) else json.dumps(value)
        return ToolResult(content=cap(text, self._max_output_chars))

    def role_context(self, role: RoleSettings) -> str:
        return ""  # local tools have no resources

    def close(self) -> None:
        return None
