"""The ``/ui`` pages: the caller's sandboxes, one sandbox, overview, approvals,
files, the key's quotas. Each handler reads through ``Service`` with the
session's key, so the pages see exactly what the API would show that key."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import mimetypes
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral import _serial as s
from corral._errors import to_wire
from corral.server._live import Live, ServiceError
from corral.server._service import Service
from corral.server._store import ApiKey

COOKIE = "corral_key"
_HERE = Path(str(files(__package__)))
# No script on every page but a sandbox's (below): a payload that slips past
# escaping still cannot run, and nothing but this server is ever contacted
# (default-src 'none' for the rest).
CSP = (
    "default-src 'none'; script-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


# The sandbox page alone runs script: its own static files (the usage charts'
# refresher, the terminal and its vendored xterm.js), which talk only to this
# server (connect-src 'self': fetch and the terminal's websocket). xterm.js
# makes <style> elements for its theme and cell size: they carry this
# response's nonce (static/terminal.js stamps it); no inline script, ever.
def _script_csp(style_nonce: str) -> str:
    return (
        "default-src 'none'; script-src 'self'; connect-src 'self'; "
        f"style-src 'self' 'nonce-{style_nonce}'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


_END_REASONS = (
    "closed",
    "timeout",
    "idle",
    "limit",
    "crashed",
    "start_failed",
    "server_shutdown",
    "server_restarted",
)

templates = Jinja2Templates(directory=_HERE / "templates")  # autoescape on for .html
templates.env.filters["when"] = lambda t: (
    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""
)
templates.env.filters["pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True)
templates.env.filters["size"] = lambda n: _size(n)
router = APIRouter(prefix="/ui", include_in_schema=False)


def _size(n: float | None) -> str:
    if n is None:
        return "no limit"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),  # no sniffing HTML in a downloaded file
    # same-origin, not no-referrer: under no-referrer the browser sends
    # "Origin: null" on our own forms, and the CSRF check refuses null
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),  # clickjacking on the Kill button
    (b"cache-control", b"no-store"),  # the pages show a tenant's data
]


class _Headers:
    """Security headers on every ``/ui`` reply. Plain ASGI: the API's own
    requests (streams included) pass through untouched, at no cost."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/ui"):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in _HEADERS}
                headers = message.get("headers", [])
                kept = [(n, v) for n, v in headers if n.lower() not in names]
                # a page's own CSP (the sandbox page's, which runs script) stays
                own = [(n, v) for n, v in headers if n.lower() == b"content-security-policy"]
                added = [h for h in _HEADERS if not (own and h[0] == b"content-security-policy")]
                message = {**message, "headers": kept + own + added}
            await send(message)

        await self.app(scope, receive, with_headers)


def install(app: FastAPI) -> None:
    """Mount the dashboard on ``app`` at ``/ui`` (pages and ``/ui/static``)."""
    mimetypes.add_type("text/javascript", ".mjs")  # a module script needs a JS type
    app.mount("/ui/static", StaticFiles(directory=_HERE / "static"), name="ui-static")
    app.include_router(router)
    app.add_middleware(_Headers)


# -- session -------------------------------------------------------------------------


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def csrf_token(token: str) -> str:
    """The form token of a session: derived from the key, which a cross-site
    page cannot read (the cookie is HttpOnly); the hash does not reveal the key."""
    return hashlib.sha256(b"corral-ui-csrf\0" + token.encode()).hexdigest()


async def _session(request: Request) -> tuple[ApiKey, str] | None:
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    key = await asyncio.to_thread(_service(request).store.authenticate, token)
    return (key, token) if key is not None else None


def _cross_site(request: Request) -> bool:
    """True when the browser says the request came from another site."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        return origin != own
    return origin == "null"


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()  # bounded by the app's BodyLimit
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


async def _post(request: Request) -> tuple[ApiKey, dict[str, str]] | Response:
    """A state-changing form: the session, then the CSRF checks, then the fields."""
    session = await _session(request)
    if session is None:
        return RedirectResponse("/ui/login", status_code=303)
    key, token = session
    form = await _form(request)
    # CSRF: a cross-site form can send the cookie only if SameSite fails (old
    # browsers); it can never know the token, which is derived from the key
    if _cross_site(request) or not hmac.compare_digest(form.get("csrf", ""), csrf_token(token)):
        return _error(request, key, token, 403, "forbidden", "cross-site or stale form")
    return key, form


def _page(
    request: Request, name: str, key: ApiKey | None, token: str | None, **context: Any
) -> HTMLResponse:
    status = context.pop("status", 200)
    context.update(key=key, csrf=csrf_token(token) if token else "")
    return templates.TemplateResponse(request, name, context, status_code=status)


def _error(
    request: Request, key: ApiKey | None, token: str | None, status: int, code: str, message: str
) -> HTMLResponse:
    return _page(request, "error.html", key, token, status=status, code=code, message=message)


def _wired(exc: BaseException) -> tuple[int, str, str] | None:
    """(status, code, message) as the API would answer ``exc`` (the one error
    table, host paths scrubbed), or None for an internal error."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.code, str(exc)
    return to_wire(exc)


def _login() -> RedirectResponse:
    return RedirectResponse("/ui/login", status_code=303)


# -- login -----------------------------------------------------------------------------


@router.get("")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/sandboxes", status_code=303)


@router.get("/login")
async def login_form(request: Request) -> HTMLResponse:
    return _page(request, "login.html", None, None, failed=False)


@router.post("/login")
async def login(request: Request) -> Response:
    # login CSRF (being signed in as the attacker's key): refused cross-site
    if _cross_site(request):
        return _error(request, None, None, 403, "forbidden", "cross-site login")
    token = (await _form(request)).get("key", "").strip()
    key = await asyncio.to_thread(_service(request).store.authenticate, token) if token else None
    if key is None:
        return _page(request, "login.html", None, None, failed=True, status=401)
    response = RedirectResponse("/ui/sandboxes", status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,  # no script reads the key
        samesite="strict",  # no other site's page sends it
        secure=request.url.scheme == "https",
        path="/ui",
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    checked = await _post(request)
    if isinstance(checked, Response):
        return checked
    response = _login()
    response.delete_cookie(COOKIE, path="/ui")
    return response


# -- sandboxes --------------------------------------------------------------------------


@router.get("/sandboxes")
async def sandboxes(
    request: Request,
    state: str = "",
    end_reason: str = "",
    metadata: str = "",
) -> Response:
    session = await _session(request)
    if session is None:
        return _login()
    key, token = session
    service = _service(request)
    wanted: dict[str, str] = {}
    for item in metadata.split(","):
        name, sep, value = item.strip().partition("=")
        if sep and name:
            wanted[name] = value
    rows = await asyncio.to_thread(
        service.store.list_sandboxes,
        key_id=key.id,
        state=state if state in ("running", "ended") else None,
        metadata=wanted,
        limit=1000,
    )
    if end_reason:
        rows = [r for r in rows if r.end_reason == end_reason]
    return _page(
        request,
        "sandboxes.html",
        key,
        token,
        rows=rows,
        state=state,
        end_reason=end_reason,
        metadata=metadata,
        reasons=_END_REASONS,
    )


@router.get("/sandboxes/{sandbox_id}")
async def sandbox(request: Request, sandbox_id: str) -> Response:
    session = await _session(request)
    if session is None:
        return _login()
    key, token = session
    service = _service(request)
    try:
        row = service.row(key, sandbox_id)
    except ServiceError as exc:
        return _error(request, key, token, exc.status, exc.code, str(exc))
    info = service.info(row)
    entries = await asyncio.to_thread(
        service.store.audit_log, key_id=key.id, sandbox_id=sandbox_id, limit=1000
    )
    approvals: list[dict[str, Any]] = []
    live = service.live.get(sandbox_id)
    if live is not None and live.key.id == key.id:
        approvals = await live.pending_approvals(0)
    nonce = base64.b64encode(os.urandom(16)).decode()
    page = _page(
        request,
        "sandbox.html",
        key,
        token,
        row=row,
        info=info,
        approvals=approvals,
        runs=[e for e in entries if e["action"] in ("command.run", "command.start", "code.run")],
        network=[e for e in entries if e["action"].startswith("network.")],
        entries=entries,
        charts=charts(service.usage_report(key, sandbox_id, None)),
        style_nonce=nonce,
    )
    page.headers["content-security-policy"] = _script_csp(nonce)
    return page


@router.get("/sandboxes/{sandbox_id}/usage.json")
async def usage(request: Request, sandbox_id: str) -> Response:
    """The sandbox page's charts, redrawn (static/usage.js polls this)."""
    session = await _session(request)
    if session is None:
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    key = session[0]
    try:
        report = _service(request).usage_report(key, sandbox_id, None)
    except ServiceError as exc:
        return JSONResponse({"error": exc.code}, status_code=exc.status)
    return JSONResponse({"state": report["state"], "charts": charts(report)})


# -- usage charts: SVG sparklines drawn here, in the page and in usage.json ----------------

CHART_W, CHART_H, CHART_SAMPLES, CHART_MIN_SPAN = 240, 48, 120, 30


def charts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One sparkline per measure of a ``usage_report``: its polyline's points
    (the last ``CHART_SAMPLES`` samples, right-aligned in a width of at least
    ``CHART_MIN_SPAN`` samples; y scaled to the limit when there is one), and
    the latest value as text and as a number. The page draws these points as
    inline SVG; usage.json sends them for static/usage.js to redraw."""
    samples = report["samples"][-CHART_SAMPLES:]
    limits = report["limits"]
    cores = limits.get("cpu_cores")
    out = []
    for name, title, field, ceiling, show in (
        ("cpu", "CPU", "cpu_used_pct", 100.0 * (cores or 1), lambda v: f"{v:.0f} %"),
        ("memory", "Memory", "memory_bytes", limits.get("memory_bytes"), _size),
        ("pids", "Processes", "pids", limits.get("pids"), lambda v: f"{v:.0f}"),
        ("disk", "Disk", "disk_bytes", limits.get("disk_bytes"), _size),
    ):
        values = [s[field] for s in samples]
        known = [float(v) for v in values if v is not None]
        top = max([float(ceiling or 0), *known, 1.0])
        span = max(len(values), CHART_MIN_SPAN)  # a young box's few samples: not a dot
        offset = span - len(values)
        points = " ".join(
            f"{(offset + i) * CHART_W / (span - 1):.1f},"
            f"{CHART_H - 2 - float(v) / top * (CHART_H - 4):.1f}"
            for i, v in enumerate(values)
            if v is not None
        )
        last = known[-1] if known else None
        out.append(
            {
                "name": name,
                "title": title,
                "points": points,
                "last": last,
                "label": "—" if last is None else show(last),
                "limit": "no limit" if ceiling is None else show(float(ceiling)),
            }
        )
    return out


@router.post("/sandboxes/{sandbox_id}/kill")
async def kill(request: Request, sandbox_id: str) -> Response:
    checked = await _post(request)
    if isinstance(checked, Response):
        return checked
    key = checked[0]
    service = _service(request)
    try:
        service.row(key, sandbox_id)  # another key's: 404, as in the API
    except ServiceError as exc:
        return _error(request, key, None, exc.status, exc.code, str(exc))
    await service.end(sandbox_id, "closed")
    return RedirectResponse(f"/ui/sandboxes/{quote(sandbox_id, safe='')}", status_code=303)


@router.post("/sandboxes/{sandbox_id}/extend")
async def extend(request: Request, sandbox_id: str) -> Response:
    checked = await _post(request)
    if isinstance(checked, Response):
        return checked
    key, form = checked
    service = _service(request)
    try:
        timeout_s = float(form.get("timeout_s", ""))
        service.extend(key, sandbox_id, timeout_s)
    except ValueError:
        return _error(request, key, None, 400, "invalid_request", "timeout_s: a number of seconds")
    except ServiceError as exc:
        return _error(request, key, None, exc.status, exc.code, str(exc))
    return RedirectResponse(f"/ui/sandboxes/{quote(sandbox_id, safe='')}", status_code=303)


# -- the terminal: xterm.js in the page, a websocket to the box's PTY ---------------------

_SHELL = ["/bin/sh", "-c", "command -v bash >/dev/null && exec bash -i || exec sh -i"]


@router.websocket("/sandboxes/{sandbox_id}/terminal")
async def terminal(ws: WebSocket, sandbox_id: str) -> None:
    """A shell in the box for the page's terminal (static/terminal.js).

    The handshake must come from this server's own pages (``Origin``: a
    websocket is not bound by CORS, so another site's page could otherwise
    open one with the cookie) and carry the session cookie; the first message
    is ``{"csrf", "cols", "rows"}``. Then binary frames are the terminal's
    bytes each way (the box's output is drawn by xterm.js as text, never
    parsed as HTML) and a text frame ``{"resize": [cols, rows]}`` resizes it.
    The shell is killed when the socket closes; ``{"exit_code"}`` is sent
    when it ends by itself.
    """
    scheme = "https" if ws.url.scheme == "wss" else "http"
    origin = ws.headers.get("origin")
    token = ws.cookies.get(COOKIE)
    service: Service = ws.app.state.service
    key = await asyncio.to_thread(service.store.authenticate, token) if token else None
    if key is None or origin != f"{scheme}://{ws.headers.get('host', '')}":
        await ws.close(code=1008)  # before accept: the handshake is refused (403)
        return
    await ws.accept()
    try:
        hello = json.loads(await asyncio.wait_for(ws.receive_text(), 30))
        if not isinstance(hello, dict) or not hmac.compare_digest(
            str(hello.get("csrf", "")), csrf_token(token or "")
        ):
            await ws.close(code=1008, reason="stale page: reload it")
            return
        cols, rows = _size_of(hello.get("cols"), 80), _size_of(hello.get("rows"), 24)
        async with service.using(key, sandbox_id) as live:
            env = {"TERM": "xterm-256color"}
            pid = await live.open_terminal(cols, rows, _SHELL, env, None)
            try:
                await _pump(ws, live, pid)
            finally:
                with contextlib.suppress(Exception):  # the box may be gone already
                    await live.terminal(pid).kill()
                    await asyncio.wait_for(live.wait_terminal(pid), 10)
    except WebSocketDisconnect:
        return
    except Exception as exc:  # the box ended, refused, or the client spoke nonsense
        wired = _wired(exc)
        message = wired[2] if wired is not None else "the terminal failed"
        try:  # the box ended under the terminal: say so, with its reason
            service.get_live(key, sandbox_id)
        except ServiceError as ended:
            message = str(ended)
        with contextlib.suppress(Exception):
            await ws.close(code=1011, reason=message[:120])


def _size_of(value: object, default: int) -> int:
    return value if isinstance(value, int) and 1 <= value <= 1000 else default


async def _pump(ws: WebSocket, live: Live, pid: int) -> None:
    """Output to the page, input and resizes from it, until either side ends."""

    async def output() -> None:
        while True:
            data = await live.read_terminal(pid, 30)
            if data is None:
                continue
            if not data:  # the shell ended by itself
                result = await live.wait_terminal(pid)
                await ws.send_text(json.dumps({"exit_code": result.get("exit_code")}))
                await ws.close()
                return
            await ws.send_bytes(data)

    async def input_() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await live.terminal(pid).send(message["bytes"])
            elif message.get("text") is not None:
                resize = json.loads(message["text"]).get("resize")
                if isinstance(resize, list) and len(resize) == 2:
                    await live.terminal(pid).resize(
                        _size_of(resize[0], 80), _size_of(resize[1], 24)
                    )

    tasks = [asyncio.ensure_future(output()), asyncio.ensure_future(input_())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()  # its error, if any


# -- network approvals -------------------------------------------------------------------


@router.get("/approvals")
async def approvals(request: Request) -> Response:
    session = await _session(request)
    if session is None:
        return _login()
    key, token = session
    waiting = []
    for live in list(_service(request).live.values()):
        if live.key.id == key.id:
            for approval in await live.pending_approvals(0):
                waiting.append({"sandbox_id": live.id, **approval})
    return _page(request, "approvals.html", key, token, waiting=waiting)


@router.post("/sandboxes/{sandbox_id}/approvals/{approval_id}")
async def answer(request: Request, sandbox_id: str, approval_id: str) -> Response:
    checked = await _post(request)
    if isinstance(checked, Response):
        return checked
    key, form = checked
    try:
        live = _service(request).get_live(key, sandbox_id)
        live.answer(approval_id, form.get("allow") == "true")
    except ServiceError as exc:
        return _error(request, key, None, exc.status, exc.code, str(exc))
    back = form.get("back", "")
    # only a page of this dashboard: never an open redirect ("//host", "https:")
    if not back.startswith("/ui/") or back.startswith("//") or "\\" in back:
        back = "/ui/approvals"
    return RedirectResponse(back, status_code=303)


# -- overview ----------------------------------------------------------------------------


@router.get("/overview")
async def overview(request: Request) -> Response:
    session = await _session(request)
    if session is None:
        return _login()
    key, token = session
    service = _service(request)
    rows = await asyncio.to_thread(service.store.list_sandboxes, key_id=key.id, limit=1000)
    by_state = Counter(r.state for r in rows if not (r.state == "ended" and r.purged))
    ends = Counter(r.end_reason for r in rows if r.end_reason)
    # limits hit by commands and cells (the box lives on) and by whole sandboxes
    # (sandbox.end): all in the audit log, each with its kind
    logged = {
        action: await asyncio.to_thread(
            service.store.audit_log, key_id=key.id, action=action, limit=1000
        )
        for action in ("command.run", "code.run", "sandbox.end")
    }
    limits = Counter(
        e["detail"]["limit"]
        for entries in logged.values()
        for e in entries
        if e["detail"].get("limit")
    )
    code_runs = logged["code.run"]
    durations = sorted(float(e["detail"].get("duration_s") or 0) for e in code_runs)
    return _page(
        request,
        "overview.html",
        key,
        token,
        by_state=dict(by_state),
        ends=sorted(ends.items()),
        limits=sorted(limits.items()),
        latency=_latency(durations),
        server_latency=_histogram(service),
    )


def _latency(durations: list[float]) -> dict[str, float] | None:
    if not durations:
        return None

    def pick(q: float) -> float:
        return durations[min(len(durations) - 1, int(q * len(durations)))]

    return {"count": len(durations), "p50": pick(0.5), "p95": pick(0.95), "max": durations[-1]}


def _histogram(service: Service) -> list[tuple[str, float]]:
    """The server-wide run_code histogram (``/metrics``'s), as cumulative buckets."""
    out: list[tuple[str, float]] = []
    for metric in service.metrics.run_code.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                out.append((sample.labels["le"], sample.value))
    return out


# -- files ---------------------------------------------------------------------------------


@router.get("/sandboxes/{sandbox_id}/files")
async def browse(request: Request, sandbox_id: str, path: str = ".") -> Response:
    session = await _session(request)
    if session is None:
        return _login()
    key, token = session
    service = _service(request)
    try:
        ended = service.ended_workspace(key, sandbox_id)
        if ended is not None:
            entries = await service.list_ended(ended, path)
        else:
            async with service.using(key, sandbox_id) as live:
                entries = await live.sandbox.files.list(path)
    except Exception as exc:  # the box's or the service's refusal, as the API answers it
        wired = _wired(exc)
        if wired is None:
            raise
        return _error(request, key, token, *wired)
    items = sorted(
        (s.entry_to_dict(e) for e in entries), key=lambda e: (e["type"] != "dir", e["name"])
    )
    parent = str(Path(path).parent) if path not in (".", "", "/") else None
    return _page(
        request,
        "files.html",
        key,
        token,
        sandbox_id=sandbox_id,
        path=path,
        parent=parent,
        items=items,
        link=lambda p: f"?{urlencode({'path': p})}",
    )


@router.get("/sandboxes/{sandbox_id}/download")
async def download(request: Request, sandbox_id: str, path: str) -> Response:
    session = await _session(request)
    if session is None:
        return _login()
    key, token = session
    service = _service(request)
    try:
        ended = service.ended_workspace(key, sandbox_id)
        if ended is not None:
            data, size = await service.read_ended(ended, path)
            body: Iterator[bytes] | AsyncIterator[bytes] = data
        else:
            async with service.using(key, sandbox_id) as live:
                reader = await live.sandbox.files.open_read(path)
            size = reader.size

            async def chunks() -> AsyncIterator[bytes]:
                async with reader:
                    async for chunk in reader:
                        yield chunk

            body = chunks()
    except Exception as exc:  # the box's or the service's refusal, as the API answers it
        wired = _wired(exc)
        if wired is None:
            raise
        return _error(request, key, token, *wired)
    name = Path(path).name or "download"
    return StreamingResponse(
        body,
        # a download, never rendered: the box chose the bytes and the name
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name, safe='')}",
            "Content-Length": str(size),
        },
    )


# -- the key -------------------------------------------------------------------------------


@router.get("/key")
async def key_page(request: Request) -> Response:
    session = await _session(request)
    if session is None:
        return _login()
    key, token = session
    store = _service(request).store
    running, memory = await asyncio.to_thread(store.running_usage, key.id)
    disk = await asyncio.to_thread(store.disk_usage, key.id)
    return _page(request, "key.html", key, token, running=running, memory=memory, disk=disk)
