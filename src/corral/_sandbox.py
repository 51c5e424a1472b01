"""Long-lived sandboxes: a box that stays up, with commands, files and terminals.

``AsyncSandbox`` is the core; ``Sandbox`` (``_sync.py``) is its mechanical
synchronous facade. The box runs the agent (``_agent.py``) as its first
program; the host reaches into the box only through it (``_connection.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import posixpath
import secrets
import signal as _signal
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import IO, Any, Literal, overload

from . import _runtime, _snapshot
from ._box import AGENT_DIR, box_files
from ._box import _wire as w
from ._connection import Connection, InStream, OutStream, field, raise_for_error
from ._errors import CorralError, HostToolMissing, SandboxBroken, SandboxClosed, SandboxError
from ._errors import PathOutsideWorkspace as PathOutsideWorkspace  # re-exported: it lived here
from ._interpreter import (
    RUNTIME_PYTHON,
    CodeContext,
    CodeEvent,
    CodeInterpreter,
    ErrorCallback,
    Execution,
    ResultCallback,
    TextCallback,
)
from ._policy import Bind, Policy
from ._result import LimitEvidence, LimitKind, ProcessOutcome, decide_limits, not_run_message
from ._snapshot import Snapshot
from .backends import Backend, Box, BoxSpec, resolve_backend
from .net._events import Approval, NetworkEvent

BOX_PYTHON = "/usr/bin/python3"
_HELLO_TIMEOUT_S = 30.0
_DETACH_GRACE_S = 0.2
_KILL_GRACE_S = 5.0  # after the agent was told to kill a command, before the host ends the box
_LIVENESS_S = 10.0  # silence, with work pending, before the agent is pinged
_STREAM_QUEUE = 64  # output chunks a stream() may hold for a lagging consumer
_CHUNK = w.DATA_CHUNK

Stream = Literal["stdout", "stderr"]
OutputCallback = Callable[[bytes], object]


@dataclass(frozen=True, slots=True)
class CommandResult(ProcessOutcome):
    """A finished command. ``limit_hit`` is ``timeout`` (its own timeout),
    ``memory`` (killed by the box's memory limit) or ``output``."""

    exit_code: int
    signal: int | None
    stdout: bytes
    stderr: bytes
    limit_hit: LimitKind | None
    truncated: bool
    duration_s: float
    pid: int | None


@dataclass(frozen=True, slots=True)
class CommandOutput:
    """A chunk of a running command's output, as it happens."""

    stream: Stream
    data: bytes


@dataclass(frozen=True, slots=True)
class CommandExit:
    """The last event of a streamed command."""

    result: CommandResult


CommandEvent = CommandOutput | CommandExit


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    argv: tuple[str, ...]
    pty: bool


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """A file or directory in the workspace (``path`` is relative to it)."""

    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    mtime: float


def _cpu_seconds(cpu_time_s: float | None) -> int:
    """RLIMIT_CPU's whole seconds, as the planner rounds them; 0 for none (and
    for a budget beyond 2**40 s, which is none in practice and no rlimit value)."""
    if cpu_time_s is None or cpu_time_s >= 2**40:
        return 0
    return math.ceil(cpu_time_s)


def _argv(command: str | Sequence[str]) -> list[str]:
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    argv = list(command)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("command must be a string or a non-empty list of strings")
    return argv


class _Process:
    """One command in the box, as the host sees it."""

    def __init__(
        self,
        sandbox: AsyncSandbox,
        ident: int,
        *,
        output_cap: int | None,
        kill_at_cap: bool,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        sink: asyncio.Queue[CommandEvent] | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.ident = ident
        self.pid: int | None = None
        self.started = time.monotonic()
        self.output_cap = output_cap
        self.kill_at_cap = kill_at_cap
        self.callbacks: dict[Stream, OutputCallback | None] = {
            "stdout": on_stdout,
            "stderr": on_stderr,
        }
        # a bounded queue: when its reader lags, the pump waits, credit stops,
        # and the command inside the box blocks on its output
        self.sink = sink
        # one growing buffer per stream: no per-chunk overhead when a program
        # writes a byte at a time
        self.chunks: dict[Stream, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.kept = 0
        self.truncated = False
        self.limit_hit: LimitKind | None = None
        self.exit: asyncio.Future[tuple[int, int | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self.pumps: list[asyncio.Task[None]] = []
        self.timers: list[asyncio.TimerHandle] = []
        self.counters_before = sandbox._limit_counters()
        self.cpu_s: float | None = None
        self.result: CommandResult | None = None
        self.callback_error: BaseException | None = None
        self.is_pty = False

    def on_event(self, body: dict[str, object]) -> None:
        if self.exit.done():
            return
        if body.get("__failed__"):
            failure = self.sandbox._conn_failure()
            self.exit.set_exception(failure)
            self.exit.exception()
            return
        code = field(body, "exit", int)
        cpu_s = body.get("cpu_s")
        self.cpu_s = float(cpu_s) if isinstance(cpu_s, int | float) else None
        sig = body.get("signal")
        self.exit.set_result((code, sig if isinstance(sig, int) else None))

    def start_pumps(self, streams: Mapping[Stream, InStream]) -> None:
        for name, stream in streams.items():
            self.pumps.append(asyncio.ensure_future(self._pump(name, stream)))

    async def _pump(self, name: Stream, stream: InStream) -> None:
        with contextlib.suppress(CorralError):
            while data := await stream.read():
                self._take(name, data)
                if self.sink is not None:
                    await self.sink.put(CommandOutput(name, data))

    def _take(self, name: Stream, data: bytes) -> None:
        kept = data
        if self.output_cap is not None and self.kept + len(data) > self.output_cap:
            kept = data[: max(0, self.output_cap - self.kept)]
            if not self.truncated:
                self.truncated = True
                if self.kill_at_cap:
                    self.limit_hit = "output"
                    self.sandbox._spawn(self.signal(_signal.SIGKILL))
        self.chunks[name] += kept
        self.kept += len(kept)
        callback = self.callbacks[name]  # called after the chunk is kept
        if callback is not None and self.callback_error is None:
            try:
                callback(data)
            except Exception as exc:  # reported by wait(); the output keeps flowing
                self.callback_error = exc

    async def signal(self, signum: int) -> None:
        with contextlib.suppress(OSError, CorralError):
            await self.sandbox._conn().call(
                {"op": "signal", "target": self.ident, "signal": int(signum)}
            )

    def arm_timeout(self, timeout_s: float) -> None:
        self.timers.append(asyncio.get_running_loop().call_later(timeout_s, self.on_timeout))

    def on_timeout(self) -> None:
        if self.exit.done():
            return
        self.limit_hit = self.limit_hit or "timeout"
        self.sandbox._spawn(self.signal(_signal.SIGKILL))
        # the agent lives in the box: if it does not end the command (stopped,
        # hung), the host ends the box rather than let the call hang
        self.timers.append(asyncio.get_running_loop().call_later(_KILL_GRACE_S, self._overdue))

    def _overdue(self) -> None:
        if not self.exit.done():
            self.sandbox._break("the box's agent did not end a timed-out command; box killed")

    async def wait(self) -> CommandResult:
        if self.result is not None:
            return self.result
        try:
            # shielded: a cancelled caller must not cancel the exit future itself
            code, sig = await asyncio.shield(self.exit)
            # Output may still be in flight; a daemon the command left behind
            # may hold its pipes open forever: wait a moment, then let go.
            pending = set(self.pumps)
            while pending:
                _, pending = await asyncio.wait(pending, timeout=_DETACH_GRACE_S)
                if not (pending and self.sink is not None and self.sink.full()):
                    break  # (a full sink is a slow reader, not a daemon: keep waiting)
            if pending:
                with contextlib.suppress(OSError, CorralError):
                    await self.sandbox._conn().call({"op": "detach", "target": self.ident})
                await asyncio.wait(self.pumps, timeout=_DETACH_GRACE_S)
        except asyncio.CancelledError:
            # the caller gave up: the command must not run on unseen
            if not self.exit.done():
                self.sandbox._spawn(self.signal(_signal.SIGKILL))
            self._release()
            raise
        finally:
            for timer in self.timers:
                timer.cancel()
        self._release()
        oom_kills, pids_hits = self.sandbox._limit_counters()
        limits = decide_limits(
            LimitEvidence(
                own=frozenset((self.limit_hit,)) if self.limit_hit is not None else frozenset(),
                oom_kills=oom_kills - self.counters_before[0],
                pids_limit_hits=pids_hits - self.counters_before[1],
                cpu_time_s=self.cpu_s,
                cpu_time_limit_s=self.sandbox.policy.limits.cpu_time_s,
                exit_code=code,
                signal=sig,
                shared=True,  # the box's cgroup counts every command of the box
            )
        )
        limit = limits[0] if limits else None
        self.result = CommandResult(
            exit_code=code,
            signal=sig,
            stdout=bytes(self.chunks["stdout"]),
            stderr=bytes(self.chunks["stderr"]),
            limit_hit=limit,
            truncated=self.truncated,
            duration_s=time.monotonic() - self.started,
            pid=self.pid,
        )
        if self.sink is not None:
            await self.sink.put(CommandExit(self.result))
        if self.callback_error is not None:
            raise self.callback_error
        return self.result

    def _release(self) -> None:
        for pump in self.pumps:
            pump.cancel()
        # a terminal's output is read by its handle, which must still see the EOF
        keep = frozenset((w.STDOUT,)) if self.is_pty else frozenset()
        self.sandbox._forget(self.ident, keep=keep)


class CommandHandle:
    """A command running in the background."""

    def __init__(self, process: _Process, stdin: OutStream | None) -> None:
        self._process = process
        self._stdin = stdin

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _buffers(self) -> Mapping[Stream, bytearray]:
        """The live output buffers (for corral serve's followers: no copy)."""
        return self._process.chunks

    @property
    def stdout(self) -> bytes:
        """Output so far (up to the policy's output cap)."""
        return bytes(self._process.chunks["stdout"])

    @property
    def stderr(self) -> bytes:
        return bytes(self._process.chunks["stderr"])

    async def wait(self) -> CommandResult:
        return await self._process.wait()

    async def kill(self, signum: int = _signal.SIGKILL) -> None:
        await self._process.signal(_signum(signum))

    async def send_stdin(self, data: bytes | str) -> None:
        """Send to the command's stdin; BrokenPipeError once it has closed it or ended."""
        if self._stdin is None:
            raise SandboxError("this command was started without stdin (stdin=True)")
        await self._stdin.write(data.encode() if isinstance(data, str) else data)

    async def close_stdin(self) -> None:
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None


def _signum(signum: int) -> int:
    if not isinstance(signum, int) or not 1 <= signum < _signal.NSIG:
        raise ValueError(f"{signum!r} is not a signal number")
    return signum


class PtyHandle:
    """An interactive terminal in the box.

    Its output is read straight from the wire: credit goes back only as
    ``read`` takes it, so a terminal nobody reads stalls inside the box instead
    of filling the host's memory.
    """

    def __init__(
        self, sandbox: AsyncSandbox, process: _Process, stdin: OutStream, output: InStream
    ) -> None:
        self._sandbox = sandbox
        self._process = process
        self._stdin = stdin
        self._output = output
        self._pending: asyncio.Task[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    async def send(self, data: bytes | str) -> None:
        await self._stdin.write(data.encode() if isinstance(data, str) else data)

    async def read(self, timeout_s: float | None = None) -> bytes:
        """The next output of the terminal; b"" once it has ended.

        Raises TimeoutError when nothing came within ``timeout_s`` (the
        terminal is still there), and the sandbox's failure if it broke.
        """
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._output.read())
        done, _ = await asyncio.wait({self._pending}, timeout=timeout_s)
        if not done:
            raise TimeoutError("no terminal output within the timeout")
        task, self._pending = self._pending, None
        return task.result()

    async def resize(self, cols: int, rows: int) -> None:
        _check_size(cols, rows)
        await self._sandbox._conn().call(
            {"op": "resize", "target": self._process.ident, "cols": cols, "rows": rows}
        )

    async def kill(self) -> None:
        await self._process.signal(_signal.SIGKILL)

    async def wait(self) -> CommandResult:
        """Wait for the terminal's program to end (its output is read with ``read``)."""
        return await self._process.wait()


def _check_size(cols: int, rows: int) -> None:
    if not (1 <= cols <= 1000 and 1 <= rows <= 1000):
        raise ValueError("cols and rows must be between 1 and 1000")


class Commands:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def _start(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None,
        cwd: str | None,
        stdin: bool,
        timeout_s: float | None,
        output_cap: int | None,
        kill_at_cap: bool,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        pty: tuple[int, int] | None = None,
        sink: asyncio.Queue[CommandEvent] | None = None,
    ) -> tuple[_Process, OutStream | None, InStream]:
        conn = self._sb._conn()
        ident = conn.new_id()
        process = _Process(
            self._sb,
            ident,
            output_cap=output_cap,
            kill_at_cap=kill_at_cap,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            sink=sink,
        )
        conn.on_event(ident, process.on_event)
        channels: dict[Stream, InStream] = {"stdout": conn.open_in(ident, w.STDOUT)}
        if pty is None:
            channels["stderr"] = conn.open_in(ident, w.STDERR)
        writer = conn.open_out(ident, w.STDIN) if (stdin or pty) else None
        body: dict[str, object] = {
            "op": "exec",
            "argv": _argv(command),
            "env": dict(self._sb._env(env)),
            "cwd": self._sb._relative(cwd or "."),
            "stdin": stdin,
        }
        if pty is not None:
            body["pty"] = {"cols": pty[0], "rows": pty[1]}
        try:
            reply = await conn.call(body, ident)
        except BaseException:
            # cancelled after sending: the agent may start it anyway, so end it
            self._sb._spawn(process.signal(_signal.SIGKILL))
            self._sb._forget(ident)
            raise
        if reply.get("pid") is None:  # could not be started: shell semantics
            self._sb._forget(ident)
            code = reply.get("exit_code")
            code = code if code in (126, 127) else 127
            reason = reply.get("reason")
            process.chunks["stderr"] += not_run_message(
                _argv(command)[0], code, reason if isinstance(reason, str) else "cannot run"
            )
            process.exit.set_result((code, None))
            process.result = CommandResult(
                exit_code=code,
                signal=None,
                stdout=b"",
                stderr=bytes(process.chunks["stderr"]),
                limit_hit=None,
                truncated=False,
                duration_s=time.monotonic() - process.started,
                pid=None,
            )
            return process, None, channels["stdout"]
        process.pid = field(reply, "pid", int)
        if pty is None:  # a terminal's output is read by its handle, on demand
            process.start_pumps(channels)
        else:
            process.is_pty = True
        if timeout_s is not None:
            process.arm_timeout(timeout_s)
        return process, writer, channels["stdout"]

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
    ) -> CommandHandle: ...

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
    ) -> CommandResult | CommandHandle: ...

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
    ) -> CommandResult | CommandHandle:
        """Run ``command`` (a shell string or an argv list).

        In the foreground it returns the finished ``CommandResult``: its
        timeout defaults to the policy's ``wall_time_s``, and output beyond the
        policy's ``output_bytes`` ends it (``limit_hit="output"``).

        With ``background=True`` it returns a ``CommandHandle`` at once: no
        timeout unless given, output kept up to ``output_bytes`` and then only
        counted (``truncated``) while the command keeps running; ``stdin=True``
        keeps its stdin open for ``send_stdin``.
        """
        if not background and isinstance(stdin, bool):
            raise TypeError("stdin=True is for background commands; give the bytes to send")
        open_stdin = stdin is not None and stdin is not False
        process, writer, _ = await self._start(
            command,
            env=env,
            cwd=cwd,
            stdin=open_stdin,
            timeout_s=timeout_s if background else self._sb._timeout(timeout_s),
            output_cap=self._sb.policy.limits.output_bytes,
            kill_at_cap=not background,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
        data = stdin if isinstance(stdin, bytes | str) else None
        if background:
            if writer is not None and data is not None:
                try:
                    await writer.write(data.encode() if isinstance(data, str) else data)
                except BaseException:
                    # cancelled while the command was not reading: nobody would
                    # hold a handle to it, so it must not run on unseen
                    self._sb._spawn(process.signal(_signal.SIGKILL))
                    raise
            return CommandHandle(process, writer)
        if writer is not None and data is not None:
            feeder = asyncio.ensure_future(_feed(writer, data))
            try:
                return await process.wait()
            finally:
                feeder.cancel()
        return await process.wait()

    async def stream(
        self,
        command: str | Sequence[str],
        *,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
    ) -> AsyncGenerator[CommandEvent, None]:
        """Output chunks as they happen, then one ``CommandExit``.

        Bounded: while the consumer lags, the command waits on its output.
        Leaving the loop early kills the command. ``stdin`` is fed, then closed.
        """
        sink: asyncio.Queue[CommandEvent] = asyncio.Queue(maxsize=_STREAM_QUEUE)
        process, writer, _ = await self._start(
            command,
            env=env,
            cwd=cwd,
            stdin=stdin is not None,
            timeout_s=self._sb._timeout(timeout_s),
            output_cap=self._sb.policy.limits.output_bytes,
            kill_at_cap=True,
            on_stdout=None,
            on_stderr=None,
            sink=sink,
        )
        if process.result is not None:  # could not be started
            yield CommandExit(process.result)
            return
        feeder = (
            asyncio.ensure_future(_feed(writer, stdin))
            if writer is not None and stdin is not None
            else None
        )
        waiter = asyncio.ensure_future(process.wait())
        try:
            while True:
                getter = asyncio.ensure_future(sink.get())
                await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    if sink.empty():
                        waiter.result()  # raises the sandbox's failure
                        continue  # the exit event is on its way into the sink
                    event = sink.get_nowait()
                else:
                    event = getter.result()
                yield event
                if isinstance(event, CommandExit):
                    return
        finally:
            if feeder is not None:
                feeder.cancel()
            if not waiter.done():
                await process.signal(_signal.SIGKILL)
                while not waiter.done():  # let the pumps finish into the sink
                    with contextlib.suppress(asyncio.QueueEmpty):
                        sink.get_nowait()
                    await asyncio.sleep(0)
                with contextlib.suppress(CorralError):
                    await waiter

    async def list(self) -> list[ProcessInfo]:
        """Every live process of the box: each running command once (it stands
        for everything it started), then every process no running command
        accounts for (a daemon a finished command left behind)."""
        reply = await self._sb._conn().call({"op": "list_processes"})
        out = []
        for item in field(reply, "processes", list):
            if not isinstance(item, dict):
                raise SandboxBroken("the agent sent a malformed process list")
            argv = field(item, "argv", list)
            out.append(
                ProcessInfo(
                    field(item, "pid", int), tuple(str(a) for a in argv), bool(item.get("pty"))
                )
            )
        return out

    async def kill(self, pid: int, signum: int = _signal.SIGKILL) -> bool:
        """Signal the process ``pid`` that ``list()`` shows and every process it
        started (whatever it did with sessions, groups or double forks); False
        if there is none."""
        reply = await self._sb._conn().call({"op": "list_processes"})
        for item in field(reply, "processes", list):
            if isinstance(item, dict) and item.get("pid") == pid:
                ident = item.get("id")
                target = {"target": ident} if isinstance(ident, int) else {"pid": pid}
                try:
                    await self._sb._conn().call({"op": "signal", **target, "signal": int(signum)})
                except ProcessLookupError:
                    return False  # it ended meanwhile
                return True
        return False


async def _quietly(call: Callable[[], Awaitable[object]]) -> None:
    """Await ``call()``, ignoring a failed box. A callable, not a coroutine: a task
    cancelled before it starts (at close) then leaves no coroutine never awaited."""
    with contextlib.suppress(OSError, CorralError):
        await call()


async def _feed(writer: OutStream, data: bytes | str) -> None:
    with contextlib.suppress(CorralError, BrokenPipeError):
        await writer.write(data.encode() if isinstance(data, str) else data)
        writer.close()


class Pty:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def create(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        command: str | Sequence[str] = ("/bin/sh", "-i"),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> PtyHandle:
        """A terminal running ``command`` (an interactive shell by default)."""
        _check_size(cols, rows)
        merged = {"TERM": "xterm-256color", **(env or {})}
        process, writer, output = await self._sb.commands._start(
            command,
            env=merged,
            cwd=cwd,
            stdin=True,
            timeout_s=None,
            output_cap=self._sb.policy.limits.output_bytes,
            kill_at_cap=False,
            on_stdout=None,
            on_stderr=None,
            pty=(cols, rows),
        )
        if writer is None:
            raise SandboxError(f"cannot start the terminal: {process.result}")
        return PtyHandle(self._sb, process, writer, output)


class FileReader:
    """A file streamed out of the box: ``async for chunk in reader`` or ``read``."""

    def __init__(self, sandbox: AsyncSandbox, ident: int, stream: InStream, size: int) -> None:
        self._sb = sandbox
        self._ident = ident
        self._stream = stream
        self.size = size
        self._buffer = b""
        self._done = False

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all the rest with -1); b"" at the end."""
        if n < 0:
            # Each chunk is copied once into a BytesIO (which grows by realloc,
            # and hands its buffer over without a copy) and freed at once, so
            # the allocator reuses chunk memory instead of faulting in fresh
            # pages: a join of the chunks would touch every byte twice.
            whole = io.BytesIO()
            whole.write(self._buffer)
            self._buffer = b""
            while chunk := await self._chunk():
                whole.write(chunk)
                del chunk
            return whole.getvalue()
        while len(self._buffer) < n:
            chunk = await self._chunk()
            if not chunk:
                break
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    async def _chunk(self) -> bytes:
        if self._done:
            return b""
        data = await self._stream.read()
        if not data:
            self._done = True
            self._sb._forget(self._ident)
        return data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        if self._buffer:
            data, self._buffer = self._buffer, b""
            yield data
        while chunk := await self._chunk():
            yield chunk

    async def close(self) -> None:
        if not self._done:
            self._done = True
            self._sb._forget(self._ident)
            with contextlib.suppress(CorralError, OSError):
                await self._sb._conn().call({"op": "detach_read", "target": self._ident})

    async def __aenter__(self) -> FileReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


Payload = bytes | str | IO[bytes] | Iterable[bytes] | AsyncIterable[bytes]


class Files:
    """The box's workspace. Paths are relative to it (or absolute inside it)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def write(self, path: str, data: Payload, *, mode: int = 0o644) -> int:
        """Write a file (atomically: it appears whole or not at all); returns its size.

        ``data`` may be bytes, text, a binary file object or an (async) iterable
        of byte chunks: large files stream through, never whole in memory.
        """
        conn = self._sb._conn()
        ident = conn.new_id()
        done: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

        def on_event(body: dict[str, object]) -> None:
            if not done.done():
                done.set_result(body)

        conn.on_event(ident, on_event)
        out = conn.open_out(ident, w.CONTENT)
        finished = False
        try:
            await conn.call({"op": "write", "path": self._sb._relative(path), "mode": mode}, ident)
            try:
                async for chunk in _chunks(data):
                    await out.write(chunk)
                out.close()
            except BrokenPipeError:
                pass  # the agent gave up on the upload: its event says why
            body = await conn.wait_or_fail(done)
            if body.get("__failed__"):
                conn.check_open()
            finished = True
            raise_for_error(body)
            return field(body, "done", int)
        finally:
            if not finished and conn.failure is None:
                # failed or cancelled half-way: the agent drops the temp file
                self._sb._spawn(_quietly(lambda: conn.call({"op": "abort_write", "target": ident})))
            self._sb._forget(ident)

    async def read(self, path: str) -> bytes:
        reader = await self.open_read(path)
        async with reader:
            return await reader.read()

    async def open_read(self, path: str) -> FileReader:
        conn = self._sb._conn()
        ident = conn.new_id()
        stream = conn.open_in(ident, w.CONTENT)
        try:
            reply = await conn.call({"op": "read", "path": self._sb._relative(path)}, ident)
        except BaseException:
            self._sb._forget(ident)
            raise
        return FileReader(self._sb, ident, stream, field(reply, "size", int))

    async def list(self, path: str = ".") -> list[EntryInfo]:
        reply = await self._sb._conn().call({"op": "list", "path": self._sb._relative(path)})
        return [_entry(item) for item in field(reply, "entries", list)]

    async def stat(self, path: str) -> EntryInfo:
        return _entry(await self._sb._conn().call({"op": "stat", "path": self._sb._relative(path)}))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except FileNotFoundError:
            return False
        return True

    async def remove(self, path: str) -> None:
        """Remove a file or a whole directory tree."""
        await self._sb._conn().call({"op": "remove", "path": self._sb._relative(path)})

    async def mkdir(self, path: str) -> None:
        await self._sb._conn().call({"op": "mkdir", "path": self._sb._relative(path)})

    async def rename(self, src: str, dst: str) -> None:
        await self._sb._conn().call(
            {"op": "rename", "src": self._sb._relative(src), "dst": self._sb._relative(dst)}
        )


def _entry(item: object) -> EntryInfo:
    if not isinstance(item, dict):
        raise SandboxBroken("the agent sent a malformed directory entry")
    kind = field(item, "type", str)
    if kind not in ("file", "dir", "symlink", "other"):
        raise SandboxBroken("the agent sent a malformed directory entry")
    mtime = item.get("mtime")
    try:
        mtime = float(mtime) if isinstance(mtime, int | float) else 0.0
    except OverflowError:
        raise SandboxBroken("the agent sent a malformed directory entry") from None
    return EntryInfo(
        name=field(item, "name", str),
        path=field(item, "path", str),
        type=kind,  # type: ignore[arg-type]
        size=field(item, "size", int),
        mode=field(item, "mode", int),
        mtime=mtime,
    )


async def _chunks(data: Payload) -> AsyncIterator[bytes]:
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            yield bytes(view[start : start + _CHUNK])
        return
    if hasattr(data, "read"):
        while chunk := data.read(_CHUNK):
            yield chunk
        return
    if isinstance(data, AsyncIterable):
        async for chunk in data:
            yield bytes(chunk)
        return
    for chunk in data:
        yield bytes(chunk)


class Network:
    """The box's network through the proxy (policy network mode ``allowlist``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def events(self) -> list[NetworkEvent]:
        """Every decision so far: host, port, address, allowed, rule, reason."""
        proxy = self._sb._box.network if self._sb._box is not None else None
        return list(proxy.events) if proxy is not None else []

    async def update(
        self, *, allow: Sequence[str] | None = None, deny: Sequence[str] | None = None
    ) -> None:
        """Change the rules while the box runs; they apply to new connections."""
        proxy = self._sb._box.network if self._sb._box is not None else None
        if proxy is None:
            raise SandboxError("this sandbox has no proxy (network mode is not 'allowlist')")
        net = self._sb.policy.network
        new_allow = tuple(allow) if allow is not None else net.allow
        new_deny = tuple(deny) if deny is not None else net.deny
        checked = self._sb.policy.with_network(allow=new_allow, deny=new_deny)  # names the field
        proxy.update(checked.network.allow, checked.network.deny)
        self._sb.policy = checked


class AsyncSandbox:
    """A long-lived, isolated box: many commands, files that persist, background work.

    ``timeout_s`` is the box's lifetime (extend it with ``set_timeout``); the
    policy's ``wall_time_s`` is the default timeout of each command.
    """

    def __init__(
        self,
        policy: Policy | str | None = None,
        *,
        timeout_s: float | None = 300.0,
        workdir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        runtime: str | None = _runtime.DEFAULT,
        on_network_request: Approval | None = None,
        on_network_event: Callable[[NetworkEvent], None] | None = None,
        backend: str | Backend | None = None,
        image: str | None = None,
    ) -> None:
        """``on_network_request(host, port)`` approves hosts the rules do not
        name; ``on_network_event`` sees every decision of the proxy as it happens.
        ``backend``: a name (``corral.backends.available_backends()``) or a
        Backend that starts the box (default ``"bwrap"``). ``image``: a
        container image whose root (read-only) the box runs instead of the
        host's system directories (docker and podman backends; e.g. one from
        ``corral image build``); ``python3`` comes from the image and so does
        the code runtime (``/opt/corral/runtime``, in images built from
        corral's default one), so ``runtime`` is not used. A missing image is
        ``HostToolMissing`` naming it; corral never pulls."""
        if policy is None:
            policy = Policy.preset("default")
        elif isinstance(policy, str):
            policy = Policy.preset(policy)
        if env:
            policy = policy.with_env(env)
        self.policy = policy
        self.id = secrets.token_hex(8)
        self.commands = Commands(self)
        self.files = Files(self)
        self.pty = Pty(self)
        self.network = Network(self)
        self.runtime = runtime
        self.image = image
        self.backend = resolve_backend(backend)
        self._approve = on_network_request
        self._on_network_event = on_network_event
        self._own_workdir = False  # set by corral serve for its own workspace directories
        self._runtime_bound = False
        self._interpreter = CodeInterpreter(_InterpreterHost(self))
        self._timeout_s = timeout_s
        self._workdir = workdir
        self._box: Box | None = None
        self._connection: Connection | None = None
        self._lifetime: asyncio.TimerHandle | None = None
        self._watch: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._closed = False
        self._paused = False
        self._diagnostics = bytearray()
        self._stderr_open = False
        self._tasks: set[asyncio.Future[None]] = set()

    async def __aenter__(self) -> AsyncSandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._box is not None or self._closed:
            raise SandboxError("a sandbox can be started once")
        argv = [
            BOX_PYTHON,
            "-E",
            "-s",
            "-S",
            f"{AGENT_DIR}/agent.py",
            self.policy.filesystem.workspace,
            # the agent gives each command its own CPU budget (RLIMIT_CPU), rather
            # than having one itself: its own CPU over a long life must not end the box
            str(_cpu_seconds(self.policy.limits.cpu_time_s)),
        ]
        box_policy = self.policy
        runtime = (
            _runtime.find(self.runtime) if self.runtime is not None and self.image is None else None
        )
        if self.image is not None:
            self._runtime_bound = True  # the image's own, at the same path (if it has one)
        elif runtime is not None:
            # the code runtime, read-only, at a fixed path in every box
            binds = (*box_policy.filesystem.read_only, Bind(str(runtime.path), _runtime.BOX_PATH))
            box_policy = box_policy.with_filesystem(read_only=binds)
            self._runtime_bound = True
        self._box = await self.backend.launch(
            BoxSpec(
                command=tuple(argv),
                policy=box_policy,
                workdir=os.fspath(self._workdir) if self._workdir is not None else None,
                own_workdir=self._own_workdir,
                extra_files=box_files(),
                stdio="channel",  # the agent's private channel: see BoxSpec
                per_command_cpu=True,
                on_network_request=self._approve,
                on_network_event=self._on_network_event,
                image=self.image,
            )
        )
        try:
            assert self._box.channel is not None
            if self._box.stderr is not None:
                os.set_blocking(self._box.stderr, False)
                asyncio.get_running_loop().add_reader(self._box.stderr, self._on_stderr)
                self._stderr_open = True
            self._connection = Connection(*self._box.channel)
            hello = await asyncio.wait_for(self._connection.hello, _HELLO_TIMEOUT_S)
            if hello.get("version") != w.VERSION:
                raise SandboxError(
                    f"the box's agent speaks protocol {hello.get('version')!r}, not {w.VERSION}"
                )
            self._watch = asyncio.ensure_future(self._watch_box())
            self._watchdog_task = asyncio.ensure_future(self._watchdog())
            self._set_lifetime(self._timeout_s)
        except BaseException as exc:
            await self._teardown()
            if isinstance(exc, TimeoutError | CorralError):
                stderr = self._stderr()
                raise SandboxError(
                    f"the box's agent did not start: {exc} {stderr}".strip()
                ) from exc
            raise

    def _stderr(self) -> str:
        """The last of what bwrap and the agent wrote to stderr, for error messages."""
        return bytes(self._diagnostics).decode(errors="replace").strip()[-2000:]

    def _on_stderr(self) -> None:
        # drained always: a full stderr pipe would block the agent
        assert self._box is not None
        fd = self._box.stderr
        assert fd is not None
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(fd)
            self._stderr_open = False
            return
        self._diagnostics += data
        del self._diagnostics[: max(0, len(self._diagnostics) - 65536)]

    async def _watch_box(self) -> None:
        """Notice the box dying underneath us and say why."""
        box = self._box
        assert box is not None
        await box.wait()
        if self._connection is not None and self._connection.failure is None:
            reason = "the box ended"
            if self._oom_kills() > 0:
                reason = "the box was killed by its memory limit"
            self._connection.fail(SandboxBroken(reason))

    async def set_timeout(self, timeout_s: float | None) -> None:
        """Give the box ``timeout_s`` more seconds to live, counted from now (None: no limit)."""
        self._set_lifetime(timeout_s)

    async def pause(self) -> None:
        """Freeze the box in place (``Box.pause``: the cgroup freezer).

        A paused box uses no CPU; its memory stays charged to it (and counts
        against quotas); its lifetime timer and the timeouts of calls already
        running keep running: a frozen box still holds memory, processes and a
        workspace, which is what the lifetime bounds. Calls made meanwhile wait
        until ``resume``. Idempotent; ``SandboxError`` where the host has no
        freezer, ``SandboxClosed``/``SandboxBroken`` when the box is gone.
        """
        self._conn()
        assert self._box is not None
        self._paused = True  # before freezing: the watchdog must not take silence for death
        try:
            await self._box.pause()
        except BaseException:
            self._paused = False
            raise

    async def resume(self) -> None:
        """Let a paused box run again where it stopped. Idempotent."""
        self._conn()
        assert self._box is not None
        await self._box.resume()
        self._paused = False

    async def snapshot(self, path: str | os.PathLike[str] | None = None) -> Snapshot:
        """Save the workspace to the host directory ``path`` (created, mode
        0700, must be empty; a new temporary directory when None). Process and
        memory state are not included (``Snapshot.processes`` is False).
        ``SandboxError`` when the box cannot archive its workspace."""
        return await _snapshot.take(self, path)

    async def restore(self, snapshot: Snapshot | str | os.PathLike[str]) -> None:
        """Unpack a snapshot's workspace into this sandbox's, inside the box."""
        await _snapshot.restore(self, snapshot)

    @classmethod
    async def from_snapshot(
        cls, snapshot: Snapshot | str | os.PathLike[str], **options: Any
    ) -> AsyncSandbox:
        """A new, started sandbox with the snapshot's policy (unless ``policy``
        is given in ``options``, the other ``AsyncSandbox`` parameters) and its
        workspace: a fork, independent of the original. Close it when done."""
        snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.load(snapshot)
        options.setdefault("policy", snap.policy)
        sb = cls(**options)
        await sb.start()
        try:
            await sb.restore(snap)
        except BaseException:
            await sb.close()
            raise
        return sb

    def _set_lifetime(self, timeout_s: float | None) -> None:
        if self._lifetime is not None:
            self._lifetime.cancel()
            self._lifetime = None
        self._timeout_s = timeout_s
        if timeout_s is not None:
            self._lifetime = asyncio.get_running_loop().call_later(timeout_s, self._expire)

    def _expire(self) -> None:
        self._break("the sandbox reached its lifetime timeout")

    def _break(self, reason: str) -> None:
        """End the box underneath every caller: pending calls raise SandboxBroken(reason)."""
        if self._connection is not None:
            self._connection.fail(SandboxBroken(reason))
        if self._box is not None:
            self._box.kill()

    async def _watchdog(self) -> None:
        """An agent that stops answering (SIGSTOPped by the box, wedged) must not
        leave calls hanging: when work is pending and nothing has arrived for a
        while, ping it; no answer ends the box."""
        conn = self._connection
        assert conn is not None
        while conn.failure is None:
            await asyncio.sleep(_LIVENESS_S)
            if self._paused:
                continue  # a frozen agent is silent by design
            if conn.busy() and time.monotonic() - conn.last_rx > _LIVENESS_S:
                try:
                    await asyncio.wait_for(conn.call({"op": "ping"}), _LIVENESS_S)
                except TimeoutError:
                    self._break("the box's agent stopped responding; box killed")
                except CorralError:
                    return

    # -- code interpreter ----------------------------------------------------------------

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
        """Run a cell in a stateful context (the language's default one unless
        given, as a ``CodeContext`` or its id).

        Errors in the code are data (``Execution.error``). ``timeout_s``
        (default: the policy's ``wall_time_s``) interrupts the cell; the context
        keeps its state when the interrupt works, and is restarted otherwise.
        ``envs`` are environment variables for this cell only (ValueError for a
        name that is not one, or a value with NUL).
        """
        return await self._interpreter.run(
            code,
            language=language,
            context=context,
            envs=envs,
            timeout_s=timeout_s,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            on_result=on_result,
            on_error=on_error,
        )

    async def stream_code(
        self,
        code: str,
        *,
        language: str = "python",
        context: CodeContext | str | None = None,
        envs: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[CodeEvent, None]:
        """``run_code`` as an async iterator: ``("stdout" | "stderr", text)``,
        ``("result", Result)`` and ``("error", ExecutionError)`` as they happen,
        then ``("done", Execution)``."""
        queue: asyncio.Queue[CodeEvent] = asyncio.Queue()
        task = asyncio.ensure_future(
            self.run_code(
                code,
                language=language,
                context=context,
                envs=envs,
                timeout_s=timeout_s,
                on_stdout=lambda t: queue.put_nowait(("stdout", t)),
                on_stderr=lambda t: queue.put_nowait(("stderr", t)),
                on_result=lambda r: queue.put_nowait(("result", r)),
                on_error=lambda e: queue.put_nowait(("error", e)),
            )
        )
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not queue.empty():
                    yield queue.get_nowait()
                yield ("done", task.result())
                return
        finally:
            if not task.done():
                task.cancel()

    async def create_code_context(
        self, language: str = "python", *, cwd: str | None = None
    ) -> CodeContext:
        return await self._interpreter.create_context(language, cwd)

    async def list_code_contexts(self) -> list[CodeContext]:
        """The live code contexts, oldest first (the languages' defaults included)."""
        return self._interpreter.list_contexts()

    async def restart_code_context(self, context: CodeContext | str) -> None:
        await self._interpreter.restart_context(context)

    async def remove_code_context(self, context: CodeContext | str) -> None:
        await self._interpreter.remove_context(context)

    async def prewarm(self, language: str = "python") -> None:
        """Start the language's default context now, so the first cell is quick."""
        await self._interpreter.prewarm(language)

    def _require_runtime(self) -> None:
        if not self._runtime_bound:
            name = self.runtime or _runtime.DEFAULT
            raise HostToolMissing(
                f"the code runtime {name!r}",
                f"build it with: corral runtime build {name}  (then start a new sandbox)",
            )

    async def is_running(self) -> bool:
        """Whether the box is up (False once closed, broken or ended)."""
        return (
            self._connection is not None and self._connection.failure is None and not self._closed
        )

    @property
    def degraded(self) -> tuple[str, ...]:
        """Controls this box enforces more weakly than its policy asks, each
        saying what stands in (``()`` before ``start`` and where nothing is)."""
        return self._box.degraded if self._box is not None else ()

    async def close(self) -> None:
        """Kill everything in the box and remove every trace of it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._connection is not None:
            self._connection.close()
        await self._teardown()

    async def _teardown(self) -> None:
        if self._stderr_open and self._box is not None and self._box.stderr is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._box.stderr)
            self._stderr_open = False
        if self._lifetime is not None:
            self._lifetime.cancel()
        # every task the box started ends with it: a sleeping watchdog would hold
        # the sandbox (and its buffers) for good
        for task in (self._watch, self._watchdog_task):
            if task is not None:
                task.cancel()
        if self._connection is not None and self._connection.failure is None:
            self._connection.close()
        if self._box is not None:
            await self._box.aclose()
        # the tasks cancelled above have ended: none outlives close()
        # housekeeping calls (a kill, an abort) fail at once on the closed
        # connection: let them end (cancelled unstarted, the call they wrap would
        # never be awaited); whatever still runs past the grace is cancelled
        me = asyncio.current_task()
        deadline = time.monotonic() + _KILL_GRACE_S
        while True:
            tasks = (self._watch, self._watchdog_task, *self._tasks)
            pending = [t for t in tasks if t is not None and t is not me and not t.done()]
            if not pending:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for late in pending:
                    late.cancel()
                await asyncio.wait(pending, timeout=0.1)
                break
            await asyncio.wait(pending, timeout=remaining)

    # -- helpers for the API objects -----------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a small housekeeping coroutine, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _conn(self) -> Connection:
        if self._closed:
            raise SandboxClosed("the sandbox was closed")
        if self._connection is None:
            raise SandboxError("the sandbox is not started (use `async with` or start())")
        self._connection.check_open()
        return self._connection

    def _conn_failure(self) -> CorralError:
        if self._connection is not None and self._connection.failure is not None:
            return self._connection.failure
        return SandboxClosed("the sandbox was closed")

    def _forget(self, ident: int, *, keep: frozenset[int] = frozenset()) -> None:
        if self._connection is not None:
            self._connection.forget(ident, keep=keep)

    def _oom_kills(self) -> int:
        return self._limit_counters()[0]

    def _limit_counters(self) -> tuple[int, int]:
        """The box's OOM kills and refused forks so far (0, 0 where nothing counts them)."""
        if self._box is None:
            return (0, 0)
        usage = self._box.usage()
        return (usage.oom_kills, usage.pids_limit_hits)

    def _timeout(self, timeout_s: float | None) -> float | None:
        return timeout_s if timeout_s is not None else self.policy.limits.wall_time_s

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        # the box's own environment: the policy's, plus what the box needs (the proxy)
        env = dict(self._box.env if self._box is not None else self.policy.env)
        if extra:
            for key, value in extra.items():
                if not isinstance(key, str) or not isinstance(value, str) or "=" in key or not key:
                    raise ValueError(f"bad environment variable {key!r}")
                env[key] = value
        return env

    def _relative(self, path: str) -> str:
        return workspace_relative(self.policy.filesystem.workspace, path)


def workspace_relative(workspace: str, path: str) -> str:
    """The workspace-relative form of ``path`` (relative, or absolute inside
    ``workspace``); refuses any way out of it."""
    if not isinstance(path, str) or not path or "\0" in path or len(path) > 4096:
        raise PathOutsideWorkspace(f"{path!r} is not a valid path")
    full = posixpath.normpath(posixpath.join(workspace, path))
    if full != workspace and not full.startswith(workspace + "/"):
        raise PathOutsideWorkspace(f"{path!r} is outside the workspace {workspace}")
    return posixpath.relpath(full, workspace)


class _Driver:
    """The kernel driver's command, as ``_interpreter.Driver``."""

    __slots__ = ("_handle",)

    def __init__(self, handle: CommandHandle) -> None:
        self._handle = handle

    @property
    def exit(self) -> asyncio.Future[Any]:
        return self._handle._process.exit

    async def send_stdin(self, data: bytes) -> None:
        await self._handle.send_stdin(data)

    async def kill(self) -> None:
        await self._handle.kill()


class _InterpreterHost:
    """The code interpreter's view of its sandbox (``_interpreter.InterpreterHost``)."""

    __slots__ = ("_sb",)

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    @property
    def policy(self) -> Policy:
        return self._sb.policy

    async def start_driver(
        self, argv: list[str], env: Mapping[str, str], on_stdout: Callable[[bytes], None]
    ) -> _Driver:
        self._sb._require_runtime()
        # output_cap 0: every line goes to the parser, none is kept
        process, writer, _ = await self._sb.commands._start(
            argv,
            env=env,
            cwd=None,
            stdin=True,
            timeout_s=None,
            output_cap=0,
            kill_at_cap=False,
            on_stdout=on_stdout,
            on_stderr=None,
        )
        if process.result is not None:
            if process.result.exit_code == 127 and self._sb.image is not None:
                raise HostToolMissing(
                    f"the code runtime in the image {self._sb.image!r}",
                    f"build the image FROM corral's default image (corral image build), "
                    f"which has it at {RUNTIME_PYTHON.rsplit('/bin/', 1)[0]}",
                )
            raise CorralError(f"cannot start the kernel driver: {process.result.stderr!r}")
        return _Driver(CommandHandle(process, writer))

    def check_open(self) -> None:
        self._sb._conn()

    def limit_counters(self) -> tuple[int, int]:
        return self._sb._limit_counters()

    def relative(self, path: str) -> str:
        return self._sb._relative(path)

    async def mkdir(self, path: str) -> None:
        await self._sb.files.mkdir(path)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._sb._spawn(coro)
