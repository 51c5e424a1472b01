"""The control plane (``/e2b/api``): E2B's REST routes over ``Service``.

``templateID`` names a corral runtime (``corral runtime list``); E2B's stock
templates (``base``, ``code-interpreter-v1``) are the default runtime.
``timeout`` is seconds, ``metadata`` and ``envVars`` are corral's. Sandboxes
use the server's ``default`` policy: no network.
"""

from __future__ import annotations

import datetime
import json
import urllib.parse
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import Response

from corral import _runtime
from corral._errors import CorralError
from corral.server._http import json_reply
from corral.server._live import ServiceError
from corral.server._service import Service
from corral.server._store import ApiKey, SandboxRow

from ._common import ENVD_VERSION, E2bRoute, access_token, unsupported

router = APIRouter(prefix="/e2b/api", route_class=E2bRoute, include_in_schema=False)

_STOCK_TEMPLATES = {"", "base", "code-interpreter-v1", "code-interpreter", "default"}


def _auth(request: Request) -> tuple[Service, ApiKey]:
    service: Service = request.app.state.service
    token = request.headers.get("x-api-key")
    key = service.store.authenticate(token) if token else None
    if key is None:
        raise ServiceError(401, "unauthorized", "Invalid API key: a corral key is required")
    return service, key


def _runtime_for(template: str) -> str:
    if template in _STOCK_TEMPLATES:
        return _runtime.DEFAULT
    try:
        found = _runtime.find(template) is not None
    except CorralError:
        found = False
    if not found:
        raise ServiceError(
            404,
            "not_found",
            f"template {template!r} not found: corral maps templateID to a runtime "
            "(corral runtime list); custom template builds are not supported",
        )
    return template


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


def _created(row: SandboxRow, template: str) -> dict[str, Any]:
    token = access_token(row.id)
    return {
        "templateID": template,
        "sandboxID": row.id,
        "clientID": "corral",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": token,
        "trafficAccessToken": token,
    }


def _listed(row: SandboxRow) -> dict[str, Any]:
    limits = row.policy.get("limits", {})
    return {
        "templateID": row.runtime or "none",
        "sandboxID": row.id,
        "clientID": "corral",
        "startedAt": _iso(row.created_at),
        "endAt": _iso(row.expires_at or row.created_at),
        "cpuCount": int(limits.get("cpu_cores") or 1),
        "memoryMB": (row.memory_bytes or 0) >> 20,
        "diskSizeMB": (row.disk_bytes or 0) >> 20,
        "state": "running",
        "envdVersion": ENVD_VERSION,
        "metadata": row.metadata,
    }


def _running(service: Service, key: ApiKey, sandbox_id: str) -> SandboxRow:
    """The key's running sandbox; ended, another key's or absent: 404 (E2B
    forgets a killed sandbox)."""
    row = service.row(key, sandbox_id)
    if row.state != "running" or sandbox_id not in service.live:
        raise ServiceError(404, "not_found", f"sandbox {sandbox_id} not found")
    return row


@router.post("/sandboxes", status_code=201)
@router.post("/v2/sandboxes", status_code=201)
async def create(request: Request, body: Annotated[dict[str, Any], Body()]) -> Response:
    service, key = _auth(request)
    template = body.get("templateID")
    if not isinstance(template, str):
        raise ServiceError(400, "invalid_request", "templateID: a string is required")
    for field, what in (
        ("volumeMounts", "volume mounts"),
        ("mcp", "MCP gateways"),
        ("network", "network rules (corral sandboxes have no network here)"),
        ("iam", "workload identity (iam)"),
    ):
        if body.get(field):
            raise unsupported(what)
    if body.get("autoPause") or body.get("autoResume"):
        raise unsupported("auto-pause")
    if body.get("allow_internet_access"):
        # deny by default: the E2B API never grants more than the server's default policy
        raise ServiceError(
            403,
            "policy_forbidden",
            "allow_internet_access: corral's E2B API creates sandboxes without network; "
            "use corral's native API with a network policy your key permits",
        )
    timeout = body.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or isinstance(timeout, bool)):
        raise ServiceError(400, "invalid_request", "timeout: seconds, a number")
    metadata, env = body.get("metadata") or {}, body.get("envVars") or {}
    for name, value in (("metadata", metadata), ("envVars", env)):
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ServiceError(400, "invalid_request", f"{name}: an object of strings")
    row = await service.create(
        key,
        policy=service.resolve_policy(None),
        runtime=_runtime_for(template),
        timeout_s=float(timeout) if timeout is not None else None,
        idle_timeout_s=None,
        metadata=metadata,
        env=env,
        network_approval=False,
    )
    return json_reply(_created(row, template), status_code=201)


@router.get("/sandboxes/{sandbox_id}")
async def get_sandbox(request: Request, sandbox_id: str) -> Response:
    service, key = _auth(request)
    row = _running(service, key, sandbox_id)
    return json_reply({**_listed(row), "envdAccessToken": access_token(row.id)})


def _filters(metadata: str | None, state: str | None) -> tuple[dict[str, str], bool]:
    wanted = dict(urllib.parse.parse_qsl(metadata or "", keep_blank_values=True))
    states = {s for s in (state or "running").split(",") if s}
    if not states <= {"running", "paused"}:
        raise ServiceError(400, "invalid_request", f"state: unknown {state!r}")
    return wanted, "running" in states


@router.get("/v2/sandboxes")
async def list_v2(
    request: Request,
    metadata: str | None = None,
    state: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
) -> Response:
    service, key = _auth(request)
    wanted, running = _filters(metadata, state)
    if next_token is not None and not next_token.isdigit():
        raise ServiceError(400, "invalid_request", "nextToken: not a token this server gave")
    rows = (
        service.store.list_sandboxes(
            key_id=key.id,
            state="running",
            metadata=wanted,
            limit=limit,
            before_seq=int(next_token) if next_token else None,
        )
        if running  # no sandbox is ever paused here
        else []
    )
    headers = {"x-next-token": str(rows[-1].seq)} if len(rows) == limit else None
    return Response(
        json.dumps([_listed(r) for r in rows]), media_type="application/json", headers=headers
    )


@router.get("/sandboxes")
async def list_v1(request: Request, metadata: str | None = None) -> Response:
    return await list_v2(request, metadata=metadata, state="running", limit=1000)


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
async def kill(request: Request, sandbox_id: str) -> Response:
    service, key = _auth(request)
    _running(service, key, sandbox_id)
    await service.end(sandbox_id, "closed")
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
async def set_timeout(
    request: Request, sandbox_id: str, timeout: Annotated[float, Body(embed=True)]
) -> Response:
    service, key = _auth(request)
    _running(service, key, sandbox_id)
    service.extend(key, sandbox_id, timeout)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/connect")
@router.post("/v2/sandboxes/{sandbox_id}/connect")
async def connect(
    request: Request,
    sandbox_id: str,
    body: Annotated[dict[str, Any] | None, Body()] = None,
) -> Response:
    service, key = _auth(request)
    row = _running(service, key, sandbox_id)
    timeout = (body or {}).get("timeout")
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0:
        now = datetime.datetime.now(datetime.UTC).timestamp()
        if (row.expires_at or 0) < now + timeout:  # connect never shortens a life, as E2B's
            row = service.extend(key, sandbox_id, float(timeout))
    return json_reply(_created(row, row.runtime or "none"))


@router.api_route(
    "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
)
async def not_supported(request: Request, rest: str) -> Response:
    _auth(request)
    what = {
        "pause": "pause and resume",
        "resume": "pause and resume",
        "metrics": "sandbox metrics",
        "network": "network updates",
        "snapshots": "snapshots",
        "fork": "fork",
        "logs": "sandbox logs",
        "refreshes": "refreshes",
    }
    for part, name in what.items():
        if rest.rstrip("/").endswith(part):
            raise unsupported(name + " (not yet)")
    if rest.startswith(("templates", "v2/templates", "v3/templates", "builds")):
        raise unsupported("templates (custom template builds)")
    if rest.startswith("volumes"):
        raise unsupported("volumes")
    raise unsupported(f"{request.method} /{rest}")
