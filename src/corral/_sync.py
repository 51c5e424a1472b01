"""``Sandbox``: the synchronous facade of ``AsyncSandbox``.

Mechanical by design: every method hands the coroutine of its async twin to
one event loop that runs in a background thread (the portal) and waits for its
result. The box's machinery — output flow, process exits, the lifetime timer —
keeps running between calls, as it does in async code.
"""

from __future__ import annotations

import asyncio
import signal as _signal
import threading
from collections.abc import Awaitable, Coroutine, Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

from ._interpreter import CodeContext, ErrorCallback, Execution, ResultCallback, TextCallback
from ._policy import Policy
from ._proxy import Approval
from ._runtime import DEFAULT as DEFAULT_RUNTIME
from ._sandbox import (
    AsyncSandbox,
    CommandEvent,
    CommandHandle,
    CommandResult,
    EntryInfo,
    FileReader,
    OutputCallback,
    Payload,
    ProcessInfo,
    PtyHandle,
)

T = TypeVar("T")


class _Portal:
    """One event loop in a daemon thread, shared by every sync Sandbox."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="corral-portal", daemon=True
                )
                thread.start()
                cls._loop = loop
            return cls._loop


def _call(coro: Coroutine[Any, Any, T]) -> T:
    loop = _Portal.loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("a sync Sandbox method was called from the portal's own loop")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except BaseException:
        # Ctrl-C (or any exception) in the caller's thread: cancel the work on
        # the portal too, so a command does not run on unseen
        future.cancel()
        raise


def _wrap(awaitable: Awaitable[T]) -> Coroutine[Any, Any, T]:
    async def run() -> T:
        return await awaitable

    return run()


class SyncCommandHandle:
    def __init__(self, handle: CommandHandle) -> None:
        self._handle = handle

    @property
    def pid(self) -> int | None:
        return self._handle.pid

    @property
    def stdout(self) -> bytes:
        return self._handle.stdout

    @property
    def stderr(self) -> bytes:
        return self._handle.stderr

    def wait(self) -> CommandResult:
        return _call(self._handle.wait())

    def kill(self, signum: int = _signal.SIGKILL) -> None:
        _call(self._handle.kill(signum))

    def send_stdin(self, data: bytes | str) -> None:
        _call(self._handle.send_stdin(data))

    def close_stdin(self) -> None:
        _call(self._handle.close_stdin())


class SyncPtyHandle:
    def __init__(self, handle: PtyHandle) -> None:
        self._handle = handle

    @property
    def pid(self) -> int | None:
        return self._handle.pid

    def send(self, data: bytes | str) -> None:
        _call(self._handle.send(data))

    def read(self, timeout_s: float | None = None) -> bytes:
        return _call(self._handle.read(timeout_s))

    def resize(self, cols: int, rows: int) -> None:
        _call(self._handle.resize(cols, rows))

    def kill(self) -> None:
        _call(self._handle.kill())

    def wait(self) -> CommandResult:
        return _call(self._handle.wait())


class SyncFileReader:
    """A file streamed out of the box, read like a binary file."""

    def __init__(self, reader: FileReader) -> None:
        self._reader = reader
        self.size = reader.size

    def read(self, n: int = -1) -> bytes:
        return _call(self._reader.read(n))

    def __iter__(self) -> Iterator[bytes]:
        chunks = aiter(self._reader)
        while True:
            try:
                yield _call(_wrap(anext(chunks)))
            except StopAsyncIteration:
                return

    def close(self) -> None:
        _call(self._reader.close())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncCommands:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    @overload
    def run(
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
    def run(
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
    ) -> SyncCommandHandle: ...

    def run(
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
    ) -> CommandResult | SyncCommandHandle:
        """See ``AsyncSandbox.commands.run``; callbacks run on the portal thread."""
        if background:
            handle = _call(
                self._sb.commands.run(
                    command,
                    background=True,
                    timeout_s=timeout_s,
                    env=env,
                    cwd=cwd,
                    stdin=stdin,
                    on_stdout=on_stdout,
                    on_stderr=on_stderr,
                )
            )
            return SyncCommandHandle(handle)
        if isinstance(stdin, bool):
            raise TypeError("stdin=True is for background commands; give the bytes to send")
        return _call(
            self._sb.commands.run(
                command,
                timeout_s=timeout_s,
                env=env,
                cwd=cwd,
                stdin=stdin,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        )

    def stream(
        self,
        command: str | Sequence[str],
        *,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
    ) -> Generator[CommandEvent, None, None]:
        """Output chunks as they happen, then one ``CommandExit``."""
        events = self._sb.commands.stream(
            command, timeout_s=timeout_s, env=env, cwd=cwd, stdin=stdin
        )
        try:
            while True:
                try:
                    yield _call(_wrap(events.__anext__()))
                except StopAsyncIteration:
                    return
        finally:
            _call(events.aclose())

    def list(self) -> list[ProcessInfo]:
        return _call(self._sb.commands.list())

    def kill(self, pid: int, signum: int = _signal.SIGKILL) -> bool:
        return _call(self._sb.commands.kill(pid, signum))


class SyncFiles:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    def write(self, path: str, data: Payload, *, mode: int = 0o644) -> int:
        return _call(self._sb.files.write(path, data, mode=mode))

    def read(self, path: str) -> bytes:
        return _call(self._sb.files.read(path))

    def open_read(self, path: str) -> SyncFileReader:
        return SyncFileReader(_call(self._sb.files.open_read(path)))

    def list(self, path: str = ".") -> list[EntryInfo]:
        return _call(self._sb.files.list(path))

    def stat(self, path: str) -> EntryInfo:
        return _call(self._sb.files.stat(path))

    def exists(self, path: str) -> bool:
        return _call(self._sb.files.exists(path))

    def remove(self, path: str) -> None:
        _call(self._sb.files.remove(path))

    def mkdir(self, path: str) -> None:
        _call(self._sb.files.mkdir(path))

    def rename(self, src: str, dst: str) -> None:
        _call(self._sb.files.rename(src, dst))


class SyncPty:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    def create(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        command: str | Sequence[str] = ("/bin/sh", "-i"),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> SyncPtyHandle:
        return SyncPtyHandle(
            _call(self._sb.pty.create(cols, rows, command=command, env=env, cwd=cwd))
        )


class Sandbox:
    """A long-lived, isolated box, synchronously. See ``AsyncSandbox``."""

    def __init__(
        self,
        policy: Policy | str | None = None,
        *,
        timeout_s: float | None = 300.0,
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        runtime: str | None = DEFAULT_RUNTIME,
        on_network_request: Approval | None = None,
    ) -> None:
        self._attach(
            AsyncSandbox(
                policy,
                timeout_s=timeout_s,
                workdir=workdir,
                env=env,
                runtime=runtime,
                on_network_request=on_network_request,
            )
        )

    @classmethod
    def _around(cls, inner: AsyncSandbox) -> Sandbox:
        """The facade of any sandbox with ``AsyncSandbox``'s interface (the remote one)."""
        sandbox = cls.__new__(cls)
        sandbox._attach(inner)
        return sandbox

    def _attach(self, inner: AsyncSandbox) -> None:
        self._async = inner
        self.commands = SyncCommands(self._async)
        self.files = SyncFiles(self._async)
        self.pty = SyncPty(self._async)
        self.network = self._async.network  # events() and update() do not block

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def policy(self) -> Policy:
        return self._async.policy

    def start(self) -> None:
        _call(self._async.start())

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        _call(self._async.close())

    def is_running(self) -> bool:
        return self._async.is_running()

    def run_code(
        self,
        code: str,
        *,
        language: str = "python",
        context: CodeContext | str | None = None,
        envs: dict[str, str] | None = None,
        timeout_s: float | None = None,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
        on_result: ResultCallback | None = None,
        on_error: ErrorCallback | None = None,
    ) -> Execution:
        """See ``AsyncSandbox.run_code``; callbacks run on the portal thread."""
        if not isinstance(self._async, AsyncSandbox):  # (a remote sandbox: no envs, ids yet)
            if envs or isinstance(context, str):
                raise NotImplementedError("envs and context ids need a local sandbox")
            return _call(
                self._async.run_code(
                    code,
                    language=language,
                    context=context,
                    timeout_s=timeout_s,
                    on_stdout=on_stdout,
                    on_stderr=on_stderr,
                    on_result=on_result,
                    on_error=on_error,
                )
            )
        return _call(
            self._async.run_code(
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
        )

    def create_code_context(
        self, language: str = "python", *, cwd: str | None = None
    ) -> CodeContext:
        return _call(self._async.create_code_context(language, cwd=cwd))

    def list_code_contexts(self) -> list[CodeContext]:
        """See ``AsyncSandbox.list_code_contexts`` (a local sandbox's)."""
        if not isinstance(self._async, AsyncSandbox):
            raise NotImplementedError("list_code_contexts needs a local sandbox")
        return self._async.list_code_contexts()

    def restart_code_context(self, context: CodeContext | str) -> None:
        if isinstance(context, str) and not isinstance(self._async, AsyncSandbox):
            raise NotImplementedError("context ids need a local sandbox")
        _call(self._async.restart_code_context(context))

    def remove_code_context(self, context: CodeContext | str) -> None:
        if isinstance(context, str) and not isinstance(self._async, AsyncSandbox):
            raise NotImplementedError("context ids need a local sandbox")
        _call(self._async.remove_code_context(context))

    def prewarm(self, language: str = "python") -> None:
        _call(self._async.prewarm(language))

    def set_timeout(self, timeout_s: float | None) -> None:
        if not isinstance(self._async, AsyncSandbox):
            # a remote sandbox makes a blocking request: from this thread, so
            # the portal's loop (every other sandbox's) does not stall on it
            self._async.set_timeout(timeout_s)
            return

        async def set_it() -> None:
            self._async.set_timeout(timeout_s)

        _call(set_it())
