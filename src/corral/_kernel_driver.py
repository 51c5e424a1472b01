"""The in-box kernel driver: stateful code contexts behind one JSON-lines pipe.

It runs inside the box with the runtime's Python (which has jupyter_client,
ipykernel and bash_kernel), started by the host through the agent like any
background command. Each code context is one kernel: Python (ipykernel) and
bash (bash_kernel) speak the Jupyter messaging protocol over the box's own
loopback; JavaScript is a persistent Node.js process (``_js_kernel.js``).

Requests, one JSON object a line on stdin::

    {"id": 1, "op": "create", "context": "c1", "language": "python", "cwd": "/workspace"}
    {"id": 2, "op": "execute", "context": "c1", "code": "1+1", "timeout": 30}
    {"id": 3, "op": "restart" | "remove", "context": "c1"}

Events, one JSON object a line on stdout, each naming its request::

    {"id": 2, "event": "stream", "name": "stdout", "text": "..."}
    {"id": 2, "event": "result", "data": {"text/plain": "2"}, "main": true}
    {"id": 2, "event": "error", "name": "ZeroDivisionError", "value": "...", "traceback": [...]}
    {"id": 2, "event": "done", "count": 1, "status": "ok" | "error" | "timeout" | "died",
     "restarted": false}
    {"id": 1, "event": "reply", "error": null}

The host treats all of it as untrusted data, like everything from the box.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from jupyter_client.manager import AsyncKernelManager  # type: ignore[import-not-found,unused-ignore]

KERNEL_NAMES = {"python": "python3", "bash": "bash"}
JS_KERNEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js_kernel.js")
INTERRUPT_GRACE_S = 3.0
START_TIMEOUT_S = 60.0
LIVENESS_S = 0.5

_out_lock = asyncio.Lock()


async def emit(event: dict[str, Any]) -> None:
    line = json.dumps(event, separators=(",", ":")) + "\n"
    async with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    # keep the workspace clean of tool state: it all goes to /tmp
    env.setdefault("IPYTHONDIR", "/tmp/.corral/ipython")
    env.setdefault("MPLCONFIGDIR", "/tmp/.corral/matplotlib")
    env.setdefault("JUPYTER_RUNTIME_DIR", "/tmp/.corral/jupyter")
    env.setdefault("JUPYTER_DATA_DIR", "/tmp/.corral/jupyter-data")
    env.pop("MPLBACKEND", None)  # inline figures
    return env


class JupyterContext:
    def __init__(self, language: str, cwd: str) -> None:
        self.language = language
        self.cwd = cwd
        self.km: Any = None
        self.kc: Any = None
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        self.km = AsyncKernelManager(kernel_name=KERNEL_NAMES[self.language])
        await self.km.start_kernel(cwd=self.cwd, env=kernel_env())
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=START_TIMEOUT_S)

    async def stop(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            await self.km.shutdown_kernel(now=True)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def execute(self, ident: int, code: str, timeout: float | None) -> None:
        async with self.lock:
            if not await self.km.is_alive():
                await self.restart()
                await emit(
                    {"id": ident, "event": "notice", "text": "the kernel had died; restarted"}
                )
            msg_id = self.kc.execute(code, allow_stdin=False)
            state: dict[str, Any] = {"count": None, "status": "ok"}
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            interrupted_at = None
            while True:
                now = loop.time()
                if deadline is not None and now >= deadline and interrupted_at is None:
                    await self.km.interrupt_kernel()
                    interrupted_at = now
                    state["status"] = "timeout"
                if interrupted_at is not None and now - interrupted_at > INTERRUPT_GRACE_S:
                    await self.km.restart_kernel(now=True)
                    await self.kc.wait_for_ready(timeout=START_TIMEOUT_S)
                    await emit(
                        {
                            "id": ident,
                            "event": "done",
                            "count": state["count"],
                            "status": "timeout",
                            "restarted": True,
                        }
                    )
                    return
                try:
                    msg = await self.kc.get_iopub_msg(timeout=LIVENESS_S)
                except Exception:  # queue.Empty: check the kernel is still there
                    if not await self.km.is_alive():
                        await self.restart()
                        await emit(
                            {
                                "id": ident,
                                "event": "done",
                                "count": state["count"],
                                "status": "died",
                                "restarted": True,
                            }
                        )
                        return
                    continue
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if await self.handle(ident, msg, state):
                    break
            await emit(
                {
                    "id": ident,
                    "event": "done",
                    "count": state["count"],
                    "status": state["status"],
                    "restarted": False,
                }
            )

    async def handle(self, ident: int, msg: dict[str, Any], state: dict[str, Any]) -> bool:
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "status" and content.get("execution_state") == "idle":
            return True
        if kind == "execute_input":
            state["count"] = content.get("execution_count")
        elif kind == "stream":
            await emit(
                {"id": ident, "event": "stream", "name": content["name"], "text": content["text"]}
            )
        elif kind in ("execute_result", "display_data"):
            await emit(
                {
                    "id": ident,
                    "event": "result",
                    "data": content.get("data", {}),
                    "main": kind == "execute_result",
                }
            )
        elif kind == "error":
            if state["status"] != "timeout":
                state["status"] = "error"
            await emit(
                {
                    "id": ident,
                    "event": "error",
                    "name": content.get("ename", ""),
                    "value": content.get("evalue", ""),
                    "traceback": content.get("traceback", []),
                }
            )
        return False


class NodeContext:
    """JavaScript: a persistent Node.js process evaluating cells in one vm context."""

    def __init__(self, cwd: str) -> None:
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "node",
            JS_KERNEL,
            cwd=self.cwd,
            env=kernel_env(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def execute(self, ident: int, code: str, timeout: float | None) -> None:
        async with self.lock:
            assert self.proc is not None
            if self.proc.returncode is not None:
                await self.restart()
            assert self.proc.stdin is not None
            assert self.proc.stdout is not None
            request = {"code": code, "timeout_ms": None if timeout is None else int(timeout * 1000)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            await self.proc.stdin.drain()
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    await self.restart()
                    await emit(
                        {
                            "id": ident,
                            "event": "done",
                            "count": None,
                            "status": "died",
                            "restarted": True,
                        }
                    )
                    return
                event = json.loads(line)
                event["id"] = ident
                await emit(event)
                if event.get("event") == "done":
                    return


class Driver:
    def __init__(self) -> None:
        self.contexts: dict[str, JupyterContext | NodeContext] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            request = json.loads(line)
            task = asyncio.ensure_future(self.dispatch(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        for context in self.contexts.values():
            await context.stop()

    async def dispatch(self, request: dict[str, Any]) -> None:
        ident = request["id"]
        op = request["op"]
        name = request.get("context", "")
        try:
            if op == "create":
                language = request["language"]
                if language == "javascript":
                    context: JupyterContext | NodeContext = NodeContext(request["cwd"])
                elif language in KERNEL_NAMES:
                    context = JupyterContext(language, request["cwd"])
                else:
                    raise ValueError(f"no kernel for {language!r}")
                await context.start()
                self.contexts[name] = context
                await emit({"id": ident, "event": "reply", "error": None})
            elif op == "execute":
                await self.contexts[name].execute(ident, request["code"], request.get("timeout"))
            elif op == "restart":
                await self.contexts[name].restart()
                await emit({"id": ident, "event": "reply", "error": None})
            elif op == "remove":
                context = self.contexts.pop(name)
                await context.stop()
                await emit({"id": ident, "event": "reply", "error": None})
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # reported, never fatal to the driver
            await emit({"id": ident, "event": "reply", "error": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    asyncio.run(Driver().serve())


if __name__ == "__main__":
    main()
