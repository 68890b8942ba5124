"""Read MCP messages with a size limit, so a huge tool result cannot exhaust memory.

The SDK reads a whole message before anyone can look at it: the stdio transport
joins stdout chunks until a newline with no limit, and the HTTP transport reads a
whole JSON body or SSE event. Capping the rendered text afterwards is too late. Here
every message (a stdio line, a JSON body, an SSE `data:` line) is cut while it is read:
at most `limit` bytes of it are ever held. An oversized message is replaced by a
JSON-RPC error for the same request id (`OUTPUT_TOO_LARGE`), carrying the start of the
text it held, so the connection turns it into a truncated result with a note the
model can read, and the session stays usable.

>>> cap = LineCap(16)
>>> cap.feed(b'{"id":1}\\n')
b'{"id":1}\\n'
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import httpx2
from mcp.client._transport import TransportStreams
from mcp.client.stdio import (
    StdioServerParameters,
    _aclose_all,
    _create_platform_compatible_process,
    _drain_stdout,
    _get_executable_command,
    _parse_line,
    _stop_server_process,
    get_default_environment,
)
from mcp.shared.message import SessionMessage

__all__ = [
    "OUTPUT_TOO_LARGE",
    "BoundedTransport",
    "LineCap",
    "bounded_stdio_client",
    "oversized_reply",
    "read_limit",
]

log = logging.getLogger(__name__)

OUTPUT_TOO_LARGE = -32099  # implementation-defined JSON-RPC server error: ours
MIN_READ_LIMIT = 4 * 1024 * 1024
_ID = re.compile(rb'"id"\s*:\s*(-?\d+|"(?:[^"\\]|\\.)*")')
_TEXT = re.compile(rb'"text"\s*:\s*"')
_SSE_DATA = b"data:"


def read_limit(max_output_chars: int) -> int:
    """Bytes one message may take: room for the capped text JSON-escaped, and for big
    listings, never less than `MIN_READ_LIMIT`."""
    return max(MIN_READ_LIMIT, 16 * max_output_chars)


def oversized_reply(prefix: bytes, size: int, limit: int) -> bytes | None:
    """The JSON-RPC error that stands in for a message cut at `limit` bytes of `size`.

    None when the prefix names no request id (a server request or notification: it is
    dropped, nobody waits for it).
    """
    head = prefix.split(b'"result"', 1)[0]  # the response's own id comes before its result
    found = _ID.search(head)
    if found is None:
        return None
    error = {
        "code": OUTPUT_TOO_LARGE,
        "message": f"the answer exceeded the {limit}-byte read limit ({size} bytes or more)",
        "data": {"text": _leading_text(prefix), "bytes": size, "limit": limit},
    }
    request_id: Any = json.loads(found.group(1))
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}).encode()


def _leading_text(prefix: bytes) -> str:
    """The first `"text"` string of a cut message, as far as it got."""
    found = _TEXT.search(prefix)
    if found is None:
        return ""
    raw = prefix[found.end() :]
    end = re.search(rb'(?<!\\)(?:\\\\)*"', raw)
    if end is not None:
        raw = raw[: end.end() - 1]
    for trim in range(0, 7):  # an escape or a UTF-8 sequence may be cut in half
        try:
            return str(json.loads(b'"' + raw[: len(raw) - trim] + b'"'))
        except ValueError:
            continue
    return ""


class LineCap:
    """Passes lines through; a line longer than `limit` bytes is replaced as it is read.

    Holds at most `limit` bytes of any line. `data:` lines (SSE) keep their prefix.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._line = bytearray()  # the current line, while it still fits
        self._over = 0  # > 0: the current line is over the limit; bytes seen so far

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        while chunk:
            newline = chunk.find(b"\n")
            part, chunk = (chunk, b"") if newline < 0 else (chunk[:newline], chunk[newline + 1 :])
            self._take(part)
            if newline >= 0:
                out += self._end_line() + b"\n"
        return bytes(out)

    def finish(self) -> bytes:
        """End of stream: the last line, which had no newline (a JSON body)."""
        if not self._line and not self._over:
            return b""
        return self._end_line()

    def _take(self, part: bytes) -> None:
        if self._over:
            self._over += len(part)
            return
        if len(self._line) + len(part) <= self.limit:
            self._line += part
            return
        room = self.limit - len(self._line)
        self._line += part[:room]
        self._over = len(self._line) + len(part) - room

    def _end_line(self) -> bytes:
        line, over = bytes(self._line), self._over
        self._line.clear()
        self._over = 0
        if not over:
            return line
        sse = line.startswith(_SSE_DATA)
        body = line[len(_SSE_DATA) :].lstrip() if sse else line
        reply = oversized_reply(body, over, self.limit)
        log.warning("mcp: a %d-byte message exceeded the %d-byte read limit", over, self.limit)
        if reply is None:
            return b""
        return (_SSE_DATA + b" " + reply) if sse else reply


class _CappedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        cap = LineCap(self._limit)
        async for chunk in self._inner:
            out = cap.feed(chunk)
            if out:
                yield out
        tail = cap.finish()
        if tail:
            yield tail

    async def aclose(self) -> None:
        await self._inner.aclose()


class BoundedTransport(httpx2.AsyncBaseTransport):
    """An httpx transport whose response bodies are read through a `LineCap`.

    Send `Accept-Encoding: identity` with it: the cap reads the bytes as sent.
    """

    def __init__(self, inner: httpx2.AsyncBaseTransport, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        headers = [(k, v) for k, v in response.headers.raw if k.lower() != b"content-length"]
        return httpx2.Response(
            response.status_code,
            headers=headers,
            stream=_CappedStream(response.stream, self._limit),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


@asynccontextmanager
async def bounded_stdio_client(
    server: StdioServerParameters, limit: int
) -> AsyncGenerator[TransportStreams, None]:
    """The SDK's `stdio_client`, reading stdout through a `LineCap`.

    The same spawn, pipes and shutdown sequence (the SDK's own helpers); only the
    reader differs, because the SDK's buffers a line without limit.
    """
    command = await _get_executable_command(server.command)
    process = await _create_platform_compatible_process(
        command=command,
        args=server.args,
        env=get_default_environment() | (server.env or {}),
        errlog=sys.stderr,
        cwd=server.cwd,
    )
    reader_send, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, writer_receive = anyio.create_memory_object_stream[SessionMessage](0)
    writer_done = anyio.Event()

    async def stdout_reader() -> None:
        assert process.stdout is not None
        cap = LineCap(limit)
        pending = b""
        try:
            async with reader_send:
                try:
                    async for chunk in process.stdout:
                        lines = (pending + cap.feed(chunk)).split(b"\n")
                        pending = lines.pop()
                        for line in lines:
                            if not line:
                                continue
                            text = line.decode(server.encoding, server.encoding_error_handler)
                            try:
                                await reader_send.send(_parse_line(text))
                            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                                return
                finally:
                    await _drain_stdout(process)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, ConnectionError):
            pass  # shutdown closed the pipe under the read; the session sees the close

    async def stdin_writer() -> None:
        assert process.stdin is not None
        try:
            async with writer_receive:
                async for message in writer_receive:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                    await process.stdin.send(
                        (data + "\n").encode(server.encoding, server.encoding_error_handler)
                    )
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            await reader_send.aclose()
        finally:
            writer_done.set()

    async with anyio.create_task_group() as group:
        group.start_soon(stdout_reader)
        group.start_soon(stdin_writer)
        try:
            yield read_stream, write_stream
        finally:
            with anyio.CancelScope(shield=True):
                read_stream.close()
                write_stream.close()
                with anyio.move_on_after(0.5):
                    await writer_done.wait()
                await _stop_server_process(process)
                await _aclose_all(read_stream, write_stream, reader_send, writer_receive)
                await anyio.lowlevel.checkpoint()
            group.cancel_scope.cancel()
