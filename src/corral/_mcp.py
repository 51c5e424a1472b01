"""``corral mcp``: sandboxes as tools for MCP clients (the official ``mcp`` SDK, 2.x).

Each MCP session gets one sandbox, opened on first use and closed when the
session ends; the tools run code (stateful, Jupyter-style, with plots as
images), shell commands and file operations in it. What a sandbox may do is
the ``Policy`` the server was started with, and nothing a client sends
changes it.

What "the session" is, transport by transport:

* stdio, handshake era: the one connection; it ends when the client closes the pipe.
* stdio, 2026-07-28 era (no handshake): requests carry no session, but the pipe
  serves exactly one client, so the pipe is the session.
* streamable HTTP: the ``Mcp-Session-Id`` session; it ends on DELETE, on the SDK's
  idle timeout, or when the server stops. The 2026-07-28 era has no sessions over
  HTTP, so this server refuses it there and clients fall back to the handshake.

Sandbox errors come back as tool errors (``isError``) with a message for the
model; none of them stops the server.

The HTTP transport has no authentication. It binds only to loopback and
checks Host and Origin (DNS rebinding), but every process on this host can
reach it and open sandboxes: it is for one user's machine, not a shared one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import logging
import math
import os
import posixpath
import signal
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

import anyio
from mcp.server.connection import Connection
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import (
    UNSUPPORTED_PROTOCOL_VERSION,
    BlobResourceContents,
    CallToolResult,
    ContentBlock,
    EmbeddedResource,
    ImageContent,
    TextContent,
    ToolAnnotations,
    UnsupportedProtocolVersionErrorData,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from ._errors import CorralError
from ._interpreter import Execution, Language, Result
from ._policy import Policy
from ._sandbox import AsyncSandbox, EntryInfo, PathOutsideWorkspace
from ._units import timeout_arg

__all__ = ["build_server", "main"]

log = logging.getLogger("corral.mcp")

T = TypeVar("T")

_STATE_KEY = "corral.sandbox"
# Everything the box sends is untrusted and lands in a model's context window:
# bounded, so one runaway print cannot flood the client (or the server's memory).
_MAX_TEXT_CHARS = 100_000
_MAX_READ_BYTES = 8 << 20  # a file, or an image, returned whole
_IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}
_EXIT_USAGE = 2


# -- one sandbox per session ------------------------------------------------------------


class _SandboxEnded(ToolError):
    """The session's sandbox ended underneath it (its lifetime ran out, or it was killed)."""


class _Session:
    """One MCP session's sandbox: opened on first use, closed when the session ends."""

    def __init__(self, sandboxes: _Sandboxes) -> None:
        self._sandboxes = sandboxes
        self._lock = asyncio.Lock()  # two concurrent first calls must not open two boxes
        self._ended = False
        self.sandbox: AsyncSandbox | None = None

    async def open(self, *, replace_ended: bool = False) -> AsyncSandbox:
        """The session's running sandbox, opened if there is none.

        One that has ended is replaced only with ``replace_ended``; otherwise the
        caller hears about it once, so a model is not left to wonder where its
        variables went."""
        async with self._lock:
            current = self.sandbox
            if current is not None and await current.is_running():
                return current
            if current is not None:
                self.sandbox = None
                await self._sandboxes.discard(current, "it had ended")
                if not replace_ended:
                    raise _SandboxEnded(
                        f"this session's sandbox {current.id} has ended (its lifetime ran out, "
                        "or it was killed): its files and variables are gone. "
                        "The next call opens a fresh one."
                    )
            if self._ended:
                raise ToolError("this MCP session has ended")
            sandbox = await self._sandboxes.start()
            if self._ended:
                # the session ended while the box was starting: nobody would close it
                await self._sandboxes.discard(sandbox, "the session ended")
                raise ToolError("this MCP session has ended")
            self.sandbox = sandbox
            return sandbox

    async def close(self, reason: str) -> str | None:
        """Close the sandbox (if any); its id."""
        sandbox, self.sandbox = self.sandbox, None
        if sandbox is None:
            return None
        await self._sandboxes.discard(sandbox, reason)
        return sandbox.id

    async def end(self) -> None:
        """The session is over: close its sandbox, and open none any more."""
        self._ended = True
        await self.close("the session ended")

    async def forget_if_ended(self, sandbox: AsyncSandbox) -> bool:
        """Drop ``sandbox`` if it is no longer running (so the next call opens a fresh one)."""
        if await sandbox.is_running():
            return False
        if self.sandbox is sandbox:
            self.sandbox = None
        await self._sandboxes.discard(sandbox, "it had ended")
        return True


class _Sandboxes:
    """Every sandbox this server has open, and which session owns which."""

    def __init__(self, policy: Policy, timeout_s: float | None) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self._live: set[AsyncSandbox] = set()
        self._stopping = False
        self._pipes: weakref.WeakKeyDictionary[object, _Session] = weakref.WeakKeyDictionary()

    async def start(self) -> AsyncSandbox:
        if self._stopping:
            raise ToolError("the server is stopping")
        sandbox = AsyncSandbox(self.policy, timeout_s=self.timeout_s)
        self._live.add(sandbox)
        try:
            await sandbox.start()
        except BaseException:
            await self.discard(sandbox, "it failed to start")
            raise
        if self._stopping:
            # started while the server was closing them all: nobody else would
            await self.discard(sandbox, "the server stopped")
            raise ToolError("the server is stopping")
        log.info("opened sandbox %s", sandbox.id)
        return sandbox

    async def discard(self, sandbox: AsyncSandbox, reason: str) -> None:
        if sandbox not in self._live:
            return  # closed already
        self._live.discard(sandbox)
        # shielded: a cancelled request or a stopping server must still kill the box
        with anyio.CancelScope(shield=True):
            await sandbox.close()
        log.info("closed sandbox %s: %s", sandbox.id, reason)

    async def close_all(self) -> None:
        self._stopping = True
        for sandbox in list(self._live):
            await self.discard(sandbox, "the server stopped")

    def session(self, ctx: Context) -> _Session:
        """The session this tool call belongs to (fails closed when there is none)."""
        connection = _connection(ctx)
        if connection.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            # handshake era: one Connection per client (the stdio pipe, or one
            # Mcp-Session-Id), torn down with its exit_stack when the client goes
            session = connection.state.get(_STATE_KEY)
            if isinstance(session, _Session):
                return session
            session = _Session(self)
            connection.state[_STATE_KEY] = session
            connection.exit_stack.push_async_callback(session.end)
            return session
        if connection.has_standalone_channel:
            # 2026-07-28 over a duplex pipe (stdio): a Connection per request, but
            # one outbound channel per pipe, and a pipe has one client. No hook
            # marks its end: its sandbox closes when the server stops (for stdio,
            # the pipe's end is the server's).
            pipe = connection.outbound
            session = self._pipes.get(pipe)
            if session is None:
                session = self._pipes[pipe] = _Session(self)
            return session
        # 2026-07-28 over HTTP: nothing ties two requests together; sharing a box
        # between them would hand one client's files to another
        raise ToolError(
            "this request belongs to no session (protocol 2026-07-28 over HTTP has none), "
            "and each session has its own sandbox: connect with the initialize handshake"
        )


def _connection(ctx: Context) -> Connection:
    # The per-client Connection (its `state` lasts across requests, its
    # `exit_stack` unwinds when the client goes) is what tells sessions apart.
    # mcp 2.3 hands MCPServer tools only the per-request ServerSession that
    # wraps it (the SDK's own TODO(L54) in server/runner.py); read it there, and
    # refuse to guess if a later SDK moves it.
    connection = getattr(ctx.request_context.session, "_connection", None)
    if not isinstance(connection, Connection):
        raise ToolError(
            "corral cannot tell MCP sessions apart with this version of the mcp SDK; "
            "refusing rather than sharing one sandbox between clients"
        )
    return connection


# -- turning results into MCP content ---------------------------------------------------


def _bounded(text: str) -> str:
    if len(text) <= _MAX_TEXT_CHARS:
        return text
    cut = len(text) - _MAX_TEXT_CHARS
    return f"{text[:_MAX_TEXT_CHARS]}\n[... {cut} more characters not shown]"


def _text(label: str, body: str) -> TextContent:
    return TextContent(type="text", text=_bounded(f"{label}:\n{body}" if label else body))


def _image(data: bytes, mime_type: str) -> ContentBlock:
    if len(data) > _MAX_READ_BYTES:
        return _text("", f"an image ({mime_type}) of {len(data)} bytes: too large to return")
    return ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type=mime_type)


def _result_blocks(result: Result) -> list[ContentBlock]:
    blocks: list[ContentBlock] = []
    if result.png is not None:
        blocks.append(_image(result.png, "image/png"))
    if result.jpeg is not None:
        blocks.append(_image(result.jpeg, "image/jpeg"))
    label = "result" if result.is_main_result else "display"
    if blocks:
        return blocks  # the image is the point; its text is only "<Figure ...>"
    for name in ("text", "markdown", "html", "latex", "svg", "javascript"):
        value = getattr(result, name)
        if isinstance(value, str):
            return [_text(label, value)]
    if result.json is not None:
        return [_text(label, json.dumps(result.json, indent=1, default=str))]
    if result.pdf is not None:
        return [_text(label, f"a PDF of {len(result.pdf)} bytes (not shown)")]
    return []


def _execution_result(execution: Execution) -> CallToolResult:
    blocks: list[ContentBlock] = []
    if execution.logs.stdout:
        blocks.append(_text("stdout", "".join(execution.logs.stdout)))
    if execution.logs.stderr:
        blocks.append(_text("stderr", "".join(execution.logs.stderr)))
    for result in execution.results:
        blocks.extend(_result_blocks(result))
    error = execution.error
    if error is not None:
        lines = [f"{error.name}: {error.value}"]
        if error.traceback:
            lines.append(error.traceback)
        if execution.restarted:
            lines.append("The code context was restarted: its variables are gone.")
        blocks.append(_text("error", "\n".join(lines)))
    if not blocks:
        blocks.append(_text("", "(no output)"))
    # an error in the code is the tool's result, flagged for the model; not a protocol failure
    return CallToolResult(content=blocks, is_error=error is not None)


def _listing(path: str, entries: Sequence[EntryInfo]) -> str:
    if not entries:
        return f"{path}: empty directory"
    rows = []
    for entry in sorted(entries, key=lambda e: e.path):
        name = entry.path + ("/" if entry.type == "dir" else "")
        size = str(entry.size) if entry.type == "file" else "-"
        rows.append(f"{entry.type:<7} {size:>10}  {name}")
    return "\n".join(rows)


# -- errors -----------------------------------------------------------------------------


async def _fail(
    session: _Session, sandbox: AsyncSandbox | None, exc: Exception, path: str | None
) -> NoReturn:
    """Raise ``exc`` as a tool error, in words a model can act on."""
    where = f"{path}: " if path is not None else ""
    if isinstance(exc, PathOutsideWorkspace):
        message = f"refused: {exc} (paths are relative to the workspace, which is all there is)"
    elif isinstance(exc, FileNotFoundError):
        message = f"{where}no such file or directory"
    elif isinstance(exc, OSError):
        message = f"{where}{exc.strerror or exc}"
    else:
        message = str(exc) or type(exc).__name__
    if sandbox is not None and await session.forget_if_ended(sandbox):
        message += (
            " -- the sandbox is gone, with its files and variables; the next call opens a fresh one"
        )
    raise ToolError(message) from exc


async def _in_sandbox(
    session: _Session, work: Callable[[AsyncSandbox], Awaitable[T]], *, path: str | None = None
) -> T:
    """Run ``work`` in the session's sandbox (opened if need be).

    Corral's errors become tool errors: the model reads them, the server goes on."""
    sandbox: AsyncSandbox | None = None
    try:
        sandbox = await session.open()
        return await work(sandbox)
    except (CorralError, OSError, ValueError) as exc:
        await _fail(session, sandbox, exc, path)


# -- the server -------------------------------------------------------------------------


async def _sessions_only_over_http(
    ctx: ServerRequestContext[Any, Any], call_next: CallNext
) -> HandlerResult:
    """Refuse the sessionless 2026-07-28 era over HTTP, naming the versions served.

    A client probing with ``server/discover`` then falls back to the initialize
    handshake, which gives it a session, and with it its own sandbox.
    """
    if ctx.request is not None and ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        data = UnsupportedProtocolVersionErrorData(
            supported=list(HANDSHAKE_PROTOCOL_VERSIONS), requested=ctx.protocol_version
        )
        raise MCPError(
            code=UNSUPPORTED_PROTOCOL_VERSION,
            message="corral keeps a sandbox per session: over HTTP, use the initialize handshake",
            data=data.model_dump(mode="json"),
        )
    return await call_next(ctx)


def build_server(*, policy: Policy, timeout_s: float | None) -> MCPServer[None]:
    """An MCP server named ``corral`` whose tools work in one sandbox per session.

    Every sandbox is ``AsyncSandbox(policy, timeout_s=timeout_s)``: ``timeout_s``
    is each sandbox's lifetime in seconds (``None``: no limit).
    """
    return _build(policy, timeout_s)[0]


def _build(policy: Policy, timeout_s: float | None) -> tuple[MCPServer[None], _Sandboxes]:
    sandboxes = _Sandboxes(policy, timeout_s)
    networked = policy.network.mode != "none"  # what code in the box can reach, for clients

    @asynccontextmanager
    async def lifespan(_: MCPServer[None]) -> AsyncIterator[None]:
        try:
            yield
        finally:
            # whatever the way out, no box outlives the server
            await sandboxes.close_all()

    server: MCPServer[None] = MCPServer(
        "corral",
        instructions=(
            "Tools to run untrusted code in an isolated sandbox (no network unless the "
            "server's policy allows it). Each session has one sandbox; files in its "
            "workspace and variables in run_code persist until close_sandbox or the end "
            "of the session."
        ),
        lifespan=lifespan,
    )
    server.middleware.append(_sessions_only_over_http)

    @server.tool(annotations=ToolAnnotations(idempotent_hint=True, open_world_hint=False))
    async def open_sandbox(ctx: Context) -> str:
        """Open this session's sandbox (if it is not open yet) and return its id.

        Optional: every other tool opens it on first use."""
        session = sandboxes.session(ctx)
        try:
            sandbox = await session.open(replace_ended=True)
        except (CorralError, OSError, ValueError) as exc:
            await _fail(session, None, exc, None)
        return sandbox.id

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False))
    async def close_sandbox(ctx: Context) -> str:
        """Close this session's sandbox: every file, variable and process in it is gone.

        The next call to another tool opens a fresh, empty one."""
        closed = await sandboxes.session(ctx).close("closed by the client")
        if closed is None:
            return "no sandbox was open"
        return f"sandbox {closed} closed; its files and state are gone"

    @server.tool(annotations=ToolAnnotations(open_world_hint=networked))
    async def run_code(code: str, ctx: Context, language: Language = "python") -> CallToolResult:
        """Run code in a stateful, Jupyter-style context (python, bash or javascript).

        Variables, imports and definitions persist between calls in this session.
        Returns stdout, stderr, the value of the last expression, and plots
        (matplotlib: call plt.show()) as images. The working directory is the
        sandbox's workspace."""
        session = sandboxes.session(ctx)

        async def work(sandbox: AsyncSandbox) -> Execution:
            return await sandbox.run_code(code, language=language)

        return _execution_result(await _in_sandbox(session, work))

    @server.tool(annotations=ToolAnnotations(open_world_hint=networked))
    async def run_command(
        command: str, ctx: Context, timeout_s: float | None = None
    ) -> CallToolResult:
        """Run a shell command (/bin/sh -c) in the workspace; returns exit code, stdout, stderr.

        timeout_s: seconds before the command is killed (default and maximum: the
        server policy's wall-time limit)."""
        limit = policy.limits.wall_time_s
        if timeout_s is not None and not (
            math.isfinite(timeout_s) and timeout_s > 0 and (limit is None or timeout_s <= limit)
        ):
            most = f"at most {limit:g} s (the policy's limits.wall_time_s)" if limit else "finite"
            raise ToolError(f"timeout_s must be more than 0 and {most}, not {timeout_s!r}")
        session = sandboxes.session(ctx)

        async def work(sandbox: AsyncSandbox) -> CallToolResult:
            done = await sandbox.commands.run(command, timeout_s=timeout_s)
            stdout = done.stdout.decode(errors="replace")
            stderr = done.stderr.decode(errors="replace")
            head = [f"exit code: {done.exit_code}"]
            if done.signal is not None:
                head.append(f"killed by signal {done.signal}")
            if done.limit_hit is not None:
                head.append(f"limit hit: {done.limit_hit}")
            if done.truncated:
                head.append("output truncated at the policy's output limit")
            blocks: list[ContentBlock] = [_text("", "\n".join(head))]
            if stdout:
                blocks.append(_text("stdout", stdout))
            if stderr:
                blocks.append(_text("stderr", stderr))
            structured = {
                "exit_code": done.exit_code,
                "signal": done.signal,
                "limit_hit": done.limit_hit,
                "truncated": done.truncated,
                "stdout": stdout[:_MAX_TEXT_CHARS],
                "stderr": stderr[:_MAX_TEXT_CHARS],
            }
            return CallToolResult(content=blocks, structured_content=structured)

        return await _in_sandbox(session, work)

    @server.tool(annotations=ToolAnnotations(idempotent_hint=True, open_world_hint=False))
    async def write_file(path: str, content: str, ctx: Context) -> str:
        """Write a text file (UTF-8) in the workspace, replacing it if it exists.

        path is relative to the workspace; parent directories must exist
        (create them with run_command: mkdir -p)."""
        session = sandboxes.session(ctx)

        async def work(sandbox: AsyncSandbox) -> int:
            return await sandbox.files.write(path, content)

        size = await _in_sandbox(session, work, path=path)
        return f"wrote {size} bytes to {path}"

    @server.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def read_file(path: str, ctx: Context) -> CallToolResult:
        """Read a file from the workspace: text as text, images as images, other
        binary files as an embedded resource (base64)."""
        session = sandboxes.session(ctx)

        async def work(sandbox: AsyncSandbox) -> CallToolResult:
            reader = await sandbox.files.open_read(path)
            async with reader:
                if reader.size > _MAX_READ_BYTES:
                    raise ToolError(
                        f"{path} is {reader.size} bytes, more than read_file returns "
                        f"({_MAX_READ_BYTES} bytes); look at it with run_command (head, wc, ...)"
                    )
                # bounded even if the box grows the file while it is read
                data = await reader.read(_MAX_READ_BYTES + 1)
            if len(data) > _MAX_READ_BYTES:
                raise ToolError(f"{path} grew past {_MAX_READ_BYTES} bytes while being read")
            return _file_result(sandbox, path, data)

        return await _in_sandbox(session, work, path=path)

    @server.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def list_files(ctx: Context, path: str = ".") -> str:
        """List a directory of the workspace: type, size and path of each entry."""
        session = sandboxes.session(ctx)

        async def work(sandbox: AsyncSandbox) -> list[EntryInfo]:
            return await sandbox.files.list(path)

        return _listing(path, await _in_sandbox(session, work, path=path))

    return server, sandboxes


def _file_result(sandbox: AsyncSandbox, path: str, data: bytes) -> CallToolResult:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = None
    if text is not None and "\0" not in text:
        return CallToolResult(content=[TextContent(type="text", text=_bounded(text))])
    workspace = sandbox.policy.filesystem.workspace
    inside = posixpath.normpath(posixpath.join(workspace, path))
    note = _text("", f"{path}: binary file, {len(data)} bytes")
    mime = _IMAGE_TYPES.get(posixpath.splitext(path)[1].lower())
    if mime is not None:
        return CallToolResult(content=[note, _image(data, mime)])
    blob = BlobResourceContents(
        uri="file://" + quote(inside),
        mime_type="application/octet-stream",
        blob=base64.b64encode(data).decode(),
    )
    return CallToolResult(content=[note, EmbeddedResource(type="resource", resource=blob)])


# -- running it -------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name could resolve anywhere: only literal loopback addresses


def _http_security(host: str, port: int) -> TransportSecuritySettings:
    # DNS rebinding: a web page the user visits could otherwise point its own
    # name at 127.0.0.1 and drive this unauthenticated server from the browser;
    # only requests that name this address (Host) and come from it (Origin) pass
    bare = host.strip("[]")
    named = f"[{bare}]" if ":" in bare else bare
    names = {named, "localhost", "127.0.0.1", "[::1]"}
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=sorted(f"{name}:{port}" for name in names),
        allowed_origins=sorted(f"http://{name}:{port}" for name in names),
    )


async def _serve_stdio(server: MCPServer[None], sandboxes: _Sandboxes) -> None:
    """Serve until the client closes the pipe (the spec's shutdown), or a signal."""
    async with anyio.create_task_group() as tasks:

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as got:
                async for signum in got:
                    # the transport reads stdin in a thread nothing can interrupt, so
                    # the server cannot wind down in order: close the boxes here (their
                    # cgroups, host identities), then die of the signal as asked
                    await sandboxes.close_all()
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)

        tasks.start_soon(on_signal)
        await server.run_stdio_async()
        tasks.cancel_scope.cancel()


def main(*, policy: Policy, timeout_s: float | None, http: bool, host: str, port: int) -> int:
    """Serve MCP on stdio, or on streamable HTTP at ``http://host:port/mcp``; the exit status."""
    if http:
        if not _is_loopback(host):
            # no authentication: anyone who can reach the port could run code
            # with this host's resources, so only this host may reach it
            print(
                f"corral mcp: refusing to listen on {host!r}: the MCP server has no "
                "authentication, so it binds only to a loopback address "
                "(127.0.0.1, ::1 or localhost)",
                file=sys.stderr,
            )
            return _EXIT_USAGE
        if not 0 < port < 65536:
            print(f"corral mcp: {port} is not a TCP port", file=sys.stderr)
            return _EXIT_USAGE
    server, sandboxes = _build(policy, timeout_s)
    try:
        if http:
            serve = partial(
                server.run_streamable_http_async,
                host=host.strip("[]"),
                port=port,
                transport_security=_http_security(host, port),
            )
            anyio.run(serve, backend="asyncio")  # (uvicorn stops gracefully on SIGTERM)
        else:
            anyio.run(_serve_stdio, server, sandboxes, backend="asyncio")
    except KeyboardInterrupt:
        return 130
    return 0


def _policy_arg(value: str) -> Policy:
    try:
        if "/" in value or value.endswith((".toml", ".json")):
            return Policy.load(value)
        return Policy.preset(value)
    except (CorralError, OSError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m corral._mcp", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--http", action="store_true", help="streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (--http)")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (--http)")
    parser.add_argument("--policy", type=_policy_arg, default="default", help="preset or file")
    parser.add_argument(
        "--timeout", type=timeout_arg, default=600.0, help="each sandbox's lifetime (or none)"
    )
    args = parser.parse_args(argv)
    return main(
        policy=args.policy, timeout_s=args.timeout, http=args.http, host=args.host, port=args.port
    )


if __name__ == "__main__":
    sys.exit(_cli())
