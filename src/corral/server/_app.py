"""The HTTP API of ``corral serve`` (FastAPI on uvicorn).

Every route but ``/health`` needs an API key (``Authorization: Bearer crl_…``);
a key sees only its own sandboxes (another key's are 404, as if absent).
Errors are JSON ``{"error": {"code", "message"}}`` with a stable code; an
unexpected failure is ``internal`` with an id to find it in the server log,
never a stack trace or a host path. Streams (code, command output) are NDJSON:
one JSON object a line, as it happens.

The routes are thin: ``_service.Service`` does the work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal as _signal
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    MutableMapping,
)
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral import _serial as s
from corral._errors import (
    CorralError,
    PolicyError,
    SandboxBroken,
    SandboxClosed,
    UnsupportedPolicy,
)
from corral._sandbox import (
    CommandExit,
    CommandHandle,
    PathOutsideWorkspace,
    workspace_relative,
)

from ._service import (
    Live,
    OutputLog,
    Service,
    ServiceError,
    list_beneath,
    open_file_beneath,
    public_message,
    stat_beneath,
)
from ._store import ApiKey, SandboxRow

log = logging.getLogger("corral.serve")
NDJSON = "application/x-ndjson"
K = TypeVar("K")
V = TypeVar("V")
_MAX_FINISHED_COMMANDS = 100  # background commands whose output is kept after they end
_MAX_FINISHED_BYTES = 64 << 20  # and their output in total, per sandbox
_MAX_BACKGROUND = 64  # running background commands per sandbox (each holds its output here)
_MAX_TERMINALS = 16  # open terminals per sandbox (each holds a read buffer here)
_MAX_SEQ = 2**63 - 1  # cursors are SQLite integers: larger ones are a 422, not an overflow


# -- request bodies -------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CreateSandbox(_Body):
    policy: str | dict[str, Any] | None = Field(
        None, description="a preset name (strict, default, dev) or a policy object"
    )
    runtime: str | None = Field("default", description="code runtime; null for none")
    timeout_s: float | None = Field(None, description="lifetime in seconds (server default)")
    idle_timeout_s: float | None = Field(None, description="end after this long unused")
    metadata: dict[str, Annotated[str, Field(max_length=1000)]] = Field(
        default_factory=dict, max_length=50
    )
    env: dict[str, str] = Field(default_factory=dict, max_length=200)
    network_approval: bool = Field(
        False, description="hosts the rules do not name wait for an answer over the API"
    )


class Timeout(_Body):
    timeout_s: float


class RunCode(_Body):
    code: str = Field(max_length=10 << 20)
    language: Literal["python", "bash", "javascript"] = "python"
    context_id: str | None = None
    timeout_s: float | None = Field(None, gt=0)
    stream: bool = Field(False, description="NDJSON events as they happen, then done")


class NewContext(_Body):
    language: Literal["python", "bash", "javascript"] = "python"
    cwd: str | None = None


class Prewarm(_Body):
    language: Literal["python", "bash", "javascript"] = "python"


class RunCommand(_Body):
    command: str | list[str] = Field(description="a shell string or an argv list")
    background: bool = False
    timeout_s: float | None = Field(None, gt=0)
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: str | None = Field(
        None, description="base64 bytes fed to stdin (then closed, unless background)"
    )
    stdin_open: bool = Field(False, description="background: keep stdin open for /stdin")
    stream: bool = Field(False, description="foreground: NDJSON output events, then exit")


class Kill(_Body):
    signal: int = Field(int(_signal.SIGKILL), ge=1, le=64)


class NewPty(_Body):
    cols: int = Field(80, ge=1, le=1000)
    rows: int = Field(24, ge=1, le=1000)
    command: str | list[str] = ["/bin/sh", "-i"]
    env: dict[str, str] | None = None
    cwd: str | None = None


class Size(_Body):
    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)


class PathBody(_Body):
    path: str


class Rename(_Body):
    src: str
    dst: str


class Rules(_Body):
    allow: list[str] | None = None
    deny: list[str] | None = None


class Answer(_Body):
    allow: bool


# -- the app ----------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="an API key: corral keys create")


def _auth(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    service: Service = request.app.state.service
    key = service.store.authenticate(creds.credentials) if creds is not None else None
    if key is None:
        raise ServiceError(401, "unauthorized", "a valid API key is required")
    return key


Key = Annotated[ApiKey, Depends(_auth)]


def create_app(service: Service, *, max_request_bytes: int = 1 << 20) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="corral",
        version=__version__,
        summary="Isolated, stateful, resource-limited sandboxes over HTTP",
        lifespan=lifespan,
    )
    app.state.service = service
    service.metrics.counts = service.store.count_by_state
    app.add_middleware(_BodyLimit, max_bytes=max_request_bytes)
    _errors(app)

    @app.get("/health", tags=["server"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def metrics(key: Key) -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    # -- sandboxes ---------------------------------------------------------------

    @app.post("/v1/sandboxes", status_code=201, tags=["sandboxes"])
    async def create_sandbox(body: CreateSandbox, key: Key) -> dict[str, Any]:
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
        return _info(service, row)

    @app.get("/v1/sandboxes", tags=["sandboxes"])
    async def list_sandboxes(
        key: Key,
        state: Literal["running", "ended"] | None = None,
        metadata: Annotated[list[str] | None, Query(description="key=value, repeatable")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[int | None, Query(ge=0, le=_MAX_SEQ)] = None,
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
            "sandboxes": [_info(service, r) for r in rows],
            "next_cursor": rows[-1].seq if len(rows) == limit else None,
        }

    @app.get("/v1/sandboxes/{sandbox_id}", tags=["sandboxes"])
    async def get_sandbox(sandbox_id: str, key: Key) -> dict[str, Any]:
        return _info(service, service.row(key, sandbox_id))

    @app.post("/v1/sandboxes/{sandbox_id}/timeout", tags=["sandboxes"])
    async def set_timeout(sandbox_id: str, body: Timeout, key: Key) -> dict[str, Any]:
        return _info(service, service.extend(key, sandbox_id, body.timeout_s))

    @app.delete("/v1/sandboxes/{sandbox_id}", tags=["sandboxes"])
    async def close_sandbox(sandbox_id: str, key: Key) -> dict[str, Any]:
        service.row(key, sandbox_id)
        await service.end(sandbox_id, "closed")
        return _info(service, service.row(key, sandbox_id))

    @app.delete("/v1/sandboxes/{sandbox_id}/workspace", tags=["sandboxes"])
    async def delete_workspace(sandbox_id: str, key: Key) -> dict[str, Any]:
        """Remove an ended sandbox's workspace now (its record stays): it stops
        counting against the key's disk quota. 409 while the sandbox runs."""
        return _info(service, await service.delete_workspace(key, sandbox_id))

    @app.get("/v1/audit", tags=["server"])
    async def audit(
        key: Key,
        sandbox_id: str | None = None,
        action: str | None = None,
        after: Annotated[int, Query(ge=0, le=_MAX_SEQ)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        entries = service.store.audit_log(
            key_id=key.id, sandbox_id=sandbox_id, action=action, limit=limit, after_seq=after
        )
        return {"entries": entries}

    # -- code --------------------------------------------------------------------

    @app.post("/v1/sandboxes/{sandbox_id}/code", tags=["code"])
    async def run_code(sandbox_id: str, body: RunCode, key: Key) -> Any:
        live = service.get_live(key, sandbox_id)
        context = (
            _find(live.contexts, body.context_id, "code context")
            if body.context_id is not None
            else None
        )

        def record(execution: dict[str, Any], seconds: float) -> None:
            service.metrics.run_code.observe(seconds)
            error = execution.get("error") or {}
            limit = error.get("limit_hit")
            if limit:
                service.metrics.limit_hit(limit)
            service.store.audit(
                "code.run",
                key_id=key.id,
                sandbox_id=sandbox_id,
                language=body.language,
                code=body.code[:2000],
                error=error.get("name"),
                limit=limit,
                duration_s=round(seconds, 6),
            )

        if not body.stream:
            async with service.using(key, sandbox_id) as live:
                started = asyncio.get_running_loop().time()
                execution = s.execution_to_dict(
                    await live.sandbox.run_code(
                        body.code, language=body.language, context=context, timeout_s=body.timeout_s
                    )
                )
                record(execution, asyncio.get_running_loop().time() - started)
                return _json(execution)

        async def events() -> AsyncIterator[dict[str, Any]]:
            async with service.using(key, sandbox_id) as live:
                started = asyncio.get_running_loop().time()
                async for event in live.sandbox.stream_code(
                    body.code, language=body.language, context=context, timeout_s=body.timeout_s
                ):
                    data = s.code_event_to_dict(event)
                    if data["type"] == "done":
                        record(data["execution"], asyncio.get_running_loop().time() - started)
                    yield data

        return _ndjson(events())

    @app.post("/v1/sandboxes/{sandbox_id}/contexts", status_code=201, tags=["code"])
    async def create_context(sandbox_id: str, body: NewContext, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            context = await live.sandbox.create_code_context(body.language, cwd=body.cwd)
            live.contexts[context.id] = context
            return s.context_to_dict(context)

    @app.post("/v1/sandboxes/{sandbox_id}/contexts/{context_id}/restart", tags=["code"])
    async def restart_context(sandbox_id: str, context_id: str, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            context = _find(live.contexts, context_id, "code context")
            await live.sandbox.restart_code_context(context)
            return s.context_to_dict(context)

    @app.delete("/v1/sandboxes/{sandbox_id}/contexts/{context_id}", tags=["code"])
    async def remove_context(sandbox_id: str, context_id: str, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            context = _find(live.contexts, context_id, "code context")
            await live.sandbox.remove_code_context(context)
            del live.contexts[context_id]
            return {"removed": context_id}

    @app.post("/v1/sandboxes/{sandbox_id}/prewarm", tags=["code"])
    async def prewarm(sandbox_id: str, body: Prewarm, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            await live.sandbox.prewarm(body.language)
            return {"language": body.language}

    # -- commands ----------------------------------------------------------------

    @app.post("/v1/sandboxes/{sandbox_id}/commands", tags=["commands"])
    async def run_command(sandbox_id: str, body: RunCommand, key: Key) -> Any:
        live = service.get_live(key, sandbox_id)
        stdin = s.unb64_request(body.stdin, "stdin") if body.stdin is not None else None
        argv = body.command if isinstance(body.command, str) else list(body.command)

        def record(result: dict[str, Any]) -> None:
            if result["limit_hit"]:
                service.metrics.limit_hit(result["limit_hit"])
            service.store.audit(
                "command.run",
                key_id=key.id,
                sandbox_id=sandbox_id,
                command=str(argv)[:2000],
                exit_code=result["exit_code"],
                limit=result["limit_hit"],
                background=body.background,
            )

        if body.background:
            async with service.using(key, sandbox_id) as live:
                running = sum(not o.done for _, o in live.commands.values())
                if running + live.starting >= _MAX_BACKGROUND:
                    raise ServiceError(
                        429,
                        "too_many",
                        f"a sandbox runs at most {_MAX_BACKGROUND} background "
                        "commands started through the API",
                    )
                output = OutputLog()
                service.objects["OutputLog"].add(output)
                live.starting += 1  # counted while it starts: concurrent requests see it
                try:
                    handle = await live.sandbox.commands.run(
                        argv,
                        background=True,
                        timeout_s=body.timeout_s,
                        env=body.env,
                        cwd=body.cwd,
                        stdin=stdin if stdin is not None else (True if body.stdin_open else None),
                        on_stdout=lambda d: output.on_output("stdout", len(d)),
                        on_stderr=lambda d: output.on_output("stderr", len(d)),
                    )
                finally:
                    live.starting -= 1
                if handle.pid is None:  # could not start: already a result
                    result = s.command_result_to_dict(await handle.wait())
                    record(result)
                    return JSONResponse({"pid": None, "result": result}, status_code=201)
                output.attach(handle)
                _keep(live, handle.pid, handle, output)
                service.store.audit(
                    "command.start",
                    key_id=key.id,
                    sandbox_id=sandbox_id,
                    command=str(argv)[:2000],
                    pid=handle.pid,
                )
                live.sandbox._spawn(_finish_background(handle, output, record))
                return JSONResponse({"pid": handle.pid, "result": None}, status_code=201)

        if not body.stream:
            async with service.using(key, sandbox_id) as live:
                result = s.command_result_to_dict(
                    await live.sandbox.commands.run(
                        argv, timeout_s=body.timeout_s, env=body.env, cwd=body.cwd, stdin=stdin
                    )
                )
                record(result)
                return _json(result)

        async def events() -> AsyncIterator[dict[str, Any]]:
            # commands.stream is bounded: a slow HTTP reader holds the command
            # back instead of filling the server's memory; a client that goes
            # away closes this generator, which kills the command
            async with service.using(key, sandbox_id) as live:
                async for event in live.sandbox.commands.stream(
                    argv, timeout_s=body.timeout_s, env=body.env, cwd=body.cwd, stdin=stdin
                ):
                    if isinstance(event, CommandExit):
                        result = s.command_result_to_dict(event.result)
                        record(result)
                        yield {"type": "exit", "result": result}
                    else:
                        yield _chunk(event.stream, event.data)

        return _ndjson(events())

    # -- terminals: the PtyHandle calls, one request each --------------------------

    @app.post("/v1/sandboxes/{sandbox_id}/pty", status_code=201, tags=["terminals"])
    async def create_pty(sandbox_id: str, body: NewPty, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            for pid, old in list(live.terminals.items()):
                if old._process.exit.done():  # ended and never waited for
                    del live.terminals[pid]
                    live.terminal_locks.pop(pid, None)
            if len(live.terminals) + live.starting >= _MAX_TERMINALS:
                raise ServiceError(
                    429, "too_many", f"a sandbox has at most {_MAX_TERMINALS} open terminals"
                )
            argv = body.command if isinstance(body.command, str) else list(body.command)
            live.starting += 1
            try:
                handle = await live.sandbox.pty.create(
                    body.cols, body.rows, command=argv, env=body.env, cwd=body.cwd
                )
            finally:
                live.starting -= 1
            assert handle.pid is not None
            live.terminals[handle.pid] = handle
            service.store.audit(
                "pty.create", key_id=key.id, sandbox_id=sandbox_id, command=str(argv)[:2000]
            )
            return {"pid": handle.pid}

    @app.post("/v1/sandboxes/{sandbox_id}/pty/{pid}/input", tags=["terminals"])
    async def pty_input(sandbox_id: str, pid: int, request: Request, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            data = await request.body()
            await _find(live.terminals, pid, "terminal with pid").send(data)
            return {"sent": len(data)}

    @app.get("/v1/sandboxes/{sandbox_id}/pty/{pid}/output", tags=["terminals"])
    async def pty_output(
        sandbox_id: str, pid: int, key: Key, timeout_s: Annotated[float, Query(ge=0, le=60)] = 30
    ) -> dict[str, Any]:
        """The next output (b"" with ``eof`` once it ended); ``timed_out`` when
        nothing came within ``timeout_s`` (ask again: nothing is lost)."""
        async with service.using(key, sandbox_id) as live:
            terminal = _find(live.terminals, pid, "terminal with pid")
            lock = live.terminal_locks.setdefault(pid, asyncio.Lock())
            try:
                async with lock:  # one reader at a time: a retry must not break the handle
                    data = await terminal.read(timeout_s)
            except TimeoutError:
                return {"data": "", "eof": False, "timed_out": True}
            return {"data": s.b64(data), "eof": not data, "timed_out": False}

    @app.post("/v1/sandboxes/{sandbox_id}/pty/{pid}/resize", tags=["terminals"])
    async def pty_resize(sandbox_id: str, pid: int, body: Size, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            await _find(live.terminals, pid, "terminal with pid").resize(body.cols, body.rows)
            return {"cols": body.cols, "rows": body.rows}

    @app.post("/v1/sandboxes/{sandbox_id}/pty/{pid}/kill", tags=["terminals"])
    async def pty_kill(sandbox_id: str, pid: int, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            await _find(live.terminals, pid, "terminal with pid").kill()
            return {"killed": True}

    @app.post("/v1/sandboxes/{sandbox_id}/pty/{pid}/wait", tags=["terminals"])
    async def pty_wait(sandbox_id: str, pid: int, key: Key) -> Response:
        async with service.using(key, sandbox_id) as live:
            result = await _find(live.terminals, pid, "terminal with pid").wait()
            live.terminals.pop(pid, None)
            live.terminal_locks.pop(pid, None)
            return _json(s.command_result_to_dict(result))

    @app.get("/v1/sandboxes/{sandbox_id}/commands", tags=["commands"])
    async def list_commands(sandbox_id: str, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            processes = await live.sandbox.commands.list()
            return {"processes": [s.process_to_dict(p) for p in processes]}

    @app.get("/v1/sandboxes/{sandbox_id}/commands/{pid}/events", tags=["commands"])
    async def command_events(sandbox_id: str, pid: int, key: Key) -> StreamingResponse:
        """A background command's output from its start, then its exit (whose
        result carries no output: it came as events)."""
        live = service.get_live(key, sandbox_id)
        _, output = _find(live.commands, pid, "background command with pid")
        return _ndjson(output.follow())

    @app.post("/v1/sandboxes/{sandbox_id}/commands/{pid}/stdin", tags=["commands"])
    async def send_stdin(sandbox_id: str, pid: int, request: Request, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            handle, _ = _find(live.commands, pid, "background command with pid")
            data = await request.body()
            await handle.send_stdin(data)
            return {"sent": len(data)}

    @app.post("/v1/sandboxes/{sandbox_id}/commands/{pid}/stdin/close", tags=["commands"])
    async def close_stdin(sandbox_id: str, pid: int, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            handle, _ = _find(live.commands, pid, "background command with pid")
            await handle.close_stdin()
            return {"closed": True}

    @app.post("/v1/sandboxes/{sandbox_id}/commands/{pid}/kill", tags=["commands"])
    async def kill_command(sandbox_id: str, pid: int, body: Kill, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            return {"killed": await live.sandbox.commands.kill(pid, body.signal)}

    # -- files -------------------------------------------------------------------

    @app.put("/v1/sandboxes/{sandbox_id}/files/content", tags=["files"])
    async def upload(
        sandbox_id: str,
        request: Request,
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
            size = await live.sandbox.files.write(path, body(), mode=mode)
            service.store.audit(
                "file.write", key_id=key.id, sandbox_id=sandbox_id, path=path[:1000], size=size
            )
            return {"path": path, "size": size}

    @app.get("/v1/sandboxes/{sandbox_id}/files/content", tags=["files"])
    async def download(sandbox_id: str, key: Key, path: str) -> StreamingResponse:
        row = service.row(key, sandbox_id)
        if row.state != "running":
            return await _download_ended(service, key, sandbox_id, path)
        async with service.using(key, sandbox_id) as live:
            reader = await live.sandbox.files.open_read(path)

        async def chunks() -> AsyncIterator[bytes]:
            async with reader:
                async for chunk in reader:
                    yield chunk

        return StreamingResponse(
            chunks(),
            media_type="application/octet-stream",
            headers={"X-Corral-Size": str(reader.size)},
        )

    @app.get("/v1/sandboxes/{sandbox_id}/files", tags=["files"])
    async def list_files(sandbox_id: str, key: Key, path: str = ".") -> dict[str, Any]:
        row = service.row(key, sandbox_id)
        if row.state != "running":
            root = service.ended_workspace(key, sandbox_id)
            relative = _workspace_relative(service, key, sandbox_id, path)
            entries = await asyncio.to_thread(list_beneath, root, relative)
        else:
            async with service.using(key, sandbox_id) as live:
                entries = await live.sandbox.files.list(path)
        return {"entries": [s.entry_to_dict(e) for e in entries]}

    @app.get("/v1/sandboxes/{sandbox_id}/files/stat", tags=["files"])
    async def stat_file(sandbox_id: str, key: Key, path: str) -> dict[str, Any]:
        row = service.row(key, sandbox_id)
        if row.state != "running":
            root = service.ended_workspace(key, sandbox_id)
            relative = _workspace_relative(service, key, sandbox_id, path)
            return s.entry_to_dict(await asyncio.to_thread(stat_beneath, root, relative))
        async with service.using(key, sandbox_id) as live:
            return s.entry_to_dict(await live.sandbox.files.stat(path))

    @app.delete("/v1/sandboxes/{sandbox_id}/files", tags=["files"])
    async def remove_file(sandbox_id: str, key: Key, path: str) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            await live.sandbox.files.remove(path)
            return {"removed": path}

    @app.post("/v1/sandboxes/{sandbox_id}/files/mkdir", tags=["files"])
    async def mkdir(sandbox_id: str, body: PathBody, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            await live.sandbox.files.mkdir(body.path)
            return {"created": body.path}

    @app.post("/v1/sandboxes/{sandbox_id}/files/rename", tags=["files"])
    async def rename(sandbox_id: str, body: Rename, key: Key) -> dict[str, Any]:
        async with service.using(key, sandbox_id) as live:
            await live.sandbox.files.rename(body.src, body.dst)
            return {"renamed": body.dst}

    # -- network -----------------------------------------------------------------

    @app.get("/v1/sandboxes/{sandbox_id}/network/events", tags=["network"])
    async def network_events(sandbox_id: str, key: Key) -> dict[str, Any]:
        live = service.get_live(key, sandbox_id)
        return {"events": [s.network_event_to_dict(e) for e in live.sandbox.network.events()]}

    @app.put("/v1/sandboxes/{sandbox_id}/network/rules", tags=["network"])
    async def update_rules(sandbox_id: str, body: Rules, key: Key) -> dict[str, Any]:
        live = service.get_live(key, sandbox_id)
        if body.allow is not None:
            service.check_rules(body.allow)
        if live.sandbox.policy.network.mode != "allowlist":
            raise ServiceError(409, "not_allowlist", "network.mode is not 'allowlist'")
        live.sandbox.network.update(allow=body.allow, deny=body.deny)
        net = live.sandbox.policy.network
        service.store.audit(
            "network.rules",
            key_id=key.id,
            sandbox_id=sandbox_id,
            allow=list(net.allow),
            deny=list(net.deny),
        )
        return {"allow": list(net.allow), "deny": list(net.deny)}

    @app.get("/v1/sandboxes/{sandbox_id}/network/approvals", tags=["network"])
    async def approvals(
        sandbox_id: str, key: Key, wait_s: Annotated[float, Query(ge=0, le=60)] = 0
    ) -> dict[str, Any]:
        live = service.get_live(key, sandbox_id)
        pending = await service.pending_approvals(live, wait_s)
        return {
            "approvals": [
                {"id": a.id, "host": a.host, "port": a.port, "time": a.time} for a in pending
            ]
        }

    @app.post("/v1/sandboxes/{sandbox_id}/network/approvals/{approval_id}", tags=["network"])
    async def answer(sandbox_id: str, approval_id: str, body: Answer, key: Key) -> dict[str, Any]:
        live = service.get_live(key, sandbox_id)
        approval = live.approvals.get(approval_id)
        if approval is None or approval.answer.done():
            raise ServiceError(404, "not_found", f"no pending approval {approval_id!r}")
        approval.answer.set_result(body.allow)
        service.store.audit(
            "network.approval",
            key_id=key.id,
            sandbox_id=sandbox_id,
            host=approval.host,
            port=approval.port,
            allowed=body.allow,
        )
        return {"id": approval_id, "allow": body.allow}

    return app


# -- helpers ------------------------------------------------------------------------------


def _info(service: Service, row: SandboxRow) -> dict[str, Any]:
    live = service.live.get(row.id)
    box = live.sandbox._box if live is not None else None
    return {
        "id": row.id,
        "state": row.state,
        "end_reason": row.end_reason,
        "limit_hit": row.limit_hit,
        "end_detail": row.end_detail,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "ended_at": row.ended_at,
        "retain_until": row.retain_until,
        "workspace_available": row.state == "running" or not row.purged,
        "metadata": row.metadata,
        "runtime": row.runtime,
        "policy": row.policy,
        "degraded": list(box.plans.degraded) if box is not None else [],
    }


def _find(items: Mapping[K, V], key: K, what: str) -> V:
    """A context, background command or terminal of the sandbox, or 404."""
    found = items.get(key)
    if found is None:
        raise ServiceError(404, "not_found", f"no {what} {key!r}")
    return found


def _keep(live: Live, pid: int, handle: CommandHandle, output: OutputLog) -> None:
    """Register a background command; finished ones are forgotten oldest first
    beyond ``_MAX_FINISHED_COMMANDS`` or ``_MAX_FINISHED_BYTES`` of output."""
    live.commands[pid] = (handle, output)
    finished = [(p, o.kept) for p, (_, o) in live.commands.items() if o.done]
    count, size = len(finished), sum(kept for _, kept in finished)
    for old, kept in finished:
        if count <= _MAX_FINISHED_COMMANDS and size <= _MAX_FINISHED_BYTES:
            break
        del live.commands[old]
        count, size = count - 1, size - kept


async def _finish_background(
    handle: CommandHandle, output: OutputLog, record: Callable[[dict[str, Any]], None]
) -> None:
    try:
        result = s.command_result_to_dict(await handle.wait())
        record(result)
        # the output went out as events: the exit does not carry it twice
        output.finish("exit", {"result": {**result, "stdout": "", "stderr": ""}})
    except CorralError as exc:
        output.finish("error", {"error": {"code": "sandbox_ended", "message": str(exc)}})
    finally:
        if not output.done:  # cancelled: followers must not wait forever
            output.finish("error", {"error": {"code": "sandbox_ended", "message": "cancelled"}})


def _json(data: dict[str, Any]) -> Response:
    """A reply already made of JSON types: serialized once, without FastAPI's walk."""
    return Response(json.dumps(data, separators=(",", ":")), media_type="application/json")


def _chunk(stream: str, data: bytes) -> dict[str, Any]:
    return {"type": stream, "data": s.b64(data)}


def _ndjson(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield json.dumps(event, separators=(",", ":")).encode() + b"\n"
        except Exception as exc:  # the status line is sent: the error is the last event
            _, code, message = _describe(exc)
            yield json.dumps(
                {"type": "error", "error": {"code": code, "message": message}}
            ).encode()
            yield b"\n"

    return StreamingResponse(lines(), media_type=NDJSON)


def _workspace_relative(service: Service, key: ApiKey, sandbox_id: str, path: str) -> str:
    """A path as the box saw it (relative, or absolute under its workspace),
    relative to the workspace directory on the host."""
    row = service.row(key, sandbox_id)
    workspace = str(row.policy.get("filesystem", {}).get("workspace", "/workspace"))
    return workspace_relative(workspace, path)


async def _download_ended(
    service: Service, key: ApiKey, sandbox_id: str, path: str
) -> StreamingResponse:
    root = service.ended_workspace(key, sandbox_id)
    relative = _workspace_relative(service, key, sandbox_id, path)
    fd, size = await asyncio.to_thread(open_file_beneath, root, relative)

    def chunks() -> Iterator[bytes]:  # Starlette runs a sync iterator in its thread pool
        try:
            while data := os.read(fd, 1 << 20):
                yield data
        finally:
            os.close(fd)

    return StreamingResponse(
        chunks(), media_type="application/octet-stream", headers={"X-Corral-Size": str(size)}
    )


def _describe(exc: BaseException) -> tuple[int, str, str]:
    """Status, stable code and a client-safe message for an exception."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.code, str(exc)
    if isinstance(exc, PolicyError):
        return 400, "invalid_policy", str(exc)
    if isinstance(exc, UnsupportedPolicy):
        return 400, "unsupported_policy", str(exc)
    if isinstance(exc, PathOutsideWorkspace):
        return 400, "path_outside_workspace", str(exc)
    if isinstance(exc, OSError) and exc.errno in s.OS_ERRORS:
        # strerror only: the filename of a host-side error would be a host path
        status, code = s.OS_ERRORS[exc.errno]
        return status, code, exc.strerror or code.replace("_", " ")
    if isinstance(exc, SandboxClosed | SandboxBroken):
        return 409, "sandbox_ended", str(exc)
    if isinstance(exc, ValueError):
        return 400, "invalid_request", str(exc)
    if isinstance(exc, CorralError):  # the box's machinery: its message names host paths
        return 500, "sandbox_error", public_message(str(exc))
    incident = secrets.token_hex(4)
    log.error("internal error %s", incident, exc_info=exc)
    return 500, "internal", f"internal error (incident {incident} in the server log)"


def _errors(app: FastAPI) -> None:
    def reply(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": code, "message": message, **extra}}, status_code=status
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return reply(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}", field=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return reply(exc.status_code, code, str(exc.detail))

    # the expected failures, answered by the exception middleware (no traceback logged)
    @app.exception_handler(CorralError)
    @app.exception_handler(OSError)
    @app.exception_handler(ValueError)
    # anything else: logged with an incident id, answered without details
    @app.exception_handler(Exception)
    async def anything(_request: Request, exc: Exception) -> JSONResponse:
        status, code, message = _describe(exc)
        extra = {"field": exc.field} if isinstance(exc, PolicyError) else {}
        return reply(status, code, message, **extra)


class _BodyLimit:
    """Request bodies beyond ``max_bytes`` are refused (413) before they are
    buffered; file uploads have their own, larger limit."""

    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http" or scope["path"].endswith("/files/content"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
        # read (at most max_bytes of) the body first, then hand it on: an
        # oversized chunked body gets its 413 like one with a Content-Length
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]], limit: int
) -> None:
    body = json.dumps(
        {"error": {"code": "too_large", "message": f"request bodies are limited to {limit} bytes"}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":  # python -m corral.server._app > docs/openapi.json
    import sys
    import tempfile
    from pathlib import Path

    from ._service import ServiceConfig
    from ._store import Store

    _service = Service(Store("sqlite://"), ServiceConfig(data_dir=Path(tempfile.gettempdir())))
    json.dump(create_app(_service).openapi(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
