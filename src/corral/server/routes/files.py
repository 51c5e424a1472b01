"""Files: upload, download, list, stat, remove, mkdir, rename. An ended
sandbox's workspace stays readable (read on the host) until it is purged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from corral import _serial as s
from corral.server._deps import Key, Svc
from corral.server._live import ServiceError
from corral.server._models import (
    Created,
    Entry,
    EntryList,
    ErrorReply,
    PathBody,
    Removed,
    Rename,
    Renamed,
    Written,
)

router = APIRouter(
    prefix="/v1/sandboxes/{sandbox_id}/files",
    tags=["files"],
    responses={"4XX": {"model": ErrorReply}},
)
_BYTES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "the file's bytes"}
}


@router.put("/content", response_model=Written)
async def upload(
    sandbox_id: str,
    request: Request,
    service: Svc,
    key: Key,
    path: str,
    mode: Annotated[int, Query(ge=0, le=0o777)] = 0o644,
) -> dict[str, Any]:
    limit = service.config.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, "too_large", f"uploads are limited to {limit} bytes")

    async def body() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:  # the agent drops the temp file: nothing half-written stays
                raise ServiceError(413, "too_large", f"uploads are limited to {limit} bytes")
            if chunk:
                yield chunk

    async with service.using(key, sandbox_id) as live:
        size = await live.write_file(path, body(), mode)
        return {"path": path, "size": size}


@router.get("/content", response_class=StreamingResponse, responses=_BYTES)
async def download(sandbox_id: str, service: Svc, key: Key, path: str) -> StreamingResponse:
    """The size comes first, in ``X-Corral-Size``."""
    ended = service.ended_workspace(key, sandbox_id)
    if ended is not None:
        data, size = await service.read_ended(ended, path)
        return _bytes(data, size)
    async with service.using(key, sandbox_id) as live:
        reader = await live.sandbox.files.open_read(path)

    async def chunks() -> AsyncIterator[bytes]:
        async with reader:
            async for chunk in reader:
                yield chunk

    return _bytes(chunks(), reader.size)


def _bytes(chunks: Any, size: int) -> StreamingResponse:
    return StreamingResponse(
        chunks, media_type="application/octet-stream", headers={"X-Corral-Size": str(size)}
    )


@router.get("", response_model=EntryList)
async def list_files(sandbox_id: str, service: Svc, key: Key, path: str = ".") -> dict[str, Any]:
    ended = service.ended_workspace(key, sandbox_id)
    if ended is not None:
        entries = await service.list_ended(ended, path)
    else:
        async with service.using(key, sandbox_id) as live:
            entries = await live.sandbox.files.list(path)
    return {"entries": [s.entry_to_dict(e) for e in entries]}


@router.get("/stat", response_model=Entry)
async def stat_file(sandbox_id: str, service: Svc, key: Key, path: str) -> dict[str, Any]:
    ended = service.ended_workspace(key, sandbox_id)
    if ended is not None:
        return s.entry_to_dict(await service.stat_ended(ended, path))
    async with service.using(key, sandbox_id) as live:
        return s.entry_to_dict(await live.sandbox.files.stat(path))


@router.delete("", response_model=Removed)
async def remove_file(sandbox_id: str, service: Svc, key: Key, path: str) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        await live.sandbox.files.remove(path)
        return {"removed": path}


@router.post("/mkdir", response_model=Created)
async def mkdir(sandbox_id: str, body: PathBody, service: Svc, key: Key) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        await live.sandbox.files.mkdir(body.path)
        return {"created": body.path}


@router.post("/rename", response_model=Renamed)
async def rename(sandbox_id: str, body: Rename, service: Svc, key: Key) -> dict[str, Any]:
    async with service.using(key, sandbox_id) as live:
        await live.sandbox.files.rename(body.src, body.dst)
        return {"renamed": body.dst}
