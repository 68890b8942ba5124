"""A fake MCP server for demos, CI and tests, built with the official SDK's `MCPServer`.

It speaks the real protocol over streamable HTTP or stdio, in both eras: modern
(2026-07-28: `server/discover`, cache hints, `subscriptions/listen`) by default, or
handshake-era only (`--handshake-only`: every modern request is refused with
METHOD_NOT_FOUND, so a client's `server/discover` probe falls back to `initialize`).
It is a peer: it imports nothing from ``swarm_workers``.

    python -m swarm_workers.fakes.mcp_server --transport http --port 8765
    python -m swarm_workers.fakes.mcp_server --transport stdio --handshake-only

Tools: ``search(query, limit)``, ``add(a, b)``, ``slow(seconds)`` (sleeps), ``huge(chars)``
(a very long answer), ``fail(message)``
(answers ``isError``), ``grow(name)`` (adds a tool ``name`` at run time and announces the
change: a `ToolsListChanged` event to modern listeners and
``notifications/tools/list_changed`` to every handshake-era connection).
Resources: ``doc://guide``, ``doc://policy``.

What tests read (every request is counted by method, e.g. ``tools/list``):
    GET  /_fake/stats     {"counts": {...}, "tools": [...], "era": "...", "pid": N}   (http only)
    POST /_fake/reset     zero the counters                                           (http only)
    POST /_fake/tools     {"name": "x"}: same as calling ``grow``                     (http only)
    --stats-file PATH     the same JSON, rewritten after every request (any transport)
    --stats-dir DIR       the same, as DIR/<pid>.json: one file per stdio server process
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import uvicorn
from mcp.server.caching import CacheHint
from mcp.server.connection import Connection
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.runner import serve_loop
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus, ToolsListChanged
from mcp.shared.exceptions import MCPError
from mcp.types import (
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    ListToolsResult,
    PaginatedRequestParams,
)
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["FakeMCPConfig", "FakeMCPState", "build_http_app", "build_server", "main"]

Scope_ = Literal["public", "private"]


@dataclass(frozen=True)
class FakeMCPConfig:
    """How the fake behaves. >>> FakeMCPConfig(name="search", handshake_only=True)"""

    name: str = "fake-mcp"
    handshake_only: bool = False
    cache_ttl_ms: int = 60_000
    cache_scope: Scope_ = "private"
    page_size: int = 0  # 0: tools/list answers in one page
    stats_file: Path | None = None
    stats_dir: Path | None = None  # one `<pid>.json` per process (stdio: one per client)
    announce_changes: bool = True  # False: grow adds tools silently (clients must re-list)
    bearer_token: str | None = None  # http only: required `Authorization: Bearer <token>`


@dataclass
class FakeMCPState:
    """Counters and the open handshake-era connections (to announce list changes)."""

    config: FakeMCPConfig
    server: MCPServer | None = None
    bus: InMemorySubscriptionBus = field(default_factory=InMemorySubscriptionBus)
    counts: Counter[str] = field(default_factory=Counter)
    eras: Counter[str] = field(default_factory=Counter)
    legacy_connections: dict[int, Connection] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        tools = (
            []
            if self.server is None
            else sorted(t.name for t in self.server._tool_manager.list_tools())
        )
        return {
            "name": self.config.name,
            "pid": os.getpid(),
            "counts": dict(self.counts),
            "eras": dict(self.eras),
            "tools": tools,
        }

    def count(self, method: str, version: str) -> None:
        self.counts[method] += 1
        self.eras["modern" if version in MODERN_PROTOCOL_VERSIONS else "handshake"] += 1
        targets = [self.config.stats_file]
        if self.config.stats_dir is not None:
            targets.append(self.config.stats_dir / f"{os.getpid()}.json")
        for target in targets:
            if target is not None:
                tmp = target.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.snapshot()))
                tmp.replace(target)

    async def add_tool(self, name: str) -> None:
        """Register an echo tool called `name`, then tell every client the list changed."""
        assert self.server is not None

        def grown(text: str = "") -> str:
            return f"{name}: {text}"

        self.server.add_tool(grown, name=name, description=f"Echo tool {name} added at run time.")
        if not self.config.announce_changes:
            return
        await self.bus.publish(ToolsListChanged())
        # Handshake-era clients hear it on their standalone channel (HTTP GET stream or
        # the stdio pipe); `notify` is best-effort and never raises.
        for connection in list(self.legacy_connections.values()):
            await connection.send_tool_list_changed()


class _Observer:
    """Server middleware: count requests, refuse modern ones when handshake-only, and
    remember handshake-era connections so list changes can be announced to them."""

    def __init__(self, state: FakeMCPState) -> None:
        self._state = state

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        state = self._state
        if ctx.request_id is not None:
            state.count(ctx.method, ctx.protocol_version)
            handshake = ctx.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS
            if state.config.handshake_only and not handshake:
                raise MCPError(METHOD_NOT_FOUND, "this server speaks handshake-era versions only")
            if handshake:
                # The SDK exposes no public handle on a request's connection; the fake
                # needs one to send list-changed notifications outside a request.
                connection: Connection = ctx.session._connection
                state.legacy_connections[id(connection)] = connection
        return await call_next(ctx)


def build_server(config: FakeMCPConfig) -> tuple[MCPServer, FakeMCPState]:
    """The MCPServer with its tools and resources, and the state tests observe."""
    state = FakeMCPState(config)
    hint = CacheHint(ttl_ms=config.cache_ttl_ms, scope=config.cache_scope)
    server = MCPServer(
        config.name,
        version="1.0",
        instructions="A fake MCP server for swarm_workers tests and demos.",
        cache_hints={"tools/list": hint, "resources/list": hint, "resources/read": hint},
        subscriptions=state.bus,
        middleware=[_Observer(state)],
        log_level="WARNING",
    )
    state.server = server

    @server.tool(description="Search the knowledge base; returns `limit` matching lines.")
    def search(query: str, limit: int = 3) -> str:
        return "\n".join(f"{i + 1}. result for {query!r}" for i in range(limit))

    @server.tool(description="Add two numbers.")
    def add(a: float, b: float) -> str:
        total = a + b
        return str(int(total) if total.is_integer() else total)

    @server.tool(description="Sleep for `seconds`, then answer (a slow dependency).")
    async def slow(seconds: float = 1.0) -> str:
        await anyio.sleep(seconds)
        return f"slept {seconds}s"

    @server.tool(description="Answer `chars` characters of text (a tool that says too much).")
    def huge(chars: int = 1_000_000) -> str:
        line = "all work and no play makes jack a dull boy. "
        return (line * (chars // len(line) + 1))[:chars]

    @server.tool(description="Always fails: the result carries isError.")
    def fail(message: str = "boom") -> str:
        raise ToolError(message)

    @server.tool(description="Add an echo tool called `name` to this server and announce it.")
    async def grow(name: str) -> str:
        await state.add_tool(name)
        return f"added tool {name}"

    @server.resource("doc://guide", name="guide", description="How agents use this server.")
    def guide() -> str:
        return "Guide: call search before answering; cite result numbers."

    @server.resource("doc://policy", name="policy", description="House rules.")
    def policy() -> str:
        return "Policy: never invent sources."

    if config.page_size > 0:
        size = config.page_size

        async def list_tools_paged(
            ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams
        ) -> ListToolsResult:
            tools = await server.list_tools()
            try:
                start = int(params.cursor or 0)
            except ValueError:
                raise MCPError(INVALID_PARAMS, f"bad cursor {params.cursor!r}") from None
            end = start + size
            return ListToolsResult(
                tools=tools[start:end], next_cursor=str(end) if end < len(tools) else None
            )

        server._lowlevel_server.add_request_handler(
            "tools/list", PaginatedRequestParams, list_tools_paged
        )
    return server, state


class _BearerGate:
    """Refuse /mcp requests without the configured bearer token (401), like a real server."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/mcp"):
            headers = dict(scope["headers"])
            if headers.get(b"authorization") != self._expected:
                await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self._app(scope, receive, send)


def build_http_app(config: FakeMCPConfig, host: str = "127.0.0.1") -> tuple[ASGIApp, FakeMCPState]:
    """The streamable-HTTP app at /mcp plus the /_fake/* routes."""
    server, state = build_server(config)

    @server.custom_route("/_fake/stats", methods=["GET"])  # type: ignore[untyped-decorator]
    async def stats(request: Request) -> Response:
        return JSONResponse(state.snapshot())

    @server.custom_route("/_fake/reset", methods=["POST"])  # type: ignore[untyped-decorator]
    async def reset(request: Request) -> Response:
        state.counts.clear()
        state.eras.clear()
        return JSONResponse(state.snapshot())

    @server.custom_route("/_fake/tools", methods=["POST"])  # type: ignore[untyped-decorator]
    async def add_tool(request: Request) -> Response:
        body = await request.json()
        await state.add_tool(str(body["name"]))
        return JSONResponse(state.snapshot())

    # The SDK guards against DNS rebinding by the bind address: bound to loopback it
    # accepts only localhost Host headers, bound to 0.0.0.0 (a container) any.
    app: ASGIApp = server.streamable_http_app(host=host)
    if config.bearer_token:
        app = _BearerGate(app, config.bearer_token)
    return app, state


async def serve_stdio(server: MCPServer, handshake_only: bool) -> None:
    """Serve one stdio connection; handshake-only drives the SDK's handshake-only loop.

    `MCPServer.run_stdio_async` serves both eras and lets the client's first request
    pick one, so a refused `server/discover` would still lock the pipe modern and
    the `initialize` fallback would be refused. `serve_loop` never goes modern.
    """
    if not handshake_only:
        await server.run_stdio_async()
        return
    lowlevel = server._lowlevel_server
    async with stdio_server() as (read_stream, write_stream), lowlevel.lifespan(lowlevel) as state:
        await serve_loop(
            lowlevel,
            read_stream,
            write_stream,
            lifespan_state=state,
            init_options=lowlevel.create_initialization_options(),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake MCP server (official SDK, MCPServer).")
    parser.add_argument("--transport", choices=["http", "stdio"], default="http")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--name", default="fake-mcp")
    parser.add_argument("--handshake-only", action="store_true", help="Refuse 2026-07-28 requests.")
    parser.add_argument("--cache-ttl-ms", type=int, default=60_000)
    parser.add_argument("--cache-scope", choices=["public", "private"], default="private")
    parser.add_argument("--page-size", type=int, default=0, help="Paginate tools/list (0: off).")
    parser.add_argument("--stats-file", type=Path, default=None)
    parser.add_argument("--stats-dir", type=Path, default=None, help="Write <pid>.json here.")
    parser.add_argument("--quiet-changes", action="store_true", help="Do not announce new tools.")
    parser.add_argument("--bearer-token-env", default=None, help="Env var with a required token.")
    args = parser.parse_args(argv)
    token = os.environ.get(args.bearer_token_env) if args.bearer_token_env else None
    config = FakeMCPConfig(
        name=args.name,
        handshake_only=args.handshake_only,
        cache_ttl_ms=args.cache_ttl_ms,
        cache_scope=args.cache_scope,
        page_size=args.page_size,
        stats_file=args.stats_file,
        stats_dir=args.stats_dir,
        announce_changes=not args.quiet_changes,
        bearer_token=token,
    )
    if args.transport == "stdio":
        server, _ = build_server(config)
        anyio.run(serve_stdio, server, config.handshake_only)
        return 0
    app, _ = build_http_app(config, host=args.host)
    print(f"fake MCP server {config.name} on http://{args.host}:{args.port}/mcp", file=sys.stderr)
    # A client's session holds a stream open for as long as it lives: without a bound,
    # SIGTERM would wait for every client to hang up (a test's teardown sat 20 s in it).
    settings = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2
    )
    uvicorn.Server(settings).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
