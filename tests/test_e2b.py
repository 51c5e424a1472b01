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

ROOT = Path(__file__).resolve().parent.parent
E2B_PYTHON = ROOT / ".venv-e2b" / "bin" / "python"
# the oldest SDKs that honour E2B_SANDBOX_URL (tests/e2b-*oldest-requirements.txt)
OLDEST_E2B = ROOT / ".venv-e2b-2.7" / "bin" / "python"  # e2b 2.7.0
OLDEST_CI = ROOT / ".venv-e2b-ci-2.9" / "bin" / "python"  # e2b-code-interpreter 2.9.0, e2b 2.26.0

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


def sdk(
    server: ServerProcess,
    key: str,
    script: str,
    timeout_s: float = 180,
    python: Path = E2B_PYTHON,
) -> str:
    """Run ``script`` under the SDKs' Python; its stdout (it must exit 0)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "E2B_API_URL": f"{server.url}/e2b/api",
        "E2B_SANDBOX_URL": f"{server.url}/e2b/sandbox",
        "E2B_API_KEY": key,
    }
    out = subprocess.run(
        [str(python), "-c", textwrap.dedent(script)],
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

        async def settle():
            # The SDK's HTTP client (pyqwest) completes each request on a tokio
            # thread that hands the result to the loop with call_soon_threadsafe
            # and then needs the GIL back once its wake-up write returns. If the
            # script ends in that window, the thread finds Python finalizing, is
            # made to pthread_exit, and the forced unwind through Rust frames
            # aborts the process (SIGABRT after "ok"; seen in core dumps, 3 runs
            # in 40). Idling the loop a moment lets those threads finish first.
            await asyncio.sleep(0.2)

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
            await settle()
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
                     lambda: Sandbox.set_timeout(sid, 30), lambda: Sandbox.pause(sid),
                     lambda: Sandbox.get_metrics(sid),
                     lambda: Sandbox.update_network(sid, {{"allow_out": ["pypi.org"]}})):
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


def test_pty_sync_async_and_isolated(server: ServerProcess, key: str) -> None:
    """``sandbox.pty``: a corral terminal behind envd's process service. The
    output comes as PTY events in the Start and Connect streams, typed input
    reaches bash, a resize is what the program sees (``stty size``), kill ends
    it; another key cannot reach it, even knowing the sandbox id and the pid."""
    out = sdk(
        server,
        key,
        """
        import threading, time
        from e2b import Sandbox, PtySize, CommandExitException, TimeoutException

        def until(seen, text):
            for _ in range(300):
                if text in seen:
                    return
                time.sleep(0.1)
            raise SystemExit(f"{text!r} never came: {bytes(seen)!r}")

        sb = Sandbox.create(timeout=120)
        seen, ended = bytearray(), {}
        h = sb.pty.create(PtySize(rows=24, cols=80))

        def follow():
            try:
                h.wait(on_pty=seen.extend)
                ended["exit"] = 0
            except CommandExitException as exc:
                ended["exit"] = exc.exit_code

        follower = threading.Thread(target=follow)
        follower.start()
        sb.pty.send_stdin(h.pid, b"echo $((6*7))\\n")
        until(seen, b"42\\r\\n")  # the typed line echoes $((6*7)), not 42
        assert b"TERM=xterm-256color" not in seen
        sb.pty.send_stdin(h.pid, b"echo $TERM; stty size\\n")
        until(seen, b"24 80")
        until(seen, b"xterm-256color")
        sb.pty.resize(h.pid, PtySize(rows=30, cols=100))
        sb.pty.send_stdin(h.pid, b"stty size\\n")
        until(seen, b"30 100")
        for bad in (PtySize(rows=0, cols=80), PtySize(rows=24, cols=5000)):
            try:
                sb.pty.resize(h.pid, bad)
                raise SystemExit(f"resized to {bad}")
            except Exception as exc:
                assert "pty.size" in str(exc), exc
        assert sb.pty.kill(h.pid)
        follower.join(30)
        assert ended.get("exit") not in (None, 0), ended
        assert h.pid not in [p.pid for p in sb.commands.list()]
        # its timeout (Connect-Timeout-Ms) ends it in the box, not only the
        # client's stream (which its deadline cuts first)
        short = sb.pty.create(PtySize(rows=24, cols=80), timeout=2)
        try:
            short.wait()
            raise SystemExit("a PTY outlived its timeout")
        except (CommandExitException, TimeoutException):
            pass
        for _ in range(100):
            if short.pid not in [p.pid for p in sb.commands.list()]:
                break
            time.sleep(0.1)
        assert short.pid not in [p.pid for p in sb.commands.list()]
        print(sb.sandbox_id, sb._envd_access_token)
        print("ok")
        """,
    )
    sandbox_id, token = out.split()[:2]
    assert out.strip().endswith("ok")

    out = sdk(
        server,
        key,
        f"""
        import asyncio, os, sys
        from e2b import AsyncSandbox, PtySize, CommandExitException

        async def until(seen, text):
            for _ in range(300):
                if text in seen:
                    return
                await asyncio.sleep(0.1)
            raise SystemExit(f"{{text!r}} never came: {{bytes(seen)!r}}")

        async def main():
            sb = await AsyncSandbox.connect({sandbox_id!r})
            first, second = bytearray(), bytearray()
            h = await sb.pty.create(PtySize(rows=24, cols=80), on_data=first.extend,
                                    cwd="/home/user", envs={{"WHO": "async"}})
            await sb.pty.send_stdin(h.pid, b"echo $((6*7)) $WHO; pwd\\n")
            await until(first, b"42 async\\r\\n")
            await until(first, b"/workspace\\r\\n")  # /home/user is the workspace
            # leave it running, then follow it again: output from then on
            await h.disconnect()
            again = await sb.pty.connect(h.pid, on_data=second.extend)
            await sb.pty.send_stdin(again.pid, b"echo again $((2+3))\\n")
            await until(second, b"again 5\\r\\n")
            assert b"again 5" not in first
            await sb.pty.resize(again.pid, PtySize(rows=40, cols=120))
            await sb.pty.send_stdin(again.pid, b"stty size\\n")
            await until(second, b"40 120")
            # a PTY left running is there for another key to try
            lasting = await sb.pty.create(
                PtySize(rows=24, cols=80), on_data=lambda _: None, timeout=0
            )
            print(lasting.pid)
            # its stream closed before exit: the SDK's HTTP client (pyqwest)
            # was seen to abort (SIGABRT) at interpreter exit with one open
            await lasting.disconnect()
            assert await sb.pty.kill(again.pid)
            try:
                await again.wait()
                raise SystemExit("a killed PTY must not succeed")
            except CommandExitException as exc:
                assert exc.exit_code != 0
            assert not await sb.pty.kill(again.pid)  # gone
            print("ok")

        asyncio.run(main())
        sys.stdout.flush()
        os._exit(0)  # past every check: as in test_stream_input, pyqwest may abort at exit
        """,
    )
    assert out.strip().endswith("ok")
    lasting = int(out.split()[0])

    other = server.key("e2b-pty-other")
    out = sdk(
        server,
        other,
        f"""
        import base64, httpx
        from e2b import Sandbox, NotFoundException, SandboxNotFoundException
        try:
            Sandbox.connect({sandbox_id!r})
            raise SystemExit("another key connected")
        except (NotFoundException, SandboxNotFoundException):
            pass
        # the sandbox id and the pid known, the token not: as absent
        headers = {{"E2b-Sandbox-Id": {sandbox_id!r}, "E2b-Sandbox-Port": "49983",
                   "X-Access-Token": "0" * 64}}
        selector = {{"pid": {lasting}}}
        typed = base64.b64encode(b"touch x\\n").decode()
        for method, body in (
            ("SendInput", {{"process": selector, "input": {{"pty": typed}}}}),
            ("Update", {{"process": selector, "pty": {{"size": {{"rows": 5, "cols": 5}}}}}}),
            ("SendSignal", {{"process": selector, "signal": "SIGNAL_SIGKILL"}}),
        ):
            r = httpx.post("{server.url}/e2b/sandbox/process.Process/" + method, json=body,
                           headers=headers)
            assert r.status_code == 404, (method, r.status_code, r.text)
        print("ok")
        """,
    )
    assert out.strip().endswith("ok")
    # untouched: still running at its size, no file typed into the workspace
    out = sdk(
        server,
        key,
        f"""
        import httpx
        from e2b import Sandbox
        sb = Sandbox.connect({sandbox_id!r})
        assert {lasting} in [p.pid for p in sb.commands.list()]
        assert not sb.files.exists("x")
        # the same raw request with the owner's token reaches it: the 404s
        # above were the missing credential's, not a missing route's
        r = httpx.post("{server.url}/e2b/sandbox/process.Process/Update",
                       json={{"process": {{"pid": {lasting}}},
                             "pty": {{"size": {{"rows": 5, "cols": 5}}}}}},
                       headers={{"E2b-Sandbox-Id": {sandbox_id!r}, "E2b-Sandbox-Port": "49983",
                                "X-Access-Token": {token!r}}})
        assert r.status_code == 200, r.text
        assert sb.pty.kill({lasting})
        sb.kill()
        print("ok")
        """,
    )
    assert out.strip().endswith("ok")


def test_stream_input(server: ServerProcess, key: str) -> None:
    """``stream_input`` (Connect client streaming over HTTP/1.1): chunks reach
    a command's stdin and a PTY in order, sync and async; a pid that is not
    there is NotFound."""
    out = sdk(
        server,
        key,
        r"""
        from e2b import Sandbox, PtySize, NotFoundException

        sb = Sandbox.create(timeout=120)
        h = sb.commands.run("cat", background=True, stdin=True)
        sb.commands.stream_input(h.pid, ["one\n", b"two\n", "three"])
        sb.commands.close_stdin(h.pid)
        assert h.wait().stdout == "one\ntwo\nthree", h
        try:
            sb.commands.stream_input(99999, ["lost"])
            raise SystemExit("input streamed to no process")
        except NotFoundException:
            pass
        seen = bytearray()
        pty = sb.pty.create(PtySize(rows=24, cols=80))
        sb.pty.stream_input(pty.pid, ["echo $((6", "*7))\n", "exit\n"])
        pty.wait(on_pty=seen.extend)
        assert b"42\r\n" in seen, seen
        # the route is read unbuffered, a message at a time: one that says it
        # is over 1 MiB is refused from its envelope, before any of it is held
        import httpx, struct
        r = httpx.post(
            "URL/e2b/sandbox/process.Process/StreamInput",
            content=struct.pack(">BI", 0, 64 << 20) + b"{",
            headers={"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "49983",
                     "X-Access-Token": sb._envd_access_token,
                     "Content-Type": "application/connect+json"},
        )
        assert r.status_code == 200 and b"malformed envelope" in r.content, r.content
        print(sb.sandbox_id)
        """.replace("URL", server.url),
    )
    sandbox_id = out.split()[0]
    # the async SDK in a process of its own (the sync one's client is not shared with it)
    out = sdk(
        server,
        key,
        f"""
        import asyncio, os
        from e2b import AsyncSandbox

        async def main():
            asb = await AsyncSandbox.connect({sandbox_id!r})
            got = []
            h = await asb.commands.run("cat", background=True, stdin=True, on_stdout=got.append)
            stream = asb.commands.stream_input(h.pid)
            await stream.send("a")
            await stream.send("b\\n")
            for _ in range(300):  # written as it arrived, the stream still open
                if "".join(got) == "ab\\n":
                    break
                await asyncio.sleep(0.1)
            assert "".join(got) == "ab\\n", got
            await stream.send("c")
            await stream.close()
            await asb.commands.close_stdin(h.pid)
            assert (await h.wait()).stdout == "ab\\nc"
            await asb.kill()

        asyncio.run(main())
        print("ok", flush=True)
        # past every check: the SDK's HTTP client (pyqwest) was seen to abort
        # (SIGABRT, nothing on stderr) at interpreter exit after async streams
        os._exit(0)
        """,
    )
    assert out.strip().endswith("ok")


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
            (lambda: Sandbox.create(lifecycle={"on_timeout": "pause"}), "auto-pause"),
            (lambda: Sandbox.create(template="my-custom-template"), "custom template builds"),
        ):
            try:
                call()
                raise SystemExit(f"not refused: {words}")
            except SandboxException as exc:
                assert words in str(exc), (words, str(exc))
        sb.kill()

        # allow_internet_access never opens the internet: the default policy
        # (the older SDKs send True on every create), and the detail says so
        sb = Sandbox.create(timeout=60, allow_internet_access=True)
        assert sb.get_info().allow_internet_access is False
        routes = sb.commands.run("cat /proc/net/route").stdout.splitlines()
        assert len(routes) == 1, routes  # the header alone: no route out of the box
        sb.kill()
        print("ok")
        """,
    )
    assert out.strip().endswith("ok")


def test_pause_resume_and_metrics(server: ServerProcess, key: str) -> None:
    """pause freezes the box (its processes and memory kept), connect resumes
    it; metrics come from its cgroup."""
    out = sdk(
        server,
        key,
        """
        import time
        import httpx
        from e2b import SandboxException, SandboxQuery, SandboxState
        from e2b_code_interpreter import Sandbox

        sb = Sandbox.create(timeout=120)
        sb.run_code("kept = 41")
        h = sb.commands.run("sleep 300", background=True)
        sb.files.write("blob.bin", b"x" * 100_000)
        def sample(sandbox_id, wanted):  # the series gains a sample a second
            for _ in range(150):
                series = Sandbox.get_metrics(sandbox_id)
                if series and wanted(series[-1]):
                    return series
                time.sleep(0.2)
            raise SystemExit(f"no sample as wanted: {series}")
        series = sample(sb.sandbox_id, lambda m: m.disk_used >= 100_000)
        times = [m.timestamp for m in series]
        assert times == sorted(times), times
        m = series[-1]
        assert m.cpu_count >= 1 and 0 <= m.cpu_used_pct <= 100, m
        assert 0 < m.mem_used <= m.mem_total and 100_000 <= m.disk_used <= m.disk_total, m
        later = Sandbox.get_metrics(sb.sandbox_id, start=m.timestamp)
        assert later and all(x.timestamp >= m.timestamp.replace(microsecond=0) for x in later)

        url = sb.download_url("blob.bin")
        assert sb.pause() is True
        assert sb.pause() is False  # already paused (409)
        assert sb.get_info().state == SandboxState.PAUSED
        def listed(state):
            query = SandboxQuery(state=[state])
            return [s.sandbox_id for s in Sandbox.list(query=query).next_items()]
        assert sb.sandbox_id in listed(SandboxState.PAUSED)
        assert sb.sandbox_id not in listed(SandboxState.RUNNING)
        try:  # traffic to a paused sandbox is refused, not held
            sb.commands.run("true")
            raise SystemExit("a paused sandbox ran a command")
        except SandboxException as exc:
            assert "is paused" in str(exc), exc
        r = httpx.get(url, timeout=30)  # a signed URL too
        assert r.status_code == 409 and "is paused" in r.text, r.text
        # a paused box is still measured: the memory it holds
        assert sample(sb.sandbox_id, lambda m: m.mem_used > 0)

        again = Sandbox.connect(sb.sandbox_id)  # resumes it
        assert again.get_info().state == SandboxState.RUNNING
        assert again.run_code("kept + 1").text == "42"  # its memory survived
        assert h.pid in [p.pid for p in again.commands.list()]  # and its processes
        assert again.commands.run("echo back").stdout == "back\\n"
        again.kill()
        print("ok")
        """,
    )
    assert out.strip().endswith("ok")


def test_network_rules_at_create_and_update(server: ServerProcess, key: str) -> None:
    """``network.allow_out`` is corral's allowlist mode; ``update_network``
    replaces the rules through the same checks as the native API."""
    out = sdk(
        server,
        key,
        """
        from e2b import Sandbox, SandboxException

        sb = Sandbox.create(timeout=60, network={"allow_out": ["pypi.org"]})
        info = sb.get_info()
        assert info.network == {"allow_out": ["pypi.org"], "deny_out": []}, info.network
        assert info.allow_internet_access is False
        sb.update_network({"allow_out": ["files.pythonhosted.org"], "deny_out": ["8.8.8.8"]})
        assert sb.get_info().network == {
            "allow_out": ["files.pythonhosted.org"], "deny_out": ["8.8.8.8"]
        }
        plain = Sandbox.create(timeout=60)  # the default policy: no network, no rules
        for call, words in (
            (lambda: sb.update_network({"allow_out": ["127.0.0.1"]}), "loopback"),
            (lambda: Sandbox.create(network={"allow_out": ["10.0.0.1"]}), "private"),
            (lambda: plain.update_network({"allow_out": ["pypi.org"]}), "not 'allowlist'"),
        ):
            try:
                call()
                raise SystemExit(f"not refused: {words}")
            except SandboxException as exc:
                assert words in str(exc), (words, str(exc))
        assert sb.get_info().network["allow_out"] == ["files.pythonhosted.org"]
        plain.kill()
        sb.kill()
        print("ok")
        """,
    )
    assert out.strip().endswith("ok")


def test_watch_dir_and_signed_urls(server: ServerProcess, key: str) -> None:
    """Directory watches, polled (sync SDK) and streamed (async SDK); signed
    download and upload URLs, refused when tampered with or expired."""
    out = sdk(
        server,
        key,
        """
        import asyncio, time
        import httpx
        from e2b import AsyncSandbox, FilesystemEventType, Sandbox

        sb = Sandbox.create(timeout=120)
        sb.files.write("old.txt", "1")
        w = sb.files.watch_dir("/home/user")
        sb.files.write("new.txt", "x")
        sb.files.write("old.txt", "22")
        sb.files.make_dir("sub")
        events = {(e.name, e.type) for e in w.get_new_events()}
        assert events == {
            ("new.txt", FilesystemEventType.CREATE),
            ("old.txt", FilesystemEventType.WRITE),
            ("sub", FilesystemEventType.CREATE),
        }, events
        sb.files.remove("new.txt")
        assert [(e.name, e.type) for e in w.get_new_events()] == [
            ("new.txt", FilesystemEventType.REMOVE)
        ]
        assert w.get_new_events() == []
        w.stop()

        async def streamed():
            a = await AsyncSandbox.connect(sb.sandbox_id)
            seen = []
            handle = await a.files.watch_dir(
                "/home/user", on_event=lambda e: seen.append((e.name, e.type)), recursive=True
            )
            await a.files.write("sub/deep.txt", "d")
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.05)
            await handle.stop()
            assert seen == [("sub/deep.txt", FilesystemEventType.CREATE)], seen

        asyncio.run(streamed())

        # signed URLs: the SDK signs with the sandbox's access token
        url = sb.download_url("old.txt")
        assert "signature=" in url
        assert httpx.get(url).text == "22"
        up = sb.upload_url("uploaded.txt", use_signature_expiration=60)
        r = httpx.post(up, files={"file": ("uploaded.txt", b"via url")})
        assert r.status_code == 200, r.text
        assert sb.files.read("uploaded.txt") == "via url"
        tampered = url.replace("old.txt", "uploaded.txt", 1)  # another file, same signature
        assert httpx.get(tampered).status_code == 401
        as_upload = sb.download_url("uploaded.txt")  # a read signature does not write
        assert httpx.post(as_upload, files={"file": ("x", b"no")}).status_code == 401
        expired = sb.download_url("old.txt", use_signature_expiration=-10)
        r = httpx.get(expired)
        assert r.status_code == 401 and "expired" in r.text, r.text
        sb.kill()
        assert httpx.get(url).status_code == 401  # its sandbox is gone
        print("ok")
        """,
    )
    assert out.strip().endswith("ok")


def test_keepalives_on_long_streams(server: ServerProcess, key: str) -> None:
    """A silent command's stream carries envd's keepalive events at the
    interval the client asks (``Keepalive-Ping-Interval``), and the SDK takes
    them in its stride; so does a silent cell's ``/execute`` stream."""
    out = sdk(
        server,
        key,
        f"""
        import json, struct
        import httpx
        import e2b.sandbox_sync.commands.command as command
        from e2b import Sandbox

        command.KEEPALIVE_PING_INTERVAL_SEC = 1  # the SDK's own header, at 1 s
        sb = Sandbox.create(timeout=60)
        seen = []
        r = sb.commands.run("sleep 2.5; echo late", on_stdout=seen.append)
        assert r.stdout == "late\\n" and seen == ["late\\n"], (r, seen)

        # the same stream read raw: its keepalives between start and the output
        body = json.dumps({{"process": {{"cmd": "/bin/sh", "args": ["-c", "sleep 2.5"]}}}})
        headers = {{
            "E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "49983",
            "X-Access-Token": sb._envd_access_token,
            "Content-Type": "application/connect+json", "Keepalive-Ping-Interval": "1",
        }}
        data = httpx.post("{server.url}/e2b/sandbox/process.Process/Start", headers=headers,
                          content=struct.pack(">BI", 0, len(body)) + body.encode(),
                          timeout=30).content
        kinds = []
        while data:
            flags, size = struct.unpack(">BI", data[:5])
            message, data = json.loads(data[5:5 + size]), data[5 + size:]
            kinds.append("end-of-stream" if flags & 2 else next(iter(message["event"])))
        assert kinds[0] == "start" and kinds[-2:] == ["end", "end-of-stream"], kinds
        assert kinds.count("keepalive") >= 2, kinds

        # and a silent cell's /execute stream (NDJSON): keepalive lines
        headers["E2b-Sandbox-Port"] = "49999"
        headers["Content-Type"] = "application/json"
        r = httpx.post("{server.url}/e2b/sandbox/execute", headers=headers, timeout=60,
                       json={{"code": "import time; time.sleep(2.5); 7"}})
        kinds = [json.loads(line)["type"] for line in r.text.splitlines()]
        assert kinds.count("keepalive") >= 2 and "result" in kinds, kinds
        assert kinds[-1] == "end_of_execution", kinds
        sb.kill()
        print("ok")
        """,
    )
    assert out.strip().endswith("ok")


def _need(python: Path) -> None:
    if not python.exists():
        pytest.skip(f"{python.parent.parent.name} is missing: scripts/bootstrap test makes it")


def test_oldest_e2b_sdk(server: ServerProcess, key: str) -> None:
    """e2b 2.7.0, the first to honour E2B_SANDBOX_URL: its own Connect client
    (``e2b_connect``, protobuf), its ``beta_pause``, and its ``connect``,
    which sends the access token but not ``E2b-Sandbox-Id``."""
    _need(OLDEST_E2B)
    out = sdk(
        server,
        key,
        """
        import asyncio, time
        import httpx
        from e2b import AsyncSandbox, CommandExitException, FilesystemEventType, Sandbox

        sb = Sandbox.create(timeout=120, metadata={"sdk": "2.7"})
        assert sb.commands.run("echo hi").stdout == "hi\\n"
        try:
            sb.commands.run("exit 3")
            raise SystemExit("a failing command must raise")
        except CommandExitException as exc:
            assert exc.exit_code == 3
        h = sb.commands.run("read x; echo got $x", background=True, stdin=True)
        sb.commands.send_stdin(h.pid, "typed\\n")
        assert h.wait().stdout == "got typed\\n"
        sb.files.write("a.txt", "hello")
        assert sb.files.read("/home/user/a.txt") == "hello"
        assert [e.name for e in sb.files.list(".")] == ["a.txt"]
        w = sb.files.watch_dir("/home/user")
        sb.files.write("b.txt", "x")
        assert [(e.name, e.type) for e in w.get_new_events()] == [
            ("b.txt", FilesystemEventType.CREATE)
        ]
        w.stop()
        assert httpx.get(sb.download_url("a.txt")).text == "hello"
        for _ in range(150):  # the series gains a sample a second
            if sb.get_metrics():
                break
            time.sleep(0.2)
        assert sb.get_metrics()[-1].mem_used > 0

        sb.beta_pause()
        assert sb.get_info().state.value == "paused"
        again = Sandbox.connect(sb.sandbox_id)  # resumes; routed by its token
        assert again.commands.run("echo back").stdout == "back\\n"
        assert sb.sandbox_id in [s.sandbox_id for s in Sandbox.list().next_items()]

        async def main():
            a = await AsyncSandbox.connect(sb.sandbox_id)
            assert (await a.commands.run("echo async")).stdout == "async\\n"
            seen = []
            handle = await a.files.watch_dir("/home/user", on_event=seen.append)
            await a.files.write("c.txt", "c")
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.05)
            await handle.stop()
            assert [e.name for e in seen] == ["c.txt"], seen
            await a.kill()

        asyncio.run(main())
        assert not sb.is_running()
        print("ok")
        """,
        python=OLDEST_E2B,
    )
    assert out.strip().endswith("ok")


def test_oldest_code_interpreter_sdk(server: ServerProcess, key: str) -> None:
    """e2b-code-interpreter 2.9.0 (the first to send its cells to
    E2B_SANDBOX_URL) on e2b 2.26.0, which insists on E2B's key format: the
    corral key as ``e2b_`` and its hex."""
    _need(OLDEST_CI)
    e2b_key = "e2b_" + key.encode().hex()
    out = sdk(
        server,
        e2b_key,
        """
        from e2b_code_interpreter import Sandbox

        sb = Sandbox.create(timeout=120)
        ex = sb.run_code("x = 40\\nprint('p')\\nx + 2")
        assert ex.text == "42" and ex.logs.stdout == ["p\\n"], ex
        assert sb.run_code("1 / 0").error.name == "ZeroDivisionError"
        ctx = sb.create_code_context()
        sb.run_code("y = 7", context=ctx)
        assert sb.run_code("y", context=ctx).text == "7"
        sb.remove_code_context(ctx)
        sb.files.write("f.txt", "data")
        assert sb.commands.run("cat f.txt").stdout == "data"
        assert sb.kill()
        print("ok")
        """,
        python=OLDEST_CI,
    )
    assert out.strip().endswith("ok")


def test_execute_interrupted_when_the_client_goes(server: ServerProcess, key: str) -> None:
    """A client that drops its ``/execute`` stream ends the cell: its kernel
    stops ticking and takes the next cell."""
    out = sdk(
        server,
        key,
        f"""
        import time
        import httpx
        from e2b_code_interpreter import Sandbox

        sb = Sandbox.create(timeout=120)
        headers = {{"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "49999",
                   "X-Access-Token": sb._envd_access_token}}
        cell = (
            "import time\\nfor i in range(600):\\n"
            "    open('tick', 'w').write(str(i)); time.sleep(0.1)"
        )
        with httpx.stream("POST", "{server.url}/e2b/sandbox/execute", headers=headers,
                          json={{"code": cell}}, timeout=60) as r:
            while not sb.files.exists("tick"):
                time.sleep(0.1)
        # the connection is closed: the cell must stop
        time.sleep(2)
        first = sb.files.read("tick")
        time.sleep(1)
        assert sb.files.read("tick") == first, "the cell still runs"
        assert sb.run_code("1+1").text == "2"
        sb.kill()
        print("ok")
        """,
    )
    assert out.strip().endswith("ok")
