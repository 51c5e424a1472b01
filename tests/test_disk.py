"""The workspace's disk bound and write access, attacked from inside the box (root only).

A fresh workspace of corral's own (a server's) is backed by a per-box image:
writing past its share of disk_bytes fails with ENOSPC at the bound. A
directory the caller hands in is reached through an idmapped mount: the box
(a fresh host uid) can write it, and what it leaves belongs to the caller.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral import AsyncSandbox, Policy
from corral.backends.bwrap import BwrapBox
from corral.backends.linux import _workdir
from tests.conftest import unprivileged_user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="per-box uids and images need root")

MIB = 1 << 20


def _others(text: str) -> bool:
    """A box of another live corral process on this host (a server another
    test session runs): not this test's leftover."""
    if "/corral-test-serve-" in text:  # a server test's workspace, mounted by its server
        return True
    if "/corral-dockerd-" in text:  # the docker backend tests' own daemon (tests/_dockerd.py)
        return True
    if "/corral-k8s" in text:  # the test Kubernetes cluster: its netns name, its kubelet
        return True
    match = re.search(r"box-(\d+)-", text)
    if match is None or int(match[1]) == os.getpid():
        return False
    return os.path.exists(f"/proc/{match[1]}")


def _leftovers() -> list[str]:
    found = []
    for top in (_workdir.MOUNT_DIR, _workdir.IMAGE_DIR):
        if os.path.isdir(top):
            found += [f"{top}/{name}" for name in os.listdir(top)]
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        found += [line for line in f if "corral" in line.split()[4]]
    return [item for item in found if not _others(item)]


@pytest.fixture
def fresh_workspace() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="corral-test-disk-"))
    workspace = top / "ws"
    workspace.mkdir(mode=0o700)
    try:
        yield workspace
    finally:
        # rm -rf, not shutil.rmtree: a box may leave a tree deeper than Python recurses
        subprocess.run(["rm", "-rf", "--", str(top)], check=True)


def _disk_policy(disk_mib: int) -> Policy:
    policy = Policy.preset("default")
    return Policy.from_dict(
        {
            **policy.to_dict(),
            "limits": {**policy.to_dict()["limits"], "disk_bytes": disk_mib * MIB},
            "filesystem": {**policy.to_dict()["filesystem"], "tmp_bytes": 16 * MIB},
        }
    )


async def test_fresh_workspace_stops_at_its_bound_and_stays_a_host_dir(
    fresh_workspace: Path,
) -> None:
    policy = _disk_policy(96)  # the workspace's share: 96 - 2 * 16 = 64 MiB
    share = policy.workspace_bytes
    assert share == 64 * MIB
    sb = AsyncSandbox(policy, runtime=None)
    sb._workdir = fresh_workspace
    sb._own_workdir = True  # as corral serve does
    await sb.start()
    try:
        assert not any("disk_bytes" in note for note in sb.degraded)
        # several files, each under file_size_bytes: only a total bound stops this
        result = await sb.commands.run(
            "for i in 1 2 3 4 5 6; do dd if=/dev/zero of=f$i bs=1M count=40 2>>err || break; done; "
            "cat err; du -sk . | cut -f1"
        )
        out = result.stdout.decode()
        assert "No space left on device" in out
        written = int(out.split()[-1]) * 1024
        assert share // 2 < written <= share
        # the host reads the live workspace at its usual path
        assert (fresh_workspace / "f1").stat().st_size == 40 * MIB
        box = sb._box
        assert isinstance(box, BwrapBox)  # the image is this backend's
        assert box.workdir is not None
        assert box.workdir.disk_limit_hit()
    finally:
        await sb.close()
    # after the box: a plain host directory holding what the box wrote
    assert not os.path.ismount(fresh_workspace)
    assert (fresh_workspace / "f1").stat().st_size == 40 * MIB
    assert _leftovers() == []


async def test_a_planted_symlink_is_copied_as_a_link(fresh_workspace: Path) -> None:
    sb = AsyncSandbox(_disk_policy(96), runtime=None)
    sb._workdir = fresh_workspace
    sb._own_workdir = True
    await sb.start()
    try:
        await sb.commands.run("ln -s /etc/shadow shadow; mkdir d; ln -s / d/root")
    finally:
        await sb.close()
    assert os.readlink(fresh_workspace / "shadow") == "/etc/shadow"
    assert os.readlink(fresh_workspace / "d" / "root") == "/"


def test_a_handed_in_workdir_says_it_is_bounded_per_file_only(tmp_path: Path) -> None:
    result = corral.run(["true"], policy=_disk_policy(96), workdir=tmp_path)
    assert any("disk_bytes" in note and "not bounded in total" in note for note in result.degraded)


def test_a_killed_owner_leaves_nothing_the_next_corral_does_not_sweep(
    fresh_workspace: Path,
) -> None:
    """kill -9 of the corral process mid-run: its mounts, loop device and image
    are undone by the next sweep, and the workspace's content is copied out."""
    code = (
        "import asyncio, os, sys\n"
        "from corral import AsyncSandbox, Policy\n"
        "async def main():\n"
        "    sb = AsyncSandbox('default', runtime=None)\n"
        f"    sb._workdir = {str(fresh_workspace)!r}; sb._own_workdir = True\n"
        "    await sb.start()\n"
        "    await sb.commands.run('echo kept > kept')\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(corral.__file__).parent.parent)}
    with subprocess.Popen(
        [shutil.which("python3") or "python3", "-c", code], stdout=subprocess.PIPE, env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            assert _leftovers() != []
        finally:
            proc.kill()
    swept = _workdir.sweep_orphans()
    assert len(swept) == 1
    assert _leftovers() == []
    assert (fresh_workspace / "kept").read_text() == "kept\n"


# -- item 12: a workdir the caller hands in is writable by the box -------------------------


def test_the_box_writes_the_callers_workdir_and_the_caller_keeps_the_files() -> None:
    user = unprivileged_user()
    if user is None:
        pytest.skip("no user corral-test: run scripts/setup.sh")
    top = Path(tempfile.mkdtemp(prefix="corral-test-wd-"))
    os.chmod(top, 0o755)
    workdir = top / "project"
    workdir.mkdir(mode=0o755)
    os.chown(workdir, user.pw_uid, user.pw_gid)
    try:
        first = corral.run(
            ["sh", "-c", "echo one > made; mkdir sub; echo x > sub/f"], workdir=workdir
        )
        assert first.exit_code == 0, first.stderr_text
        # what the box made belongs to the directory's owner, not the box's uid
        for path in (workdir / "made", workdir / "sub", workdir / "sub" / "f"):
            st = path.stat()
            assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid)
        # a second box (another host uid) changes and removes the first one's files
        second = corral.run(["sh", "-c", "echo two >> made; rm sub/f; rmdir sub"], workdir=workdir)
        assert second.exit_code == 0, second.stderr_text
        assert (workdir / "made").read_text() == "one\ntwo\n"
        assert not (workdir / "sub").exists()
        # and the caller (the owner, unprivileged) reads and removes them
        subprocess.run(
            [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
                "sh",
                "-c",
                f"cat {workdir}/made >/dev/null && rm {workdir}/made",
            ],
            check=True,
        )
        assert os.listdir(workdir) == []
    finally:
        shutil.rmtree(top)
    assert _leftovers() == []


def test_only_the_owners_files_are_writable_through_the_mapping(tmp_path: Path) -> None:
    """A file of another host user in the workdir stays read-only to the box."""
    user = unprivileged_user()
    if user is None:
        pytest.skip("no user corral-test: run scripts/setup.sh")
    other = tmp_path / "other"
    other.write_text("theirs\n")
    other.chmod(0o644)
    os.chown(other, user.pw_uid, user.pw_gid)
    result = corral.run(["sh", "-c", "echo mine > other"], workdir=tmp_path)
    assert result.exit_code != 0
    assert "Permission denied" in result.stderr_text
    assert other.read_text() == "theirs\n"


async def test_what_the_box_leaves_cannot_grow_on_the_way_out(fresh_workspace: Path) -> None:
    """The copy out of the image is no way around the bound: a sparse file larger than the image
    file stays sparse on the host, and a tree nested past PATH_MAX (which cp
    cannot copy) loses only that tree, never the teardown: no mount, image or
    loop device is left, and the rest of the workspace is kept."""
    sb = AsyncSandbox(_disk_policy(96), runtime=None)
    sb._workdir = fresh_workspace
    sb._own_workdir = True
    await sb.start()
    try:
        deep = "import os\nfor _ in range(2500):\n    os.mkdir('d'); os.chdir('d')\n"
        made = await sb.commands.run(
            f'truncate -s 200M sparse && echo kept > kept && python3 -c "{deep}"'
        )
        assert made.exit_code == 0, made.stderr
    finally:
        await sb.close()
    sparse = fresh_workspace / "sparse"
    assert sparse.stat().st_size == 200 * MIB  # over the 64 MiB image
    assert sparse.stat().st_blocks * 512 < MIB
    assert (fresh_workspace / "kept").read_text() == "kept\n"
    assert _leftovers() == []
