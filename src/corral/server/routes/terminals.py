"""Terminals: the ``PtyHandle`` calls, one request each (``read`` long-polls)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from corral import _serial as s
from corral.server._deps import Key, Svc
from corral.server._http import json_reply
from corral.server._models import (
    CommandResult,
    ErrorReply,
    Killed,
    NewPty,
    Sent,
    Size,
    Terminal,
    TerminalOutput,
    TerminalSize,
)

router = APIRouter(
    prefix="/v1/sandboxes/{sandbox_id}/pty",
    tags=["terminals"],
    responses={"4XX": {"model": ErrorReply}},
)


@router.post("", status_code=201, response_model=Terminal)
async def create_pty(sandbox_id: str, body: NewPty, service: Svc, key: Key) -> dict[str, Any]:
    argv = body.command if isinstance(body.command, str) else list(body.command)
    async with service.using(key, sandbox_id) as live:
        pid = await live.open_terminal(body.cols, body.rows, argv, body.env, body.cwd)
        return {"pid": pid}


@router.post("/{pid}/input", response_model=Sent)
async def pty_input(
    sandbox_id: str, pid: int, request: Request, service: Svc, key: Key
) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        data = await request.body()
        await live.terminal(pid).send(data)
        return {"sent": len(data)}


@router.get("/{pid}/output", response_model=TerminalOutput)
async def pty_output(
    sandbox_id: str,
    pid: int,
    service: Svc,
    key: Key,
    timeout_s: Annotated[float, Query(ge=0, le=60)] = 30,
) -> dict[str, Any]:
    """The next output (b"" with ``eof`` once it ended); ``timed_out`` when
    nothing came within ``timeout_s`` (ask again: nothing is lost)."""
    async with service.using(key, sandbox_id) as live:
        data = await live.read_terminal(pid, timeout_s)
    if data is None:
        return {"data": "", "eof": False, "timed_out": True}
    return {"data": s.b64(data), "eof": not data, "timed_out": False}


@router.post("/{pid}/resize", response_model=TerminalSize)
async def pty_resize(
    sandbox_id: str, pid: int, body: Size, service: Svc, key: Key
) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        await live.terminal(pid).resize(body.cols, body.rows)
        return {"cols": body.cols, "rows": body.rows}


@router.post("/{pid}/kill", response_model=Killed)
async def pty_kill(sandbox_id: str, pid: int, service: Svc, key: Key) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        await live.terminal(pid).kill()
        return {"killed": True}


@router.post("/{pid}/wait", response_model=CommandResult)
async def pty_wait(sandbox_id: str, pid: int, service: Svc, key: Key) -> Response:
    async with service.using(key, sandbox_id) as live:
        return json_reply(await live.wait_terminal(pid))
