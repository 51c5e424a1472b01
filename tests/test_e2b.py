"""The E2B-compatible API, driven by the unmodified official SDKs (``e2b``,
``e2b-code-interpreter``, pinned in tests/e2b-requirements.txt) against a real
``corral serve`` on 127.0.0.1. The SDKs live in their own venv (``.venv-e2b``,
made by ``scripts/bootstrap test``), never in corral's: each scenario is a
script run by that venv's Python, pointed at the server by the three
environment variables alone."""

from __future__ import annotations

import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from .server_helpers import ServerProcess, serving

E2B_PYTHON = Path(__file__).resolve().parent.parent / ".venv-e2b" / "bin" / "python"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the server tests run as root here"),
    pytest.mark.skipif(
        not E2B_PYTHON.exists(),
        reason="the E2B SDKs' venv is missing: scripts/bootstrap test makes .venv-e2b",
    ),
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with serving() as proc:
        yield proc


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> str:
    return server.key("e2b")


def sdk(server: ServerProcess, key: str, script: str, timeout_s: float = 180) -> str:
    """Run ``script`` under the SDKs' Python; its stdout (it must exit 0)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "E2B_API_URL": f"{server.url}/e2b/api",
        "E2B_SANDBOX_URL": f"{server.url}/e2b/sandbox",
        "E2B_API_KEY": key,
    }
    out = subprocess.run(
        [str(E2B_PYTHON), "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_sync_sdk_commands_files_code(server: ServerProcess, key: str) -> None:
    out = sdk(
        server,
        key,
        """
        from e2b import CommandExitException
        from e2b_code_interpreter import Sandbox

        sb = Sandbox.create(timeout=120, metadata={"who": "sync"}, envs={"GREETING": "hi"})
        r = sb.commands.run("echo $GREETING; echo oops >&2")
        assert (r.exit_code, r.stdout, r.stderr) == (0, "hi\\n", "oops\\n"), r
        try:
            sb.commands.run("exit 3")
            raise SystemExit("a failing command must raise")
        except CommandExitException as exc:
            assert exc.exit_code == 3

        # a background command: its pid, stdin, listed, killed
        h = sb.commands.run("read x; echo got $x", background=True, stdin=True)
        sb.commands.send_stdin(h.pid, "typed\\n")
        assert h.wait().stdout == "got typed\\n"
        h = sb.commands.run("sleep 100", background=True)
        assert h.pid in [p.pid for p in sb.commands.list()]
        assert sb.commands.kill(h.pid)
        try:
            h.wait()
            raise SystemExit("a killed command must not succeed")
        except CommandExitException as exc:
            assert exc.exit_code != 0
        seen = []
        r = sb.commands.run("echo one; echo two", on_stdout=seen.append)
        assert "".join(seen) == "one\\ntwo\\n"

        # files: /home/user is the workspace, relative paths too
        info = sb.files.write("/home/user/data/a.txt", "hello")
        assert info.path == "/home/user/data/a.txt", info
        assert sb.files.read("data/a.txt") == "hello"
        assert sb.files.read("/home/user/data/a.txt", format="bytes") == b"hello"
        sb.files.write_files([{"path": "b.bin", "data": b"\\x00\\x01"}])
        names = sorted(e.name for e in sb.files.list("/home/user"))
        assert names == ["b.bin", "data"], names
        assert sb.files.exists("b.bin") and not sb.files.exists("nope")
        assert sb.files.make_dir("d1/d2") and not sb.files.make_dir("d1/d2")
        sb.files.rename("b.bin", "d1/c.bin")
        assert sb.files.get_info("d1/c.bin").size == 2
        sb.files.remove("d1")
        assert not sb.files.exists("d1")
        # the file written through envd is the one a command sees
        assert sb.commands.run("cat data/a.txt").stdout == "hello"

        # code: results with their MIME fields, logs, errors, the count
        ex = sb.run_code("x = 40\\nprint('p')\\nx + 2")
        assert ex.text == "42" and ex.logs.stdout == ["p\\n"], ex
        assert ex.execution_count is not None
        ex = sb.run_code("import pandas as pd; pd.DataFrame({'a': [1, 2]})")
        assert ex.results[0].html and ex.results[0].data, ex.results[0].formats()
        ex = sb.run_code("1 / 0")
        assert ex.error is not None and ex.error.name == "ZeroDivisionError"
        # envs for one execution only
        ex = sb.run_code("import os; os.environ['ONE']", envs={"ONE": "cell"})
        assert ex.text == "'cell'", ex
        assert sb.run_code("import os; 'ONE' in os.environ").text == "False"
        ctx = sb.create_code_context()
        sb.run_code("y = 7", context=ctx)
        assert sb.run_code("y", context=ctx).text == "7"
        assert ctx.id in [c.id for c in sb.list_code_contexts()]
        sb.restart_code_context(ctx)
        assert sb.run_code("y", context=ctx).error.name == "NameError"
        sb.remove_code_context(ctx)
        assert ctx.id not in [c.id for c in sb.list_code_contexts()]

        info = sb.get_info()
        assert info.metadata == {"who": "sync"}, info
        assert sb.is_running()
        assert sb.kill()
        assert not sb.is_running()
        print("ok")
        """,
    )
    assert out.strip().endswith("ok")


def test_async_sdk_and_listing(server: ServerProcess, key: str) -> None:
    out = sdk(
        server,
        key,
        """
        import asyncio
        from e2b import SandboxQuery
        from e2b_code_interpreter import AsyncSandbox

        async def main():
            boxes = [await AsyncSandbox.create(timeout=60, metadata={"set": "a", "n": str(i)})
                     for i in range(3)]
            r = await boxes[0].commands.run("echo async")
            assert r.stdout == "async\\n"
            await boxes[0].files.write("f.txt", b"1 KB" * 256)
            assert len(await boxes[0].files.read("f.txt", format="bytes")) == 1024
            assert (await boxes[1].run_code("1+1")).text == "2"
            seen = []
            await boxes[1].run_code("print('streamed')", on_stdout=lambda m: seen.append(m.line))
            assert seen == ["streamed\\n"], seen
            # list: a metadata filter and x-next-token paging
            pager = AsyncSandbox.list(query=SandboxQuery(metadata={"set": "a"}), limit=2)
            ids = []
            while pager.has_next:
                ids += [s.sandbox_id for s in await pager.next_items()]
            assert sorted(ids) == sorted(b.sandbox_id for b in boxes), ids
            # connect to a running sandbox by id
            again = await AsyncSandbox.connect(boxes[2].sandbox_id)
            assert (await again.commands.run("echo back")).stdout == "back\\n"
            await boxes[0].set_timeout(120)
            for b in boxes:
                await b.kill()
            print("ok")

        asyncio.run(main())
        """,
    )
    assert out.strip().endswith("ok")


def test_another_keys_sandbox_is_absent(server: ServerProcess, key: str) -> None:
    """Per-key isolation on every E2B route: another key's sandbox cannot be
    read, listed, killed, extended or connected to, and its traffic is refused
    without its token even when the id is known."""
    other = server.key("e2b-other")
    sandbox_id = sdk(
        server,
        key,
        """
        from e2b import Sandbox
        print(Sandbox.create(timeout=60).sandbox_id)
        """,
    ).strip()
    out = sdk(
        server,
        other,
        f"""
        import httpx
        from e2b import Sandbox, NotFoundException, SandboxNotFoundException
        sid = {sandbox_id!r}
        assert sid not in [s.sandbox_id for s in Sandbox.list().next_items()]
        for call in (lambda: Sandbox.get_info(sid), lambda: Sandbox.connect(sid),
                     lambda: Sandbox.set_timeout(sid, 30)):
            try:
                call()
                raise SystemExit("another key reached the sandbox")
            except (NotFoundException, SandboxNotFoundException):
                pass
        assert Sandbox.kill(sid) is False
        # its traffic, with the id but without its token: as absent
        r = httpx.post("{server.url}/e2b/sandbox/process.Process/List", json={{}},
                       headers={{"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983",
                                "X-Access-Token": "0" * 64}})
        assert r.status_code == 404, r.text
        print("ok")
        """,
    )
    assert out.strip().endswith("ok")
    # and it still runs for its owner
    sdk(
        server,
        key,
        f"""
        from e2b import Sandbox
        assert Sandbox.connect({sandbox_id!r}).kill()
        """,
    )


def test_timeout_root_and_unsupported(server: ServerProcess, key: str) -> None:
    out = sdk(
        server,
        key,
        """
        import time
        from e2b import Sandbox, SandboxException, NotFoundException
        sb = Sandbox.create(timeout=2)
        time.sleep(4)  # the reaper ends it
        assert not sb.is_running()
        try:
            sb.commands.run("true")
            raise SystemExit("a timed-out sandbox ran a command")
        except SandboxException as exc:
            assert "was not found" in str(exc), exc
        try:
            sb.get_info()
            raise SystemExit("a timed-out sandbox is still listed")
        except NotFoundException:
            pass

        sb = Sandbox.create(timeout=60)
        for call, words in (
            (lambda: sb.commands.run("id", user="root"), "root is never granted"),
            (lambda: sb.files.read("/etc/passwd"), "workspace only"),
            (lambda: sb.pause(), "pause"),
            (lambda: Sandbox.create(template="my-custom-template"), "custom template builds"),
            (lambda: Sandbox.create(allow_internet_access=True), "without network"),
        ):
            try:
                call()
                raise SystemExit(f"not refused: {words}")
            except SandboxException as exc:
                assert words in str(exc), (words, str(exc))
        sb.kill()
        print("ok")
        """,
    )
    assert out.strip().endswith("ok")
