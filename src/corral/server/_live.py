"""One running sandbox of ``corral serve`` and everything the API keeps beside it.

``Live`` owns the per-sandbox tables (code contexts, background commands and
their output logs, terminals, pending network approvals) and performs every
operation on them, writing the audit log and the metrics as it goes. The HTTP
routes call these methods and turn their plain results into replies; they
never touch the tables or the ``AsyncSandbox`` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from corral import _serial as s
from corral._errors import CorralError
from corral._interpreter import CodeContext
from corral._sandbox import AsyncSandbox, CommandExit, CommandHandle, PtyHandle

from . import _internals
from ._metrics import Metrics
from ._output import OutputLog
from ._store import ApiKey, Store

K = TypeVar("K")
V = TypeVar("V")

MAX_FINISHED_COMMANDS = 100  # background commands whose output is kept after they end
MAX_FINISHED_BYTES = 64 << 20  # and their output in total, per sandbox
MAX_BACKGROUND = 64  # running background commands per sandbox (each holds its output here)
MAX_TERMINALS = 16  # open terminals per sandbox (each holds a read buffer here)
APPROVAL_TIMEOUT_S = 30.0


class ServiceError(CorralError):
    """A refusal of the service, with an HTTP status and a stable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def find(items: dict[K, V], key: K, what: str) -> V:
    """A context, background command or terminal of the sandbox, or 404."""
    found = items.get(key)
    if found is None:
        raise ServiceError(404, "not_found", f"no {what} {key!r}")
    return found


@dataclass
class Approval:
    id: str
    host: str
    port: int
    time: float
    answer: asyncio.Future[bool]


@dataclass(eq=False)  # identity: tracked in a WeakSet
class Live:
    """A running sandbox of this process, and what the API keeps beside it."""

    sandbox: AsyncSandbox
    key: ApiKey
    expires_at: float | None
    idle_timeout_s: float | None
    workspace: Path
    store: Store
    metrics: Metrics
    track: Callable[[OutputLog], None] = lambda _log: None  # /metrics counts unfreed logs
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    commands: dict[int, tuple[CommandHandle, OutputLog]] = field(default_factory=dict)
    terminals: dict[int, PtyHandle] = field(default_factory=dict)
    terminal_locks: dict[int, asyncio.Lock] = field(default_factory=dict)
    starting: int = 0  # background commands and terminals being started (counted in caps)
    contexts: dict[str, CodeContext] = field(default_factory=dict)
    approvals: dict[str, Approval] = field(default_factory=dict)
    approvals_changed: asyncio.Event = field(default_factory=asyncio.Event)
    next_disk_check: float = 0.0
    disk_bytes: int | None = None  # the workspace's size at the last disk check

    @property
    def id(self) -> str:
        return self.sandbox.id

    def commands_running(self) -> bool:
        return any(not log.done for _, log in self.commands.values())

    def audit(self, action: str, **detail: Any) -> None:
        self.store.audit(action, key_id=self.key.id, sandbox_id=self.sandbox.id, **detail)

    def ended(self, reason: str) -> None:
        """The sandbox ends: pending questions are denied, followers told."""
        for approval in self.approvals.values():
            if not approval.answer.done():
                approval.answer.set_result(False)
        for _, log in self.commands.values():
            if not log.done:
                log.finish("error", {"error": {"code": "sandbox_ended", "message": reason}})

    def clear(self) -> None:
        """Nothing of an ended sandbox stays in this process: the tables go
        now, whoever still holds this object."""
        self.commands.clear()
        self.terminals.clear()
        self.terminal_locks.clear()
        self.contexts.clear()
        self.approvals.clear()

    # -- code ------------------------------------------------------------------------

    def context(self, context_id: str | None) -> CodeContext | None:
        return find(self.contexts, context_id, "code context") if context_id is not None else None

    def _record_code(
        self, language: str, code: str, execution: dict[str, Any], seconds: float
    ) -> None:
        self.metrics.run_code.observe(seconds)
        error = execution.get("error") or {}
        limit = error.get("limit_hit")
        if limit:
            self.metrics.limit_hit(limit)
        self.audit(
            "code.run",
            language=language,
            code=code[:2000],
            error=error.get("name"),
            limit=limit,
            duration_s=round(seconds, 6),
        )

    async def run_code(
        self,
        code: str,
        language: str,
        context: CodeContext | None,
        envs: dict[str, str] | None,
        timeout_s: float | None,
    ) -> dict[str, Any]:
        """The execution as JSON types (``_serial.execution_to_dict``)."""
        started = asyncio.get_running_loop().time()
        execution = s.execution_to_dict(
            await self.sandbox.run_code(
                code, language=language, context=context, envs=envs, timeout_s=timeout_s
            )
        )
        self._record_code(language, code, execution, asyncio.get_running_loop().time() - started)
        return execution

    async def stream_code(
        self,
        code: str,
        language: str,
        context: CodeContext | None,
        envs: dict[str, str] | None,
        timeout_s: float | None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Code events as JSON types, the last one ``done`` with the execution."""
        started = asyncio.get_running_loop().time()
        async for event in self.sandbox.stream_code(
            code, language=language, context=context, envs=envs, timeout_s=timeout_s
        ):
            data = s.code_event_to_dict(event)
            if data["type"] == "done":
                seconds = asyncio.get_running_loop().time() - started
                self._record_code(language, code, data["execution"], seconds)
            yield data

    async def create_context(self, language: str, cwd: str | None) -> dict[str, Any]:
        context = await self.sandbox.create_code_context(language, cwd=cwd)
        self.contexts[context.id] = context
        return s.context_to_dict(context)

    async def list_contexts(self) -> list[dict[str, Any]]:
        """Every live context, the languages' defaults included (each then
        addressable by id through this API)."""
        contexts = await self.sandbox.list_code_contexts()
        for context in contexts:
            self.contexts.setdefault(context.id, context)
        return [s.context_to_dict(c) for c in contexts]

    async def restart_context(self, context_id: str) -> dict[str, Any]:
        context = find(self.contexts, context_id, "code context")
        await self.sandbox.restart_code_context(context)
        return s.context_to_dict(context)

    async def remove_context(self, context_id: str) -> None:
        context = find(self.contexts, context_id, "code context")
        await self.sandbox.remove_code_context(context)
        del self.contexts[context_id]

    async def prewarm(self, language: str) -> None:
        await self.sandbox.prewarm(language)

    # -- commands ----------------------------------------------------------------------

    def _record_command(self, argv: str | Sequence[str], result: dict[str, Any], bg: bool) -> None:
        if result["limit_hit"]:
            self.metrics.limit_hit(result["limit_hit"])
        self.audit(
            "command.run",
            command=str(argv)[:2000],
            exit_code=result["exit_code"],
            limit=result["limit_hit"],
            background=bg,
        )

    async def run_command(
        self,
        argv: str | list[str],
        *,
        timeout_s: float | None,
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: bytes | None,
    ) -> dict[str, Any]:
        result = s.command_result_to_dict(
            await self.sandbox.commands.run(
                argv, timeout_s=timeout_s, env=env, cwd=cwd, stdin=stdin
            )
        )
        self._record_command(argv, result, False)
        return result

    async def stream_command(
        self,
        argv: str | list[str],
        *,
        timeout_s: float | None,
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: bytes | None,
    ) -> AsyncIterator[dict[str, Any]]:
        # commands.stream is bounded: a slow HTTP reader holds the command
        # back instead of filling the server's memory; a reader that goes away
        # closes this generator, which kills the command
        async for event in self.sandbox.commands.stream(
            argv, timeout_s=timeout_s, env=env, cwd=cwd, stdin=stdin
        ):
            if isinstance(event, CommandExit):
                result = s.command_result_to_dict(event.result)
                self._record_command(argv, result, False)
                yield {"type": "exit", "result": result}
            else:
                yield {"type": event.stream, "data": s.b64(event.data)}

    async def start_background(
        self,
        argv: str | list[str],
        *,
        timeout_s: float | None,
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: bytes | None,
        stdin_open: bool,
    ) -> tuple[int | None, dict[str, Any] | None]:
        """``(pid, None)``, or ``(None, result)`` for a command that could not start."""
        running = sum(not o.done for _, o in self.commands.values())
        if running + self.starting >= MAX_BACKGROUND:
            raise ServiceError(
                429,
                "too_many",
                f"a sandbox runs at most {MAX_BACKGROUND} background "
                "commands started through the API",
            )
        output = OutputLog()
        self.track(output)
        feed: bytes | bool | None = stdin if stdin is not None else (True if stdin_open else None)
        self.starting += 1  # counted while it starts: concurrent requests see it
        try:
            handle = await self.sandbox.commands.run(
                argv,
                background=True,
                timeout_s=timeout_s,
                env=env,
                cwd=cwd,
                stdin=feed,
                on_stdout=lambda d: output.on_output("stdout", len(d)),
                on_stderr=lambda d: output.on_output("stderr", len(d)),
            )
        finally:
            self.starting -= 1
        if handle.pid is None:  # could not start: already a result
            result = s.command_result_to_dict(await handle.wait())
            self._record_command(argv, result, True)
            return None, result
        output.attach(handle)
        self._keep(handle.pid, handle, output)
        self.audit("command.start", command=str(argv)[:2000], pid=handle.pid)
        _internals.spawn(self.sandbox, self._finish_background(argv, handle, output))
        return handle.pid, None

    def _keep(self, pid: int, handle: CommandHandle, output: OutputLog) -> None:
        """Register a background command; finished ones are forgotten oldest first
        beyond ``MAX_FINISHED_COMMANDS`` or ``MAX_FINISHED_BYTES`` of output."""
        self.commands[pid] = (handle, output)
        finished = [(p, o.kept) for p, (_, o) in self.commands.items() if o.done]
        count, size = len(finished), sum(kept for _, kept in finished)
        for old, kept in finished:
            if count <= MAX_FINISHED_COMMANDS and size <= MAX_FINISHED_BYTES:
                break
            del self.commands[old]
            count, size = count - 1, size - kept

    async def _finish_background(
        self, argv: str | list[str], handle: CommandHandle, output: OutputLog
    ) -> None:
        try:
            result = s.command_result_to_dict(await handle.wait())
            self._record_command(argv, result, True)
            # the output went out as events: the exit does not carry it twice
            output.finish("exit", {"result": {**result, "stdout": "", "stderr": ""}})
        except CorralError as exc:
            output.finish("error", {"error": {"code": "sandbox_ended", "message": str(exc)}})
        finally:
            if not output.done:  # cancelled: followers must not wait forever
                output.finish("error", {"error": {"code": "sandbox_ended", "message": "cancelled"}})

    def follow(self, pid: int) -> AsyncIterator[dict[str, Any]]:
        """A background command's output from its start, then its exit."""
        _, output = find(self.commands, pid, "background command with pid")
        return output.follow()

    async def send_stdin(self, pid: int, data: bytes) -> None:
        handle, _ = find(self.commands, pid, "background command with pid")
        await handle.send_stdin(data)

    async def close_stdin(self, pid: int) -> None:
        handle, _ = find(self.commands, pid, "background command with pid")
        await handle.close_stdin()

    async def kill(self, pid: int, signal: int) -> bool:
        return await self.sandbox.commands.kill(pid, signal)

    async def processes(self) -> list[dict[str, Any]]:
        return [s.process_to_dict(p) for p in await self.sandbox.commands.list()]

    # -- terminals ---------------------------------------------------------------------

    async def open_terminal(
        self,
        cols: int,
        rows: int,
        argv: str | list[str],
        env: dict[str, str] | None,
        cwd: str | None,
        timeout_s: float | None = None,
    ) -> int:
        """The new terminal's pid; with ``timeout_s`` it is killed (SIGKILL)
        that many seconds after it started, as a command's timeout."""
        for pid, old in list(self.terminals.items()):
            if _internals.terminal_ended(old):  # ended and never waited for
                del self.terminals[pid]
                self.terminal_locks.pop(pid, None)
        if len(self.terminals) + self.starting >= MAX_TERMINALS:
            raise ServiceError(
                429, "too_many", f"a sandbox has at most {MAX_TERMINALS} open terminals"
            )
        self.starting += 1
        try:
            handle = await self.sandbox.pty.create(cols, rows, command=argv, env=env, cwd=cwd)
        finally:
            self.starting -= 1
        assert handle.pid is not None
        self.terminals[handle.pid] = handle
        self.audit("pty.create", command=str(argv)[:2000])
        if timeout_s is not None:
            _internals.spawn(self.sandbox, self._terminal_deadline(handle, timeout_s))
        return handle.pid

    async def _terminal_deadline(self, handle: PtyHandle, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        if not _internals.terminal_ended(handle):
            await handle.kill()

    def terminal(self, pid: int) -> PtyHandle:
        return find(self.terminals, pid, "terminal with pid")

    async def read_terminal(self, pid: int, timeout_s: float) -> bytes | None:
        """The next output (b"" once it ended), None when nothing came in time."""
        terminal = self.terminal(pid)
        lock = self.terminal_locks.setdefault(pid, asyncio.Lock())
        try:
            async with lock:  # one reader at a time: a retry must not break the handle
                return await terminal.read(timeout_s)
        except TimeoutError:
            return None

    async def wait_terminal(self, pid: int) -> dict[str, Any]:
        result = await self.terminal(pid).wait()
        self.terminals.pop(pid, None)
        self.terminal_locks.pop(pid, None)
        return s.command_result_to_dict(result)

    # -- files -------------------------------------------------------------------------

    async def write_file(self, path: str, chunks: AsyncIterator[bytes], mode: int) -> int:
        size = await self.sandbox.files.write(path, chunks, mode=mode)
        self.audit("file.write", path=path[:1000], size=size)
        return size

    # -- network -----------------------------------------------------------------------

    async def network_events(self) -> list[dict[str, Any]]:
        return [s.network_event_to_dict(e) for e in await self.sandbox.network.events()]

    async def update_rules(self, allow: list[str] | None, deny: list[str] | None) -> dict[str, Any]:
        if self.sandbox.policy.network.mode != "allowlist":
            raise ServiceError(409, "not_allowlist", "network.mode is not 'allowlist'")
        await self.sandbox.network.update(allow=allow, deny=deny)
        net = self.sandbox.policy.network
        self.audit("network.rules", allow=list(net.allow), deny=list(net.deny))
        return {"allow": list(net.allow), "deny": list(net.deny)}

    async def ask(self, host: str, port: int) -> bool:
        """A host the rules do not name: ask the client over the API, deny on silence."""
        approval = Approval(
            os.urandom(6).hex(), host, port, time.time(), asyncio.get_running_loop().create_future()
        )
        self.approvals[approval.id] = approval
        self.approvals_changed.set()
        self.approvals_changed = asyncio.Event()
        try:
            return await asyncio.wait_for(asyncio.shield(approval.answer), APPROVAL_TIMEOUT_S)
        except TimeoutError:
            return False
        finally:
            self.approvals.pop(approval.id, None)

    async def pending_approvals(self, wait_s: float) -> list[dict[str, Any]]:
        if not self.approvals and wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.approvals_changed.wait(), wait_s)
        return [
            {"id": a.id, "host": a.host, "port": a.port, "time": a.time}
            for a in self.approvals.values()
            if not a.answer.done()
        ]

    def answer(self, approval_id: str, allow: bool) -> None:
        approval = self.approvals.get(approval_id)
        if approval is None or approval.answer.done():
            raise ServiceError(404, "not_found", f"no pending approval {approval_id!r}")
        approval.answer.set_result(allow)
        self.audit("network.approval", host=approval.host, port=approval.port, allowed=allow)
