"""Commands: foreground (one reply, or NDJSON output), background (events, stdin, kill)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from corral import _serial as s
from corral.server._deps import Key, Svc
from corral.server._http import NDJSON, json_reply, ndjson
from corral.server._models import (
    Closed,
    CommandResult,
    ErrorReply,
    Kill,
    Killed,
    ProcessList,
    RunCommand,
    Sent,
    Started,
)

router = APIRouter(
    prefix="/v1/sandboxes/{sandbox_id}/commands",
    tags=["commands"],
    responses={"4XX": {"model": ErrorReply}},
)


@router.post(
    "",
    response_model=CommandResult,
    responses={
        200: {"content": {NDJSON: {}}, "description": "the result, or with stream: events"},
        201: {"model": Started, "description": "background: its pid"},
    },
)
async def run_command(sandbox_id: str, body: RunCommand, service: Svc, key: Key) -> Response:
    service.get_live(key, sandbox_id)  # a status, not an event, for an absent sandbox
    stdin = s.unb64_request(body.stdin, "stdin") if body.stdin is not None else None
    argv = body.command if isinstance(body.command, str) else list(body.command)
    options: dict[str, Any] = {
        "timeout_s": body.timeout_s,
        "env": body.env,
        "cwd": body.cwd,
        "stdin": stdin,
    }
    if body.background:
        async with service.using(key, sandbox_id) as live:
            pid, result = await live.start_background(argv, stdin_open=body.stdin_open, **options)
            return json_reply({"pid": pid, "result": result}, status_code=201)
    if not body.stream:
        async with service.using(key, sandbox_id) as live:
            return json_reply(await live.run_command(argv, **options))

    async def events() -> AsyncIterator[dict[str, Any]]:
        async with service.using(key, sandbox_id) as live:
            async for event in live.stream_command(argv, **options):
                yield event

    return ndjson(events())


@router.get("", response_model=ProcessList)
async def list_commands(sandbox_id: str, service: Svc, key: Key) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        return {"processes": await live.processes()}


@router.get(
    "/{pid}/events", response_class=StreamingResponse, responses={200: {"content": {NDJSON: {}}}}
)
async def command_events(sandbox_id: str, pid: int, service: Svc, key: Key) -> StreamingResponse:
    """A background command's output from its start, then its exit (whose
    result carries no output: it came as events)."""
    return ndjson(service.get_live(key, sandbox_id).follow(pid))


@router.post("/{pid}/stdin", response_model=Sent)
async def send_stdin(
    sandbox_id: str, pid: int, request: Request, service: Svc, key: Key
) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        data = await request.body()
        await live.send_stdin(pid, data)
        return {"sent": len(data)}


@router.post("/{pid}/stdin/close", response_model=Closed)
async def close_stdin(sandbox_id: str, pid: int, service: Svc, key: Key) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        await live.close_stdin(pid)
        return {"closed": True}


@router.post("/{pid}/kill", response_model=Killed)
async def kill_command(
    sandbox_id: str, pid: int, body: Kill, service: Svc, key: Key
) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        return {"killed": await live.kill(pid, body.signal)}
