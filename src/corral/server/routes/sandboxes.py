"""Sandboxes: create, list, read, usage, extend, pause/resume, close, purge a workspace."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from corral.server._deps import Key, Svc
from corral.server._live import ServiceError
from corral.server._models import (
    MAX_SEQ,
    CreateSandbox,
    ErrorReply,
    SandboxInfo,
    SandboxList,
    Timeout,
    UsageReport,
)

router = APIRouter(
    prefix="/v1/sandboxes", tags=["sandboxes"], responses={"4XX": {"model": ErrorReply}}
)


@router.post("", status_code=201, response_model=SandboxInfo)
async def create_sandbox(body: CreateSandbox, service: Svc, key: Key) -> dict[str, Any]:
    policy = service.resolve_policy(body.policy)
    row = await service.create(
        key,
        policy=policy,
        runtime=body.runtime,
        timeout_s=body.timeout_s,
        idle_timeout_s=body.idle_timeout_s,
        metadata=body.metadata,
        env=body.env,
        network_approval=body.network_approval,
    )
    return service.info(row)


@router.get("", response_model=SandboxList)
async def list_sandboxes(
    service: Svc,
    key: Key,
    state: Literal["running", "ended"] | None = None,
    metadata: Annotated[list[str] | None, Query(description="key=value, repeatable")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
) -> dict[str, Any]:
    wanted: dict[str, str] = {}
    for item in metadata or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ServiceError(400, "invalid_request", "metadata: expected key=value")
        wanted[name] = value
    rows = service.store.list_sandboxes(
        key_id=key.id, state=state, metadata=wanted, limit=limit, before_seq=cursor
    )
    return {
        "sandboxes": [service.info(r) for r in rows],
        "next_cursor": rows[-1].seq if len(rows) == limit else None,
    }


@router.get("/{sandbox_id}", response_model=SandboxInfo)
async def get_sandbox(sandbox_id: str, service: Svc, key: Key) -> dict[str, Any]:
    return service.info(service.row(key, sandbox_id))


@router.get("/{sandbox_id}/metrics", response_model=UsageReport)
async def sandbox_metrics(
    sandbox_id: str,
    service: Svc,
    key: Key,
    since: Annotated[float | None, Query(description="only samples after this Unix time")] = None,
) -> dict[str, Any]:
    """The sandbox's recent usage (CPU, memory, pids, disk) as a time series,
    oldest first; the peer of E2B's ``GET /sandboxes/{id}/metrics``."""
    return service.usage_report(key, sandbox_id, since)


@router.post("/{sandbox_id}/timeout", response_model=SandboxInfo)
async def set_timeout(sandbox_id: str, body: Timeout, service: Svc, key: Key) -> dict[str, Any]:
    return service.info(service.extend(key, sandbox_id, body.timeout_s))


@router.post("/{sandbox_id}/pause", response_model=SandboxInfo)
async def pause_sandbox(sandbox_id: str, service: Svc, key: Key) -> dict[str, Any]:
    """Freeze the sandbox in place (no CPU; memory and lifetime keep counting)."""
    await service.get_live(key, sandbox_id).sandbox.pause()
    return service.info(service.row(key, sandbox_id))


@router.post("/{sandbox_id}/resume", response_model=SandboxInfo)
async def resume_sandbox(sandbox_id: str, service: Svc, key: Key) -> dict[str, Any]:
    """Let a paused sandbox run again."""
    await service.get_live(key, sandbox_id).sandbox.resume()
    return service.info(service.row(key, sandbox_id))


@router.delete("/{sandbox_id}", response_model=SandboxInfo)
async def close_sandbox(sandbox_id: str, service: Svc, key: Key) -> dict[str, Any]:
    service.row(key, sandbox_id)
    await service.end(sandbox_id, "closed")
    return service.info(service.row(key, sandbox_id))


@router.delete("/{sandbox_id}/workspace", response_model=SandboxInfo)
async def delete_workspace(sandbox_id: str, service: Svc, key: Key) -> dict[str, Any]:
    """Remove an ended sandbox's workspace now (its record stays): it stops
    counting against the key's disk quota. 409 while the sandbox runs."""
    return service.info(await service.delete_workspace(key, sandbox_id))
