"""Code: run cells (one JSON reply, or NDJSON events), contexts, prewarming."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from corral.server._deps import Key, Svc
from corral.server._http import NDJSON, json_reply, ndjson
from corral.server._models import (
    CodeContext,
    CodeContexts,
    ErrorReply,
    Execution,
    NewContext,
    Prewarm,
    PrewarmReply,
    Removed,
    RunCode,
)

router = APIRouter(
    prefix="/v1/sandboxes/{sandbox_id}", tags=["code"], responses={"4XX": {"model": ErrorReply}}
)

_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {NDJSON: {}}, "description": "the execution, or with stream: events"}
}


@router.post("/code", response_model=Execution, responses=_STREAM)
async def run_code(sandbox_id: str, body: RunCode, service: Svc, key: Key) -> Response:
    # checked before a stream starts: a missing sandbox or context is a status, not an event
    context = service.get_live(key, sandbox_id).context(body.context_id)
    if not body.stream:
        async with service.using(key, sandbox_id) as live:
            execution = await live.run_code(
                body.code, body.language, context, body.envs, body.timeout_s
            )
            return json_reply(execution)

    async def events() -> AsyncIterator[dict[str, Any]]:
        async with service.using(key, sandbox_id) as live:
            async for event in live.stream_code(
                body.code, body.language, context, body.envs, body.timeout_s
            ):
                yield event

    return ndjson(events())


@router.post("/contexts", status_code=201, response_model=CodeContext)
async def create_context(
    sandbox_id: str, body: NewContext, service: Svc, key: Key
) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        return await live.create_context(body.language, body.cwd)


@router.get("/contexts", response_model=CodeContexts)
async def list_contexts(sandbox_id: str, service: Svc, key: Key) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        return {"contexts": await live.list_contexts()}


@router.post("/contexts/{context_id}/restart", response_model=CodeContext)
async def restart_context(
    sandbox_id: str, context_id: str, service: Svc, key: Key
) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        return await live.restart_context(context_id)


@router.delete("/contexts/{context_id}", response_model=Removed)
async def remove_context(
    sandbox_id: str, context_id: str, service: Svc, key: Key
) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        await live.remove_context(context_id)
        return {"removed": context_id}


@router.post("/prewarm", response_model=PrewarmReply)
async def prewarm(sandbox_id: str, body: Prewarm, service: Svc, key: Key) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        await live.prewarm(body.language)
        return {"language": body.language}
