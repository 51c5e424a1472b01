"""envd's protocol (port 49983) over a corral sandbox: processes and the
filesystem as Connect RPC (``_connect``), bytes through ``/files``.

Every process is a background command of the sandbox (``Live``): ``Start``
streams its start, output and end, ``Connect`` follows it again, and
``SendInput``, ``CloseStdin``, ``SendSignal`` and ``List`` reach it by pid.
``Connect-Timeout-Ms`` bounds the command, as envd does; streams carry
keepalives at the client's ``Keepalive-Ping-Interval``. Paths: ``/home/user``
is the workspace (``_common.to_box``). Directory watches: ``_watch``.
``/files`` takes the access token or a signed URL.

PTYs are corral terminals (``Live.open_terminal``): ``Start`` with a ``pty``
size opens one and streams its output as ``pty`` data events, ``Connect``
follows it again (output from then on, as envd), ``SendInput`` with
``input.pty`` types into it, ``Update`` resizes it, ``SendSignal`` ends it.
The terminal's output is read as the stream takes it (no buffer on the
host); two streams following one PTY at once share its output, each chunk
going to one of them. ``StreamInput`` (client streaming, over HTTP/1.1 as
Connect allows) writes each ``data`` event to the process's stdin or PTY as
it arrives.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import posixpath
import stat
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from corral._sandbox import EntryInfo
from corral.server._live import Live, ServiceError, find
from corral.server._service import Service

from . import _connect as c
from . import _watch
from ._common import (
    ENVD_PORT,
    E2bRoute,
    access_token,
    check_user,
    cwd_to_box,
    from_box,
    refuse_paused,
    sandbox_live,
    to_box,
    unsupported,
)

router = APIRouter(prefix="/e2b/sandbox", route_class=E2bRoute, include_in_schema=False)

_SIGNALS = {"SIGNAL_SIGKILL": 9, "SIGNAL_SIGTERM": 15, 9: 9, 15: 15}
_TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}


@router.get("/health", status_code=204)
async def health(request: Request) -> Response:
    sandbox_live(request, ENVD_PORT)
    return Response(status_code=204)


# -- process.Process ---------------------------------------------------------------


def _timeout_s(request: Request) -> float | None:
    value = request.headers.get("connect-timeout-ms", "")
    return int(value) / 1000 if value.isdigit() and int(value) > 0 else None


def _pid(message: dict[str, Any]) -> int:
    selector = message.get("process") or {}
    pid = selector.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise c.ConnectError(
            "invalid_argument", "process.pid: a pid is required (tags are not kept)"
        )
    return pid


def _end(result: dict[str, Any]) -> dict[str, Any]:
    code = result["exit_code"]
    end: dict[str, Any] = {"exitCode": code, "exited": result.get("signal") is None}
    end["status"] = f"signal: {result['signal']}" if result.get("signal") else f"exit status {code}"
    if result.get("limit_hit"):
        end["error"] = f"corral: the {result['limit_hit']} limit was hit"
    return {"event": {"end": end}}


def _size(message: dict[str, Any]) -> tuple[int, int]:
    """``pty.size`` as ``(cols, rows)``, each 1 to 1000."""
    size = (message.get("pty") or {}).get("size") or {}

    def side(name: str) -> int:
        value = size.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1000:
            raise c.ConnectError("invalid_argument", f"pty.size.{name}: 1 to 1000")
        return value

    return side("cols"), side("rows")


async def _pty_events(live: Live, pid: int) -> AsyncIterator[dict[str, Any]]:
    """A terminal's start, its output as ``pty`` data, then its end."""
    yield {"event": {"start": {"pid": pid}}}
    while True:
        data = await live.read_terminal(pid, 3600.0)
        if data is None:  # nothing for an hour: keepalives cover the wait
            continue
        if not data:
            break
        yield {"event": {"data": {"pty": base64.b64encode(data).decode()}}}
    yield _end(await live.wait_terminal(pid))


async def _events(live: Live, pid: int) -> AsyncIterator[dict[str, Any]]:
    yield {"event": {"start": {"pid": pid}}}
    async for event in live.follow(pid):
        kind = event["type"]
        if kind in ("stdout", "stderr"):
            yield {"event": {"data": {kind: event["data"]}}}
        elif kind == "exit":
            yield _end(event["result"])
        else:
            error = event.get("error") or {}
            raise c.ConnectError("unavailable", error.get("message", "the sandbox ended"))


@router.post("/process.Process/Start")
async def start(request: Request) -> StreamingResponse:
    try:
        live = sandbox_live(request, ENVD_PORT)
        check_user(request)
        message = await c.stream_request(request)
        config = message.get("process") or {}
        cmd, args, envs = config.get("cmd"), config.get("args") or [], config.get("envs") or {}
        if not isinstance(cmd, str) or not cmd or not all(isinstance(a, str) for a in args):
            raise c.ConnectError("invalid_argument", "process.cmd: a command is required")
        service: Service = request.app.state.service
        if message.get("pty") is not None:
            cols, rows = _size(message)
            async with service.using(live.key, live.id) as used:
                terminal = await used.open_terminal(
                    cols,
                    rows,
                    [cmd, *args],
                    dict(envs) or None,
                    cwd_to_box(used, config.get("cwd")),
                    timeout_s=_timeout_s(request),
                )
            return c.stream_reply(_kept_alive(request, _pty_events(live, terminal)))
        async with service.using(live.key, live.id) as used:
            pid, result = await used.start_background(
                [cmd, *args],
                timeout_s=_timeout_s(request),
                env=dict(envs) or None,
                cwd=cwd_to_box(used, config.get("cwd")),
                stdin=None,
                stdin_open=bool(message.get("stdin")),
            )
    except Exception as exc:
        return c.stream_error(exc)
    if pid is None:  # it could not start: its result says why (127, 126)
        assert result is not None

        async def failed() -> AsyncIterator[dict[str, Any]]:
            yield {"event": {"start": {"pid": 0}}}
            stderr = result["stderr"]
            if stderr:
                yield {"event": {"data": {"stderr": stderr}}}
            yield _end(result)

        return c.stream_reply(failed())
    return c.stream_reply(_kept_alive(request, _events(live, pid)))


def _kept_alive(
    request: Request, events: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    return c.with_keepalive(events, c.keepalive_interval(request), {"event": {"keepalive": {}}})


@router.post("/process.Process/Connect")
async def connect(request: Request) -> StreamingResponse:
    try:
        live = sandbox_live(request, ENVD_PORT)
        pid = _pid(await c.stream_request(request))
        if pid in live.terminals:
            events = _pty_events(live, pid)
        else:
            events = _events(live, pid)
            live.follow(pid)  # a missing pid is an error before the stream starts
    except Exception as exc:
        return c.stream_error(exc)
    return c.stream_reply(_kept_alive(request, events))


async def _unary(
    request: Request, method: str, live: Live, message: dict[str, Any]
) -> dict[str, Any]:
    if method == "List":
        return {
            "processes": [
                {
                    "pid": p["pid"],
                    "config": {"cmd": p["argv"][0] if p["argv"] else "", "args": p["argv"][1:]},
                }
                for p in await live.processes()
            ]
        }
    if method == "SendInput":
        await _send_input(live, _pid(message), message.get("input") or {})
        return {}
    if method == "Update":
        if message.get("pty") is None:
            raise c.ConnectError("invalid_argument", "pty: a size is required")
        cols, rows = _size(message)
        await live.terminal(_pid(message)).resize(cols, rows)
        return {}
    if method == "CloseStdin":
        await live.close_stdin(_pid(message))
        return {}
    if method == "SendSignal":
        signal = _SIGNALS.get(message.get("signal", 0))
        if signal is None:
            raise c.ConnectError("invalid_argument", "signal: SIGNAL_SIGKILL or SIGNAL_SIGTERM")
        if not await live.kill(_pid(message), signal):
            raise c.ConnectError("not_found", f"process {_pid(message)} not found")
        return {}
    raise c.ConnectError("unimplemented", f"process.Process/{method} does not exist")


async def _send_input(live: Live, pid: int, given: dict[str, Any]) -> None:
    """``input.stdin`` or ``input.pty`` (base64) to the process or terminal ``pid``."""
    if "pty" in given:
        data = given["pty"]
        if not isinstance(data, str):
            raise c.ConnectError("invalid_argument", "input.pty: base64 bytes are required")
        await live.terminal(pid).send(base64.b64decode(data))
        return
    data = given.get("stdin")
    if not isinstance(data, str):
        raise c.ConnectError("invalid_argument", "input: base64 bytes are required in stdin or pty")
    if pid in live.terminals:  # a terminal's stdin is its PTY
        await live.terminal(pid).send(base64.b64decode(data))
    else:
        await live.send_stdin(pid, base64.b64decode(data))


@router.post("/process.Process/StreamInput")
async def stream_input(request: Request) -> StreamingResponse:
    """Client streaming: a ``start`` naming the process, then ``data`` events
    (its stdin or its PTY) and ``keepalive``s, each written as it arrives;
    the reply comes once the client ends the stream."""
    try:
        live = sandbox_live(request, ENVD_PORT)
        check_user(request)
        service: Service = request.app.state.service
        async with service.using(live.key, live.id) as used:
            pid: int | None = None
            async for message in c.stream_messages(request):
                if "start" in message:
                    pid = _pid(message["start"] or {})
                    if pid not in used.terminals:
                        find(used.commands, pid, "background command with pid")
                elif "data" in message:
                    if pid is None:
                        raise c.ConnectError("invalid_argument", "start: must come before data")
                    await _send_input(used, pid, (message["data"] or {}).get("input") or {})
                elif "keepalive" not in message:
                    raise c.ConnectError("invalid_argument", "event: start, data or keepalive")
    except Exception as exc:
        return c.stream_error(exc)

    async def done() -> AsyncIterator[dict[str, Any]]:
        yield {}

    return c.stream_reply(done())


@router.post("/process.Process/{method}")
async def process_unary(request: Request, method: str) -> Response:
    try:
        live = sandbox_live(request, ENVD_PORT)
        check_user(request)
        message = await c.unary_request(request)
        service: Service = request.app.state.service
        async with service.using(live.key, live.id) as used:
            return c.unary_reply(await _unary(request, method, used, message))
    except Exception as exc:
        return c.unary_error(exc)


# -- filesystem.Filesystem ---------------------------------------------------------


def _entry(live: Live, entry: EntryInfo) -> dict[str, Any]:
    mtime = datetime.datetime.fromtimestamp(entry.mtime, datetime.UTC)
    return {
        "name": entry.name,
        "type": _TYPES.get(entry.type, "FILE_TYPE_UNSPECIFIED"),
        "path": from_box(live, entry.path),
        "size": entry.size,
        "mode": entry.mode & 0o7777,
        "permissions": stat.filemode(entry.mode),
        "owner": "user",
        "group": "user",
        "modifiedTime": mtime.isoformat().replace("+00:00", "Z"),
    }


def _path(message: dict[str, Any], name: str = "path") -> str:
    path = message.get(name)
    if not isinstance(path, str) or not path:
        raise c.ConnectError("invalid_argument", f"{name}: a path is required")
    return path


async def _list(live: Live, path: str, depth: int) -> list[dict[str, Any]]:
    entries = []
    for entry in await live.sandbox.files.list(path):
        entries.append(_entry(live, entry))
        if entry.type == "dir" and depth > 1:
            entries += await _list(live, posixpath.join(path, entry.name), depth - 1)
    return entries


async def _fs(service: Service, method: str, live: Live, message: dict[str, Any]) -> dict[str, Any]:
    files = live.sandbox.files
    if method == "Stat":
        return {"entry": _entry(live, await files.stat(to_box(live, _path(message))))}
    if method == "ListDir":
        depth = message.get("depth") or 1
        if not isinstance(depth, int) or not 1 <= depth <= 32:
            raise c.ConnectError("invalid_argument", "depth: 1 to 32")
        return {"entries": await _list(live, to_box(live, _path(message)), depth)}
    if method == "MakeDir":
        path = to_box(live, _path(message))
        if await files.exists(path):
            raise c.ConnectError("already_exists", f"{_path(message)} exists")
        parts = posixpath.relpath(path, live.sandbox.policy.filesystem.workspace).split("/")
        for i in range(1, len(parts) + 1):  # with its parents, as envd
            sub = posixpath.join(live.sandbox.policy.filesystem.workspace, *parts[:i])
            if not await files.exists(sub):
                await files.mkdir(sub)
        return {"entry": _entry(live, await files.stat(path))}
    if method == "Move":
        dst = to_box(live, _path(message, "destination"))
        await files.rename(to_box(live, _path(message, "source")), dst)
        return {"entry": _entry(live, await files.stat(dst))}
    if method == "Remove":
        await files.remove(to_box(live, _path(message)))
        return {}
    if method == "CreateWatcher":
        _watch_options(message)
        path = to_box(live, _path(message))
        recursive = bool(message.get("recursive"))
        return {"watcherId": await _watch.create(service, live, path, recursive)}
    if method == "GetWatcherEvents":
        return {"events": await _watch.events(live, message.get("watcherId"))}
    if method == "RemoveWatcher":
        _watch.remove(live, message.get("watcherId"))
        return {}
    raise c.ConnectError("unimplemented", f"filesystem.Filesystem/{method} does not exist")


def _watch_options(message: dict[str, Any]) -> None:
    for option in ("includeEntry", "allowNetworkMounts"):
        if message.get(option):
            raise unsupported(f"{option} (watch events name the entry only)")


@router.post("/filesystem.Filesystem/WatchDir")
async def watch_dir(request: Request) -> StreamingResponse:
    """A stream of the directory's changes (``_watch``), with keepalives."""
    try:
        live = sandbox_live(request, ENVD_PORT)
        check_user(request)
        message = await c.stream_request(request)
        _watch_options(message)
        service: Service = request.app.state.service
        path = to_box(live, _path(message))
        events = _watch.stream(service, live, path, bool(message.get("recursive")))
    except Exception as exc:
        return c.stream_error(exc)
    return c.stream_reply(
        c.with_keepalive(events, c.keepalive_interval(request), {"keepalive": {}})
    )


@router.post("/filesystem.Filesystem/{method}")
async def filesystem(request: Request, method: str) -> Response:
    try:
        live = sandbox_live(request, ENVD_PORT)
        check_user(request)
        message = await c.unary_request(request)
        service: Service = request.app.state.service
        async with service.using(live.key, live.id) as used:
            return c.unary_reply(await _fs(service, method, used, message))
    except Exception as exc:
        return c.unary_error(exc)


# -- /files ------------------------------------------------------------------------


# The SDKs build signed URLs by joining the absolute path ``/files`` to
# E2B_SANDBOX_URL, which drops its path: they reach the server's root, with
# no sandbox id. Only the sandbox whose access token made the signature
# verifies it, so the signature itself names the sandbox.
root_router = APIRouter(route_class=E2bRoute, include_in_schema=False)


def _signature(path: str, operation: str, username: str, token: str, expiration: str) -> str:
    """envd's v1 signature: base64 (unpadded) of the SHA-256 of
    ``path:operation:username:token[:expiration]``."""
    raw = f"{path}:{operation}:{username}:{token}" + (f":{expiration}" if expiration else "")
    return "v1_" + base64.b64encode(hashlib.sha256(raw.encode()).digest()).decode().rstrip("=")


def _files_live(request: Request, operation: str, path: str | None, username: str | None) -> Live:
    """The sandbox of a ``/files`` request: by its access token, or by a
    signed URL (``signature``, ``signature_expiration`` in Unix seconds)."""
    signature = request.query_params.get("signature")
    if signature is None or request.headers.get("x-access-token"):
        live = sandbox_live(request, ENVD_PORT)
        check_user(request, username)
        return live
    expiration = request.query_params.get("signature_expiration", "")
    if expiration and (not expiration.isdigit() or int(expiration) < time.time()):
        raise ServiceError(401, "unauthorized", "the signed URL has expired")
    check_user(request, username)
    service: Service = request.app.state.service
    wanted = request.headers.get("e2b-sandbox-id")
    for sandbox_id, live in list(service.live.items()):
        if wanted and sandbox_id != wanted:
            continue
        token = access_token(sandbox_id)
        expected = _signature(path or "", operation, username or "", token, expiration)
        if hmac.compare_digest(signature, expected):
            refuse_paused(live)
            return live
    raise ServiceError(401, "unauthorized", "invalid signature for this file and operation")


@router.get("/files")
@root_router.get("/files")
async def download(request: Request, path: str, username: str | None = None) -> StreamingResponse:
    live = _files_live(request, "read", path, username)
    service: Service = request.app.state.service
    async with service.using(live.key, live.id) as used:
        reader = await used.sandbox.files.open_read(to_box(used, path))

    async def chunks() -> AsyncIterator[bytes]:
        async with reader:
            async for chunk in reader:
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"content-length": str(reader.size)},
    )


async def _limited(chunks: AsyncIterator[bytes], limit: int, gzipped: bool) -> AsyncIterator[bytes]:
    """The body, inflated if gzipped, refused past ``limit`` bytes (after
    inflating: a small gzip body must not become a huge file)."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    seen = 0
    async for chunk in chunks:
        data = inflate.decompress(chunk, limit + 1 - seen) if inflate is not None else chunk
        seen += len(data)
        if seen > limit:
            raise ServiceError(413, "too_large", f"uploads are limited to {limit} bytes")
        if data:
            yield data


@router.post("/files")
@root_router.post("/files")
async def upload(
    request: Request, path: str | None = None, username: str | None = None
) -> Response:
    live = _files_live(request, "write", path, username)
    service: Service = request.app.state.service
    limit = service.config.max_upload_bytes
    written: list[dict[str, Any]] = []
    kind = request.headers.get("content-type", "")
    encoding = request.headers.get("content-encoding", "identity")
    if encoding not in ("identity", "gzip"):
        raise ServiceError(400, "invalid_request", f"content-encoding {encoding!r}")
    async with service.using(live.key, live.id) as used:
        if kind.startswith("multipart/form-data"):
            form = await request.form(max_files=100, max_part_size=limit)
            try:
                for _, part in form.multi_items():
                    if isinstance(part, str):
                        continue
                    target = path if path and len(form) == 1 else part.filename
                    if not target:
                        raise ServiceError(
                            400, "invalid_request", "path: the file's path is missing"
                        )

                    async def body(part: Any = part) -> AsyncIterator[bytes]:
                        while chunk := await part.read(1 << 16):
                            yield chunk

                    box_path = to_box(used, target)
                    await _write(used, box_path, _limited(body(), limit, False))
                    written.append(_written(used, box_path))
            finally:
                await form.close()
        else:
            if not path:
                raise ServiceError(
                    400, "invalid_request", "path: required for an octet-stream upload"
                )
            box_path = to_box(used, path)
            await _write(used, box_path, _limited(request.stream(), limit, encoding == "gzip"))
            written.append(_written(used, box_path))
    return Response(json.dumps(written), media_type="application/json")


def _written(live: Live, box_path: str) -> dict[str, str]:
    relative = posixpath.relpath(box_path, live.sandbox.policy.filesystem.workspace)
    return {"name": posixpath.basename(box_path), "type": "file", "path": from_box(live, relative)}


async def _write(live: Live, path: str, chunks: AsyncIterator[bytes]) -> None:
    """Write with the parents created, as envd does."""
    files = live.sandbox.files
    workspace = live.sandbox.policy.filesystem.workspace
    parts = posixpath.relpath(posixpath.dirname(path), workspace).split("/")
    for i in range(1, len(parts) + 1):
        if parts[0] == ".":
            break
        sub = posixpath.join(workspace, *parts[:i])
        if not await files.exists(sub):
            await files.mkdir(sub)
    await live.write_file(path, chunks, 0o644)
