"""Stateful code execution: Jupyter-style results from kernels inside the box.

The host starts the kernel driver (``_kernel_driver.py``) in the box, with the
runtime's Python, as a background command, and speaks JSON lines with it over
that command's stdin/stdout (which the driver keeps to itself: its kernels
never inherit them). Everything the driver says is untrusted: each line is
bounded, parsed defensively, and only known fields are used.

Every call ends on the host's own clock: a cell by its ``timeout_s`` plus
``HOST_GRACE_S`` whatever the box does, a context operation by
``CONTEXT_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ._errors import CorralError, SandboxBroken
from ._policy import Policy
from ._result import LimitEvidence, LimitKind, decide_limits

Language = Literal["python", "bash", "javascript", "js", "typescript", "ts"]
LANGUAGES: tuple[str, ...] = ("python", "bash", "javascript", "js", "typescript", "ts")
_ALIASES = {"js": "javascript", "ts": "typescript"}
# the driver interrupts a cell at its timeout and restarts the kernel 3 s later
# if the interrupt did not take: the host waits that long, and a little more
HOST_GRACE_S = 5.0
# starting a kernel (60 s at most in the driver), restarting or removing one
CONTEXT_TIMEOUT_S = 75.0
DRIVER = "/run/corral/kernel_driver.py"
RUNTIME_PYTHON = "/opt/corral/runtime/bin/python"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# structured data the Python kernel adds to a figure's and a DataFrame's bundle
# (see _kernel_driver: e2b-charts for figures, columns as lists for frames)
_CHART_MIME = "application/vnd.corral.chart+json"
_DATA_MIME = "application/vnd.corral.data+json"
_MAX_LINE = 64 << 20  # one event (a large image) at most
_BINARY = {"image/png": "png", "image/jpeg": "jpeg", "application/pdf": "pdf"}
_TEXT = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "text/latex": "latex",
    "application/javascript": "javascript",
}


@dataclass(frozen=True, slots=True)
class Result:
    """One rich output of a cell: a Jupyter MIME bundle, in E2B's shape.

    ``text``, ``html``, ``markdown``, ``svg``, ``latex``, ``javascript`` are
    strings; ``png``, ``jpeg``, ``pdf`` bytes; ``json`` the parsed
    ``application/json`` (a dict or list last expression gives it).
    ``chart`` is a matplotlib figure's data as E2B's extractor (e2b-charts)
    gives it: ``{"type": "line" | "bar" | "scatter" | "pie" |
    "box_and_whisker" | "superchart" | "unknown", "title", "x_label",
    "y_label", "elements": [...]}``. ``data`` is a DataFrame's columns as
    ``{column: [values]}`` (JSON values: NaN is None, times ISO strings).
    ``is_main_result`` marks the cell's last expression; ``extra`` holds every
    other MIME type the kernel sent, by MIME type.
    """

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: bytes | None = None
    jpeg: bytes | None = None
    pdf: bytes | None = None
    latex: str | None = None
    json: object | None = None
    javascript: str | None = None
    chart: dict[str, object] | None = None
    data: dict[str, object] | None = None
    is_main_result: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def formats(self) -> list[str]:
        names = (
            "text",
            "html",
            "markdown",
            "svg",
            "png",
            "jpeg",
            "pdf",
            "latex",
            "json",
            "javascript",
            "chart",
            "data",
        )
        return [n for n in names if getattr(self, n) is not None]


@dataclass(frozen=True, slots=True)
class ExecutionError:
    """An error raised by the code: data, not an exception."""

    name: str
    value: str
    traceback: str
    limit_hit: LimitKind | None = None


@dataclass(frozen=True, slots=True)
class Logs:
    stdout: tuple[str, ...] = ()
    stderr: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Execution:
    """What one ``run_code`` produced."""

    results: tuple[Result, ...]
    logs: Logs
    error: ExecutionError | None
    execution_count: int | None
    duration_s: float
    restarted: bool = False  # the context lost its state (timeout or death) and was restarted

    @property
    def text(self) -> str | None:
        """The main result's text/plain, if the cell had one."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None


@dataclass(frozen=True, slots=True)
class CodeContext:
    """An independent stateful context (one kernel)."""

    id: str
    language: str
    cwd: str


CodeEvent = (
    tuple[Literal["stdout", "stderr"], str]
    | tuple[Literal["result"], Result]
    | tuple[Literal["error"], ExecutionError]
    | tuple[Literal["done"], Execution]
)
ResultCallback = Callable[[Result], object]
ErrorCallback = Callable[[ExecutionError], object]
TextCallback = Callable[[str], object]


def _result(data: object, main: bool) -> Result:
    if not isinstance(data, dict):
        raise SandboxBroken("the kernel driver sent a malformed result")
    fields: dict[str, Any] = {"is_main_result": main}
    extra: dict[str, object] = {}
    for mime, value in data.items():
        if mime in _TEXT and isinstance(value, str):
            fields[_TEXT[mime]] = value
        elif mime in _BINARY and isinstance(value, str):
            try:
                fields[_BINARY[mime]] = base64.b64decode(value, validate=False)
            except (binascii.Error, ValueError):
                raise SandboxBroken(f"the kernel driver sent malformed {mime}") from None
        elif mime == "application/json":
            fields["json"] = value
        elif mime == _CHART_MIME and isinstance(value, dict):
            fields["chart"] = value
        elif mime == _DATA_MIME and isinstance(value, dict):
            fields["data"] = value
        else:
            extra[str(mime)] = value
    return Result(**fields, extra=extra)


def _size(result: Result) -> int:
    """Bytes a result holds: its texts encoded, its binaries, its JSON serialized."""
    size = 0
    for name in result.formats:
        value = getattr(result, name)
        if isinstance(value, bytes):
            size += len(value)
        elif isinstance(value, str):
            size += len(value.encode(errors="replace"))
        else:
            size += len(json.dumps(value, default=str))
    if result.extra:
        size += len(json.dumps(result.extra, default=str))
    return size


class Driver(Protocol):
    """The kernel driver's command in the box, as the interpreter uses it."""

    @property
    def exit(self) -> asyncio.Future[Any]:
        """Done once the driver has ended."""
        ...

    async def send_stdin(self, data: bytes) -> None: ...

    async def kill(self) -> None: ...


class InterpreterHost(Protocol):
    """What the interpreter needs of its sandbox. ``AsyncSandbox`` hands it one
    (``_sandbox._InterpreterHost``), so this module imports nothing of
    ``_sandbox``: the dependency runs one way."""

    @property
    def policy(self) -> Policy: ...

    async def start_driver(
        self, argv: list[str], env: Mapping[str, str], on_stdout: Callable[[bytes], None]
    ) -> Driver:
        """Start the driver as a background command with stdin, keeping none of
        its output (every line goes to ``on_stdout``). ``HostToolMissing``
        without a runtime; ``CorralError`` if it cannot start."""
        ...

    def check_open(self) -> None:
        """Raise the sandbox's own failure (closed, broken) if it has one."""
        ...

    def limit_counters(self) -> tuple[int, int]:
        """The box's OOM kills and refused forks so far."""
        ...

    def relative(self, path: str) -> str:
        """``path`` relative to the workspace (``PathOutsideWorkspace`` if outside)."""
        ...

    async def mkdir(self, path: str) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a housekeeping coroutine, cancelled when the sandbox closes."""
        ...


class CodeInterpreter:
    def __init__(self, host: InterpreterHost) -> None:
        self._sb = host
        self._driver: Driver | None = None
        self._starting: asyncio.Lock | None = None
        self._buffer = bytearray()
        self._waiters: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._next = 1
        self._contexts: dict[str, CodeContext] = {}
        self._defaults: dict[str, CodeContext] = {}
        self._running: dict[str, set[int]] = {}  # context id -> its executions' ids

    # -- the driver ----------------------------------------------------------------------

    def _driver_env(self) -> dict[str, str]:
        env = {"PATH": "/opt/corral/runtime/bin:/usr/local/bin:/usr/bin:/bin"}
        # thread pools (OpenBLAS, OpenMP) sized to the policy's CPUs, not the
        # host's: each thread counts against the pids limit, per context
        cores = self._sb.policy.limits.cpu_cores
        threads = str(max(1, math.ceil(cores))) if cores else None
        if threads is not None:
            for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                if name not in dict(self._sb.policy.env):
                    env[name] = threads
        return env

    async def _ensure_driver(self) -> Driver:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._driver is not None and self._driver.exit.done():
                self._lost_driver()
            if self._driver is None:
                self._driver = await self._sb.start_driver(
                    [RUNTIME_PYTHON, "-s", DRIVER], self._driver_env(), self._on_bytes
                )
            return self._driver

    def _lost_driver(self) -> None:
        self._driver = None
        self._contexts.clear()
        self._defaults.clear()
        self._running.clear()
        self._buffer.clear()
        for queue in self._waiters.values():
            queue.put_nowait({"event": "lost"})

    def _on_bytes(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._on_line(line)
        if len(self._buffer) > _MAX_LINE:
            self._buffer.clear()
            raise SandboxBroken("the kernel driver sent an oversized line")

    def _on_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            return  # malformed: ignored (only the driver can write this channel)
        if not isinstance(event, dict):
            return
        ident = event.get("id")
        # an event for a request nobody waits for (a cell given up on) is dropped
        queue = self._waiters.get(ident) if isinstance(ident, int) else None
        if queue is not None:
            queue.put_nowait(event)

    async def _send(self, body: dict[str, Any], *, wait: bool = True) -> int:
        driver = await self._ensure_driver()
        ident = self._next
        self._next += 1
        if wait:
            self._waiters[ident] = asyncio.Queue()
        await driver.send_stdin((json.dumps({"id": ident, **body}) + "\n").encode())
        return ident

    async def _next_event(self, ident: int, deadline: float | None) -> dict[str, Any]:
        """The next event for request ``ident``; ``{"event": "deadline"}`` once the
        host's clock passes ``deadline`` (monotonic), ``{"event": "lost"}`` if the
        driver ended."""
        queue = self._waiters[ident]
        driver = self._driver
        getter = asyncio.ensure_future(queue.get())
        exit_watch = asyncio.ensure_future(asyncio.shield(driver.exit)) if driver else None
        waitables: set[asyncio.Future[Any]] = {getter}
        if exit_watch is not None:
            waitables.add(exit_watch)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait(waitables, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if exit_watch is not None:
                exit_watch.cancel()
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        if exit_watch is not None and exit_watch.done() and not exit_watch.cancelled():
            self._sb.check_open()  # raises the sandbox's own failure, if that is what happened
            self._lost_driver()
            return {"event": "lost"}
        return {"event": "deadline"}

    async def _simple(self, body: dict[str, Any]) -> None:
        before = self._sb.limit_counters()
        ident = await self._send(body)
        try:
            event = await self._next_event(ident, time.monotonic() + CONTEXT_TIMEOUT_S)
        finally:
            self._waiters.pop(ident, None)
        kind = event.get("event")
        if kind == "deadline":
            # the driver does not answer: it is wedged, end it (and its contexts)
            await self._kill_driver()
            raise SandboxBroken(
                f"the kernel driver did not answer within {CONTEXT_TIMEOUT_S:.0f} s; "
                "it was ended and every code context was lost"
            )
        if kind == "lost":
            raise SandboxBroken(
                f"the kernel driver died{self._reason(before)}; every code context was lost"
            )
        error = event.get("error")
        if error:
            raise CorralError(f"code context: {str(error)[:2000]}{self._reason(before)}")

    async def _kill_driver(self) -> None:
        driver = self._driver
        if driver is not None:
            with contextlib.suppress(CorralError, OSError):
                await driver.kill()
            self._lost_driver()

    def _reason(self, before: tuple[int, int]) -> str:
        """Which of the sandbox's limits was hit since ``before``, as a clause."""
        oom, pids = self._sb.limit_counters()
        limits = self._sb.policy.limits
        if oom > before[0]:
            return f" (the sandbox's memory limit, {limits.memory_bytes} bytes, was reached)"
        if pids > before[1]:
            return f" (the sandbox's pids limit, {limits.pids} processes and threads, was reached)"
        return ""

    # -- contexts --------------------------------------------------------------------------

    async def create_context(self, language: str = "python", cwd: str | None = None) -> CodeContext:
        language = _language(language)
        workspace = self._sb.policy.filesystem.workspace
        path = workspace + "/" + self._sb.relative(cwd or ".") if cwd else workspace
        path = path.rstrip("/.") or workspace
        if cwd:
            await self._sb.mkdir(cwd)
        context = CodeContext(secrets.token_hex(6), language, path)
        await self._simple(
            {"op": "create", "context": context.id, "language": language, "cwd": path}
        )
        self._contexts[context.id] = context
        return context

    def _end_running(self, context: CodeContext, status: str) -> None:
        """End the context's running calls at once, whatever the box does next."""
        for ident in self._running.pop(context.id, set()):
            queue = self._waiters.get(ident)
            if queue is not None:
                queue.put_nowait({"event": "done", "status": status, "restarted": True})

    def list_contexts(self) -> list[CodeContext]:
        """The sandbox's live code contexts, oldest first (defaults included)."""
        return list(self._contexts.values())

    async def restart_context(self, context: CodeContext | str) -> None:
        context = self._known(context)
        self._end_running(context, "restarted")
        await self._simple({"op": "restart", "context": context.id})

    async def remove_context(self, context: CodeContext | str) -> None:
        context = self._known(context)
        self._end_running(context, "removed")
        await self._simple({"op": "remove", "context": context.id})
        del self._contexts[context.id]

    def _known(self, context: CodeContext | str) -> CodeContext:
        """The live context ``context`` names (itself, or its id); CorralError if none."""
        ident = context if isinstance(context, str) else context.id
        known = self._contexts.get(ident)
        if known is None or (isinstance(context, CodeContext) and known != context):
            raise CorralError(f"code context {ident} does not exist (any more) in this sandbox")
        return known

    async def _default(self, language: str) -> CodeContext:
        language = _language(language)
        context = self._defaults.get(language)
        if context is None or context.id not in self._contexts:
            context = await self.create_context(language)
            self._defaults[language] = context
        return context

    async def prewarm(self, language: str = "python") -> None:
        await self._default(language)

    async def _recover(self, context: CodeContext) -> None:
        """A cell overran the host's deadline: restart its context in the box
        (the request is sent now, so it comes before any later cell); if the
        driver does not answer, end it."""
        if self._contexts.get(context.id) != context:
            return
        ident = await self._send({"op": "restart", "context": context.id})

        async def wait() -> None:
            try:
                event = await self._next_event(ident, time.monotonic() + CONTEXT_TIMEOUT_S)
            finally:
                self._waiters.pop(ident, None)
            if event.get("event") == "deadline":
                await self._kill_driver()

        self._sb.spawn(wait())

    # -- running code ----------------------------------------------------------------------

    async def run(
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
        envs = _check_envs(envs)
        if context is None:
            context = await self._default(language)
        else:
            context = self._known(context)
        if timeout_s is None:
            timeout_s = self._sb.policy.limits.wall_time_s
        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s + HOST_GRACE_S
        before = self._sb.limit_counters()
        ident = await self._send(
            {
                "op": "execute",
                "context": context.id,
                "code": code,
                "timeout": timeout_s,
                **({"envs": envs} if envs else {}),
            }
        )
        running = self._running.setdefault(context.id, set())
        running.add(ident)
        results: list[Result] = []
        displays: dict[str, int] = {}  # display id -> its index in results
        clear_pending = False  # clear_output(wait=True): clear when the next output comes
        stdout: list[str] = []
        stderr: list[str] = []
        error: ExecutionError | None = None
        count: int | None = None
        restarted = False
        # the cell's output is kept (and passed on) up to the policy's output_bytes:
        # a cell printing forever must not fill the host's memory until its timeout
        cap = self._sb.policy.limits.output_bytes
        kept = 0

        def room(size: int) -> int:
            """How much of ``size`` more may be kept (all of it, or what is left)."""
            nonlocal kept
            if cap is None or kept + size <= cap:
                kept += size
                return size
            left = max(0, cap - kept)
            if kept <= cap:
                notice = f"[corral] output beyond {cap} bytes was dropped\n"
                stderr.append(notice)
                _call(on_stderr, notice)
            kept = cap + 1
            return left

        def timed_out() -> ExecutionError:
            return ExecutionError(
                "TimeoutError",
                f"execution exceeded {timeout_s} s"
                + ("; the context was restarted" if restarted else ""),
                error.traceback if error else "",
                limit_hit="timeout",
            )

        def clear() -> None:
            nonlocal clear_pending
            clear_pending = False
            results.clear()
            displays.clear()
            stdout.clear()
            stderr.clear()

        finished = False
        try:
            while True:
                event = await self._next_event(ident, deadline)
                kind = event.get("event")
                if clear_pending and kind in ("stream", "result"):
                    clear()
                if kind == "clear":
                    if event.get("wait"):
                        clear_pending = True
                    else:
                        clear()
                elif kind == "stream":
                    text = str(event.get("text", ""))
                    data = text.encode(errors="surrogatepass")
                    allowed = room(len(data))
                    if allowed < len(data):  # cut at a byte count, on a character boundary
                        text = data[:allowed].decode(errors="ignore")
                    if not text:
                        continue
                    if event.get("name") == "stderr":
                        stderr.append(text)
                        _call(on_stderr, text)
                    else:
                        stdout.append(text)
                        _call(on_stdout, text)
                elif kind == "result":
                    result = _result(event.get("data"), bool(event.get("main")))
                    size = _size(result)
                    if room(size) < size:
                        continue
                    display = event.get("display_id")
                    if isinstance(display, str) and display in displays and event.get("update"):
                        # a display updated by id shows its last value
                        results[displays[display]] = result
                        _call(on_result, result)
                        continue
                    if isinstance(display, str):
                        displays[display] = len(results)
                    results.append(result)
                    _call(on_result, result)
                elif kind == "error":
                    tb = event.get("traceback")
                    lines = tb if isinstance(tb, list) else []
                    error = ExecutionError(
                        name=str(event.get("name", "")),
                        value=str(event.get("value", "")),
                        # terminal colours are noise to a program (or a model) reading it
                        traceback=_ANSI.sub("", "\n".join(str(line) for line in lines)),
                    )
                elif kind == "reply" and event.get("error"):
                    error = ExecutionError("CorralError", str(event["error"])[:2000], "")
                    break
                elif kind == "notice":
                    restarted = True
                    stderr.append(f"[corral] {event.get('text', '')}\n")
                elif kind == "done":
                    count = event.get("count") if isinstance(event.get("count"), int) else None
                    status = event.get("status")
                    restarted = restarted or bool(event.get("restarted"))
                    if status == "timeout":
                        error = timed_out()
                    elif status == "died":
                        error = self._death(before)
                    elif status in ("restarted", "removed"):
                        error = ExecutionError(
                            "ContextRestarted",
                            f"the code context was {status} while this cell ran; its state is gone",
                            "",
                        )
                    break
                elif kind == "deadline":
                    # the box did not end the cell in time: the host does
                    restarted = True
                    error = timed_out()
                    await self._recover(context)
                    break
                elif kind == "lost":
                    error = self._death(before, driver=True)
                    restarted = True
                    break
            finished = True
        finally:
            self._waiters.pop(ident, None)
            running.discard(ident)
            if not finished and self._driver is not None:
                # the caller gave up (cancelled, Ctrl-C, a client gone): the cell
                # must not run on unseen and hold its context
                self._sb.spawn(self._interrupt(context, ident))
        if error is not None:
            _call(on_error, error)
        return Execution(
            results=tuple(results),
            logs=Logs(tuple(stdout), tuple(stderr)),
            error=error,
            execution_count=count,
            duration_s=time.monotonic() - started,
            restarted=restarted,
        )

    async def _interrupt(self, context: CodeContext, ident: int) -> None:
        with contextlib.suppress(CorralError, OSError):
            await self._send(
                {"op": "interrupt", "context": context.id, "target": ident}, wait=False
            )

    def _death(self, before: tuple[int, int], *, driver: bool = False) -> ExecutionError:
        what = "the kernel driver" if driver else "the kernel"
        oom_kills, pids_hits = self._sb.limit_counters()
        limits = decide_limits(
            LimitEvidence(
                oom_kills=oom_kills - before[0],
                pids_limit_hits=pids_hits - before[1],
                exit_code=137,  # it died: whatever the box's counters saw explains it
                shared=True,
            )
        )
        if limits and limits[0] == "pids":
            return ExecutionError(
                "KernelDied",
                f"{what} died at the sandbox's process limit; the next cell runs in a "
                "fresh context",
                "",
                limit_hit="pids",
            )
        if limits:
            return ExecutionError(
                "MemoryError",
                f"{what} was killed by the sandbox's memory limit; the next cell runs in a "
                "fresh context",
                "",
                limit_hit="memory",
            )
        return ExecutionError(
            "KernelDied",
            f"{what} died{self._reason(before)}; the next cell runs in a fresh context",
            "",
        )


def _language(language: str) -> str:
    """The kernel's name for ``language`` (``js`` is ``javascript``); ValueError if none."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, not {language!r}")
    return _ALIASES.get(language, language)


def _check_envs(envs: Mapping[str, str] | None) -> dict[str, str]:
    """``envs`` checked: variable names to strings without NUL; ValueError if not."""
    if envs is None:
        return {}
    for name, value in envs.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValueError(f"envs: {name!r} is not an environment variable name")
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"envs: the value of {name} must be a string without NUL")
    return dict(envs)


def _call(callback: Callable[[Any], object] | None, value: object) -> None:
    if callback is not None:
        with contextlib.suppress(Exception):
            callback(value)
