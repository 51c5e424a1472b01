"""The in-box kernel driver: stateful code contexts behind one JSON-lines channel.

It runs inside the box with the runtime's Python (which has jupyter_client,
ipykernel and bash_kernel), started by the host through the agent like any
background command. Each code context is one Jupyter kernel: Python
(ipykernel), bash (bash_kernel), JavaScript and TypeScript (Deno's ``deno
jupyter``), spoken to over the box's own loopback.

The channel to the host is the pipe pair the agent gave the driver as stdin
and stdout, moved at start-up to private descriptors that no other process
holds: the kernels, their children and user code get ``/dev/null`` as stdin
and the driver's stderr (which the host discards) as stdout, so nothing they
write can reach the channel. The driver is made non-dumpable so code running
under the same uid cannot reopen the pipe through ``/proc/<pid>/fd``.

Requests, one JSON object a line::

    {"id": 1, "op": "create", "context": "c1", "language": "python", "cwd": "/workspace"}
    {"id": 2, "op": "execute", "context": "c1", "code": "1+1", "timeout": 30}
    {"id": 3, "op": "restart" | "remove", "context": "c1"}
    {"id": 4, "op": "interrupt", "context": "c1", "target": 2}   (no answer)

Events, one JSON object a line, each naming the request it belongs to (events
of a kernel are matched to their execution by the kernel's own parent header,
so output that arrives after its cell ended is dropped, never re-labelled)::

    {"id": 2, "event": "stream", "name": "stdout", "text": "..."}
    {"id": 2, "event": "result", "data": {"text/plain": "2"}, "main": true}
    {"id": 2, "event": "error", "name": "ZeroDivisionError", "value": "...", "traceback": [...]}
    {"id": 2, "event": "done", "count": 1, "status": "ok" | "error" | "timeout" | "died"
     | "restarted" | "cancelled", "restarted": false}
    {"id": 1, "event": "reply", "error": null}

The host treats all of it as untrusted data, like everything from the box.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import sys
from typing import Any

import zmq.asyncio  # type: ignore[import-not-found,unused-ignore]
from jupyter_client.manager import AsyncKernelManager  # type: ignore[import-not-found,unused-ignore]

KERNEL_NAMES = {
    "python": "python3",
    "bash": "bash",
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


def kernel_env(language: str) -> dict[str, str]:
    env = dict(os.environ)
    # keep the workspace clean of tool state: it all goes to /tmp
    env.setdefault("IPYTHONDIR", "/tmp/.corral/ipython")
    env.setdefault("MPLCONFIGDIR", "/tmp/.corral/matplotlib")
    env.setdefault("JUPYTER_RUNTIME_DIR", "/tmp/.corral/jupyter")
    env.setdefault("JUPYTER_DATA_DIR", "/tmp/.corral/jupyter-data")
    env.setdefault("DENO_DIR", "/tmp/.corral/deno")
    env.setdefault("DENO_NO_UPDATE_CHECK", "1")
    if language in ("javascript", "typescript"):
        env.setdefault("NO_COLOR", "1")  # plain tracebacks
    env.pop("MPLBACKEND", None)  # inline figures
    return env


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
                ]
            await self.km.start_kernel(
                cwd=self.cwd, env=kernel_env(self.language), extra_arguments=extra
            )
            self.kc = self.km.client()
            self.kc.start_channels()
            await self.kc.wait_for_ready(timeout=START_TIMEOUT_S)
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

    async def execute(self, ident: int, code: str, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with self.lock:
                run = Run(ident, None if timeout is None else loop.time() + timeout)
                self.current = run
                try:
                    await self._execute(run, code)
                finally:
                    self.current = None
        except asyncio.CancelledError as exc:
            status = str(exc.args[0]) if exc.args else "cancelled"
            await self.channel.emit(
                {"id": ident, "event": "done", "count": None, "status": status, "restarted": True}
            )
        finally:
            self.tasks.pop(ident, None)

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
        elif kind in ("execute_result", "display_data"):
            await self.channel.emit(
                {
                    "id": ident,
                    "event": "result",
                    "data": content.get("data", {}),
                    "main": kind == "execute_result",
                }
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
                await self.contexts[name].execute(ident, request["code"], request.get("timeout"))
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
    _no_dumps()
    fd_in, fd_out = _private_channel()
    asyncio.run(_main(fd_in, fd_out))


if __name__ == "__main__":
    main()
