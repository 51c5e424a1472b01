"""The server itself: health, metrics, the audit log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from corral import __version__
from corral.server._deps import Key, Svc
from corral.server._models import MAX_SEQ, AuditLog, ErrorReply, Health

router = APIRouter(tags=["server"])


@router.get("/health", response_model=Health)
async def health() -> dict[str, Any]:
    return {"status": "ok", "version": __version__}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, "4XX": {"model": ErrorReply}},
)
async def metrics(service: Svc, key: Key) -> Response:
    """Prometheus text format."""
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/audit", response_model=AuditLog, responses={"4XX": {"model": ErrorReply}})
async def audit(
    service: Svc,
    key: Key,
    sandbox_id: str | None = None,
    action: str | None = None,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    entries = service.store.audit_log(
        key_id=key.id, sandbox_id=sandbox_id, action=action, limit=limit, after_seq=after
    )
    return {"entries": entries}
