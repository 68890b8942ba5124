"""The shipped fake provider, with its completions counted per task: the fault suite's
witness that no task ran to completion twice.

A task tags its prompt with ``[task:<tag>]``; every chat request whose body carries
the tag is counted: answered (200) to a caller still connected, answered too late (the
caller timed out or died meanwhile: undelivered), or refused (an injected fault).
Everything else is the fake of `swarm_workers.fakes.llm_server`, unchanged (its
``/_fake/*`` endpoints too). Extra endpoints:

    GET  /_census          {"<tag>": {"completions": n, "undelivered": u, "refused": m}}
    POST /_census/clear    drop the pending injected faults (ends a timed outage
                           started with ``POST /_fake/faults``), counters untouched

    python -m tests.counting_llm --port 8401 --latency-ms 200
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from swarm_workers.fakes.llm_server import (
    FakeLLMConfig,
    FakeProvider,
    FixedLatency,
    UniformLatency,
    build_app,
)

__all__ = ["TAG", "build_counting_app", "tag_prompt"]

TAG = re.compile(r"\[task:([\w.-]+)\]")
_CHAT = "/v1/chat/completions"


def tag_prompt(tag: str, text: str) -> str:
    """A prompt the counting provider attributes to `tag`."""
    return f"[task:{tag}] {text}"


def build_counting_app(config: FakeLLMConfig) -> Starlette:
    inner = build_app(config)
    provider: FakeProvider = inner.state.provider
    counts: defaultdict[str, Counter[str]] = defaultdict(Counter)

    async def chat(request: Request) -> Response:
        body = await request.body()  # cached on the request: the provider reads it again
        found = TAG.search(body.decode(errors="replace"))
        tag = found[1] if found else "?"
        response = await provider.chat_completions(request)
        if response.status_code != 200:
            counts[tag]["refused"] += 1
        elif await request.is_disconnected():
            # The caller gave up (timed out) or died while the answer was made: it never
            # got it, so it is not a run that completed.
            counts[tag]["undelivered"] += 1
        else:
            counts[tag]["completions"] += 1
        return response

    async def census(request: Request) -> Response:
        return JSONResponse({tag: dict(c) for tag, c in counts.items()})

    async def clear(request: Request) -> Response:
        dropped = len(provider.faults)
        provider.faults.clear()
        return JSONResponse({"dropped": dropped})

    routes: list[BaseRoute] = [
        Route(_CHAT, chat, methods=["POST"]),
        Route("/_census", census, methods=["GET"]),
        Route("/_census/clear", clear, methods=["POST"]),
    ]
    routes += [r for r in inner.routes if getattr(r, "path", None) != _CHAT]
    return Starlette(routes=routes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The fake provider, counted per task.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--latency-max-ms", type=float, help="uniform between the two")
    args = parser.parse_args(argv)
    latency: FixedLatency | UniformLatency = FixedLatency(ms=args.latency_ms)
    if args.latency_max_ms is not None:
        latency = UniformLatency(min_ms=args.latency_ms, max_ms=args.latency_max_ms)
    app = build_counting_app(FakeLLMConfig(latency=latency))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
