"""The public sandbox API, as ``typing.Protocol``s: what every sandbox offers.

Four surfaces implement it: ``AsyncSandbox`` (local) and ``RemoteSandbox``
(``corral serve``, through ``AsyncClient``) implement ``AsyncSandboxAPI``;
``Sandbox`` implements ``SandboxAPI`` over either of them (``Sandbox(...)``
locally, ``Client.sandbox()`` remotely). mypy checks each implementation
against these Protocols, so code typed against them runs on any surface.

The async Protocols below are written by hand; the sync ones at the end of this
file, and the ``Sandbox`` facade in ``_sync.py``, are generated from them by
``scripts/gen_sync.py`` (``--check`` fails when either is stale). Every
method that does I/O is a coroutine on the async API.

Errors, on every surface: the caller's mistakes are ``ValueError`` /
``TypeError`` (``PathOutsideWorkspace`` for paths); a file the box lacks is the
``OSError`` the box saw (``FileNotFoundError``…); a sandbox closed by its
owner raises ``SandboxClosed``, one that broke underneath (box died, lifetime
ran out, server lost) ``SandboxBroken``; the server's own refusals are
``RemoteError``.
"""

from __future__ import annotations

import os
import signal as _signal
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Literal, Protocol, Self, overload

if TYPE_CHECKING:
    from ._interpreter import (
        CodeContext,
        CodeEvent,
        ErrorCallback,
        Execution,
        ResultCallback,
        TextCallback,
    )
    from ._policy import Policy
    from ._sandbox import (
        CommandEvent,
        CommandResult,
        EntryInfo,
        OutputCallback,
        Payload,
        ProcessInfo,
    )
    from ._snapshot import Snapshot
    from .net._events import NetworkEvent

__all__ = [
    "AsyncCommandHandleAPI",
    "AsyncCommandsAPI",
    "AsyncFileReaderAPI",
    "AsyncFilesAPI",
    "AsyncNetworkAPI",
    "AsyncPtyAPI",
    "AsyncPtyHandleAPI",
    "AsyncSandboxAPI",
    "CommandHandleAPI",
    "CommandsAPI",
    "FileReaderAPI",
    "FilesAPI",
    "NetworkAPI",
    "PtyAPI",
    "PtyHandleAPI",
    "SandboxAPI",
]


class AsyncCommandHandleAPI(Protocol):
    """A command running in the background (``commands.run(..., background=True)``)."""

    @property
    def pid(self) -> int | None:
        """Its pid in the box; None when it could not be started."""
        ...

    @property
    def stdout(self) -> bytes:
        """Output so far (up to the policy's ``output_bytes``)."""
        ...

    @property
    def stderr(self) -> bytes:
        """Error output so far (up to the policy's ``output_bytes``)."""
        ...

    async def wait(self) -> CommandResult:
        """Wait for it to end; raises what an output callback raised."""
        ...

    async def kill(self, signum: int = _signal.SIGKILL) -> None:
        """Signal it (default SIGKILL); ValueError for a number that is no signal."""
        ...

    async def send_stdin(self, data: bytes | str) -> None:
        """Send to its stdin (started with ``stdin=True``); BrokenPipeError once closed."""
        ...

    async def close_stdin(self) -> None:
        """Close its stdin (EOF for the command); idempotent."""
        ...


class AsyncPtyHandleAPI(Protocol):
    """An interactive terminal in the box."""

    @property
    def pid(self) -> int | None:
        """The pid in the box of the terminal's program."""
        ...

    async def send(self, data: bytes | str) -> None:
        """Type into the terminal."""
        ...

    async def read(self, timeout_s: float | None = None) -> bytes:
        """The next output; b"" once the terminal ended; TimeoutError after ``timeout_s``."""
        ...

    async def resize(self, cols: int, rows: int) -> None:
        """Resize the terminal (1..1000 each, else ValueError)."""
        ...

    async def kill(self) -> None:
        """Kill the terminal's program (SIGKILL)."""
        ...

    async def wait(self) -> CommandResult:
        """Wait for the terminal's program to end (its output is read with ``read``)."""
        ...


class AsyncFileReaderAPI(Protocol):
    """A file streamed out of the box: iterate it for its chunks, or ``read``."""

    @property
    def size(self) -> int:
        """The file's size in bytes when it was opened."""
        ...

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all the rest with -1); b"" at the end."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]:
        """The rest of the file, chunk by chunk."""
        ...

    async def close(self) -> None:
        """Stop reading (idempotent)."""
        ...

    async def __aenter__(self) -> Self:
        """The reader itself; closed at the end of the block."""
        ...

    async def __aexit__(self, *exc: object) -> None:
        """Close the reader."""
        ...


class AsyncCommandsAPI(Protocol):
    """Commands in the box: ``sandbox.commands``."""

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
        """Run ``command`` (a shell string, or an argv list).

        In the foreground: the finished ``CommandResult``; ``timeout_s`` defaults
        to the policy's ``wall_time_s``, and output beyond its ``output_bytes``
        ends the command (``limit_hit="output"``). With ``background=True``: a
        handle at once; no timeout unless given; ``stdin=True`` keeps its stdin
        open (TypeError in the foreground: give the bytes to send). A command
        that fails, times out or hits a limit is a result, never an exception.
        """
        ...

    def stream(
        self,
        command: str | Sequence[str],
        *,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
    ) -> AsyncGenerator[CommandEvent, None]:
        """``CommandOutput`` chunks as they happen, then one ``CommandExit``.
        Leaving the loop early kills the command."""
        ...

    async def list(self) -> list[ProcessInfo]:
        """Every live process of the box: each running command once, then what
        no running command accounts for (daemons left behind)."""
        ...

    async def kill(self, pid: int, signum: int = _signal.SIGKILL) -> bool:
        """Signal the process ``pid`` of ``list()`` and all it started; False if none."""
        ...


class AsyncFilesAPI(Protocol):
    """The box's workspace: ``sandbox.files``. Paths are relative to it (or
    absolute inside it); any way out raises ``PathOutsideWorkspace``."""

    async def write(self, path: str, data: Payload, *, mode: int = 0o644) -> int:
        """Write a file atomically (whole or not at all); its size in bytes.
        ``data``: bytes, text, a binary file or an (async) iterable of chunks."""
        ...

    async def read(self, path: str) -> bytes:
        """The whole file."""
        ...

    async def open_read(self, path: str) -> AsyncFileReaderAPI:
        """The file as a stream, for files too large to hold at once."""
        ...

    async def list(self, path: str = ".") -> list[EntryInfo]:
        """The entries of a directory."""
        ...

    async def stat(self, path: str) -> EntryInfo:
        """One entry (FileNotFoundError if there is none)."""
        ...

    async def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        ...

    async def remove(self, path: str) -> None:
        """Remove a file or a whole directory tree."""
        ...

    async def mkdir(self, path: str) -> None:
        """Make a directory (and its parents)."""
        ...

    async def rename(self, src: str, dst: str) -> None:
        """Rename within the workspace."""
        ...


class AsyncPtyAPI(Protocol):
    """Terminals in the box: ``sandbox.pty``."""

    async def create(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        command: str | Sequence[str] = ("/bin/sh", "-i"),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> AsyncPtyHandleAPI:
        """A terminal of ``cols`` x ``rows`` running ``command`` (an interactive shell)."""
        ...


class AsyncNetworkAPI(Protocol):
    """The box's network through its proxy: ``sandbox.network``."""

    async def events(self) -> list[NetworkEvent]:
        """Every decision so far (host, port, address, allowed, rule, reason);
        empty unless the policy's network mode is ``allowlist``."""
        ...

    async def update(
        self, *, allow: Sequence[str] | None = None, deny: Sequence[str] | None = None
    ) -> None:
        """New allow/deny rules for new connections (None keeps a list as it is).
        Refused unless the network mode is ``allowlist`` (``SandboxError`` locally,
        ``RemoteError`` 409 remotely); ``PolicyError`` names a bad rule."""
        ...


class AsyncSandboxAPI(Protocol):
    """A long-lived, isolated box: commands, files, terminals, network, code."""

    @property
    def id(self) -> str:
        """The sandbox's id ("" before it started, remotely)."""
        ...

    @property
    def policy(self) -> Policy:
        """The policy it runs under (network rules as last updated)."""
        ...

    @property
    def degraded(self) -> tuple[str, ...]:
        """Controls the host enforces more weakly than the policy asks, each
        saying what stands in (``()`` before ``start``)."""
        ...

    @property
    def commands(self) -> AsyncCommandsAPI:
        """Commands: run, background, stream, list, kill."""
        ...

    @property
    def files(self) -> AsyncFilesAPI:
        """The workspace: write, read, list, stat, remove, mkdir, rename."""
        ...

    @property
    def pty(self) -> AsyncPtyAPI:
        """Interactive terminals."""
        ...

    @property
    def network(self) -> AsyncNetworkAPI:
        """The proxy's decisions and rules."""
        ...

    async def start(self) -> None:
        """Start the box (SandboxError when started twice)."""
        ...

    async def close(self) -> None:
        """End the box and everything in it (idempotent)."""
        ...

    async def __aenter__(self) -> Self:
        """Start the box; it is closed at the end of the block."""
        ...

    async def __aexit__(self, *exc: object) -> None:
        """Close the box."""
        ...

    async def is_running(self) -> bool:
        """Whether the box is up (False once closed, broken or ended)."""
        ...

    async def set_timeout(self, timeout_s: float | None) -> None:
        """Give the box ``timeout_s`` more seconds to live, counted from now
        (None: no limit, which a remote sandbox refuses with ValueError)."""
        ...

    async def pause(self) -> None:
        """Freeze every process of the box in place (the cgroup freezer): it
        uses no CPU, keeps its memory (still counted against its limits and
        quotas) and its state, and its lifetime timer keeps running. Calls made
        while paused wait until ``resume``. Idempotent; ``SandboxError`` where
        the host cannot freeze a box."""
        ...

    async def resume(self) -> None:
        """Let a paused box run again, where it stopped. Idempotent."""
        ...

    async def snapshot(self, path: str | os.PathLike[str] | None = None) -> Snapshot:
        """Save the workspace to the host directory ``path`` (created, mode
        0700, must be empty; a new temporary directory when None): a
        ``Snapshot`` that outlives the box, the server and its host process.
        Process and memory state are not included (``Snapshot.processes``).
        ``SandboxError`` when the box cannot archive its workspace."""
        ...

    async def restore(self, snapshot: Snapshot | str | os.PathLike[str]) -> None:
        """Unpack a snapshot's workspace into this sandbox's (same-named files
        are replaced). The archive is unpacked inside the box, never on the
        host. ``SandboxError`` when it cannot be unpacked."""
        ...

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
        given, as a context or its id). Errors in the code are data
        (``Execution.error``); ``envs`` are environment variables for this cell
        only (ValueError for a bad name or a value with NUL), as E2B's
        ``run_code(envs=...)``; ``timeout_s`` (default: the policy's
        ``wall_time_s``) interrupts the cell."""
        ...

    def stream_code(
        self,
        code: str,
        *,
        language: str = "python",
        context: CodeContext | str | None = None,
        envs: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[CodeEvent, None]:
        """``run_code`` as events: ``("stdout" | "stderr", text)``, ``("result",
        Result)``, ``("error", ExecutionError)`` as they happen, then ``("done", Execution)``."""
        ...

    async def create_code_context(
        self, language: str = "python", *, cwd: str | None = None
    ) -> CodeContext:
        """A new independent context (its own kernel) for ``run_code(context=...)``."""
        ...

    async def list_code_contexts(self) -> list[CodeContext]:
        """The live code contexts, oldest first (the languages' defaults included)."""
        ...

    async def restart_code_context(self, context: CodeContext | str) -> None:
        """Restart the context's kernel (a context or its id): its state is lost."""
        ...

    async def remove_code_context(self, context: CodeContext | str) -> None:
        """Shut the context's kernel down (a context or its id)."""
        ...

    async def prewarm(self, language: str = "python") -> None:
        """Start the language's default context now, so the first cell is quick."""
        ...


# -- GENERATED below this line by scripts/gen_sync.py from the Protocols above: do not edit --


class CommandHandleAPI(Protocol):
    """A command running in the background (``commands.run(..., background=True)``).

    The sync variant of ``AsyncCommandHandleAPI``.
    """

    @property
    def pid(self) -> int | None:
        """Its pid in the box; None when it could not be started."""
        ...

    @property
    def stdout(self) -> bytes:
        """Output so far (up to the policy's ``output_bytes``)."""
        ...

    @property
    def stderr(self) -> bytes:
        """Error output so far (up to the policy's ``output_bytes``)."""
        ...

    def wait(self) -> CommandResult:
        """Wait for it to end; raises what an output callback raised."""
        ...

    def kill(self, signum: int = _signal.SIGKILL) -> None:
        """Signal it (default SIGKILL); ValueError for a number that is no signal."""
        ...

    def send_stdin(self, data: bytes | str) -> None:
        """Send to its stdin (started with ``stdin=True``); BrokenPipeError once closed."""
        ...

    def close_stdin(self) -> None:
        """Close its stdin (EOF for the command); idempotent."""
        ...


class PtyHandleAPI(Protocol):
    """An interactive terminal in the box.

    The sync variant of ``AsyncPtyHandleAPI``.
    """

    @property
    def pid(self) -> int | None:
        """The pid in the box of the terminal's program."""
        ...

    def send(self, data: bytes | str) -> None:
        """Type into the terminal."""
        ...

    def read(self, timeout_s: float | None = None) -> bytes:
        """The next output; b"" once the terminal ended; TimeoutError after ``timeout_s``."""
        ...

    def resize(self, cols: int, rows: int) -> None:
        """Resize the terminal (1..1000 each, else ValueError)."""
        ...

    def kill(self) -> None:
        """Kill the terminal's program (SIGKILL)."""
        ...

    def wait(self) -> CommandResult:
        """Wait for the terminal's program to end (its output is read with ``read``)."""
        ...


class FileReaderAPI(Protocol):
    """A file streamed out of the box: iterate it for its chunks, or ``read``.

    The sync variant of ``AsyncFileReaderAPI``.
    """

    @property
    def size(self) -> int:
        """The file's size in bytes when it was opened."""
        ...

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all the rest with -1); b"" at the end."""
        ...

    def __iter__(self) -> Iterator[bytes]:
        """The rest of the file, chunk by chunk."""
        ...

    def close(self) -> None:
        """Stop reading (idempotent)."""
        ...

    def __enter__(self) -> Self:
        """The reader itself; closed at the end of the block."""
        ...

    def __exit__(self, *exc: object) -> None:
        """Close the reader."""
        ...


class CommandsAPI(Protocol):
    """Commands in the box: ``sandbox.commands``.

    The sync variant of ``AsyncCommandsAPI``.
    """

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
    ) -> CommandHandleAPI: ...

    @overload
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
    ) -> CommandResult | CommandHandleAPI: ...

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
    ) -> CommandResult | CommandHandleAPI:
        """Run ``command`` (a shell string, or an argv list).

        In the foreground: the finished ``CommandResult``; ``timeout_s`` defaults
        to the policy's ``wall_time_s``, and output beyond its ``output_bytes``
        ends the command (``limit_hit="output"``). With ``background=True``: a
        handle at once; no timeout unless given; ``stdin=True`` keeps its stdin
        open (TypeError in the foreground: give the bytes to send). A command
        that fails, times out or hits a limit is a result, never an exception.
        """
        ...

    def stream(
        self,
        command: str | Sequence[str],
        *,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
    ) -> Generator[CommandEvent, None, None]:
        """``CommandOutput`` chunks as they happen, then one ``CommandExit``.
        Leaving the loop early kills the command.
        """
        ...

    def list(self) -> list[ProcessInfo]:
        """Every live process of the box: each running command once, then what
        no running command accounts for (daemons left behind).
        """
        ...

    def kill(self, pid: int, signum: int = _signal.SIGKILL) -> bool:
        """Signal the process ``pid`` of ``list()`` and all it started; False if none."""
        ...


class FilesAPI(Protocol):
    """The box's workspace: ``sandbox.files``. Paths are relative to it (or
    absolute inside it); any way out raises ``PathOutsideWorkspace``.

    The sync variant of ``AsyncFilesAPI``.
    """

    def write(self, path: str, data: Payload, *, mode: int = 0o644) -> int:
        """Write a file atomically (whole or not at all); its size in bytes.
        ``data``: bytes, text, a binary file or an (async) iterable of chunks.
        """
        ...

    def read(self, path: str) -> bytes:
        """The whole file."""
        ...

    def open_read(self, path: str) -> FileReaderAPI:
        """The file as a stream, for files too large to hold at once."""
        ...

    def list(self, path: str = ".") -> list[EntryInfo]:
        """The entries of a directory."""
        ...

    def stat(self, path: str) -> EntryInfo:
        """One entry (FileNotFoundError if there is none)."""
        ...

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        ...

    def remove(self, path: str) -> None:
        """Remove a file or a whole directory tree."""
        ...

    def mkdir(self, path: str) -> None:
        """Make a directory (and its parents)."""
        ...

    def rename(self, src: str, dst: str) -> None:
        """Rename within the workspace."""
        ...


class PtyAPI(Protocol):
    """Terminals in the box: ``sandbox.pty``.

    The sync variant of ``AsyncPtyAPI``.
    """

    def create(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        command: str | Sequence[str] = ("/bin/sh", "-i"),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> PtyHandleAPI:
        """A terminal of ``cols`` x ``rows`` running ``command`` (an interactive shell)."""
        ...


class NetworkAPI(Protocol):
    """The box's network through its proxy: ``sandbox.network``.

    The sync variant of ``AsyncNetworkAPI``.
    """

    def events(self) -> list[NetworkEvent]:
        """Every decision so far (host, port, address, allowed, rule, reason);
        empty unless the policy's network mode is ``allowlist``.
        """
        ...

    def update(
        self, *, allow: Sequence[str] | None = None, deny: Sequence[str] | None = None
    ) -> None:
        """New allow/deny rules for new connections (None keeps a list as it is).
        Refused unless the network mode is ``allowlist`` (``SandboxError`` locally,
        ``RemoteError`` 409 remotely); ``PolicyError`` names a bad rule.
        """
        ...


class SandboxAPI(Protocol):
    """A long-lived, isolated box: commands, files, terminals, network, code.

    The sync variant of ``AsyncSandboxAPI``.
    """

    @property
    def id(self) -> str:
        """The sandbox's id ("" before it started, remotely)."""
        ...

    @property
    def policy(self) -> Policy:
        """The policy it runs under (network rules as last updated)."""
        ...

    @property
    def degraded(self) -> tuple[str, ...]:
        """Controls the host enforces more weakly than the policy asks, each
        saying what stands in (``()`` before ``start``).
        """
        ...

    @property
    def commands(self) -> CommandsAPI:
        """Commands: run, background, stream, list, kill."""
        ...

    @property
    def files(self) -> FilesAPI:
        """The workspace: write, read, list, stat, remove, mkdir, rename."""
        ...

    @property
    def pty(self) -> PtyAPI:
        """Interactive terminals."""
        ...

    @property
    def network(self) -> NetworkAPI:
        """The proxy's decisions and rules."""
        ...

    def start(self) -> None:
        """Start the box (SandboxError when started twice)."""
        ...

    def close(self) -> None:
        """End the box and everything in it (idempotent)."""
        ...

    def __enter__(self) -> Self:
        """Start the box; it is closed at the end of the block."""
        ...

    def __exit__(self, *exc: object) -> None:
        """Close the box."""
        ...

    def is_running(self) -> bool:
        """Whether the box is up (False once closed, broken or ended)."""
        ...

    def set_timeout(self, timeout_s: float | None) -> None:
        """Give the box ``timeout_s`` more seconds to live, counted from now
        (None: no limit, which a remote sandbox refuses with ValueError).
        """
        ...

    def pause(self) -> None:
        """Freeze every process of the box in place (the cgroup freezer): it
        uses no CPU, keeps its memory (still counted against its limits and
        quotas) and its state, and its lifetime timer keeps running. Calls made
        while paused wait until ``resume``. Idempotent; ``SandboxError`` where
        the host cannot freeze a box.
        """
        ...

    def resume(self) -> None:
        """Let a paused box run again, where it stopped. Idempotent."""
        ...

    def snapshot(self, path: str | os.PathLike[str] | None = None) -> Snapshot:
        """Save the workspace to the host directory ``path`` (created, mode
        0700, must be empty; a new temporary directory when None): a
        ``Snapshot`` that outlives the box, the server and its host process.
        Process and memory state are not included (``Snapshot.processes``).
        ``SandboxError`` when the box cannot archive its workspace.
        """
        ...

    def restore(self, snapshot: Snapshot | str | os.PathLike[str]) -> None:
        """Unpack a snapshot's workspace into this sandbox's (same-named files
        are replaced). The archive is unpacked inside the box, never on the
        host. ``SandboxError`` when it cannot be unpacked.
        """
        ...

    def run_code(
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
        given, as a context or its id). Errors in the code are data
        (``Execution.error``); ``envs`` are environment variables for this cell
        only (ValueError for a bad name or a value with NUL), as E2B's
        ``run_code(envs=...)``; ``timeout_s`` (default: the policy's
        ``wall_time_s``) interrupts the cell.
        """
        ...

    def stream_code(
        self,
        code: str,
        *,
        language: str = "python",
        context: CodeContext | str | None = None,
        envs: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Generator[CodeEvent, None, None]:
        """``run_code`` as events: ``("stdout" | "stderr", text)``, ``("result",
        Result)``, ``("error", ExecutionError)`` as they happen, then ``("done", Execution)``.
        """
        ...

    def create_code_context(
        self, language: str = "python", *, cwd: str | None = None
    ) -> CodeContext:
        """A new independent context (its own kernel) for ``run_code(context=...)``."""
        ...

    def list_code_contexts(self) -> list[CodeContext]:
        """The live code contexts, oldest first (the languages' defaults included)."""
        ...

    def restart_code_context(self, context: CodeContext | str) -> None:
        """Restart the context's kernel (a context or its id): its state is lost."""
        ...

    def remove_code_context(self, context: CodeContext | str) -> None:
        """Shut the context's kernel down (a context or its id)."""
        ...

    def prewarm(self, language: str = "python") -> None:
        """Start the language's default context now, so the first cell is quick."""
        ...
