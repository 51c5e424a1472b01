"""Network: the proxy's decisions, live rule changes, approvals of unnamed hosts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from corral.server._deps import Key, Svc
from corral.server._models import (
    Answer,
    Answered,
    Approvals,
    ErrorReply,
    NetworkEvents,
    Rules,
    RulesReply,
)

router = APIRouter(
    prefix="/v1/sandboxes/{sandbox_id}/network",
    tags=["network"],
    responses={"4XX": {"model": ErrorReply}},
)


@router.get("/events", response_model=NetworkEvents)
async def network_events(sandbox_id: str, service: Svc, key: Key) -> dict[str, Any]:
    return {"events": await service.get_live(key, sandbox_id).network_events()}


@router.put("/rules", response_model=RulesReply)
async def update_rules(sandbox_id: str, body: Rules, service: Svc, key: Key) -> dict[str, Any]:
    live = service.get_live(key, sandbox_id)
    if body.allow is not None:
        service.check_rules(body.allow)
    return await live.update_rules(body.allow, body.deny)


@router.get("/approvals", response_model=Approvals)
async def approvals(
    sandbox_id: str,
    service: Svc,
    key: Key,
    wait_s: Annotated[float, Query(ge=0, le=60)] = 0,
) -> dict[str, Any]:
    """Hosts waiting for an answer (long-polls up to ``wait_s`` for the first)."""
    live = service.get_live(key, sandbox_id)
    return {"approvals": await live.pending_approvals(wait_s)}


@router.post("/approvals/{approval_id}", response_model=Answered)
async def answer(
    sandbox_id: str, approval_id: str, body: Answer, service: Svc, key: Key
) -> dict[str, Any]:
    service.get_live(key, sandbox_id).answer(approval_id, body.allow)
    return {"id": approval_id, "allow": body.allow}
