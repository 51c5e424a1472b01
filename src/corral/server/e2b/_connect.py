"""Connect RPC's JSON codec over HTTP/1.1, server side: unary,
server-streaming and client-streaming, which is all envd's clients use here.

Written here rather than taken from ``connectrpc`` (connect-python): its
server wants classes generated from ``.proto`` files by protoc plugins, and
the schema would be ours to write and compile for two services; the framing
itself is small. Unary: a JSON body in, a JSON body out, errors as an HTTP
status with ``{"code", "message"}``. Server streaming
(``application/connect+json``): messages in 5-byte envelopes (flags, then a
big-endian length), the last one flagged end-of-stream (0x02) carrying
``{}`` or ``{"error": {...}}``. Client streaming: the same envelopes in
the request body, read as they come; the reply is one message and the end.
Compression is refused (the SDKs send none).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from corral.server._http import describe

STREAM_TYPE = "application/connect+json"
_END = 0x02
_MAX_MESSAGE = 1 << 20

# Connect's codes by the HTTP status corral's errors carry, and back
_CODE = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    409: "failed_precondition",
    413: "resource_exhausted",
    429: "resource_exhausted",
    501: "unimplemented",
    502: "unavailable",
    503: "unavailable",
    504: "deadline_exceeded",
    507: "resource_exhausted",
}
_STATUS = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "already_exists": 409,
    "failed_precondition": 412,
    "resource_exhausted": 429,
    "unimplemented": 501,
    "unavailable": 503,
    "deadline_exceeded": 504,
    "internal": 500,
}


class ConnectError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_of(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, ConnectError):
        return {"code": exc.code, "message": str(exc)}
    status, _, message = describe(exc)
    return {"code": _CODE.get(status, "internal"), "message": message}


def _check_encoding(request: Request, header: str) -> None:
    encoding = request.headers.get(header, "identity")
    if encoding != "identity":
        raise ConnectError("unimplemented", f"{header} {encoding!r} is not supported")


def _message(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise ConnectError("invalid_argument", "the request is not JSON") from None
    if not isinstance(data, dict):
        raise ConnectError("invalid_argument", "the request is not a JSON object")
    return data


async def unary_request(request: Request) -> dict[str, Any]:
    _check_encoding(request, "content-encoding")
    return _message(await request.body())


async def stream_request(request: Request) -> dict[str, Any]:
    """The one message of a server-streaming call."""
    _check_encoding(request, "connect-content-encoding")
    body = await request.body()
    if len(body) < 5:
        raise ConnectError("invalid_argument", "a streaming request needs one enveloped message")
    flags, size = struct.unpack(">BI", body[:5])
    if flags != 0 or size != len(body) - 5 or size > _MAX_MESSAGE:
        raise ConnectError("invalid_argument", "malformed envelope (compressed or truncated)")
    return _message(body[5:])


async def stream_messages(request: Request) -> AsyncIterator[dict[str, Any]]:
    """The messages of a client-streaming call, each as its envelope arrives
    (Connect runs client streams over HTTP/1.1: the body is sent chunked,
    the reply follows its end)."""
    _check_encoding(request, "connect-content-encoding")
    buffer = bytearray()
    async for chunk in request.stream():
        buffer += chunk
        while len(buffer) >= 5:
            flags, size = struct.unpack(">BI", buffer[:5])
            if flags != 0 or size > _MAX_MESSAGE:
                raise ConnectError("invalid_argument", "malformed envelope (compressed or too big)")
            if len(buffer) < 5 + size:
                break
            message = _message(bytes(buffer[5 : 5 + size]))
            del buffer[: 5 + size]
            yield message
    if buffer:
        raise ConnectError("invalid_argument", "the request ended inside an envelope")


def unary_reply(message: dict[str, Any]) -> Response:
    return Response(json.dumps(message, separators=(",", ":")), media_type="application/json")


def unary_error(exc: BaseException) -> Response:
    error = error_of(exc)
    return JSONResponse(error, status_code=_STATUS.get(error["code"], 500))


def _envelope(flags: int, message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">BI", flags, len(data)) + data


def stream_reply(messages: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Messages as they come; a failure, before or during, is the end-of-stream
    message's error (Connect answers a streaming call 200 either way)."""

    async def frames() -> AsyncIterator[bytes]:
        end: dict[str, Any] = {}
        try:
            async for message in messages:
                yield _envelope(0, message)
        except Exception as exc:  # the status line is sent: the error ends the stream
            end = {"error": error_of(exc)}
        yield _envelope(_END, end)

    return StreamingResponse(frames(), media_type=STREAM_TYPE)


def stream_error(exc: BaseException) -> StreamingResponse:
    async def nothing() -> AsyncIterator[dict[str, Any]]:
        raise exc
        yield {}  # pragma: no cover  (makes this a generator)

    return stream_reply(nothing())


def keepalive_interval(request: Request) -> float | None:
    """``Keepalive-Ping-Interval`` (seconds), which the SDKs send on their long
    streams so that idle ones are not cut by proxies: 1 s to an hour, else none."""
    value = request.headers.get("keepalive-ping-interval", "")
    return float(min(int(value), 3600)) if value.isdigit() and int(value) >= 1 else None


async def with_keepalive(
    messages: AsyncIterator[dict[str, Any]], interval_s: float | None, ping: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """``messages``, with ``ping`` sent whenever none came for ``interval_s``
    (envd's keepalive events). The source is closed with the stream."""
    if interval_s is None:
        async for message in messages:
            yield message
        return
    source = aiter(messages)
    pending: asyncio.Future[dict[str, Any]] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield ping
                continue
            finished, pending = pending, None
            try:
                message = finished.result()
            except StopAsyncIteration:
                return
            yield message
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
