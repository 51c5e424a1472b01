"""Long-lived sandboxes through the real agent, over the real protocol, in real boxes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import signal
import time
from collections.abc import AsyncIterator

import pytest

from corral import (
    AsyncSandbox,
    CommandExit,
    CommandOutput,
    PathOutsideWorkspace,
    Policy,
    Sandbox,
    SandboxBroken,
    SandboxClosed,
)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def test_commands_and_files_share_one_box() -> None:
    async with AsyncSandbox(policy="default", timeout_s=60) as sb:
        assert await sb.is_running()
        assert len(sb.id) == 16
        assert await sb.files.write("in/data.csv", b"a,b\n1,2\n") == 8
        result = await sb.commands.run("wc -l in/data.csv", timeout_s=10)
        assert result.exit_code == 0
        assert result.stdout == b"2 in/data.csv\n"
        result = await sb.commands.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
        await sb.commands.run("python3 -c \"open('out.bin','wb').write(bytes(range(256)))\"")
        assert await sb.files.read("out.bin") == bytes(range(256))
        names = [e.name for e in await sb.files.list(".")]
        assert names == ["in", "out.bin"]
        entry = await sb.files.stat("out.bin")
        assert (entry.type, entry.size) == ("file", 256)
        await sb.files.remove("in")
        assert not await sb.files.exists("in/data.csv")
        await sb.files.mkdir("a/b")
        await sb.files.rename("out.bin", "a/b/moved.bin")
        assert await sb.files.exists("/workspace/a/b/moved.bin")
        # state persists between commands: cwd-relative files, environment per call
        result = await sb.commands.run("echo $GREETING", env={"GREETING": "hi"}, cwd="a")
        assert result.stdout == b"hi\n"
    assert not await sb.is_running()


async def test_background_server_and_same_loopback() -> None:
    async with AsyncSandbox() as sb:
        handle = await sb.commands.run("python3 -m http.server 8000", background=True)
        fetch = (
            "import time, urllib.request\n"
            "for _ in range(100):\n"
            "    try:\n"
            "        print(urllib.request.urlopen('http://127.0.0.1:8000').status); break\n"
            "    except OSError: time.sleep(0.05)\n"
        )
        result = await sb.commands.run(["python3", "-c", fetch])
        assert result.stdout == b"200\n"
        processes = await sb.commands.list()
        assert [p.pid for p in processes] == [handle.pid]
        assert processes[0].argv[-1] == "python3 -m http.server 8000"
        assert await sb.commands.kill(handle.pid or 0)
        done = await handle.wait()
        assert done.signal == signal.SIGKILL
        assert b"GET / HTTP/1.1" in done.stderr
        assert await sb.commands.list() == []


async def test_stream_delivers_output_as_it_happens() -> None:
    async with AsyncSandbox() as sb:
        stamps: list[tuple[float, bytes]] = []
        events = sb.commands.stream("for i in 1 2 3; do echo $i; sleep 0.2; done")
        last = None
        async for event in events:
            if isinstance(event, CommandOutput):
                stamps.append((time.monotonic(), event.data))
            else:
                last = event
        assert isinstance(last, CommandExit)
        assert last.result.stdout == b"1\n2\n3\n"
        assert [data for _, data in stamps] == [b"1\n", b"2\n", b"3\n"]
        assert stamps[2][0] - stamps[0][0] > 0.3  # not all at the end


async def test_callbacks_and_stdin() -> None:
    async with AsyncSandbox() as sb:
        seen: list[bytes] = []
        result = await sb.commands.run("cat; echo done >&2", stdin=b"hello", on_stdout=seen.append)
        assert result.stdout == b"hello"
        assert seen == [b"hello"]
        handle = await sb.commands.run("cat", background=True, stdin=True)
        await handle.send_stdin("line 1\n")
        await handle.close_stdin()
        assert (await handle.wait()).stdout == b"line 1\n"
        # a command that never reads its stdin does not block the host
        result = await sb.commands.run("true", stdin=b"x" * (8 << 20))
        assert result.exit_code == 0


async def test_command_timeout_output_cap_and_not_found() -> None:
    policy = Policy.preset("default").with_limits(output_bytes=1 << 16)
    async with AsyncSandbox(policy) as sb:
        started = time.monotonic()
        result = await sb.commands.run("sleep 30", timeout_s=0.5)
        assert result.limit_hit == "timeout"
        assert result.signal == signal.SIGKILL
        assert time.monotonic() - started < 5
        result = await sb.commands.run("yes")
        assert result.limit_hit == "output"
        assert result.truncated
        assert len(result.stdout) == 1 << 16
        result = await sb.commands.run(["no-such-program"])
        assert result.exit_code == 127
        assert b"no-such-program" in result.stderr
        # the box is still fine
        assert (await sb.commands.run("echo ok")).stdout == b"ok\n"


async def test_binary_and_invalid_utf8_output_is_bytes() -> None:
    async with AsyncSandbox() as sb:
        result = await sb.commands.run(
            ["python3", "-c", "import sys; sys.stdout.buffer.write(b'\\xff\\xfe\\x00abc')"]
        )
        assert result.stdout == b"\xff\xfe\x00abc"
        assert result.stdout_text == "\ufffd\ufffd\x00abc"


async def test_pty_drives_a_terminal_program() -> None:
    async with AsyncSandbox() as sb:
        term = await sb.pty.create(cols=100, rows=30, command=["/bin/sh", "-i"])
        await term.send("stty size; echo marker-$((6*7))\n")
        seen = b""
        deadline = time.monotonic() + 10
        while b"marker-42" not in seen and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                seen += await term.read(timeout_s=1)
        assert b"30 100" in seen
        assert b"marker-42" in seen
        await term.resize(cols=120, rows=40)
        await term.send("stty size\n")
        while b"40 120" not in seen and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                seen += await term.read(timeout_s=1)
        assert b"40 120" in seen
        await term.send("exit 5\n")
        assert (await term.wait()).exit_code == 5
        # the end of the terminal is b"", not a timeout
        rest = b""
        while chunk := await term.read(timeout_s=5):
            rest += chunk


async def test_paths_outside_the_workspace_are_refused() -> None:
    async with AsyncSandbox() as sb:
        for path in ("../etc/passwd", "/etc/passwd", "a/../../x", "", "a\0b"):
            with pytest.raises(PathOutsideWorkspace):
                await sb.files.read(path)
        # a symlink planted by the box: resolved inside the box, and refused
        await sb.commands.run("ln -s /etc/passwd link; ln -s .. up")
        with pytest.raises(PermissionError, match="outside the workspace"):
            await sb.files.read("link")
        with pytest.raises(PermissionError, match="outside the workspace"):
            await sb.files.write("up/evil", b"x")
        with pytest.raises(FileNotFoundError):
            await sb.files.read("missing.txt")
        with pytest.raises(IsADirectoryError):
            await sb.files.read(".")


async def test_many_commands_in_one_box_and_many_boxes() -> None:
    async with AsyncSandbox(Policy.preset("dev")) as sb:
        results = await asyncio.gather(
            *(sb.commands.run(f"echo {i}; sleep 0.2") for i in range(64))
        )
        assert sorted(int(r.stdout) for r in results) == list(range(64))

    async def one(i: int) -> bytes:
        async with AsyncSandbox() as box:
            return (await box.commands.run(f"echo {i}")).stdout

    outputs = await asyncio.gather(*(one(i) for i in range(32)))
    assert outputs == [f"{i}\n".encode() for i in range(32)]


async def _gigabytes(total: int, digest: hashlib._Hash) -> AsyncIterator[bytes]:
    block = os.urandom(1 << 20)
    for i in range(total >> 20):
        chunk = block[i % 997 :] + block[: i % 997]
        digest.update(chunk)
        yield chunk


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_two_gib_streams_both_ways_in_bounded_memory() -> None:
    size = 2 << 30
    policy = (
        Policy.preset("dev")
        .with_limits(memory_bytes=4 << 30, disk_bytes=6 << 30, file_size_bytes=4 << 30)
        .with_filesystem(tmp_bytes=64 << 20)
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with AsyncSandbox(policy, timeout_s=250) as sb:
        sent = hashlib.sha256()
        assert await sb.files.write("big.bin", _gigabytes(size, sent)) == size
        result = await sb.commands.run("sha256sum big.bin", timeout_s=120)
        assert result.stdout.split()[0].decode() == sent.hexdigest()
        got = hashlib.sha256()
        received = 0
        reader = await sb.files.open_read("big.bin")
        async with reader:
            assert reader.size == size
            async for chunk in reader:
                got.update(chunk)
                received += len(chunk)
        assert received == size
        assert got.hexdigest() == sent.hexdigest()
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert growth < 256 << 20, f"host RSS grew by {growth >> 20} MiB"


async def test_memory_limit_kills_a_command_not_the_box() -> None:
    policy = Policy.preset("default").with_limits(memory_bytes=128 << 20)
    async with AsyncSandbox(policy) as sb:
        result = await sb.commands.run(
            ["python3", "-c", "b = bytearray(1 << 30); b[::4096] = b'x' * len(b[::4096])"]
        )
        assert result.limit_hit == "memory"
        assert result.signal == signal.SIGKILL
        assert (await sb.commands.run("echo still here")).stdout == b"still here\n"


async def test_agent_killed_from_inside_breaks_pending_calls_promptly() -> None:
    async with AsyncSandbox() as sb:
        slow = asyncio.ensure_future(sb.commands.run("sleep 60"))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        # user code may kill its own box's agent: the box is then broken, never hung
        with pytest.raises(SandboxBroken):
            await sb.commands.run("kill -9 $(pgrep -f /run/corral/agent.py)")
        with pytest.raises(SandboxBroken):
            await slow
        assert time.monotonic() - started < 5
        assert not await sb.is_running()
        with pytest.raises(SandboxBroken):
            await sb.files.read("x")


async def test_agent_channel_is_not_reachable_from_user_code() -> None:
    async with AsyncSandbox() as sb:
        result = await sb.commands.run(
            "pid=$(pgrep -f /run/corral/agent.py); "
            "echo garbage > /proc/$pid/fd/1 || echo refused; "
            "cat /proc/$pid/environ >/dev/null 2>&1 || echo refused"
        )
        assert result.stdout == b"refused\nrefused\n"
        assert (await sb.commands.run("echo fine")).stdout == b"fine\n"


async def test_lifetime_timeout_and_extension() -> None:
    async with AsyncSandbox(timeout_s=1.0) as sb:
        await sb.set_timeout(3.0)
        await asyncio.sleep(1.5)
        assert (await sb.commands.run("echo alive")).stdout == b"alive\n"
        with pytest.raises(SandboxBroken, match="lifetime timeout"):
            await sb.commands.run("sleep 30", timeout_s=None)
        assert not await sb.is_running()


async def test_close_while_a_command_runs() -> None:
    sb = AsyncSandbox()
    await sb.start()
    slow = asyncio.ensure_future(sb.commands.run("sleep 60"))
    await asyncio.sleep(0.2)
    await sb.close()
    with pytest.raises(SandboxClosed):
        await slow
    with pytest.raises(SandboxClosed):
        await sb.commands.run("true")
    await sb.close()  # idempotent


def test_sync_facade() -> None:
    with Sandbox(policy="default", timeout_s=60) as sb:
        sb.files.write("in/data.csv", b"a,b\n1,2\n")
        assert sb.commands.run("wc -l in/data.csv", timeout_s=10).stdout == b"2 in/data.csv\n"
        handle = sb.commands.run("sleep 0.3; echo bg", background=True)
        events = list(sb.commands.stream("for i in 1 2 3; do echo $i; sleep 0.05; done"))
        assert [e.data for e in events if isinstance(e, CommandOutput)] == [b"1\n", b"2\n", b"3\n"]
        assert isinstance(events[-1], CommandExit)
        assert handle.wait().stdout == b"bg\n"
        sb.commands.run("head -c 3000000 /dev/urandom > big.bin")
        with sb.files.open_read("big.bin") as f:
            first = f.read(10)
            rest = f.read()
        assert len(first) + len(rest) == 3_000_000
        assert [e.name for e in sb.files.list(".")] == ["big.bin", "in"]
        term = sb.pty.create(cols=80, rows=24)
        term.send("echo via-pty\n")
        seen = b""
        deadline = time.monotonic() + 10
        while b"via-pty\r\n" not in seen and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                seen += term.read(timeout_s=1)
        assert b"via-pty\r\n" in seen
        term.kill()
        sb.set_timeout(120)
        assert sb.is_running()
    assert not sb.is_running()


async def test_a_stopped_agent_cannot_hang_a_command_past_its_timeout() -> None:
    async with AsyncSandbox(timeout_s=120) as sb:
        started = time.monotonic()
        with pytest.raises(SandboxBroken, match="did not end a timed-out command"):
            await sb.commands.run(
                "kill -STOP $(pgrep -f /run/corral/agent.py); sleep 100", timeout_s=1
            )
        assert time.monotonic() - started < 15


async def test_closing_a_reader_early_or_cancelling_keeps_the_box_usable() -> None:
    async with AsyncSandbox() as sb:
        await sb.commands.run("head -c 50000000 /dev/zero > big")
        reader = await sb.files.open_read("big")
        assert len(await reader.read(1000)) == 1000
        await reader.close()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sb.files.read("big"), 0.01)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sb.commands.run("sleep 1000"), 0.3)
        await asyncio.sleep(0.3)
        assert (await sb.commands.run("echo fine")).stdout == b"fine\n"
        # the cancelled command was killed, not left running unseen
        assert await sb.commands.list() == []


async def test_an_unread_terminal_does_not_grow_host_memory() -> None:
    async with AsyncSandbox() as sb:
        term = await sb.pty.create(command=["/bin/sh", "-c", "yes corral"])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        await asyncio.sleep(2)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert (after - before) * 1024 < 32 << 20
        assert await term.read(timeout_s=5)
        await term.kill()


async def test_failed_uploads_fail_and_leave_nothing() -> None:
    policy = Policy.preset("default").with_limits(file_size_bytes=8 << 20)
    async with AsyncSandbox(policy) as sb:
        with pytest.raises(OSError, match="too large|File too large"):
            await asyncio.wait_for(sb.files.write("big", b"x" * (32 << 20)), 30)

        async def broken_source() -> AsyncIterator[bytes]:
            yield b"x" * (1 << 20)
            raise RuntimeError("source failed")

        with pytest.raises(RuntimeError, match="source failed"):
            await sb.files.write("partial", broken_source())
        await asyncio.sleep(0.2)
        listing = (await sb.commands.run("ls -A")).stdout
        assert listing == b""
        # stdin offered to a command that has ended is refused, not hung
        handle = await sb.commands.run("true", background=True, stdin=True)
        await handle.wait()
        with pytest.raises(BrokenPipeError):
            await asyncio.wait_for(handle.send_stdin(b"x" * (8 << 20)), 10)


async def test_ordinary_inputs_never_crash_the_agent() -> None:
    async with AsyncSandbox() as sb:
        await sb.commands.run(
            "mkfifo pipe; printf 'x' > notelf; chmod +x notelf; "
            "for i in $(seq 3000); do : > f-$(printf %0120d $i); done"
        )
        entries = await sb.files.list(".")
        assert 100 < len(entries) < 3003
        with pytest.raises(OSError, match="not a regular file"):
            await asyncio.wait_for(sb.files.read("pipe"), 5)
        result = await sb.commands.run(["./notelf"])
        assert result.exit_code == 126
        with pytest.raises(FileNotFoundError):
            await sb.commands.run("ls", cwd="nope")
        handle = await sb.commands.run("sleep 5", background=True)
        with pytest.raises(ValueError, match="not a signal"):
            await handle.kill(2**40)
        term = await sb.pty.create()
        with pytest.raises(ValueError, match="between 1 and 1000"):
            await term.resize(70000, 24)
        await sb.commands.run("d=deep; for i in $(seq 1200); do mkdir $d; cd $d; done")
        await sb.files.remove("deep")
        assert not await sb.files.exists("deep")
        assert (await sb.commands.run("echo alive")).stdout == b"alive\n"


async def test_a_failing_callback_is_reported_and_does_not_stall() -> None:
    async with AsyncSandbox() as sb:

        def boom(_: bytes) -> None:
            raise ValueError("callback failed")

        started = time.monotonic()
        with pytest.raises(ValueError, match="callback failed"):
            await sb.commands.run("seq 100000", on_stdout=boom)
        assert time.monotonic() - started < 5


def test_sync_reader_iteration_keeps_buffered_bytes() -> None:
    with Sandbox() as sb:
        sb.commands.run("head -c 1048576 /dev/urandom > f")
        with sb.files.open_read("f") as reader:
            head = reader.read(10)
            rest = b"".join(reader)
        assert len(head) + len(rest) == 1 << 20


async def test_each_command_has_its_own_cpu_budget_and_the_agent_none() -> None:
    """RLIMIT_CPU on the agent would end a long-lived box once the agent itself
    had relayed enough output; each command gets the budget instead."""
    policy = Policy.preset("default").with_limits(cpu_time_s=2.0)
    async with AsyncSandbox(policy, runtime=None) as sb:
        find_agent = (
            "import os\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
            "    if b'/run/corral/agent.py' in argv:\n"
            "        print(open(f'/proc/{pid}/limits').read())\n"
        )
        agent = await sb.commands.run(["python3", "-c", find_agent])
        agent_line = next(ln for ln in agent.stdout.splitlines() if b"Max cpu time" in ln)
        assert agent_line.split()[3:5] == [b"unlimited", b"unlimited"], agent.stdout
        for _ in range(20):  # a shell forks at once: its child is limited too
            own = await sb.commands.run("grep 'Max cpu time' /proc/self/limits")
            assert own.stdout.split()[3:5] == [b"2", b"3"], own.stdout
        nested = await sb.commands.run(
            "sh -c 'python3 -c \"while True: pass\"'; echo survived", timeout_s=20
        )
        assert b"survived" in nested.stdout  # the outer shell goes on ...
        assert nested.duration_s < 10  # ... after its busy child was stopped by the limit
        spin = await sb.commands.run(["python3", "-c", "while True: pass"], timeout_s=20)
        assert spin.signal == signal.SIGXCPU
        terminal = await sb.pty.create(command=["grep", "Max cpu time", "/proc/self/limits"])
        out = b""
        while chunk := await terminal.read(timeout_s=10):
            out += chunk
        assert out.split()[3:5] == [b"2", b"3"], out
        assert await sb.is_running()


async def test_removing_a_symlink_removes_the_link_not_its_target() -> None:
    async with AsyncSandbox(runtime=None) as sb:
        setup = (
            "echo keep > /tmp/target && mkdir -p /tmp/dir && echo keep > /tmp/dir/inner"
            " && ln -s /tmp/target out && ln -s /tmp/dir outdir && ln -s /nowhere dangling"
            " && mkdir sub && ln -s ../../tmp/target sub/rel && echo keep > here && ln -s here in"
        )
        assert (await sb.commands.run(setup)).exit_code == 0
        for link in ("out", "outdir", "dangling", "sub/rel", "in"):
            await sb.files.remove(link)
            assert not await sb.files.exists(link), link
        # every target survives, inside the workspace and out of it
        check = "cat /tmp/target /tmp/dir/inner here"
        assert (await sb.commands.run(check)).stdout == b"keep\nkeep\nkeep\n"
        # a path through a symlinked directory still cannot reach outside
        assert (await sb.commands.run("ln -s /tmp/dir via")).exit_code == 0
        with pytest.raises(PermissionError, match="outside the workspace"):
            await sb.files.remove("via/inner")
        assert (await sb.commands.run("cat /tmp/dir/inner")).stdout == b"keep\n"


# A fork+setsid+exec chain and a double fork: the descendants leave the
# command's session and process group, and the double-forked one its parent.
_ESCAPES = (
    "import os, sys, time\n"
    "tag = sys.argv[1]\n"
    "if os.fork() == 0:\n"
    "    os.setsid(); os.execvp('sleep', ['sleep', tag + '1'])\n"
    "if os.fork() == 0:\n"
    "    if os.fork() == 0:\n"
    "        os.setsid(); os.execvp('sleep', ['sleep', tag + '2'])\n"
    "    os._exit(0)\n"
    "print('started', flush=True)\n"
)


async def _escapees(sb: AsyncSandbox, tag: str) -> list[str]:
    """Live (not zombie) processes in the box whose argv names ``tag``, seen
    from inside the box, independently of commands.list()."""
    scan = (
        "import os, sys\n"
        "for p in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        state = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0]\n"
        "        argv = open(f'/proc/{p}/cmdline').read().split('\\0')\n"
        "    except OSError: continue\n"
        "    if state != 'Z' and argv[0] == 'sleep' and argv[1].startswith(sys.argv[1]):\n"
        "        print(argv[1])\n"
    )
    for _ in range(50):  # SIGKILL is delivered at once; reaping takes a moment
        found = (await sb.commands.run(["python3", "-c", scan, tag])).stdout_text.split()
        if not found:
            return []
        await asyncio.sleep(0.02)
    return found


@pytest.mark.parametrize("how", ["timeout", "handle.kill", "commands.kill", "cancel", "stream"])
async def test_killing_a_command_ends_everything_it_started(how: str) -> None:
    tag = f"{4000 + len(how)}"
    command = ["/bin/sh", "-c", f'python3 -c "$0" {tag}; sleep 300', _ESCAPES]
    async with AsyncSandbox(runtime=None) as sb:
        if how == "timeout":
            result = await sb.commands.run(command, timeout_s=1)
            assert result.limit_hit == "timeout"
        elif how == "stream":
            async for event in sb.commands.stream(command):
                assert isinstance(event, CommandOutput)
                break  # leaving early kills the command
        elif how == "cancel":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sb.commands.run(command), 1)
        else:
            handle = await sb.commands.run(command, background=True, on_stdout=lambda _: None)
            while b"started" not in handle.stdout:
                await asyncio.sleep(0.02)
            assert sorted(await _escapees(sb, tag)) == [f"{tag}1", f"{tag}2"]
            if how == "handle.kill":
                await handle.kill()
            else:
                assert await sb.commands.kill(handle.pid or 0)
            assert (await handle.wait()).signal == signal.SIGKILL
        assert await _escapees(sb, tag) == []
        assert await sb.commands.list() == []


async def test_list_shows_what_a_finished_command_left_running() -> None:
    async with AsyncSandbox(runtime=None) as sb:
        result = await sb.commands.run(["python3", "-c", _ESCAPES, "4100"])
        assert result.stdout == b"started\n"
        # the command ended by itself: what it left runs on, and is listed
        left = await sb.commands.list()
        assert sorted(p.argv for p in left) == [("sleep", "41001"), ("sleep", "41002")]
        for process in left:
            assert await sb.commands.kill(process.pid)
        assert await _escapees(sb, "4100") == []
        assert await sb.commands.list() == []
        assert not await sb.commands.kill(left[0].pid)


async def test_every_task_a_sandbox_starts_has_ended_when_close_returns() -> None:
    """A watchdog, a box watcher or a housekeeping task left running after
    close() holds the sandbox (and its buffers) and keeps ticking."""
    before = set(asyncio.all_tasks())
    sb = AsyncSandbox(runtime=None, timeout_s=60)
    await sb.start()
    try:
        await sb.commands.run("sleep 30", background=True)
        term = await sb.pty.create()
        await term.send("sleep 30\n")
        slow = asyncio.ensure_future(sb.commands.run("sleep 30"))
        await asyncio.sleep(0.05)
    finally:
        await sb.close()
    left = set(asyncio.all_tasks()) - before - {slow}  # the caller's own task aside
    await asyncio.gather(slow, return_exceptions=True)
    assert left == set()
