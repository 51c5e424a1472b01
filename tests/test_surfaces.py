"""One API, four surfaces: the same checks on async and sync, local and remote.

``AsyncSandbox`` and ``RemoteSandbox`` implement ``corral.abc.AsyncSandboxAPI``;
``Sandbox`` (generated) implements ``SandboxAPI`` over either. Every check here
is written once against the async API and runs on all four: the sync surfaces
are driven through ``_Threaded``, which calls the real sync facade in a worker
thread (so its portal does the work, as in a sync program). Remote means a real
``corral serve`` on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import pytest

import corral
from corral import AsyncClient, AsyncSandbox, Client, CommandExit, CommandOutput, Sandbox
from corral._runtime import DEFAULT as DEFAULT_RUNTIME
from corral._sync import SyncCommands, SyncFiles, SyncNetwork, SyncPty
from corral.abc import AsyncSandboxAPI
from corral.backends import get_backend

from .server_helpers import ServerProcess, serving

SURFACES = ["async-local", "sync-local", "async-remote", "sync-remote"]
_STREAMING = {"stream", "stream_code"}  # methods that return an (async) iterator at once


class _Threaded:
    """A sync API object seen through its async twin's interface: each call
    runs the sync method in a worker thread; handles it returns are wrapped too."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if isinstance(value, SyncCommands | SyncFiles | SyncPty | SyncNetwork):
            return _Threaded(value)
        if not callable(value):
            return value
        if name in _STREAMING:
            return lambda *a, **k: _aiterate(lambda: value(*a, **k))
        return lambda *a, **k: _threaded(value, *a, **k)

    async def __aenter__(self) -> _Threaded:
        await asyncio.to_thread(self._inner.__enter__)  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self._inner.__exit__, *exc)  # type: ignore[attr-defined]

    def __aiter__(self) -> AsyncIterator[Any]:
        return _aiterate(lambda: iter(self._inner))  # type: ignore[call-overload]


async def _threaded(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    result = await asyncio.to_thread(method, *args, **kwargs)
    wrapped = (corral.SyncCommandHandle, corral.SyncPtyHandle, corral.SyncFileReader)
    return _Threaded(result) if isinstance(result, wrapped) else result


async def _aiterate(start: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    events = await asyncio.to_thread(start)
    done = object()
    try:
        while (item := await asyncio.to_thread(next, events, done)) is not done:
            yield item
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with serving() as proc:
        yield proc


@pytest.fixture(scope="module")
def api_key(server: ServerProcess) -> str:
    return server.key("surfaces")


OpenSandbox = Callable[..., AsyncSandboxAPI]


@pytest.fixture(params=SURFACES)
async def open_sandbox(request: pytest.FixtureRequest) -> AsyncIterator[OpenSandbox]:
    """A factory of unstarted sandboxes on one surface: ``open_sandbox(policy, runtime=...)``."""
    surface: str = request.param
    stack = contextlib.AsyncExitStack()
    if surface.endswith("remote"):
        server: ServerProcess = request.getfixturevalue("server")
        key: str = request.getfixturevalue("api_key")
        if surface == "async-remote":
            remote = await stack.enter_async_context(AsyncClient(server.url, api_key=key))
        else:
            client = stack.enter_context(Client(server.url, api_key=key))

    def make(policy: str = "default", *, runtime: str | None = None) -> AsyncSandboxAPI:
        if surface == "async-local":
            return AsyncSandbox(policy, timeout_s=120, runtime=runtime)
        if surface == "sync-local":
            return cast(AsyncSandboxAPI, _Threaded(Sandbox(policy, timeout_s=120, runtime=runtime)))
        if surface == "async-remote":
            return remote.sandbox(policy, timeout_s=120, runtime=runtime)
        return cast(
            AsyncSandboxAPI, _Threaded(client.sandbox(policy, timeout_s=120, runtime=runtime))
        )

    async with stack:
        yield make


async def test_commands(open_sandbox: OpenSandbox) -> None:
    async with open_sandbox() as sb:
        done = await sb.commands.run("echo out; echo err >&2; exit 3")
        assert (done.exit_code, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
        assert (await sb.commands.run(["cat"], stdin=b"fed")).stdout == b"fed"
        seen: list[bytes] = []
        await sb.commands.run("echo a; echo b", on_stdout=seen.append)
        assert b"".join(seen) == b"a\nb\n"
        with pytest.raises(TypeError, match="stdin=True is for background"):
            await sb.commands.run("true", stdin=True)

        handle = await sb.commands.run(["cat"], background=True, stdin=True)
        assert handle.pid is not None
        await handle.send_stdin("typed")
        await handle.close_stdin()
        assert (await handle.wait()).stdout == b"typed"

        sleeper = await sb.commands.run("sleep 300", background=True)
        listed = await sb.commands.list()
        assert sleeper.pid in [p.pid for p in listed]
        assert await sb.commands.kill(sleeper.pid or -1)
        assert (await sleeper.wait()).signal == signal.SIGKILL
        assert not await sb.commands.kill(999_999)

        events = [e async for e in sb.commands.stream("echo one; echo two >&2")]
        assert isinstance(events[-1], CommandExit)
        assert events[-1].result.exit_code == 0
        outputs = [e for e in events if isinstance(e, CommandOutput)]
        assert {(e.stream, e.data) for e in outputs} >= {("stdout", b"one\n")}
        assert b"two\n" in b"".join(e.data for e in outputs if e.stream == "stderr")


async def test_files(open_sandbox: OpenSandbox) -> None:
    async with open_sandbox() as sb:
        assert await sb.files.write("d/a.txt", b"hello") == 5
        assert await sb.files.read("d/a.txt") == b"hello"
        await sb.files.mkdir("d/sub")
        names = {(e.name, e.type) for e in await sb.files.list("d")}
        assert names == {("a.txt", "file"), ("sub", "dir")}
        assert (await sb.files.stat("d/a.txt")).size == 5
        await sb.files.rename("d/a.txt", "d/b.txt")
        assert not await sb.files.exists("d/a.txt")
        big = bytes(range(256)) * 4096  # several chunks
        await sb.files.write("big.bin", big)
        async with await sb.files.open_read("big.bin") as reader:
            assert reader.size == len(big)
            assert await reader.read(10) == big[:10]
            assert b"".join([chunk async for chunk in reader]) == big[10:]
        await sb.files.remove("d")
        assert not await sb.files.exists("d/b.txt")
        with pytest.raises(FileNotFoundError):
            await sb.files.read("d/b.txt")
        with pytest.raises(corral.PathOutsideWorkspace):
            await sb.files.read("../../etc/passwd")


async def test_pty(open_sandbox: OpenSandbox) -> None:
    async with open_sandbox() as sb:
        term = await sb.pty.create(100, 30, command=["/bin/sh"])
        assert term.pid is not None
        await term.resize(120, 40)
        await term.send("stty size; exit 7\n")
        seen = b""
        while b"40 120" not in seen:
            chunk = await term.read(timeout_s=30)
            assert chunk, seen
            seen += chunk
        assert (await term.wait()).exit_code == 7


async def test_lifetime_and_running(open_sandbox: OpenSandbox) -> None:
    sb = open_sandbox()
    assert not await sb.is_running()
    assert sb.degraded == ()
    async with sb:
        assert await sb.is_running()
        # what this host weakens, the same whichever surface asks
        assert sb.degraded == get_backend().check(sb.policy)
        await sb.set_timeout(60)
        assert await sb.is_running()
        with pytest.raises(corral.SandboxError, match="started once"):
            await sb.start()
    assert not await sb.is_running()
    with pytest.raises(corral.SandboxClosed):
        await sb.commands.run("true")


async def test_network_without_a_proxy(open_sandbox: OpenSandbox) -> None:
    async with open_sandbox("strict") as sb:  # network mode none
        assert sb.policy.network.mode == "none"
        assert await sb.network.events() == []
        with pytest.raises(corral.CorralError):  # locally SandboxError, remotely RemoteError(409)
            await sb.network.update(allow=["a.test"])


@pytest.mark.slow
async def test_run_code(open_sandbox: OpenSandbox) -> None:
    async with open_sandbox(runtime=DEFAULT_RUNTIME) as sb:
        await sb.run_code("x = 21")
        assert (await sb.run_code("x * 2")).text == "42"
        failed = await sb.run_code("1 / 0")
        assert failed.error is not None
        assert failed.error.name == "ZeroDivisionError"
        printed: list[str] = []
        await sb.run_code("print('hi')", on_stdout=printed.append)
        assert "".join(printed) == "hi\n"
        events = [e async for e in sb.stream_code("print('s'); x")]
        assert events[-1][0] == "done"
        assert ("stdout", "s\n") in events
        context = await sb.create_code_context()
        assert (await sb.run_code("'x' in dir()", context=context)).text == "False"
        # E2B's shapes: per-call envs, contexts listed and addressed by id
        envs = {"CELL_ONLY": "it's $here"}
        code = "import os; os.environ.get('CELL_ONLY')"
        assert (await sb.run_code(code, envs=envs)).text == '"it\'s $here"'
        assert (await sb.run_code(code)).text is None  # None: not kept after the cell
        assert context.id in {c.id for c in await sb.list_code_contexts()}
        await sb.run_code("y = 1", context=context.id)
        await sb.restart_code_context(context.id)
        assert (await sb.run_code("'y' in dir()", context=context)).text == "False"
        await sb.remove_code_context(context.id)
        assert context.id not in {c.id for c in await sb.list_code_contexts()}
