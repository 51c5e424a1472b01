"""Nothing is left behind: processes, cgroups, mounts, fds, temp files."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest

import corral
from corral import Policy
from corral.backends.linux._cgroups import leftover_cgroups, sweep_orphans
from corral.backends.linux._identity import DEFAULT_RANGE

from .conftest import py


def _box_uid_processes() -> list[str]:
    """Processes running as a box uid that are ours: below this process, or orphans.

    A zombie whose parent is the host's pid 1 is left out: bwrap's monitor exits
    as soon as the box's init reports the command's status, so the init, dying
    a moment later, is always reaped by the host's init (at once under systemd,
    late under some container inits). Live boxes of another corral process on
    the same host are left out too (their bwrap's parent is that process).
    """
    found = []
    parents = _parents()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[0])
        zombie_of_init = fields["State"].strip().startswith("Z") and fields["PPid"].strip() == "1"
        if not DEFAULT_RANGE[0] <= uid <= DEFAULT_RANGE[1] or zombie_of_init:
            continue
        if _descends_from_us(int(entry.name), parents) or fields["PPid"].strip() == "1":
            found.append(f"{entry.name} uid={uid} state={fields['State'].strip()}")
    return found


def _parents() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_bytes()
                out[int(entry.name)] = int(stat.rsplit(b")", 1)[1].split()[1])
    return out


def _descends_from_us(pid: int, parents: dict[int, int]) -> bool:
    me = os.getpid()
    for _ in range(64):
        pid = parents.get(pid, 0)
        if pid == me:
            return True
        if pid <= 1:
            return False
    return False


def _theirs(text: str) -> bool:
    """Made by a server another test session runs on this host at the same time."""
    if "corral-test-serve-" in text:
        return True
    match = re.search(r"/box-(\d+)-", text)
    return match is not None and int(match[1]) != os.getpid() and Path(f"/proc/{match[1]}").exists()


def _snapshot() -> dict[str, object]:
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return {
        "fds": sorted(os.listdir("/proc/self/fd")),
        "mounts": len([line for line in mounts if not _theirs(line)]),
        "tmp": sorted(
            p.name for p in Path("/tmp").iterdir() if "corral" in p.name and not _theirs(p.name)
        ),
        "cgroups": [c for c in leftover_cgroups() if f"/box-{os.getpid()}-" in c],
        "box_processes": _box_uid_processes(),
    }


async def _many() -> list[corral.RunResult]:
    quick = Policy.preset("default").with_limits(wall_time_s=0.5, memory_bytes=32 << 20)
    jobs = []
    for i in range(24):
        kind = i % 4
        if kind == 0:
            cmd = ["/bin/true"]
        elif kind == 1:  # killed at the wall limit, with a daemon
            cmd = ["/bin/sh", "-c", "setsid sleep 500 & sleep 500"]
        elif kind == 2:  # killed by the memory limit
            cmd = py("b = bytearray(1 << 28); b[::4096] = b'x' * len(b[::4096])")
        else:  # output flood
            cmd = ["/bin/sh", "-c", "yes"]
        jobs.append(corral.run_async(cmd, policy=quick.with_limits(output_bytes=1 << 16)))
    return await asyncio.gather(*jobs)


def test_nothing_is_left_after_many_boxes() -> None:
    corral.run(["/bin/true"])  # warm caches (seccomp program, lock file) before the snapshot
    before = _snapshot()
    results = asyncio.run(_many())
    kinds = [r.limit_hit for r in results]
    assert kinds.count("timeout") >= 6
    assert kinds.count("output") >= 6
    assert _snapshot() == before


async def _cancel_after(delay_s: float, marker: str) -> None:
    task = asyncio.create_task(
        corral.run_async(["/bin/sh", "-c", f"setsid sleep {marker} & sleep {marker}"])
    )
    await asyncio.sleep(delay_s)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_cancelling_at_any_moment_leaves_no_box() -> None:
    """A run cancelled while bwrap is still setting up must not let the box run on."""
    marker = f"4242{os.getpid() % 1000}"
    for delay_ms in (0, 1, 2, 3, 5, 8, 12, 20, 40):
        asyncio.run(_cancel_after(delay_ms / 1000, marker))
    time.sleep(0.5)  # a box that escaped would have started its sleeps by now
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert [line for line in ps.stdout.splitlines() if f"sleep {marker}" in line] == []
    assert _box_uid_processes() == []
    assert [c for c in leftover_cgroups() if f"/box-{os.getpid()}-" in c] == []


def test_a_killed_owner_takes_its_box_along() -> None:
    """kill -9 of the corral process: the box dies too, and the next corral sweeps its cgroup."""
    marker = f"4343{os.getpid() % 1000}"
    owner = subprocess.Popen(
        [sys.executable, "-c", f"import corral; corral.run(['/bin/sh', '-c', 'sleep {marker}'])"]
    )
    deadline = time.monotonic() + 10
    while not _matching(f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _matching(f"sleep {marker}"), "the box never started"
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 5
    while _matching(f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _matching(f"sleep {marker}") == []
    swept = sweep_orphans()
    assert any(name.startswith(f"box-{owner.pid}-") for name in swept), swept
    assert not [p for p in leftover_cgroups() if f"box-{owner.pid}-" in p]


def _matching(command: str) -> list[str]:
    """Processes running exactly ``command`` (directly or as ``sh -c``), not merely
    mentioning it, as the owner's own ``python -c`` line does."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    wanted = {command, f"/bin/sh -c {command}"}
    return [line for line in ps.stdout.splitlines() if line.strip() in wanted]


async def _open_and_close(i: int) -> None:
    sb = corral.AsyncSandbox(timeout_s=60)
    await sb.start()
    try:
        if i % 3 == 0:  # closed while a command still runs
            slow = asyncio.ensure_future(sb.commands.run("sleep 30"))
            bg = await sb.commands.run("setsid sleep 30", background=True)
            del bg
            await asyncio.sleep(0.01)
            await sb.close()
            with contextlib.suppress(corral.SandboxClosed):
                await slow
        elif i % 3 == 1:
            await sb.files.write("f", b"x" * 1000)
            assert (await sb.commands.run("cat f")).stdout == b"x" * 1000
        else:
            term = await sb.pty.create()
            await term.send("sleep 30\n")
    finally:
        await sb.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_200_sandboxes_leave_nothing_behind() -> None:
    asyncio.run(_open_and_close(1))  # warm-up
    before = _snapshot()

    async def all_of_them() -> None:
        for start in range(0, 200, 20):
            await asyncio.gather(*(_open_and_close(i) for i in range(start, start + 20)))

    asyncio.run(all_of_them())
    assert _snapshot() == before


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(300)
def test_closed_async_sandboxes_are_freed() -> None:
    """Everything a sandbox starts ends with it: no object, task or fd survives
    a few hundred create/close cycles, and memory stays flat."""

    async def cycles(n: int) -> list[weakref.ref[corral.AsyncSandbox]]:
        refs = []
        for i in range(n):
            async with corral.AsyncSandbox(runtime=None) as sb:
                if i % 2:
                    await sb.commands.run("true")
            refs.append(weakref.ref(sb))
            del sb
        return refs

    async def main() -> None:
        await cycles(5)  # warm-up: caches, the allocator's arenas
        await asyncio.sleep(0.01)  # cancelled tasks run their last step
        gc.collect()
        fds, tasks, rss = _fds(), len(asyncio.all_tasks()), _rss_bytes()
        refs = await cycles(200)
        await asyncio.sleep(0.01)
        gc.collect()
        assert [r for r in refs if r() is not None] == []
        assert len(asyncio.all_tasks()) == tasks, asyncio.all_tasks()
        # none opened and kept (another test's threads may have closed some of theirs)
        after = _fds()
        assert sorted(set(after) - set(fds)) == [], (fds, after)
        assert len(after) <= len(fds), (fds, after)
        # before the fix each box kept its 4 MiB read buffer: 800 MiB here
        assert _rss_bytes() - rss < 64 << 20

    asyncio.run(main())


@pytest.mark.timeout(300)
def test_closed_sync_sandboxes_are_freed() -> None:
    """The same through the sync facade, whose portal loop outlives every box."""
    from corral._portal import _Portal
    from corral.abc import AsyncSandboxAPI

    def cycles(n: int) -> list[weakref.ref[AsyncSandboxAPI]]:
        refs = []
        for _ in range(n):
            with corral.Sandbox(runtime=None) as sb:
                pass
            refs.append(weakref.ref(sb._async))
            del sb
        return refs

    def portal_tasks() -> int:
        loop = _Portal.loop()

        async def count() -> int:
            await asyncio.sleep(0.01)  # cancelled tasks run their last step
            return len(asyncio.all_tasks()) - 1  # this one

        return asyncio.run_coroutine_threadsafe(count(), loop).result()

    cycles(5)
    gc.collect()
    fds, tasks, rss = _fds(), portal_tasks(), _rss_bytes()
    refs = cycles(100)
    tasks_after = portal_tasks()
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    assert tasks_after == tasks
    assert _fds() == fds
    assert _rss_bytes() - rss < 64 << 20
