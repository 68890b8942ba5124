"""What a registry holds about one server's tools, and how MCP results become text.

Pure values and functions, no I/O: the registry (`tools/registry.py`) fills them from
`tools/list` and uses them to answer the agent loop.

>>> openai_name("search", "web.lookup")
'search__web_lookup_974fc5f3'
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal

from mcp.types import (
    AudioContent,
    BlobResourceContents,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    ReadResourceResult,
    ResourceLink,
    TextContent,
    TextResourceContents,
    Tool,
)

from swarm_workers.tools.base import ToolSpec

__all__ = [
    "Era",
    "RegisteredTool",
    "ServerTools",
    "openai_name",
    "register_tool",
    "render_resource",
    "render_result",
    "server_tools",
]

Era = Literal["modern", "handshake"]  # 2026-07-28 (discover) or initialize handshake

_OPENAI_NAME = re.compile(r"[^A-Za-z0-9_-]")
_MAX_NAME = 64  # OpenAI function names: ^[a-zA-Z0-9_-]{1,64}$


@dataclass(frozen=True)
class RegisteredTool:
    """A tool the model may call: its fleet-unique name and where it really lives."""

    name: str  # `server__tool`, OpenAI-safe
    server: str
    tool: str  # the name the server knows
    spec: ToolSpec


@dataclass(frozen=True)
class ServerTools:
    """One server's listing as this worker holds it."""

    server: str
    era: Era | None
    protocol_version: str | None
    tools: tuple[RegisteredTool, ...]
    resources: tuple[str, ...]
    version: str
    listed_at: float  # when this worker installed it (epoch s)
    cached_at: float | None  # when the shared cache entry was stored; None: not cacheable

    def view(self, status: str, last_error: str | None) -> dict[str, Any]:
        return {
            "server": self.server,
            "era": self.era,
            "protocol_version": self.protocol_version,
            "version": self.version,
            "listed_at": self.listed_at,
            "cached_at": self.cached_at,
            "status": status,
            "last_error": last_error,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "tools": [
                {"name": t.name, "tool": t.tool, "description": t.spec.description}
                for t in self.tools
            ],
            "resources": list(self.resources),
        }


def server_tools(
    server: str,
    tools: list[Tool],
    resources: list[str],
    *,
    era: Era | None,
    protocol_version: str | None,
    cached_at: float | None,
) -> ServerTools:
    """One server's listing: tools named for the model, a version digest, the time."""
    ordered = sorted(tools, key=lambda t: t.name)
    registered = tuple(register_tool(server, tool) for tool in ordered)
    digest = hashlib.sha256(
        json.dumps(
            [[t.name, t.description, t.input_schema] for t in ordered],
            sort_keys=True,
            default=str,
        ).encode()
    )
    return ServerTools(
        server=server,
        era=era,
        protocol_version=protocol_version,
        tools=registered,
        resources=tuple(sorted(resources)),
        version=digest.hexdigest()[:12],
        listed_at=time.time(),
        cached_at=cached_at,
    )


def openai_name(server: str, tool: str) -> str:
    """`server__tool`, or for a tool name OpenAI would reject, a safe name with a digest.

    Valid names are kept verbatim, so adding a tool never renames another one.
    """
    name = f"{server}__{tool}"
    if len(name) <= _MAX_NAME and not _OPENAI_NAME.search(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return _OPENAI_NAME.sub("_", name)[: _MAX_NAME - 9] + "_" + digest


def register_tool(server: str, tool: Tool) -> RegisteredTool:
    """The tool as an OpenAI function (`inputSchema` as parameters), mapped to its server."""
    parameters: dict[str, Any] = dict(tool.input_schema or {})
    parameters.setdefault("type", "object")
    if parameters.get("type") == "object":
        parameters.setdefault("properties", {})
    description = tool.description or tool.title or ""
    name = openai_name(server, tool.name)
    return RegisteredTool(
        name=name,
        server=server,
        tool=tool.name,
        spec=ToolSpec(name=name, description=description, parameters=parameters),
    )


def render_result(result: CallToolResult) -> str:
    """A tool result as the text a chat model reads."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, TextContent):
            parts.append(block.text)
        elif isinstance(block, ImageContent | AudioContent):
            parts.append(f"[{block.type}: {block.mime_type}, {len(block.data) * 3 // 4} bytes]")
        elif isinstance(block, EmbeddedResource):
            resource = block.resource
            if isinstance(resource, TextResourceContents):
                parts.append(resource.text)
            else:
                parts.append(f"[resource {resource.uri}: binary]")
        elif isinstance(block, ResourceLink):
            parts.append(f"[resource link: {block.uri}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def render_resource(result: ReadResourceResult) -> str:
    """A resource's contents as text (binary parts are described, not inlined)."""
    parts: list[str] = []
    for item in result.contents:
        if isinstance(item, TextResourceContents):
            parts.append(item.text)
        elif isinstance(item, BlobResourceContents):
            parts.append(f"[binary {item.mime_type or 'data'}, {len(item.blob) * 3 // 4} bytes]")
    return "\n".join(parts)
