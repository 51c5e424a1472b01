"""What the E2B routes share: errors as ``{code, message}``, the sandbox
access token, the caller's sandbox, and ``/home/user`` onto the workspace."""

from __future__ import annotations

import hashlib
import hmac
import os
import posixpath
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from corral._errors import PathOutsideWorkspace
from corral.server import _internals
from corral.server._http import describe
from corral.server._live import Live, ServiceError
from corral.server._service import Service

ENVD_VERSION = "0.6.1"
"""The envd version the SDKs are told: 0.5.7+ has octet-stream uploads and a
default user; below 0.6.2, so the SDK itself refuses file metadata (xattrs),
which corral does not keep."""
ENVD_PORT = "49983"
JUPYTER_PORT = "49999"
HOME = "/home/user"
NOT_FOUND = "The sandbox {} was not found"  # the SDK maps "was not found" to SandboxNotRunning

_SECRET = os.urandom(32)  # per server process: boxes die with it, so do their tokens


def access_token(sandbox_id: str) -> str:
    """The sandbox's access token: only the key that created (or connected to)
    it is told, so another key cannot reach its traffic even knowing its id."""
    return hmac.new(_SECRET, sandbox_id.encode(), hashlib.sha256).hexdigest()


def unsupported(what: str) -> ServiceError:
    return ServiceError(501, "not_supported", f"{what} is not supported by corral's E2B API")


def error_reply(exc: Exception) -> JSONResponse:
    """E2B's error shape: ``{"code": <HTTP status>, "message": ...}``."""
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        status, message = 400, f"{where}: {first.get('msg', 'invalid')}"
    else:
        status, _, message = describe(exc)
    return JSONResponse({"code": status, "message": message}, status_code=status)


class E2bRoute(APIRoute):
    """Every failure of an E2B route, validation included, in E2B's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_reply(exc)

        return route


def _by_token(service: Service, token: str) -> str:
    """The running sandbox whose access token this is ("" if none): the
    routing of SDKs that send the token without ``E2b-Sandbox-Id`` (``e2b``
    2.7's ``Sandbox.connect``). Each token is one sandbox's, so it names it."""
    for sandbox_id in list(service.live):
        if hmac.compare_digest(token, access_token(sandbox_id)):
            return sandbox_id
    return ""


def sandbox_live(request: Request, port: str) -> Live:
    """The running sandbox a sandbox-traffic request names, checked against its
    token. A wrong or missing token is answered like an absent sandbox (404):
    the id alone reveals nothing and reaches nothing."""
    service: Service = request.app.state.service
    sandbox_id = request.headers.get("e2b-sandbox-id", "")
    if request.headers.get("e2b-sandbox-port", port) != port:
        raise ServiceError(
            404, "not_found", f"port {request.headers['e2b-sandbox-port']} is not open"
        )
    token = request.headers.get("x-access-token") or request.headers.get(
        "e2b-traffic-access-token", ""
    )
    if not sandbox_id and token:
        sandbox_id = _by_token(service, token)
    # constant-time: the token is the only credential of sandbox traffic
    if not sandbox_id or not hmac.compare_digest(token, access_token(sandbox_id)):
        raise ServiceError(404, "not_found", NOT_FOUND.format(sandbox_id))
    live = service.live.get(sandbox_id)
    if live is None:
        raise ServiceError(502, "sandbox_ended", NOT_FOUND.format(sandbox_id))
    refuse_paused(live)
    return live


def refuse_paused(live: Live) -> None:
    """Traffic to a paused sandbox is answered now rather than held until a resume."""
    if _internals.paused(live.sandbox):
        raise ServiceError(
            409, "paused", f"The sandbox {live.id} is paused: connect to it to resume it"
        )


def check_user(request: Request, user: str | None = None) -> None:
    """E2B's default user is ``user``; corral runs everything as the box's one
    unprivileged identity, so ``root`` is refused rather than faked."""
    import base64

    if user is None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                user = base64.b64decode(auth[6:]).decode().partition(":")[0]
            except ValueError:
                user = "?"
    if user and user != "user":
        raise ServiceError(
            403,
            "permission_denied",
            f"user {user!r}: corral sandboxes run as one unprivileged user ('user'); "
            "root is never granted",
        )


def to_box(live: Live, path: str) -> str:
    """An E2B path as corral's files API takes it: ``/home/user`` (and relative
    paths) are the workspace; any other absolute path is outside it."""
    workspace = live.sandbox.policy.filesystem.workspace
    full = posixpath.normpath(posixpath.join(HOME, path))
    if full == HOME or full.startswith(HOME + "/"):
        return posixpath.join(workspace, posixpath.relpath(full, HOME))
    if full == workspace or full.startswith(workspace + "/"):
        return full
    raise PathOutsideWorkspace(
        f"{path!r}: files are served from the workspace only ({HOME}, which is "
        f"{workspace} in the box)"
    )


def cwd_to_box(live: Live, cwd: str | None) -> str | None:
    """A command's working directory: ``/home/user`` is the workspace; others
    are the box's own paths."""
    if not cwd:
        return None
    try:
        return to_box(live, cwd)
    except PathOutsideWorkspace:
        return cwd


def from_box(live: Live, relative: str) -> str:
    """A workspace-relative path as E2B shows it, under ``/home/user``."""
    return posixpath.normpath(posixpath.join(HOME, relative))
