"""The control plane (``/e2b/api``): E2B's REST routes over ``Service``.

``templateID`` names a corral runtime (``corral runtime list``); E2B's stock
templates (``base``, ``code-interpreter-v1``) are the default runtime.
``timeout`` is seconds, ``metadata`` and ``envVars`` are corral's. Sandboxes
use the server's ``default`` policy (no network), or allowlist mode with the
rules of ``network.allowOut``/``denyOut``. Pause is the freezer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import math
import os
import urllib.parse
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import Response

from corral import _runtime
from corral._errors import CorralError
from corral.server import _internals
from corral.server._http import json_reply
from corral.server._live import Live, ServiceError
from corral.server._service import Service
from corral.server._store import ApiKey, SandboxRow

from ._common import ENVD_VERSION, E2bRoute, access_token, unsupported

router = APIRouter(prefix="/e2b/api", route_class=E2bRoute, include_in_schema=False)

_STOCK_TEMPLATES = {"", "base", "code-interpreter-v1", "code-interpreter", "default"}


def _auth(request: Request) -> tuple[Service, ApiKey]:
    service: Service = request.app.state.service
    token = request.headers.get("x-api-key") or ""
    if token.startswith("e2b_"):  # a corral key in E2B's key format, for the SDKs that check it
        with contextlib.suppress(ValueError):
            token = bytes.fromhex(token[4:]).decode()
    key = service.store.authenticate(token) if token else None
    if key is None:
        raise ServiceError(
            401, "unauthorized", "Invalid API key: a corral key (or 'e2b_' and its hex) is required"
        )
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


def _state(service: Service, sandbox_id: str) -> str:
    live = service.live.get(sandbox_id)
    return "paused" if live is not None and _internals.paused(live.sandbox) else "running"


def _listed(row: SandboxRow, state: str = "running") -> dict[str, Any]:
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
        "state": state,
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


def _rules(network: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``allowOut``/``denyOut`` as corral's allowlist rules (hosts, ``host:port``,
    addresses, CIDRs); every other egress field is refused, never ignored."""
    for field, value in network.items():
        if field not in ("allowOut", "denyOut") and value not in (None, [], {}):
            raise unsupported(f"network.{field}")
    lists = []
    for name in ("allowOut", "denyOut"):
        value = network.get(name) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ServiceError(400, "invalid_request", f"network.{name}: a list of strings")
        lists.append(value)
    return lists[0], lists[1]


def _network_policy(network: object) -> dict[str, Any] | None:
    """No ``network``: the server's default policy (no network). With
    ``allowOut``: corral's allowlist mode with those rules, checked as the
    native API checks them (no loopback or private ranges unless the server
    allows them)."""
    if not network:
        return None
    if not isinstance(network, dict):
        raise ServiceError(400, "invalid_request", "network: an object")
    allow, deny = _rules(network)
    return {"network": {"mode": "allowlist", "allow": allow, "deny": deny}}


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
        ("iam", "workload identity (iam)"),
    ):
        if body.get(field):
            raise unsupported(what)
    resume = body.get("autoResume")
    if body.get("autoPause") or (resume.get("enabled") if isinstance(resume, dict) else resume):
        raise unsupported("auto-pause")
    # allow_internet_access is never more than the policy below (no network, or
    # the allowlist network.allowOut names): corral's E2B API does not open the
    # internet to a box. The detail reports allowInternetAccess false. Refusing
    # it would refuse every create of the Python SDKs before 2.3x, which send
    # True by default.
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
        policy=service.resolve_policy(_network_policy(body.get("network"))),
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
    detail = {**_listed(row, _state(service, row.id)), "envdAccessToken": access_token(row.id)}
    live = service.live.get(row.id)
    if live is not None:  # the rules in force now (update_network changes them)
        net = live.sandbox.policy.network
        detail["allowInternetAccess"] = False
        if net.mode == "allowlist":
            detail["network"] = {"allowOut": list(net.allow), "denyOut": list(net.deny)}
    return json_reply(detail)


def _filters(metadata: str | None, state: str | None) -> tuple[dict[str, str], set[str]]:
    wanted = dict(urllib.parse.parse_qsl(metadata or "", keep_blank_values=True))
    states = {s for s in (state or "running,paused").split(",") if s}
    if not states <= {"running", "paused"}:
        raise ServiceError(400, "invalid_request", f"state: unknown {state!r}")
    return wanted, states


@router.get("/v2/sandboxes")
async def list_v2(
    request: Request,
    metadata: str | None = None,
    state: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
) -> Response:
    """Newest first; ``state`` filters on running and paused (the freezer), and
    ``x-next-token`` is the sequence number to continue below."""
    service, key = _auth(request)
    wanted, states = _filters(metadata, state)
    if next_token is not None and not next_token.isdigit():
        raise ServiceError(400, "invalid_request", "nextToken: not a token this server gave")
    found: list[tuple[SandboxRow, str]] = []
    cursor = int(next_token) if next_token else None
    while len(found) < limit:
        rows = service.store.list_sandboxes(
            key_id=key.id, state="running", metadata=wanted, limit=limit, before_seq=cursor
        )
        for row in rows:
            row_state = _state(service, row.id)
            if row_state in states:
                found.append((row, row_state))
                if len(found) == limit:
                    break
        if len(rows) < limit:
            break
        cursor = rows[-1].seq
    headers = {"x-next-token": str(found[-1][0].seq)} if len(found) == limit else None
    return Response(
        json.dumps([_listed(row, row_state) for row, row_state in found]),
        media_type="application/json",
        headers=headers,
    )


@router.get("/sandboxes")
async def list_v1(request: Request, metadata: str | None = None) -> Response:
    return await list_v2(request, metadata=metadata, state="running,paused", limit=1000)


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


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204)
async def pause(request: Request, sandbox_id: str) -> Response:
    """Freeze the sandbox in place (corral's ``pause``: the cgroup freezer).
    Its processes, memory and files stay as they are; unlike E2B's pause
    nothing is written to disk, so a paused sandbox still holds its memory,
    counts against quotas, and its timeout keeps running. 409 when already
    paused, as E2B answers (the SDK's ``pause`` then returns False)."""
    service, key = _auth(request)
    _running(service, key, sandbox_id)
    async with _paused_change(service, key, sandbox_id) as live:
        if _internals.paused(live.sandbox):
            raise ServiceError(409, "conflict", f"sandbox {sandbox_id} is already paused")
        await live.sandbox.pause()
        live.audit("sandbox.pause")
    return Response(status_code=204)


async def _resume(service: Service, key: ApiKey, sandbox_id: str) -> bool:
    """Thaw a paused sandbox; False if it was running."""
    async with _paused_change(service, key, sandbox_id) as live:
        if not _internals.paused(live.sandbox):
            return False
        await live.sandbox.resume()
        live.audit("sandbox.resume")
        return True


@contextlib.asynccontextmanager
async def _paused_change(service: Service, key: ApiKey, sandbox_id: str) -> AsyncIterator[Live]:
    live = service.get_live(key, sandbox_id)
    lock = _PAUSE_LOCKS.setdefault(sandbox_id, asyncio.Lock())
    try:
        async with lock:
            yield live
    finally:
        if not lock.locked():
            _PAUSE_LOCKS.pop(sandbox_id, None)


_PAUSE_LOCKS: dict[str, asyncio.Lock] = {}


def _extend(service: Service, key: ApiKey, row: SandboxRow, timeout: object) -> SandboxRow:
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0:
        now = datetime.datetime.now(datetime.UTC).timestamp()
        if (row.expires_at or 0) < now + timeout:  # never shortens a life, as E2B's
            return service.extend(key, row.id, float(timeout))
    return row


@router.post("/sandboxes/{sandbox_id}/resume", status_code=201)
async def resume(
    request: Request,
    sandbox_id: str,
    body: Annotated[dict[str, Any] | None, Body()] = None,
) -> Response:
    """Thaw a paused sandbox (the older SDKs' ``resume``); 409 when it runs."""
    service, key = _auth(request)
    row = _running(service, key, sandbox_id)
    if not await _resume(service, key, sandbox_id):
        raise ServiceError(409, "conflict", f"sandbox {sandbox_id} is already running")
    row = _extend(service, key, row, (body or {}).get("timeout"))
    return json_reply(_created(row, row.runtime or "none"), status_code=201)


@router.post("/sandboxes/{sandbox_id}/connect")
@router.post("/v2/sandboxes/{sandbox_id}/connect")
async def connect(
    request: Request,
    sandbox_id: str,
    body: Annotated[dict[str, Any] | None, Body()] = None,
) -> Response:
    """Connect, resuming a paused sandbox first (E2B: 201 when it resumed, 200
    when it was running)."""
    service, key = _auth(request)
    row = _running(service, key, sandbox_id)
    resumed = await _resume(service, key, sandbox_id)
    row = _extend(service, key, row, (body or {}).get("timeout"))
    return json_reply(_created(row, row.runtime or "none"), status_code=201 if resumed else 200)


@router.get("/sandboxes/{sandbox_id}/metrics")
async def metrics(
    request: Request,
    sandbox_id: str,
    start: Annotated[int | None, Query(ge=0)] = None,
    end: Annotated[int | None, Query(ge=0)] = None,
) -> Response:
    """The sandbox's usage series (``Service.usage``: one sample a second from
    its cgroup, the last five minutes by default), between Unix seconds
    ``start`` and ``end``, oldest first, in E2B's shape. ``cpuUsedPct``: CPU
    used since the previous sample, in percent of the sandbox's cores;
    ``memUsed``: memory charged to it now (page cache included, as its limit
    counts it; ``memCache`` is not told apart: 0); ``diskUsed``: its
    workspace at the last disk check. Totals are the sandbox's limits. Empty
    until the first sample, as E2B's."""
    service, key = _auth(request)
    row = _running(service, key, sandbox_id)
    series = service.usage(key, sandbox_id)
    cpus = float(row.policy.get("limits", {}).get("cpu_cores") or os.cpu_count() or 1)
    samples = []
    for sample in series.since(None) if series is not None else []:
        if (start is not None and sample.time < start) or (end is not None and sample.time > end):
            continue
        samples.append(
            {
                "timestamp": _iso(sample.time),
                "timestampUnix": int(sample.time),
                "cpuCount": max(1, math.ceil(cpus)),
                "cpuUsedPct": round(min((sample.cpu_used_pct or 0.0) / cpus, 100.0), 2),
                "memUsed": sample.memory_bytes or 0,
                "memTotal": row.memory_bytes or 0,
                "memCache": 0,
                "diskUsed": sample.disk_bytes or 0,
                "diskTotal": row.disk_bytes or 0,
            }
        )
    return Response(json.dumps(samples), media_type="application/json")


@router.put("/sandboxes/{sandbox_id}/network", status_code=204)
async def update_network(
    request: Request, sandbox_id: str, body: Annotated[dict[str, Any], Body()]
) -> Response:
    """``allowOut``/``denyOut`` replace the sandbox's allowlist rules (corral's
    ``network.update``; the same checks as the native route, so a key never
    gets more than its server permits). Only a sandbox whose policy is in
    allowlist mode has rules to change: others answer 409. Egress proxies,
    DNS servers, header transforms and ``allowInternetAccess`` are refused."""
    service, key = _auth(request)
    _running(service, key, sandbox_id)
    allow, deny = _rules(body)
    live = service.get_live(key, sandbox_id)
    service.check_rules(allow)
    await live.update_rules(allow, deny)
    return Response(status_code=204)


@router.api_route(
    "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
)
async def not_supported(request: Request, rest: str) -> Response:
    _auth(request)
    what = {
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
