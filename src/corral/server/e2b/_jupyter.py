"""The code interpreter's protocol (port 49999) over corral's ``run_code``:
``/execute`` streams NDJSON events (stdout, stderr, result, error, the
execution count, end of execution, keepalives); ``/contexts`` creates, lists, restarts
and removes contexts. A client that goes away ends its cell (the stream's
generator is closed, which interrupts it)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import Response, StreamingResponse

from corral.server._http import NDJSON, describe, json_reply
from corral.server._live import ServiceError
from corral.server._service import Service

from . import _connect as c
from ._common import HOME, JUPYTER_PORT, E2bRoute, cwd_to_box, sandbox_live

router = APIRouter(prefix="/e2b/sandbox", route_class=E2bRoute, include_in_schema=False)

_LANGUAGES = {None: "python", "python": "python", "python3": "python"}
KEEPALIVE_S = 30.0
"""A ``keepalive`` line when a cell is silent this long (or at the request's
``Keepalive-Ping-Interval``), so that idle-timing proxies keep the stream."""


def _language(name: str | None) -> str:
    return _LANGUAGES.get(name, name or "python")


def _event(data: dict[str, Any]) -> dict[str, Any] | None:
    kind = data["type"]
    if kind in ("stdout", "stderr"):
        return {"type": kind, "text": data["text"], "timestamp": time.time_ns() // 1000}
    if kind == "result":
        result = {k: v for k, v in data["result"].items() if k != "extra" or v}
        return {"type": "result", **result}
    if kind == "error":
        error = data["error"]
        return {
            "type": "error",
            "name": error["name"],
            "value": error["value"],
            "traceback": error["traceback"],
        }
    return None


@router.post("/execute")
async def execute(request: Request, body: Annotated[dict[str, Any], Body()]) -> Response:
    live = sandbox_live(request, JUPYTER_PORT)
    code = body.get("code")
    if not isinstance(code, str):
        return json_reply({"code": 400, "message": "code: a string is required"}, 400)
    envs = body.get("env_vars") or None  # for this execution only, as E2B's
    if envs is not None and not (
        isinstance(envs, dict) and all(isinstance(v, str) for v in envs.values())
    ):
        raise ServiceError(400, "invalid_request", "env_vars must map names to strings")
    context = live.context(body.get("context_id"))
    language = context.language if context is not None else _language(body.get("language"))
    service: Service = request.app.state.service

    async def events() -> AsyncIterator[dict[str, Any]]:
        try:
            async with service.using(live.key, live.id) as used:
                async for data in used.stream_code(code, language, context, envs, None):
                    if data["type"] == "done":
                        count = data["execution"].get("execution_count")
                        if count is not None:
                            yield {"type": "number_of_executions", "execution_count": count}
                        yield {"type": "end_of_execution"}
                        continue
                    event = _event(data)
                    if event is not None:
                        yield event
        except Exception as exc:  # the status line is sent: the failure is the cell's error
            _, code_name, message = describe(exc)
            yield {"type": "error", "name": code_name, "value": message, "traceback": ""}

    async def lines() -> AsyncIterator[bytes]:
        # a silent cell still sends a line now and then (the SDKs skip unknown types)
        interval = c.keepalive_interval(request) or KEEPALIVE_S
        async for event in c.with_keepalive(events(), interval, {"type": "keepalive"}):
            yield _line(event)

    return StreamingResponse(lines(), media_type=NDJSON)


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def _context(data: dict[str, Any]) -> dict[str, Any]:
    return {"id": data["id"], "language": data["language"], "cwd": data.get("cwd") or HOME}


@router.post("/contexts")
async def create_context(request: Request, body: Annotated[dict[str, Any], Body()]) -> Response:
    live = sandbox_live(request, JUPYTER_PORT)
    service: Service = request.app.state.service
    async with service.using(live.key, live.id) as used:
        cwd = cwd_to_box(used, body.get("cwd"))
        return json_reply(_context(await used.create_context(_language(body.get("language")), cwd)))


@router.get("/contexts")
async def list_contexts(request: Request) -> Response:
    live = sandbox_live(request, JUPYTER_PORT)
    contexts = [
        {"id": c.id, "language": c.language, "cwd": c.cwd or HOME} for c in live.contexts.values()
    ]
    return Response(json.dumps(contexts), media_type="application/json")


@router.post("/contexts/{context_id}/restart")
async def restart_context(request: Request, context_id: str) -> Response:
    live = sandbox_live(request, JUPYTER_PORT)
    service: Service = request.app.state.service
    async with service.using(live.key, live.id) as used:
        await used.restart_context(context_id)
    return Response(status_code=204)


@router.delete("/contexts/{context_id}")
async def remove_context(request: Request, context_id: str) -> Response:
    live = sandbox_live(request, JUPYTER_PORT)
    service: Service = request.app.state.service
    async with service.using(live.key, live.id) as used:
        await used.remove_context(context_id)
    return Response(status_code=204)
