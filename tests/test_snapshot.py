"""Workspace snapshots and fork: files come back whole, forks are independent,
a snapshot outlives its maker (kill -9), a hostile archive reaches only its box."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from corral import AsyncSandbox, SandboxError, Snapshot

# the import makes the four-surface fixture (and its server) available here
from .test_surfaces import OpenSandbox, api_key, open_sandbox, server  # noqa: F401


async def test_snapshot_and_fork(tmp_path: Path) -> None:
    async with AsyncSandbox() as sb:
        await sb.files.write("a.txt", b"alpha")
        await sb.files.write("dir/deep/b.bin", bytes(range(256)) * 100)
        await sb.commands.run("chmod 755 dir/deep/b.bin && ln -s a.txt link")
        snap = await sb.snapshot(tmp_path / "snap")
        assert not snap.processes  # process state: not on this host (see design.md)
        assert snap.workspace_bytes > 25_600
        assert oct(os.stat(snap.path).st_mode & 0o777) == "0o700"
        assert not [e for e in await sb.files.list(".") if e.name.startswith(".corral")]
    fork1 = await AsyncSandbox.from_snapshot(snap.path)
    fork2 = await AsyncSandbox.from_snapshot(Snapshot.load(snap.path))
    try:
        assert await fork1.files.read("a.txt") == b"alpha"
        assert await fork1.files.read("dir/deep/b.bin") == bytes(range(256)) * 100
        listing = await fork1.commands.run("stat -c '%A %n' dir/deep/b.bin; readlink link")
        assert listing.stdout == b"-rwxr-xr-x dir/deep/b.bin\na.txt\n"
        await fork1.files.write("a.txt", b"changed in fork 1")
        assert await fork2.files.read("a.txt") == b"alpha"  # independent copies
        assert fork1.policy == snap.policy
    finally:
        await fork1.close()
        await fork2.close()


def test_a_snapshot_outlives_its_maker_killed(tmp_path: Path) -> None:
    maker = (
        "import asyncio, sys\n"
        "from corral import AsyncSandbox\n"
        "async def main():\n"
        "    sb = AsyncSandbox(); await sb.start()\n"
        "    await sb.files.write('kept.txt', b'survives')\n"
        "    await sb.snapshot(sys.argv[1]); print('done', flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-c", maker, str(tmp_path / "s")], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"done\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()

    async def restore() -> bytes:
        async with AsyncSandbox() as sb:
            await sb.restore(tmp_path / "s")
            return await sb.files.read("kept.txt")

    assert asyncio.run(restore()) == b"survives"


async def test_a_hostile_archive_reaches_only_its_box(tmp_path: Path) -> None:
    # an archive a box could have made: names that climb out, an absolute path,
    # a symlink to a host directory and a file written through it
    target = tmp_path / "host-target"
    target.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("../../../../" + str(target / "climbed"), str(target / "absolute")):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"owned"))
        link = tarfile.TarInfo("out")
        link.type, link.linkname = tarfile.SYMTYPE, str(target)
        tar.addfile(link)
        through = tarfile.TarInfo("out/through")
        through.size = 5
        tar.addfile(through, io.BytesIO(b"owned"))
    snap_dir = tmp_path / "hostile"
    snap_dir.mkdir()
    (snap_dir / "workspace.tar").write_bytes(buffer.getvalue())
    (snap_dir / "snapshot.json").write_text(
        json.dumps(
            {"format": 1, "sandbox_id": "x", "policy": {}, "created_at": 0, "processes": False}
        )
    )
    async with AsyncSandbox() as sb:
        with pytest.raises(SandboxError):  # tar refuses some members and says so
            await sb.restore(snap_dir)
    assert list(target.iterdir()) == []  # the host never saw a byte of it


async def test_not_a_snapshot(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="not a corral snapshot"):
        Snapshot.load(tmp_path)
    async with AsyncSandbox() as sb:
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        with pytest.raises(SandboxError, match="empty directory"):
            await sb.snapshot(tmp_path / "full")


async def test_snapshot_on_every_surface(open_sandbox: OpenSandbox, tmp_path: Path) -> None:  # noqa: F811
    async with open_sandbox() as sb:
        await sb.files.write("f.txt", b"across")
        snap = await sb.snapshot(tmp_path / "snap")
    async with open_sandbox() as sb2:
        await sb2.restore(snap)
        assert await sb2.files.read("f.txt") == b"across"
