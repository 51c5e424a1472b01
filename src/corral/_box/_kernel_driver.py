"""The in-box kernel driver: stateful code contexts behind one JSON-lines channel.

It runs inside the box with the runtime's Python (which has jupyter_client,
ipykernel and bash_kernel), started by the host through the agent like any
background command. Each code context is one Jupyter kernel: Python
(ipykernel), bash (bash_kernel, subclassed below: this file run with
``bash-kernel``), JavaScript and TypeScript (Deno's ``deno jupyter``), spoken
to over the box's own loopback.

The channel to the host is the pipe pair the agent gave the driver as stdin
and stdout, moved at start-up to private descriptors that no other process
holds: the kernels, their children and user code get ``/dev/null`` as stdin
and the driver's stderr (which the host discards) as stdout, so nothing they
write can reach the channel. The driver is made non-dumpable so code running
under the same uid cannot reopen the pipe through ``/proc/<pid>/fd``.

Requests, one JSON object a line::

    {"id": 1, "op": "create", "context": "c1", "language": "python", "cwd": "/workspace"}
    {"id": 2, "op": "execute", "context": "c1", "code": "1+1", "timeout": 30,
     "envs": {"NAME": "value"}}   (envs: optional, for this cell only)
    {"id": 3, "op": "restart" | "remove", "context": "c1"}
    {"id": 4, "op": "interrupt", "context": "c1", "target": 2}   (no answer)

Events, one JSON object a line, each naming the request it belongs to (events
of a kernel are matched to their execution by the kernel's own parent header,
so output that arrives after its cell ended is dropped, never re-labelled)::

    {"id": 2, "event": "stream", "name": "stdout", "text": "..."}
    {"id": 2, "event": "result", "data": {"text/plain": "2"}, "main": true,
     "display_id": null | "...", "update": false}   (update: update_display_data)
    {"id": 2, "event": "clear", "wait": false}   (clear_output)
    {"id": 2, "event": "error", "name": "ZeroDivisionError", "value": "...", "traceback": [...]}
    {"id": 2, "event": "done", "count": 1, "status": "ok" | "error" | "timeout" | "died"
     | "restarted" | "cancelled", "restarted": false}
    {"id": 1, "event": "reply", "error": null}

The host treats all of it as untrusted data, like everything from the box.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import json
import os
import re
import select
import shlex
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import zmq.asyncio  # type: ignore[import-not-found,unused-ignore]
from jupyter_client.manager import AsyncKernelManager  # type: ignore[import-not-found,unused-ignore]

KERNEL_NAMES = {
    "python": "python3",
    "bash": "corral-bash",
    "javascript": "corral-deno",
    "typescript": "corral-deno",
}
# Run in each Python kernel before the first cell: threads started by a cell
# carry that cell's context (as Python 3.14's thread_inherit_context does), so
# ipykernel labels what they print with their own cell; once that cell has
# ended the driver drops it instead of showing it in whichever cell runs then.
_THREADS_KEEP_THEIR_CELL = """
def _corral_threads_keep_their_cell():
    import contextvars, threading
    start = threading.Thread.start
    def start_in_context(self):
        run, context = self.run, contextvars.copy_context()
        self.run = lambda: context.run(run)
        start(self)
    threading.Thread.start = start_in_context
_corral_threads_keep_their_cell()
del _corral_threads_keep_their_cell
"""
# Run in each Python kernel before the first cell: E2B's result shapes. A
# matplotlib figure also gives its chart data (E2B's own extractor, e2b-charts,
# from the runtime), a DataFrame its columns as lists, a dict or list last
# expression its JSON; PIL's Image.show() displays the image in the cell (the
# box has no image viewer). Each hook is lazy: nothing is imported up front.
# (MIME types application/vnd.corral.chart+json and application/vnd.corral.data+json;
# frames of more than a million cells give no data)
_RICH_RESULTS = """
def _corral_rich_results():
    import importlib.abc, importlib.util, json, sys
    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    display_formatter = get_ipython().display_formatter

    def add(mime, module, name, function):
        # by isinstance on the class once its module is loaded, not through the
        # formatter's type registry: the inline backend pops every Figure printer
        class Formatter(BaseFormatter):
            format_type = Unicode(mime)
            print_method = ObjectName("_repr_corral_none_")
            _return_type = dict

            def __call__(self, obj):
                kind = getattr(sys.modules.get(module), name, None)
                if kind is None or not isinstance(obj, kind):
                    return None
                try:
                    return function(obj) or None
                except Exception:
                    return None
        display_formatter.formatters[mime] = Formatter(parent=display_formatter)

    def chart(figure):
        try:
            from e2b_charts import chart_figure_to_dict
        except ImportError:  # a runtime built without it
            return None
        return chart_figure_to_dict(figure)

    def data(frame):
        if frame.size > 1_000_000:
            return None
        split = json.loads(frame.to_json(orient="split", date_format="iso"))
        rows = split["data"]
        return {str(c): [row[i] for row in rows] for i, c in enumerate(split["columns"])}

    add("application/vnd.corral.chart+json", "matplotlib.figure", "Figure", chart)
    add("application/vnd.corral.data+json", "pandas", "DataFrame", data)

    def plain_json(value):
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return None
        return value

    for kind in (dict, list):
        display_formatter.formatters["application/json"].for_type(kind, plain_json)

    def shows_inline(image_show):
        class Inline(image_show.Viewer):
            def show(self, image, **options):
                from IPython.display import display
                display(image)
                return 1
        image_show.register(Inline(), -1)

    class PilShowsInline(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "PIL.ImageShow":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module
                def exec_module(module):
                    run(module)
                    shows_inline(module)
                spec.loader.exec_module = exec_module
            return spec

    if "PIL.ImageShow" in sys.modules:
        shows_inline(sys.modules["PIL.ImageShow"])
    else:
        sys.meta_path.insert(0, PilShowsInline())
_corral_rich_results()
del _corral_rich_results
"""
_FONTS_CONF = """<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "urn:fontconfig:fonts.dtd">
<fontconfig>
  <dir>/usr/share/fonts</dir>
  <dir>/usr/local/share/fonts</dir>
  <cachedir>/tmp/.corral/fontconfig</cachedir>
</fontconfig>
"""
# Run in each Deno kernel before the first cell: Deno labels console output
# with the cell running when it is printed, so a timer or promise of an ended
# cell would print into a later one. Each cell starts with
# ``__corral.enter(id)``, which sets an AsyncLocalStorage that every timer,
# promise and callback the cell creates inherits; console methods called from
# an earlier cell's continuation print nothing (late output is dropped, as in
# the other kernels). Writes to Deno.stdout or process.stdout are not covered.
_DENO_CELLS_KEEP_THEIR_OUTPUT = """
const { AsyncLocalStorage } = await import("node:async_hooks");
Object.defineProperty(globalThis, "__corral", { enumerable: false, value: {
  cell: new AsyncLocalStorage(),
  current: 0,
  enter(id) { this.current = id; this.cell.enterWith(id); },
} });
for (const name of ["log", "info", "debug", "warn", "error", "trace", "dir", "dirxml",
                    "table", "assert", "count", "group", "groupCollapsed", "timeLog",
                    "timeEnd"]) {
  const original = console[name];
  if (typeof original !== "function") continue;
  console[name] = function (...args) {
    const cell = globalThis.__corral.cell.getStore();
    if (cell !== undefined && cell !== globalThis.__corral.current) return;
    return original.apply(this, args);
  };
}
"""
# Every thread counts against the box's pids limit: one ZeroMQ context (two
# threads) serves all the driver's kernel clients instead of one per context,
# and IPython keeps no history database (its saving thread, and a file).
_ZMQ: zmq.asyncio.Context | None = None
_PYTHON_ARGS = ("--HistoryManager.enabled=False",)
INTERRUPT_GRACE_S = 3.0
START_TIMEOUT_S = 60.0
LIVENESS_S = 0.25


class Channel:
    """The private descriptor events are written to, one JSON object a line."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    async def emit(self, event: dict[str, Any]) -> None:
        # one write() call per line: lines of concurrent tasks never interleave;
        # ensure_ascii: any string (lone surrogates included) survives the trip
        self.writer.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        await self.writer.drain()


# Tool state goes to /tmp, never to the workspace (HOME), which stays
# downloadable after the sandbox ended: set for the driver itself (jupyter_client
# asks IPython for its directory, which creates ~/.ipython; connection files)
# and inherited by every kernel.
TOOL_STATE = {
    "IPYTHONDIR": "/tmp/.corral/ipython",
    "MPLCONFIGDIR": "/tmp/.corral/matplotlib",
    "JUPYTER_RUNTIME_DIR": "/tmp/.corral/jupyter",
    "JUPYTER_DATA_DIR": "/tmp/.corral/jupyter-data",
    "JUPYTER_CONFIG_DIR": "/tmp/.corral/jupyter-config",
    "DENO_DIR": "/tmp/.corral/deno",
    "DENO_NO_UPDATE_CHECK": "1",
    "XDG_CACHE_HOME": "/tmp/.corral/cache",
}


def kernel_env(language: str) -> dict[str, str]:
    env = dict(os.environ)
    if language in ("javascript", "typescript"):
        env.setdefault("NO_COLOR", "1")  # plain tracebacks
    env.pop("MPLBACKEND", None)  # inline figures
    return env


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_code(language: str, envs: dict[str, str]) -> tuple[str, str]:
    """Code that sets ``envs`` in a kernel for one cell, and code that puts
    back what was there before (set or not); ("", "") for no envs."""
    if not envs:
        return "", ""
    names = sorted(envs)
    if language == "python":
        setup = (
            "exec('import os, sys\\n"
            "sys._corral_env = {k: os.environ.get(k) for k in envs}\\n"
            f"os.environ.update(envs)', {{'envs': {envs!r}}})"
        )
        teardown = (
            "exec('import os, sys\\n"
            'for k, v in sys.__dict__.pop("_corral_env", {}).items():\\n'
            "    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)', {})"
        )
        return setup, teardown
    if language == "bash":
        quoted = " ".join(names)
        exports = " ".join(f"{k}={shlex.quote(envs[k])}" for k in names)
        setup = f"__corral_env=$(declare -p {quoted} 2>/dev/null); export {exports}"
        teardown = f'unset {quoted}; eval "$__corral_env"; unset __corral_env'
        return setup, teardown
    setup = (
        f"globalThis.__corralEnv = Object.fromEntries({json.dumps(names)}.map("
        "(k) => [k, Deno.env.get(k)])); "
        f"for (const [k, v] of Object.entries({json.dumps(envs)})) Deno.env.set(k, v);"
    )
    teardown = (
        "for (const [k, v] of Object.entries(globalThis.__corralEnv ?? {})) "
        "{ if (v === undefined) Deno.env.delete(k); else Deno.env.set(k, v); } "
        "delete globalThis.__corralEnv;"
    )
    return setup, teardown


class Run:
    """One execution: its request id, its deadline on the loop's clock, its fate."""

    def __init__(self, ident: int, deadline: float | None) -> None:
        self.ident = ident
        self.deadline = deadline
        self.status = "ok"
        self.count: int | None = None
        self.interrupted_at: float | None = None


class Context:
    def __init__(self, channel: Channel, language: str, cwd: str) -> None:
        self.channel = channel
        self.language = language
        self.cwd = cwd
        self.km: Any = None
        self.kc: Any = None
        self.lock = asyncio.Lock()
        self.current: Run | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}  # executions, running or waiting

    async def start(self) -> None:
        global _ZMQ
        if _ZMQ is None:
            _ZMQ = zmq.asyncio.Context()
        self.km = AsyncKernelManager(kernel_name=KERNEL_NAMES[self.language], context=_ZMQ)
        try:
            self.km.kernel_spec  # noqa: B018 (looked up now, for a clear error)
        except Exception:
            raise RuntimeError(
                f"this runtime has no {self.language} kernel ({KERNEL_NAMES[self.language]}): "
                "rebuild it with `corral runtime build` (Deno comes from npm)"
            ) from None
        try:
            extra = []
            if self.language == "python":
                extra += [
                    *_PYTHON_ARGS,
                    f"--IPKernelApp.exec_lines=exec({_THREADS_KEEP_THEIR_CELL!r})",
                    f"--IPKernelApp.exec_lines=exec({_RICH_RESULTS!r})",
                ]
            await self.km.start_kernel(
                cwd=self.cwd, env=kernel_env(self.language), extra_arguments=extra
            )
            self.kc = self.km.client()
            self.kc.start_channels()
            await self.kc.wait_for_ready(timeout=START_TIMEOUT_S)
            if self.language in ("javascript", "typescript"):
                self.kc.execute(_DENO_CELLS_KEEP_THEIR_OUTPUT, silent=True, store_history=False)
        except BaseException:
            await self.stop()  # a half-started kernel must not linger
            raise

    async def stop(self) -> None:
        kc, km, self.kc, self.km = self.kc, self.km, None, None
        if kc is not None:
            kc.stop_channels()
        if km is not None:
            try:
                await km.shutdown_kernel(now=True)
            except Exception:  # never started: nothing to shut down
                if km.has_kernel:
                    raise

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def end_executions(self, status: str) -> None:
        """End every execution of this context at once (restart, remove)."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel(status)
        await asyncio.gather(*tasks, return_exceptions=True)

    def interrupt(self, target: int) -> None:
        """The host gave up on execution ``target``: stop it in the kernel."""
        run = self.current
        if run is not None and run.ident == target:
            run.status = "cancelled"
            run.deadline = asyncio.get_running_loop().time()  # interrupt now, restart if ignored
        elif (task := self.tasks.get(target)) is not None:
            task.cancel("cancelled")  # still waiting for the context: never runs

    async def execute(
        self, ident: int, code: str, timeout: float | None, envs: dict[str, str] | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with self.lock:
                run = Run(ident, None if timeout is None else loop.time() + timeout)
                self.current = run
                setup, teardown = env_code(self.language, envs or {})
                try:
                    if setup:
                        await self._silent(setup)
                    kernel = self.kc
                    await self._execute(run, code)
                    if teardown and self.kc is kernel:  # (a restarted kernel has no envs to undo)
                        await self._silent(teardown)
                finally:
                    self.current = None
        except asyncio.CancelledError as exc:
            status = str(exc.args[0]) if exc.args else "cancelled"
            await self.channel.emit(
                {"id": ident, "event": "done", "count": None, "status": status, "restarted": True}
            )
        finally:
            self.tasks.pop(ident, None)

    async def _silent(self, code: str) -> None:
        """Run ``code`` before or after a cell, unseen: its messages name a
        request nobody matches; the kernel runs it in turn with the cells."""
        if self.km is None or not await self.km.is_alive():
            await self.restart()
        self.kc.execute(code, silent=True, store_history=False, stop_on_error=False)

    async def _done(self, run: Run, restarted: bool) -> None:
        await self.channel.emit(
            {
                "id": run.ident,
                "event": "done",
                "count": run.count,
                "status": run.status,
                "restarted": restarted,
            }
        )

    async def _execute(self, run: Run, code: str) -> None:
        loop = asyncio.get_running_loop()
        if self.km is None or not await self.km.is_alive():
            await self.restart()
            await self.channel.emit(
                {"id": run.ident, "event": "notice", "text": "the kernel had died; restarted"}
            )
        if self.language in ("javascript", "typescript"):
            # on the cell's first line: line numbers in tracebacks stay the user's
            code = f"globalThis.__corral?.enter({run.ident}); {code}"
        msg_id = self.kc.execute(code, allow_stdin=False)
        while True:
            now = loop.time()
            if run.deadline is not None and now >= run.deadline and run.interrupted_at is None:
                run.interrupted_at = now
                if run.status != "cancelled":
                    run.status = "timeout"
                await self.km.interrupt_kernel()
            if run.interrupted_at is not None and now - run.interrupted_at > INTERRUPT_GRACE_S:
                # the interrupt did not take: answer now, then restart (holding
                # the context, so the next cell waits for the fresh kernel)
                await self._done(run, restarted=True)
                await self.restart()
                return
            wait = LIVENESS_S
            if run.deadline is not None and run.interrupted_at is None:
                wait = min(wait, max(0.001, run.deadline - now))
            try:
                msg = await self.kc.get_iopub_msg(timeout=wait)
            except Exception:  # queue.Empty: check the kernel is still there
                if not await self.km.is_alive():
                    if run.interrupted_at is None:  # (Deno's kernel ends on SIGINT)
                        run.status = "died"
                    await self._done(run, restarted=True)
                    await self.restart()
                    return
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue  # another execution's (late) output: dropped, never re-labelled
            if await self.handle(run, msg):
                break
        if self.language in ("javascript", "typescript"):
            await self._after_idle(run, msg_id)
        await self._done(run, restarted=False)

    async def _after_idle(self, run: Run, msg_id: str) -> None:
        """Deno (2.9.6) at times publishes "idle" before the cell's result: wait
        for its execute_reply, then take what is already queued for this cell."""
        for _ in range(1000):
            try:
                reply = await self.kc.get_shell_msg(timeout=1.0)
            except Exception:  # queue.Empty: no reply in time; go on
                break
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                break
        while True:
            try:
                msg = await self.kc.get_iopub_msg(timeout=0.02)
            except Exception:  # queue.Empty: nothing more
                return
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                await self.handle(run, msg)

    async def handle(self, run: Run, msg: dict[str, Any]) -> bool:
        kind = msg["msg_type"]
        content = msg["content"]
        ident = run.ident
        if kind == "status" and content.get("execution_state") == "idle":
            return True
        if kind == "execute_input":
            run.count = content.get("execution_count")
        elif kind == "stream":
            await self.channel.emit(
                {"id": ident, "event": "stream", "name": content["name"], "text": content["text"]}
            )
        elif kind in ("execute_result", "display_data", "update_display_data"):
            transient = content.get("transient") or {}
            await self.channel.emit(
                {
                    "id": ident,
                    "event": "result",
                    "data": content.get("data", {}),
                    "main": kind == "execute_result",
                    "display_id": transient.get("display_id"),
                    "update": kind == "update_display_data",
                }
            )
        elif kind == "clear_output":
            await self.channel.emit(
                {"id": ident, "event": "clear", "wait": bool(content.get("wait"))}
            )
        elif kind == "error":
            if run.status == "ok":
                run.status = "error"
            await self.channel.emit(
                {
                    "id": ident,
                    "event": "error",
                    "name": content.get("ename", ""),
                    "value": content.get("evalue", ""),
                    "traceback": content.get("traceback", []),
                }
            )
        return False


class Driver:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.contexts: dict[str, Context] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                request = json.loads(line)
            except ValueError:
                continue
            task = asyncio.ensure_future(self.dispatch(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            if request.get("op") == "execute":
                context = self.contexts.get(request.get("context", ""))
                if context is not None:
                    context.tasks[request["id"]] = task
        for context in self.contexts.values():
            await context.stop()

    async def dispatch(self, request: dict[str, Any]) -> None:
        ident = request["id"]
        op = request["op"]
        name = request.get("context", "")
        try:
            if op == "create":
                language = request["language"]
                if language not in KERNEL_NAMES:
                    raise ValueError(f"no kernel for {language!r}")
                context = Context(self.channel, language, request["cwd"])
                await context.start()
                self.contexts[name] = context
                await self.channel.emit({"id": ident, "event": "reply", "error": None})
            elif op == "execute":
                envs = request.get("envs") or {}
                if not isinstance(envs, dict) or not all(
                    isinstance(k, str) and ENV_NAME.fullmatch(k) and isinstance(v, str)
                    for k, v in envs.items()
                ):
                    raise ValueError("envs must map variable names to strings")
                await self.contexts[name].execute(
                    ident, request["code"], request.get("timeout"), envs
                )
            elif op == "interrupt":
                if name in self.contexts:
                    self.contexts[name].interrupt(int(request["target"]))
            elif op == "restart":
                context = self.contexts[name]
                await context.end_executions("restarted")
                async with context.lock:
                    await context.restart()
                await self.channel.emit({"id": ident, "event": "reply", "error": None})
            elif op == "remove":
                context = self.contexts.pop(name)
                await context.end_executions("removed")
                async with context.lock:
                    await context.stop()
                await self.channel.emit({"id": ident, "event": "reply", "error": None})
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # reported, never fatal to the driver
            await self.channel.emit(
                {"id": ident, "event": "reply", "error": f"{type(exc).__name__}: {exc}"}
            )


# -- the bash kernel ---------------------------------------------------------------------

# corral's bash kernel is bash_kernel with three changes, and is this file run
# with ``bash-kernel``: pexpect sends without its 50 ms "delaybeforesend" (two
# sends a cell made a warm cell 100 ms slower than Python's), each cell's
# stderr goes to a FIFO of its own instead of the shared terminal (so it comes
# back as stderr, labelled with its own cell even when a background job writes
# it later), bash keeps no history file (it recorded every cell's text in the
# workspace, which stays downloadable after the sandbox ended), and job control
# is off (no "[1] 42" / "Done" notices in a cell's output).
BASH_KERNEL = "corral-bash"
_KERNELS_DIR = "/tmp/.corral/kernels"


def _font_configuration() -> None:
    """The box sees the host's fonts but not its /etc/fonts: without a
    configuration, fc-list (which matplotlib runs for its first plot) prints
    "Fontconfig error: Cannot load default config file" into the cell."""
    if os.path.exists("/etc/fonts/fonts.conf") or "FONTCONFIG_FILE" in os.environ:
        return
    os.makedirs("/tmp/.corral", exist_ok=True)
    with open("/tmp/.corral/fonts.conf", "w") as file:
        file.write(_FONTS_CONF)
    os.environ["FONTCONFIG_FILE"] = "/tmp/.corral/fonts.conf"


def _register_bash_kernel() -> None:
    spec = os.path.join(_KERNELS_DIR, "kernels", BASH_KERNEL)
    os.makedirs(spec, exist_ok=True)
    argv = [sys.executable, "-s", os.path.abspath(__file__), "bash-kernel"]
    with open(os.path.join(spec, "kernel.json"), "w") as file:
        json.dump(
            {
                "argv": [*argv, "-f", "{connection_file}"],
                "display_name": "Bash",
                "language": "bash",
                "interrupt_mode": "signal",
                "env": {"PS1": "$"},
            },
            file,
        )
    paths = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = _KERNELS_DIR + (os.pathsep + paths if paths else "")


class StderrPump:
    """Reads each bash cell's stderr FIFO and sends what it holds as that cell's
    stderr stream, under that cell's parent header, from a thread of its own
    (late writes of a background job included, until its last writer closed)."""

    def __init__(self, send: Callable[[dict[str, Any], str], None]) -> None:
        self.send = send
        self.lock = threading.Lock()
        self.cells: dict[int, tuple[dict[str, Any], codecs.IncrementalDecoder]] = {}
        self.wake_r, self.wake_w = os.pipe()
        threading.Thread(target=self._run, name="corral-stderr", daemon=True).start()

    def add(self, fd: int, parent: dict[str, Any]) -> None:
        with self.lock:
            self.cells[fd] = (parent, codecs.getincrementaldecoder("utf-8")("replace"))
        os.write(self.wake_w, b".")

    def drain(self, fd: int) -> None:
        """Send what is in the FIFO now (all the cell wrote, once it ended)."""
        with self.lock:
            self._read(fd)

    def _read(self, fd: int) -> None:  # holding the lock
        entry = self.cells.get(fd)
        if entry is None:
            return
        parent, decoder = entry
        text = []
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not data:  # its last writer is gone
                text.append(decoder.decode(b"", final=True))
                del self.cells[fd]
                os.close(fd)
                break
            text.append(decoder.decode(data))
        if joined := "".join(text):
            self.send(parent, joined)

    def _run(self) -> None:
        while True:
            poller = select.poll()
            poller.register(self.wake_r, select.POLLIN)
            with self.lock:
                for fd in self.cells:
                    poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll():
                if fd == self.wake_r:
                    os.read(self.wake_r, 4096)
                else:
                    with self.lock:
                        self._read(fd)


def _bash_kernel_main() -> None:
    import signal

    import pexpect  # type: ignore[import-not-found,import-untyped,unused-ignore]
    from bash_kernel.display import build_cmds  # type: ignore[import-not-found,unused-ignore]
    from bash_kernel.kernel import BashKernel, IREPLWrapper  # type: ignore[import-not-found,unused-ignore]
    from ipykernel.kernelapp import IPKernelApp  # type: ignore[import-not-found,unused-ignore]

    class CorralBashKernel(BashKernel):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            self.fifos = tempfile.mkdtemp(prefix="bash-", dir="/tmp/.corral")
            self.cells = 0
            super().__init__(**kwargs)
            self.pump = StderrPump(self._send_stderr)

        def _send_stderr(self, parent: dict[str, Any], text: str) -> None:
            # from the pump's thread: ipykernel's IOPub socket takes sends from any thread
            self.session.send(
                self.iopub_socket,
                "stream",
                {"name": "stderr", "text": text},
                parent,
                ident=self._topic("stream"),
            )

        def _start_bash(self) -> None:
            # bash_kernel's own start, sending without pexpect's 50 ms delay
            old_sigint = signal.signal(signal.SIGINT, signal.SIG_DFL)
            old_sigpipe = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            try:
                bashrc = os.path.join(os.path.dirname(pexpect.__file__), "bashrc.sh")
                child = pexpect.spawn(
                    "bash",
                    ["--rcfile", bashrc],
                    echo=False,
                    encoding="utf-8",
                    codec_errors="replace",
                )
                child.delaybeforesend = None
                ps1 = self.unique_prompt + r"\[\]" + ">"
                ps2 = self.unique_prompt + r"\[\]" + "+"
                prompt_change = f"PS1='{ps1}' PS2='{ps2}' PROMPT_COMMAND=''"
                self.bashwrapper = IREPLWrapper(
                    child,
                    r"\$",
                    prompt_change,
                    self.unique_prompt,
                    extra_init_cmd="export PAGER=cat; unset HISTFILE; set +m",
                    line_output_callback=self.process_output,
                )
            finally:
                signal.signal(signal.SIGINT, old_sigint)
                signal.signal(signal.SIGPIPE, old_sigpipe)
            self.bashwrapper.run_command(
                "bind 'set enable-bracketed-paste off' >/dev/null 2>&1 || true"
            )
            self.bashwrapper.run_command(build_cmds())

        def do_execute(
            self,
            code: str,
            silent: bool,
            store_history: bool = True,
            user_expressions: Any = None,
            allow_stdin: bool = False,
        ) -> dict[str, Any]:
            if not code.strip() or code.strip().endswith("\\"):
                return BashKernel.do_execute(  # type: ignore[no-any-return]
                    self, code, silent, store_history, user_expressions, allow_stdin
                )
            self.silent = silent
            self.cells += 1
            path = os.path.join(self.fifos, f"{self.cells}.err")
            os.mkfifo(path, 0o600)
            read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            # our own writer until the cell ended: no end-of-file before bash opened it
            write_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            self.pump.add(read_fd, self.get_parent())
            interrupted = False
            try:
                # the cell as one group whose stderr is the FIFO (bash's prompts,
                # which bash writes to stderr, stay on the terminal pexpect reads)
                self.bashwrapper.run_command(
                    "{\n" + code.rstrip() + "\n} 2>" + shlex.quote(path), timeout=None
                )
            except KeyboardInterrupt:
                self.bashwrapper.child.sendintr()
                interrupted = True
                self.bashwrapper._expect_prompt()
                self.process_output(self.bashwrapper.child.before)
            except pexpect.EOF:
                output = self.bashwrapper.child.before + "Restarting Bash"
                self._start_bash()
                self.process_output(output)
            finally:
                os.unlink(path)
                self.pump.drain(read_fd)
                os.close(write_fd)
            if interrupted:
                return {"status": "abort", "execution_count": self.execution_count}
            try:
                status = self.bashwrapper.run_command("{ echo $?; } 2>/dev/null")
                exit_status = int(status.rstrip().split("\r\n")[0])
            except Exception:
                exit_status = 1
            if exit_status == 0:
                return {
                    "status": "ok",
                    "execution_count": self.execution_count,
                    "payload": [],
                    "user_expressions": {},
                }
            message = f"the cell's last command exited with status {exit_status}"
            error = {"ename": "ExitStatus", "evalue": message, "traceback": [message]}
            self.send_response(self.iopub_socket, "error", error)
            return {**error, "status": "error", "execution_count": self.execution_count}

    IPKernelApp.launch_instance(kernel_class=CorralBashKernel, argv=sys.argv[2:])


def _no_dumps() -> None:
    # non-dumpable: code under the same uid can neither ptrace the driver nor
    # reopen its channel pipes through /proc/<pid>/fd and write fake events
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_dumpable = 4
    libc.prctl(pr_set_dumpable, 0, 0, 0, 0)


def _private_channel() -> tuple[int, int]:
    """Move the channel off fds 0 and 1: kernels and everything they start
    inherit /dev/null and the driver's stderr there instead, so a stray write
    (a child's printf, a kernel's fd echo) can never land in the channel."""
    fd_in, fd_out = os.dup(0), os.dup(1)  # not inheritable (PEP 446)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = sys.stderr
    return fd_in, fd_out


async def _main(fd_in: int, fd_out: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 << 20)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd_in, "rb", buffering=0)
    )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(fd_out, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    await Driver(Channel(writer)).serve(reader)


def main() -> None:
    if sys.argv[1:2] == ["bash-kernel"]:
        _bash_kernel_main()
        return
    _no_dumps()
    for name, value in TOOL_STATE.items():
        os.environ.setdefault(name, value)
    _font_configuration()
    _register_bash_kernel()
    fd_in, fd_out = _private_channel()
    asyncio.run(_main(fd_in, fd_out))


if __name__ == "__main__":
    main()
