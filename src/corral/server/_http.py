"""What every route shares: JSON errors, fast JSON replies, NDJSON streams, the body limit.

Errors are ``{"error": {"code", "message"}}``: the service's refusals carry
their own status and code, the library's exceptions are named by
``corral._errors.WIRE`` (the table the client reads back), and anything else
is ``internal`` with an incident id to find it in the server log, never a
stack trace or a host path.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral._errors import CorralError, PolicyError, to_wire

from ._live import ServiceError

log = logging.getLogger("corral.serve")
NDJSON = "application/x-ndjson"


def describe(exc: BaseException) -> tuple[int, str, str]:
    """Status, stable code and a client-safe message for an exception."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.code, str(exc)
    wire = to_wire(exc)
    if wire is not None:
        return wire
    incident = secrets.token_hex(4)
    log.error("internal error %s", incident, exc_info=exc)
    return 500, "internal", f"internal error (incident {incident} in the server log)"


def json_reply(data: dict[str, Any], status_code: int = 200) -> Response:
    """A reply already made of JSON types: serialized once, without FastAPI's walk."""
    return Response(
        json.dumps(data, separators=(",", ":")),
        status_code=status_code,
        media_type="application/json",
    )


def ndjson(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """One JSON object a line; a failure mid-stream is the last event."""

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield json.dumps(event, separators=(",", ":")).encode() + b"\n"
        except Exception as exc:  # the status line is sent: the error is the last event
            _, code, message = describe(exc)
            yield json.dumps(
                {"type": "error", "error": {"code": code, "message": message}}
            ).encode()
            yield b"\n"

    return StreamingResponse(lines(), media_type=NDJSON)


def install_error_handlers(app: FastAPI) -> None:
    def reply(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": code, "message": message, **extra}}, status_code=status
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return reply(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}", field=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return reply(exc.status_code, code, str(exc.detail))

    # the expected failures, answered by the exception middleware (no traceback logged)
    @app.exception_handler(CorralError)
    @app.exception_handler(OSError)
    @app.exception_handler(ValueError)
    # anything else: logged with an incident id, answered without details
    @app.exception_handler(Exception)
    async def anything(_request: Request, exc: Exception) -> JSONResponse:
        status, code, message = describe(exc)
        extra = {"field": exc.field} if isinstance(exc, PolicyError) else {}
        return reply(status, code, message, **extra)


Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class BodyLimit:
    """Request bodies beyond ``max_bytes`` are refused (413) before they are
    buffered; file uploads have their own, larger limit, and envd's
    ``StreamInput`` is read as it comes (a stream of bounded messages)."""

    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or path.endswith("/files/content")
            or path == "/e2b/sandbox/files"
            or path == "/e2b/sandbox/process.Process/StreamInput"
        ):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
        # read (at most max_bytes of) the body first, then hand it on: an
        # oversized chunked body gets its 413 like one with a Content-Length
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps(
        {"error": {"code": "too_large", "message": f"request bodies are limited to {limit} bytes"}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
