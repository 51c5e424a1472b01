"""The remote client: the same ``Sandbox`` API, run by ``corral serve``.

``AsyncClient.sandbox()`` returns a ``RemoteSandbox``, which implements
``corral.abc.AsyncSandboxAPI`` as ``AsyncSandbox`` does (mypy checks both);
``Client.sandbox()`` returns the very ``Sandbox`` facade of the local library
(generated, ``_sync.py``) around it, so code moves between local and remote by
changing one line. Streaming callbacks work remotely: output and rich results
arrive as NDJSON events as they happen.

Differences that cannot be hidden, and how they show:
- a terminal's ``read`` is one long-polling request per call;
- a remote sandbox always has a finite lifetime (``set_timeout(None)`` is refused);
- the server's failures are ``RemoteError`` (``.code``: ``unauthorized``,
  ``quota_exceeded``…), and losing the server mid-call is ``SandboxBroken``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import json
import os
import signal as _signal
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, cast, overload

from . import _serial as s
from . import _snapshot
from ._errors import (
    CorralError,
    RemoteError,
    SandboxBroken,
    SandboxClosed,
    SandboxError,
    from_wire,
)
from ._interpreter import (
    CodeContext,
    CodeEvent,
    ErrorCallback,
    Execution,
    ResultCallback,
    TextCallback,
)
from ._policy import Policy
from ._portal import call as _call
from ._runtime import DEFAULT as DEFAULT_RUNTIME
from ._sandbox import (
    CommandEvent,
    CommandExit,
    CommandOutput,
    CommandResult,
    EntryInfo,
    OutputCallback,
    Payload,
    ProcessInfo,
    _chunks,
)
from ._snapshot import Snapshot
from ._sync import Sandbox
from .abc import (
    AsyncCommandHandleAPI,
    AsyncCommandsAPI,
    AsyncFileReaderAPI,
    AsyncFilesAPI,
    AsyncNetworkAPI,
    AsyncPtyAPI,
    AsyncPtyHandleAPI,
    AsyncSandboxAPI,
)
from .net._events import Approval, NetworkEvent

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
_API = "/v1/sandboxes"


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    """A sandbox as the server records it; ``end_reason`` says why it ended."""

    id: str
    state: Literal["running", "ended"]
    end_reason: str | None
    limit_hit: str | None
    end_detail: str | None
    created_at: float
    expires_at: float | None
    ended_at: float | None
    retain_until: float | None
    workspace_available: bool
    metadata: dict[str, str]
    runtime: str | None
    policy: dict[str, Any]
    degraded: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SandboxInfo:
        try:
            return cls(
                **{k: data[k] for k in cls.__dataclass_fields__ if k != "degraded"},
                degraded=tuple(data.get("degraded") or ()),
            )
        except KeyError as exc:
            raise SandboxBroken(f"the server's sandbox record lacks {exc}") from None


# -- errors ---------------------------------------------------------------------------------


def _raise_for(status: int, body: bytes) -> None:
    """Turn the server's JSON error into the exception the local library raises."""
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        raise RemoteError(status, "http_error", body[:200].decode(errors="replace")) from None
    _raise_code(status, code, message, error.get("field"))


def _raise_code(status: int, code: str, message: str, fieldname: object = None) -> None:
    """Raise the class ``corral._errors.WIRE`` names for ``code``, from the
    ``RemoteError`` that says what the server answered (httpx's idiom)."""
    remote = RemoteError(status, code, message)
    mapped = from_wire(status, code, message, fieldname)
    if isinstance(mapped, RemoteError):
        raise mapped
    raise mapped from remote


def _lost(exc: Exception) -> SandboxBroken:
    return SandboxBroken(f"lost the connection to the corral server: {exc!r}")


# -- the clients ------------------------------------------------------------------------------


class AsyncClient:
    """A connection to ``corral serve``. ``api_key`` defaults to ``$CORRAL_API_KEY``."""

    def __init__(self, url: str = DEFAULT_URL, *, api_key: str | None = None) -> None:
        try:
            import httpx
        except ImportError:  # pragma: no cover - an install without the extra
            raise CorralError(
                "the remote client needs httpx: pip install 'corral[client]'"
            ) from None
        key = api_key or os.environ.get("CORRAL_API_KEY")
        if not key:
            raise ValueError("api_key: needed (or set CORRAL_API_KEY)")
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"}
        # no read timeout: a cell may run for its whole timeout; a dead server
        # closes the connection, which ends the call
        timeout = httpx.Timeout(connect=10.0, read=None, write=None, pool=None)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        # TCP keepalive: with no read timeout, a server that vanished without a
        # FIN (a cut network) must still end the call, within about a minute
        keepalive = [
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
        ]
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            limits=limits,
            transport=httpx.AsyncHTTPTransport(socket_options=keepalive, limits=limits),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def sandbox(
        self,
        policy: Policy | str | None = None,
        *,
        timeout_s: float = 300.0,
        idle_timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        runtime: str | None = DEFAULT_RUNTIME,
        metadata: Mapping[str, str] | None = None,
        on_network_request: Approval | None = None,
    ) -> RemoteSandbox:
        """A sandbox on the server, started by ``async with`` (or ``start()``)."""
        return RemoteSandbox(
            self,
            policy,
            timeout_s=timeout_s,
            idle_timeout_s=idle_timeout_s,
            env=env,
            runtime=runtime,
            metadata=metadata,
            on_network_request=on_network_request,
        )

    async def connect(self, sandbox_id: str) -> RemoteSandbox:
        """A running sandbox of this key, from another process or an earlier session."""
        info = await self.get(sandbox_id)
        if info.state != "running":
            raise SandboxBroken(f"sandbox {sandbox_id} has ended ({info.end_reason})")
        sandbox = RemoteSandbox(self, Policy.from_dict(info.policy), timeout_s=None)
        sandbox._attach(info)
        return sandbox

    async def get(self, sandbox_id: str) -> SandboxInfo:
        return SandboxInfo.from_dict(await self._json("GET", f"{_API}/{sandbox_id}"))

    async def list(
        self,
        *,
        state: Literal["running", "ended"] | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int = 100,
    ) -> list[SandboxInfo]:
        """This key's sandboxes, newest first, every page."""
        out: list[SandboxInfo] = []
        cursor: int | None = None
        while True:
            params: list[tuple[str, str | int]] = [("limit", limit)]
            if state is not None:
                params.append(("state", state))
            params += [("metadata", f"{k}={v}") for k, v in (metadata or {}).items()]
            if cursor is not None:
                params.append(("cursor", cursor))
            page = await self._json("GET", _API, params=params)
            out += [SandboxInfo.from_dict(item) for item in page["sandboxes"]]
            cursor = page.get("next_cursor")
            if cursor is None:
                return out

    async def kill(self, sandbox_id: str) -> SandboxInfo:
        return SandboxInfo.from_dict(await self._json("DELETE", f"{_API}/{sandbox_id}"))

    async def download(self, sandbox_id: str, path: str) -> bytes:
        """A file of a sandbox's workspace, running or ended (until its retention ends)."""
        async with self._stream(
            "GET", f"{_API}/{sandbox_id}/files/content", params={"path": path}
        ) as r:
            return await r.aread()

    async def audit(
        self, *, sandbox_id: str | None = None, action: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        params = {k: v for k, v in (("sandbox_id", sandbox_id), ("action", action)) if v}
        return list((await self._json("GET", "/v1/audit", params=params))["entries"])

    # -- transport -------------------------------------------------------------------

    async def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise _lost(exc) from exc
        if response.status_code >= 400:
            _raise_for(response.status_code, response.content)
        try:
            return response.json()
        except ValueError:
            raise SandboxBroken("the server sent malformed JSON") from None

    @contextlib.asynccontextmanager
    async def _stream(self, method: str, url: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        import httpx

        try:
            async with self._http.stream(method, url, **kwargs) as response:
                if response.status_code >= 400:
                    _raise_for(response.status_code, await response.aread())
                yield response
        except httpx.TransportError as exc:
            raise _lost(exc) from exc

    async def _events(self, method: str, url: str, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        """NDJSON events; an error event raises, a cut stream is SandboxBroken."""
        import httpx

        async with self._stream(method, url, **kwargs) as response:
            try:
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise SandboxBroken("the server sent a malformed event") from None
                    if not isinstance(event, dict):
                        raise SandboxBroken("the server sent a malformed event")
                    if event.get("type") == "error":
                        error = event.get("error") or {}
                        _raise_code(500, str(error.get("code")), str(error.get("message")))
                    yield event
            except httpx.TransportError as exc:
                raise _lost(exc) from exc


class Client:
    """``AsyncClient``, synchronously: ``client.sandbox()`` is a ``Sandbox``."""

    def __init__(self, url: str = DEFAULT_URL, *, api_key: str | None = None) -> None:
        self._async = AsyncClient(url, api_key=api_key)
        self.url = self._async.url

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        _call(self._async.aclose())

    def sandbox(
        self,
        policy: Policy | str | None = None,
        *,
        timeout_s: float = 300.0,
        idle_timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        runtime: str | None = DEFAULT_RUNTIME,
        metadata: Mapping[str, str] | None = None,
        on_network_request: Approval | None = None,
    ) -> Sandbox:
        """A sandbox on the server, started by ``with`` (or ``start()``)."""
        remote = self._async.sandbox(
            policy,
            timeout_s=timeout_s,
            idle_timeout_s=idle_timeout_s,
            env=env,
            runtime=runtime,
            metadata=metadata,
            on_network_request=on_network_request,
        )
        return Sandbox._around(remote)

    def connect(self, sandbox_id: str) -> Sandbox:
        return Sandbox._around(_call(self._async.connect(sandbox_id)))

    def get(self, sandbox_id: str) -> SandboxInfo:
        return _call(self._async.get(sandbox_id))

    def list(
        self,
        *,
        state: Literal["running", "ended"] | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int = 100,
    ) -> list[SandboxInfo]:
        """This key's sandboxes, newest first, every page (``limit`` a page)."""
        return _call(self._async.list(state=state, metadata=metadata, limit=limit))

    def kill(self, sandbox_id: str) -> SandboxInfo:
        return _call(self._async.kill(sandbox_id))

    def download(self, sandbox_id: str, path: str) -> bytes:
        return _call(self._async.download(sandbox_id, path))

    def audit(
        self, *, sandbox_id: str | None = None, action: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        return _call(self._async.audit(sandbox_id=sandbox_id, action=action))


# -- the remote sandbox ---------------------------------------------------------------------


class RemoteSandbox:
    """A sandbox run by ``corral serve``, with the interface of ``AsyncSandbox``."""

    def __init__(
        self,
        client: AsyncClient,
        policy: Policy | str | None = None,
        *,
        timeout_s: float | None = 300.0,
        idle_timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        runtime: str | None = DEFAULT_RUNTIME,
        metadata: Mapping[str, str] | None = None,
        on_network_request: Approval | None = None,
    ) -> None:
        self._client = client
        self._spec: str | dict[str, Any] | None = (
            policy.to_dict() if isinstance(policy, Policy) else policy
        )
        self.policy = policy if isinstance(policy, Policy) else Policy.preset(policy or "default")
        self.id = ""
        self.runtime = runtime
        self.info: SandboxInfo | None = None
        self.commands = RemoteCommands(self)
        self.files = RemoteFiles(self)
        self.pty = RemotePty(self)
        self.network = RemoteNetwork(self)
        self._timeout_s = timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._env = dict(env or {})
        self._metadata = dict(metadata or {})
        self._approve = on_network_request
        self._closed = False
        self._tasks: set[asyncio.Future[None]] = set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self.info is not None or self._closed:
            raise SandboxError("a sandbox can be started once")
        if self._timeout_s is None:
            raise ValueError("timeout_s: a remote sandbox always has a finite lifetime")
        body = {
            "policy": self._spec,
            "runtime": self.runtime,
            "timeout_s": self._timeout_s,
            "idle_timeout_s": self._idle_timeout_s,
            "metadata": self._metadata,
            "env": self._env,
            "network_approval": self._approve is not None,
        }
        self._attach(SandboxInfo.from_dict(await self._client._json("POST", _API, json=body)))

    def _attach(self, info: SandboxInfo) -> None:
        self.info = info
        self.id = info.id
        self.policy = Policy.from_dict(info.policy)
        if self._approve is not None:
            self._spawn(self._answer_approvals(self._approve))

    async def close(self) -> None:
        """End the sandbox on the server (idempotent)."""
        if self._closed:
            return
        url = f"{_API}/{self.id}"
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self.info is not None:
            with contextlib.suppress(RemoteError, SandboxBroken):
                await self._client._json("DELETE", url)

    @property
    def degraded(self) -> tuple[str, ...]:
        """See ``AsyncSandbox.degraded`` (as the server reported it at start)."""
        return self.info.degraded if self.info is not None else ()

    async def is_running(self) -> bool:
        """Whether the server runs the sandbox (False when it is out of reach)."""
        if self._closed or self.info is None:
            return False
        try:
            info = await self._client._json("GET", self._url(""))
        except SandboxBroken:  # the server is out of reach
            return False
        return bool(info.get("state") == "running")

    async def set_timeout(self, timeout_s: float | None) -> None:
        """Give the sandbox ``timeout_s`` more seconds, counted from now."""
        if timeout_s is None:
            raise ValueError("timeout_s: a remote sandbox always has a finite lifetime")
        await self._client._json("POST", self._url("/timeout"), json={"timeout_s": timeout_s})

    async def pause(self) -> None:
        """Freeze the sandbox in place on the server (see ``AsyncSandbox.pause``)."""
        await self._client._json("POST", self._url("/pause"))

    async def resume(self) -> None:
        """Let a paused sandbox run again."""
        await self._client._json("POST", self._url("/resume"))

    async def snapshot(self, path: str | os.PathLike[str] | None = None) -> Snapshot:
        """Save the remote workspace to the local directory ``path`` (see
        ``AsyncSandbox.snapshot``): made through the files and commands API."""
        return await _snapshot.take(self, path)

    async def restore(self, snapshot: Snapshot | str | os.PathLike[str]) -> None:
        """Unpack a local snapshot into the remote workspace, inside the box."""
        await _snapshot.restore(self, snapshot)

    # -- code ---------------------------------------------------------------------

    async def run_code(
        self,
        code: str,
        *,
        language: str = "python",
        context: CodeContext | str | None = None,
        envs: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
        on_result: ResultCallback | None = None,
        on_error: ErrorCallback | None = None,
    ) -> Execution:
        """See ``AsyncSandbox.run_code``."""
        body = _code_body(code, language, context, envs, timeout_s)
        if not (on_stdout or on_stderr or on_result or on_error):
            return s.execution_from_dict(
                await self._client._json("POST", self._url("/code"), json=body)
            )
        callbacks: dict[str, Callable[[Any], object] | None] = {
            "stdout": on_stdout,
            "stderr": on_stderr,
            "result": on_result,
            "error": on_error,
        }
        async for kind, value in self._code_events(body):
            if kind == "done":
                return cast(Execution, value)
            callback = callbacks[kind]
            if callback is not None:
                with contextlib.suppress(Exception):  # as locally: a callback's error is its own
                    callback(value)
        raise SandboxBroken("the server ended the cell's stream without a result")

    async def stream_code(
        self,
        code: str,
        *,
        language: str = "python",
        context: CodeContext | str | None = None,
        envs: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[CodeEvent, None]:
        """See ``AsyncSandbox.stream_code``."""
        body = _code_body(code, language, context, envs, timeout_s)
        async for event in self._code_events(body):
            yield event
            if event[0] == "done":
                return

    async def _code_events(self, body: dict[str, Any]) -> AsyncIterator[CodeEvent]:
        async for data in self._client._events(
            "POST", self._url("/code"), json={**body, "stream": True}
        ):
            yield s.code_event_from_dict(data)

    async def create_code_context(
        self, language: str = "python", *, cwd: str | None = None
    ) -> CodeContext:
        data = await self._client._json(
            "POST", self._url("/contexts"), json={"language": language, "cwd": cwd}
        )
        return s.context_from_dict(data)

    async def list_code_contexts(self) -> list[CodeContext]:
        data = await self._client._json("GET", self._url("/contexts"))
        return [s.context_from_dict(c) for c in data["contexts"]]

    async def restart_code_context(self, context: CodeContext | str) -> None:
        await self._client._json("POST", self._url(f"/contexts/{_context_id(context)}/restart"))

    async def remove_code_context(self, context: CodeContext | str) -> None:
        await self._client._json("DELETE", self._url(f"/contexts/{_context_id(context)}"))

    async def prewarm(self, language: str = "python") -> None:
        await self._client._json("POST", self._url("/prewarm"), json={"language": language})

    # -- helpers ------------------------------------------------------------------

    def _url(self, tail: str) -> str:
        if self._closed:
            raise SandboxClosed("the sandbox was closed")
        if self.info is None:
            raise SandboxError("the sandbox is not started (use `async with` or start())")
        return f"{_API}/{self.id}{tail}"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_approvals(self, approve: Approval) -> None:
        """Hosts the rules do not name come to ``approve``, as they do locally."""
        while not self._closed:
            try:
                pending = await self._client._json(
                    "GET", self._url("/network/approvals"), params={"wait_s": 20}
                )
            except (CorralError, ValueError):
                return
            for item in pending["approvals"]:
                try:
                    verdict = approve(str(item["host"]), int(item["port"]))
                    if asyncio.iscoroutine(verdict) or isinstance(verdict, asyncio.Future):
                        verdict = await verdict
                    allow = bool(verdict)
                except Exception:  # a failing callback denies, as locally
                    allow = False
                with contextlib.suppress(CorralError):
                    await self._client._json(
                        "POST",
                        self._url(f"/network/approvals/{item['id']}"),
                        json={"allow": allow},
                    )


def _context_id(context: CodeContext | str) -> str:
    return context if isinstance(context, str) else context.id


def _code_body(
    code: str,
    language: str,
    context: CodeContext | str | None,
    envs: Mapping[str, str] | None,
    timeout_s: float | None,
) -> dict[str, Any]:
    return {
        "code": code,
        "language": language,
        "context_id": _context_id(context) if context is not None else None,
        "envs": dict(envs) if envs is not None else None,
        "timeout_s": timeout_s,
    }


class RemotePtyHandle:
    """A terminal on the server: each call is one request (``read`` long-polls)."""

    def __init__(self, sandbox: RemoteSandbox, pid: int) -> None:
        self._sb = sandbox
        self._pid = pid
        self._url = sandbox._url(f"/pty/{pid}")

    @property
    def pid(self) -> int | None:
        return self._pid

    async def send(self, data: bytes | str) -> None:
        payload = data.encode() if isinstance(data, str) else data
        await self._sb._client._json("POST", f"{self._url}/input", content=payload)

    async def read(self, timeout_s: float | None = None) -> bytes:
        """See ``PtyHandle.read``: the next output, b"" at the end, TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            wait = 30.0 if deadline is None else max(0.0, min(30.0, deadline - loop.time()))
            reply = await self._sb._client._json(
                "GET", f"{self._url}/output", params={"timeout_s": wait}
            )
            if not reply.get("timed_out"):
                return s.unb64(reply.get("data"))
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError("no terminal output within the timeout")

    async def resize(self, cols: int, rows: int) -> None:
        if not (1 <= cols <= 1000 and 1 <= rows <= 1000):
            raise ValueError("cols and rows must be between 1 and 1000")
        await self._sb._client._json(
            "POST", f"{self._url}/resize", json={"cols": cols, "rows": rows}
        )

    async def kill(self) -> None:
        await self._sb._client._json("POST", f"{self._url}/kill")

    async def wait(self) -> CommandResult:
        return s.command_result_from_dict(await self._sb._client._json("POST", f"{self._url}/wait"))


class RemotePty:
    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sb = sandbox

    async def create(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        command: str | Sequence[str] = ("/bin/sh", "-i"),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> RemotePtyHandle:
        """A terminal running ``command`` (an interactive shell by default)."""
        if not (1 <= cols <= 1000 and 1 <= rows <= 1000):
            raise ValueError("cols and rows must be between 1 and 1000")
        body = {
            "cols": cols,
            "rows": rows,
            "command": command if isinstance(command, str) else list(command),
            "env": dict(env) if env is not None else None,
            "cwd": cwd,
        }
        reply = await self._sb._client._json("POST", self._sb._url("/pty"), json=body)
        return RemotePtyHandle(self._sb, int(reply["pid"]))


class RemoteNetwork:
    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sb = sandbox

    async def events(self) -> list[NetworkEvent]:
        data = await self._sb._client._json("GET", self._sb._url("/network/events"))
        return [s.network_event_from_dict(e) for e in data["events"]]

    async def update(
        self, *, allow: Sequence[str] | None = None, deny: Sequence[str] | None = None
    ) -> None:
        body = {
            "allow": list(allow) if allow is not None else None,
            "deny": list(deny) if deny is not None else None,
        }
        data = await self._sb._client._json("PUT", self._sb._url("/network/rules"), json=body)
        self._sb.policy = self._sb.policy.with_network(
            allow=tuple(data["allow"]), deny=tuple(data["deny"])
        )


# -- commands ------------------------------------------------------------------------------


class RemoteCommandHandle:
    """A background command on the server; its output follows as it happens."""

    def __init__(
        self,
        sandbox: RemoteSandbox,
        pid: int,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
    ) -> None:
        self._sb = sandbox
        self._pid = pid
        self._chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._callback_error: BaseException | None = None
        self._result: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self._follower = asyncio.ensure_future(self._follow())
        sandbox._tasks.add(self._follower)  # cancelled when the sandbox closes
        self._follower.add_done_callback(sandbox._tasks.discard)

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def stdout(self) -> bytes:
        return b"".join(self._chunks["stdout"])

    @property
    def stderr(self) -> bytes:
        return b"".join(self._chunks["stderr"])

    async def _follow(self) -> None:
        try:
            url = self._sb._url(f"/commands/{self._pid}/events")
            async for event in self._sb._client._events("GET", url):
                kind = event.get("type")
                if kind in ("stdout", "stderr"):
                    data = s.unb64(event.get("data"))
                    self._chunks[kind].append(data)
                    callback = self._callbacks[kind]
                    if callback is not None and self._callback_error is None:
                        try:
                            callback(data)
                        except Exception as exc:  # reported by wait(), as locally
                            self._callback_error = exc
                elif kind == "exit":
                    result = s.command_result_from_dict(event["result"])
                    self._result.set_result(
                        dataclasses.replace(result, stdout=self.stdout, stderr=self.stderr)
                    )
                    return
            raise SandboxBroken("the server ended the command's stream without its exit")
        except BaseException as exc:
            if not self._result.done():
                self._result.set_exception(
                    exc if isinstance(exc, Exception) else SandboxBroken("the stream was cancelled")
                )
                self._result.exception()
            if not isinstance(exc, Exception):
                raise

    async def wait(self) -> CommandResult:
        result = await asyncio.shield(self._result)
        if self._callback_error is not None:
            raise self._callback_error
        return result

    async def kill(self, signum: int = _signal.SIGKILL) -> None:
        await self._sb.commands.kill(self._pid, signum)

    async def send_stdin(self, data: bytes | str) -> None:
        payload = data.encode() if isinstance(data, str) else data
        await self._sb._client._json(
            "POST", self._sb._url(f"/commands/{self._pid}/stdin"), content=payload
        )

    async def close_stdin(self) -> None:
        await self._sb._client._json("POST", self._sb._url(f"/commands/{self._pid}/stdin/close"))


class RemoteCommands:
    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sb = sandbox

    @overload
    async def run(
        self,
        command: str | Sequence[str],
        *,
        background: Literal[False] = False,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult: ...

    @overload
    async def run(
        self,
        command: str | Sequence[str],
        *,
        background: Literal[True],
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | bool | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> AsyncCommandHandleAPI: ...

    @overload
    async def run(
        self,
        command: str | Sequence[str],
        *,
        background: bool = False,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | bool | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult | AsyncCommandHandleAPI: ...

    async def run(
        self,
        command: str | Sequence[str],
        *,
        background: bool = False,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | bool | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult | AsyncCommandHandleAPI:
        """See ``Commands.run`` of ``AsyncSandbox``."""
        if not background and isinstance(stdin, bool):
            raise TypeError("stdin=True is for background commands; give the bytes to send")
        data = stdin.encode() if isinstance(stdin, str) else stdin
        body: dict[str, Any] = {
            "command": command if isinstance(command, str) else list(command),
            "background": background,
            "timeout_s": timeout_s,
            "env": dict(env) if env is not None else None,
            "cwd": cwd,
            "stdin": s.b64(data) if isinstance(data, bytes) else None,
            "stdin_open": stdin is True,
        }
        if background:
            reply = await self._sb._client._json("POST", self._sb._url("/commands"), json=body)
            if reply.get("pid") is None:
                return _Finished(s.command_result_from_dict(reply["result"]))
            return RemoteCommandHandle(self._sb, int(reply["pid"]), on_stdout, on_stderr)
        if on_stdout is None and on_stderr is None:
            reply = await self._sb._client._json("POST", self._sb._url("/commands"), json=body)
            return s.command_result_from_dict(reply)
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        failure: BaseException | None = None
        result: CommandResult | None = None
        async for event in self._events({**body, "stream": True}):
            if isinstance(event, CommandExit):
                result = event.result
            elif (callback := callbacks[event.stream]) is not None and failure is None:
                try:
                    callback(event.data)
                except Exception as exc:  # reported at the end, as locally
                    failure = exc
        if failure is not None:
            raise failure
        if result is None:
            raise SandboxBroken("the server ended the command's stream without its exit")
        return result

    async def stream(
        self,
        command: str | Sequence[str],
        *,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
    ) -> AsyncGenerator[CommandEvent, None]:
        """See ``Commands.stream``: leaving the loop early kills the command."""
        data = stdin.encode() if isinstance(stdin, str) else stdin
        body = {
            "command": command if isinstance(command, str) else list(command),
            "timeout_s": timeout_s,
            "env": dict(env) if env is not None else None,
            "cwd": cwd,
            "stdin": s.b64(data) if data is not None else None,
            "stream": True,
        }
        async for event in self._events(body):
            yield event
            if isinstance(event, CommandExit):
                return

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[CommandEvent]:
        async for event in self._sb._client._events("POST", self._sb._url("/commands"), json=body):
            kind = event.get("type")
            if kind in ("stdout", "stderr"):
                yield CommandOutput(
                    cast(Literal["stdout", "stderr"], kind), s.unb64(event.get("data"))
                )
            elif kind == "exit":
                yield CommandExit(s.command_result_from_dict(event["result"]))

    async def list(self) -> list[ProcessInfo]:
        data = await self._sb._client._json("GET", self._sb._url("/commands"))
        return [s.process_from_dict(p) for p in data["processes"]]

    async def kill(self, pid: int, signum: int = _signal.SIGKILL) -> bool:
        """Signal the process group of the command with ``pid``; False if there is none."""
        data = await self._sb._client._json(
            "POST", self._sb._url(f"/commands/{pid}/kill"), json={"signal": int(signum)}
        )
        return bool(data["killed"])


class _Finished:
    """A background command that could not start: already its result."""

    def __init__(self, result: CommandResult) -> None:
        self._result = result
        self.pid = None
        self.stdout = result.stdout
        self.stderr = result.stderr

    async def wait(self) -> CommandResult:
        return self._result

    async def kill(self, signum: int = _signal.SIGKILL) -> None:
        return None

    async def send_stdin(self, data: bytes | str) -> None:
        raise BrokenPipeError("the command did not start")

    async def close_stdin(self) -> None:
        return None


# -- files ---------------------------------------------------------------------------------


class RemoteFileReader:
    """A file streamed from the server: ``async for chunk in reader`` or ``read``."""

    def __init__(self, stack: contextlib.AsyncExitStack, response: httpx.Response) -> None:
        self._stack = stack
        self._chunks = response.aiter_bytes()
        self.size = int(response.headers.get("x-corral-size", "0"))
        self._buffer = b""
        self._done = False

    async def _chunk(self) -> bytes:
        import httpx

        if self._done:
            return b""
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            self._done = True
            await self.close()
            return b""
        except httpx.TransportError as exc:  # a cut download is never a whole file
            await self.close()
            raise _lost(exc) from exc

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = [self._buffer]
            self._buffer = b""
            while chunk := await self._chunk():
                parts.append(chunk)
            return b"".join(parts)
        while len(self._buffer) < n:
            chunk = await self._chunk()
            if not chunk:
                break
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        if self._buffer:
            data, self._buffer = self._buffer, b""
            yield data
        while chunk := await self._chunk():
            yield chunk

    async def close(self) -> None:
        self._done = True
        await self._stack.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class RemoteFiles:
    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sb = sandbox

    async def write(self, path: str, data: Payload, *, mode: int = 0o644) -> int:
        """Streamed upload; the file appears whole or not at all."""
        reply = await self._sb._client._json(
            "PUT",
            self._sb._url("/files/content"),
            params={"path": path, "mode": mode},
            content=_chunks(data),
        )
        return int(reply["size"])

    async def read(self, path: str) -> bytes:
        reader = await self.open_read(path)
        async with reader:
            return await reader.read()

    async def open_read(self, path: str) -> RemoteFileReader:
        stack = contextlib.AsyncExitStack()
        try:
            response = await stack.enter_async_context(
                self._sb._client._stream(
                    "GET", self._sb._url("/files/content"), params={"path": path}
                )
            )
        except BaseException:
            await stack.aclose()
            raise
        return RemoteFileReader(stack, response)

    async def list(self, path: str = ".") -> list[EntryInfo]:
        data = await self._sb._client._json("GET", self._sb._url("/files"), params={"path": path})
        return [s.entry_from_dict(e) for e in data["entries"]]

    async def stat(self, path: str) -> EntryInfo:
        return s.entry_from_dict(
            await self._sb._client._json("GET", self._sb._url("/files/stat"), params={"path": path})
        )

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except FileNotFoundError:
            return False
        return True

    async def remove(self, path: str) -> None:
        await self._sb._client._json("DELETE", self._sb._url("/files"), params={"path": path})

    async def mkdir(self, path: str) -> None:
        await self._sb._client._json("POST", self._sb._url("/files/mkdir"), json={"path": path})

    async def rename(self, src: str, dst: str) -> None:
        await self._sb._client._json(
            "POST", self._sb._url("/files/rename"), json={"src": src, "dst": dst}
        )


# The remote classes implement the public Protocols, as the local ones do (mypy checks).
_sandbox_api: type[AsyncSandboxAPI] = RemoteSandbox
_commands_api: type[AsyncCommandsAPI] = RemoteCommands
_files_api: type[AsyncFilesAPI] = RemoteFiles
_pty_api: type[AsyncPtyAPI] = RemotePty
_network_api: type[AsyncNetworkAPI] = RemoteNetwork
_command_handle_api: tuple[type[AsyncCommandHandleAPI], ...] = (RemoteCommandHandle, _Finished)
_pty_handle_api: type[AsyncPtyHandleAPI] = RemotePtyHandle
_file_reader_api: type[AsyncFileReaderAPI] = RemoteFileReader
