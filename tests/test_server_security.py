"""``corral serve`` attacked from a box and from another local user: the host's
walks of a workspace never follow what the box plants, the database is private
to the server's user, and the per-key disk quota counts retained workspaces."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral import Client, Policy, RemoteError, Sandbox
from corral.server._workspace import _MAX_DEPTH, _UPLOAD_PREFIX, _usage, walk_beneath

from .conftest import SYSTEM_PYTHON, unprivileged_user
from .server_helpers import CORRAL, serving

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the server tests run as root here")

_RENAME_EXCHANGE = 2
_PAIRS = 16  # directories the box keeps swapping with symlinks: one lost race is enough
_SECRET_BYTES = 64 << 20


@pytest.fixture
def secret_dir() -> Iterator[Path]:
    """A 0700 host directory (root's) holding 64 MiB of real blocks and a file
    named like an upload temp: what a box must not make the server count or remove."""
    top = Path(tempfile.mkdtemp(prefix="corral-test-secret-"))
    top.chmod(0o700)
    fd = os.open(top / "big", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, _SECRET_BYTES)
    finally:
        os.close(fd)
    (top / f"{_UPLOAD_PREFIX}victim").write_bytes(b"x")
    try:
        yield top
    finally:
        shutil.rmtree(top)


def _workspace(root: Path, target: Path) -> None:
    """Many small entries (they widen the window between a walker's look at
    a name and its use of it) and pairs ``dN`` (directory) / ``lN -> target``."""
    for i in range(2000):
        (root / f"f{i}").write_bytes(b"")
    for i in range(_PAIRS):
        (root / f"d{i}").mkdir()
        (root / f"d{i}" / "inner").write_bytes(b"y")
        os.symlink(target, root / f"l{i}")


def _exchange(root: Path, a: str, b: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, str(root / a).encode(), -100, str(root / b).encode(), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- the walker, on a real filesystem ---------------------------------------------------


def test_the_walker_never_enters_a_symlink_swapped_in_after_it_looked(
    tmp_path: Path, secret_dir: Path
) -> None:
    """Deterministic: the walk is paused right after it saw ``d0`` as a
    directory, ``d0`` becomes a symlink to the secret directory, the walk goes on."""
    _workspace(tmp_path, secret_dir)
    walk = walk_beneath(tmp_path)
    names = []
    for _fd, name, _st in walk:
        names.append(name)
        if name == "d0":
            _exchange(tmp_path, "d0", "l0")  # d0 is now the symlink
    assert "big" not in names
    assert f"{_UPLOAD_PREFIX}victim" not in names
    assert names.count("inner") == _PAIRS - 1  # l0, now the directory, was seen as a link


def test_usage_and_sealing_do_not_follow_a_racing_swap(tmp_path: Path, secret_dir: Path) -> None:
    """A thread swaps every dN with lN as fast as it can while the server's
    walks run: none counts the secret's 64 MiB or removes its upload-named file."""
    _workspace(tmp_path, secret_dir)
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            for i in range(_PAIRS):
                _exchange(tmp_path, f"d{i}", f"l{i}")

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        sizes = [_usage(tmp_path, 1 << 62, 1 << 30).bytes for _ in range(40)]
        sizes += [_usage(tmp_path, 1 << 62, 1 << 30, remove_temps=True).bytes for _ in range(10)]
    finally:
        stop.set()
        swapper.join()
    assert max(sizes) < _SECRET_BYTES, f"the walk counted the secret directory: {max(sizes)}"
    assert (secret_dir / f"{_UPLOAD_PREFIX}victim").exists()


def test_a_tree_deeper_than_the_walker_goes_is_reported(tmp_path: Path) -> None:
    """Each level holds an fd while walking: past _MAX_DEPTH the walk says so
    (the reaper ends the box) rather than leave the rest uncounted."""
    path = tmp_path
    for _ in range(_MAX_DEPTH + 5):
        path = path / "d"
        path.mkdir()
    assert _usage(tmp_path, 1 << 62, 1 << 30).too_deep
    assert not _usage(tmp_path.joinpath(*["d"] * 10), 1 << 62, 1 << 30).too_deep


# -- end to end: a box attacks the server's disk check ------------------------------------

_SWAPPER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
target, pairs = sys.argv[1], int(sys.argv[2])
for i in range(2000):
    open(f"f{i}", "w").close()
for i in range(pairs):
    os.mkdir(f"d{i}")
    os.symlink(target, f"l{i}")
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    for i in range(pairs):
        libc.renameat2(-100, f"d{i}".encode(), -100, f"l{i}".encode(), 2)
"""


def test_a_box_swapping_dirs_for_symlinks_cannot_make_the_server_count_a_host_dir(
    secret_dir: Path,
) -> None:
    """Over four of the reaper's disk checks the box keeps swapping its
    directories with symlinks to a 64 MiB host directory; its limit is 32 MiB.
    Were the check to follow one, the box would end with limit ``disk`` (and
    its end would tell the box's owner that the host directory is big)."""
    policy = _limit(32 << 20)
    with serving() as server, Client(server.url, api_key=server.key("swap")) as client:
        with client.sandbox(policy=policy, timeout_s=120) as sb:
            sb.files.write("swap.py", _SWAPPER.encode())
            result = sb.commands.run(
                [SYSTEM_PYTHON, "swap.py", str(secret_dir), str(_PAIRS), "9"], timeout_s=60
            )
            assert result.exit_code == 0, result.stderr
            info = client.get(sb.id)
            assert info.state == "running", (info.end_reason, info.limit_hit, info.end_detail)
        assert (secret_dir / f"{_UPLOAD_PREFIX}victim").exists()


# -- the database is the server user's alone ---------------------------------------------


def _read_as_user(path: Path) -> subprocess.CompletedProcess[str]:
    user = unprivileged_user()
    assert user is not None
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            "--",
            SYSTEM_PYTHON,
            "-c",
            "import sys; print(len(open(sys.argv[1], 'rb').read()))",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.skipif(unprivileged_user() is None, reason="needs the user corral-test")
def test_another_local_user_cannot_read_the_database() -> None:
    """A tenant's policy env (its API token) and the audit log live in
    corral.db and its -wal/-shm: an ordinary user of the host reads none."""
    with serving() as server, Client(server.url, api_key=server.key("db")) as client:
        with client.sandbox(env={"TOKEN": "sk-tenant-secret"}, timeout_s=60) as sb:
            sb.commands.run(["true"])
        files = [server.data_dir / n for n in ("corral.db", "corral.db-wal", "corral.db-shm")]
        present = [f for f in files if f.exists()]
        assert server.data_dir / "corral.db" in present
        for path in present:
            mode = path.stat().st_mode & 0o777
            assert mode == 0o600, f"{path.name}: {mode:o}"
            denied = _read_as_user(path)
            assert denied.returncode != 0, f"corral-test read {path.name}"
            assert "PermissionError" in denied.stderr


def test_a_readable_database_is_repaired_at_start_with_a_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = data / "corral.db"
    old = os.umask(0o022)
    try:
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE t (x)")
    finally:
        os.umask(old)
    db.chmod(0o644)
    out = subprocess.run(
        [*CORRAL, "keys", "list", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "was readable by other users (mode 644)" in out.stderr
    assert db.stat().st_mode & 0o777 == 0o600


# -- start-up failures: one line -----------------------------------------------------------


def _serve_as(src: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """``corral serve`` as root, or (``src``: a copy of the package it can
    read) as the user corral-test, with the test's interpreter (it has uvicorn)."""
    argv = [*CORRAL, "serve", "--log-level", "warning", *args]
    env = dict(os.environ)
    if src is not None:
        pw = unprivileged_user()
        assert pw is not None
        argv = [
            "setpriv",
            f"--reuid={pw.pw_uid}",
            f"--regid={pw.pw_gid}",
            "--clear-groups",
            "--",
            sys.executable,
            "-m",
            "corral._cli",
            "serve",
            *args,
        ]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(src), "HOME": "/nonexistent"}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, env=env, cwd="/"
    )


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("corral: ")
    return lines[0]


def test_serve_on_a_port_in_use_says_so_in_one_line() -> None:
    with serving() as server:
        data = server.data_dir.parent / "other"
        line = _one_line(_serve_as(None, "--port", str(server.port), "--data-dir", str(data)))
    assert f"cannot listen on 127.0.0.1:{server.port}" in line
    assert "in use" in line


def test_serve_in_a_data_dir_it_cannot_use_says_so_in_one_line(world_readable_src: Path) -> None:
    """As an ordinary user: a 0700 directory of root's it cannot enter, and one
    it can enter but not write."""
    if unprivileged_user() is None:
        pytest.skip("needs the user corral-test")
    top = Path(tempfile.mkdtemp(prefix="corral-test-datadir-"))
    try:
        top.chmod(0o755)
        closed = top / "closed"
        closed.mkdir(mode=0o700)
        line = _one_line(
            _serve_as(world_readable_src, "--port", "0", "--data-dir", str(closed / "data"))
        )
        assert "cannot use the data directory" in line
        assert "Permission denied" in line
        readonly = top / "readonly"
        readonly.mkdir(mode=0o755)
        line = _one_line(_serve_as(world_readable_src, "--port", "0", "--data-dir", str(readonly)))
        assert "cannot use the data directory" in line
        assert "Permission denied" in line
    finally:
        shutil.rmtree(top)


# -- the per-key disk quota counts retained workspaces -------------------------------------


def _limit(disk_bytes: int) -> Policy:
    return Policy.from_dict(
        {"name": "q", "limits": {"disk_bytes": disk_bytes}, "filesystem": {"tmp_bytes": 4 << 20}}
    )


def _started(client: Client, policy: Policy) -> Sandbox:
    sb = client.sandbox(policy, timeout_s=60)
    sb.start()
    return sb


_FILL = "import os; os.posix_fallocate(os.open('f', os.O_CREAT | os.O_WRONLY), 0, 60 << 20)"


def test_retained_workspaces_count_against_the_keys_disk_quota() -> None:
    """Running sandboxes reserve their disk limit, ended ones count their
    retained workspace until it is purged (or deleted through the API)."""
    with serving() as server:
        token = server.key("q", "--max-disk", "200M")
        with Client(server.url, api_key=token) as c:
            with pytest.raises(RemoteError) as too_big:
                _started(c, _limit(300 << 20))
            assert (too_big.value.status, too_big.value.code) == (403, "quota_forbidden")
            first = _started(c, _limit(100 << 20))
            # 60 MiB of real blocks, kept after the end for the retention period
            assert first.commands.run([SYSTEM_PYTHON, "-c", _FILL]).exit_code == 0
            second = _started(c, _limit(100 << 20))
            with pytest.raises(RemoteError) as running_full:
                _started(c, _limit(10 << 20))
            assert (running_full.value.status, running_full.value.code) == (429, "quota_exceeded")
            first.close()
            second.close()
            # 60 MiB retained + 150 MiB asked > 200 MiB; 60 + 100 fits
            with pytest.raises(RemoteError) as retained_full:
                _started(c, _limit(150 << 20))
            assert (retained_full.value.status, retained_full.value.code) == (
                429,
                "quota_exceeded",
            )
            assert "retained" in str(retained_full.value)
            _started(c, _limit(100 << 20)).close()
            # deleting the ended workspace frees its bytes at once; its record stays
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=server.url, headers=headers) as http:
                gone = http.delete(f"/v1/sandboxes/{first.id}/workspace")
                assert gone.status_code == 200, gone.text
                assert gone.json()["workspace_available"] is False
                still_running = _started(c, _limit(10 << 20))
                refused = http.delete(f"/v1/sandboxes/{still_running.id}/workspace")
                assert (refused.status_code, refused.json()["error"]["code"]) == (
                    409,
                    "sandbox_running",
                )
                still_running.close()
            _started(c, _limit(150 << 20)).close()


# -- a long-running server frees every ended sandbox -----------------------------------------

_CYCLES = 200


def _server_counts(url: str, token: str) -> dict[str, float]:
    """``corral_server_objects`` and the process collector's fds and memory, from /metrics."""
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as http:
        text = http.get(f"{url}/metrics").text
    counts = {}
    for line in text.splitlines():
        found = re.match(r'corral_server_objects\{kind="(\w+)"\} (\S+)$', line) or re.match(
            r"(process_open_fds|process_resident_memory_bytes) (\S+)$", line
        )
        if found:
            counts[found.group(1)] = float(found.group(2))
    return counts


def _use_everything(sb: Sandbox) -> None:
    """Each per-sandbox table of the API gets an entry: a background command
    followed to its end, a terminal read (its lock), a code context."""
    handle = sb.commands.run(["echo", "out"], background=True)
    assert handle.wait().stdout == b"out\n"
    pty = sb.pty.create(command=["echo", "tty"])
    assert b"tty" in pty.read(timeout_s=30)
    sb.create_code_context()


def _cycles(count: int) -> tuple[dict[str, float], dict[str, float]]:
    """The server's counts before and after ``count`` create/close cycles over
    the real API (every tenth using commands, terminals and a code context)."""
    with serving() as server:
        token = server.key("cycles")
        with Client(server.url, api_key=token) as client:
            for _ in range(5):  # warm-up: thread pools, imports, the first box's caches
                with client.sandbox(timeout_s=60) as sb:
                    _use_everything(sb)
            before = _server_counts(server.url, token)
            for i in range(count):
                with client.sandbox(timeout_s=60) as sb:
                    if i % 10 == 0:
                        _use_everything(sb)
        after = _server_counts(server.url, token)
        for _ in range(50):  # the client's connection closing reaches the server
            if after["process_open_fds"] <= before["process_open_fds"] + 4:
                break
            time.sleep(0.1)
            after = _server_counts(server.url, token)
    return before, after


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_long_running_server_keeps_nothing_of_ended_sandboxes() -> None:
    """200 cycles: afterwards the server holds no live sandbox, no record of
    one (``Live``, with its commands, terminals, locks, contexts, approvals),
    no output log and no fd more than before."""
    before, after = _cycles(_CYCLES)
    exact = ["live_sandboxes", "starting_sandboxes", "objects_Live", "objects_OutputLog"]
    assert {k: after[k] for k in exact} == dict.fromkeys(exact, 0.0), after
    # a per-sandbox leak leaves 200 fds or more; a pool (threads, database
    # connections) may open one or two more lazily during the run
    assert after["process_open_fds"] <= before["process_open_fds"] + 4, (before, after)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_long_running_server_frees_every_sandbox_object_task_and_its_memory() -> None:
    before, after = _cycles(50)
    assert after["objects_AsyncSandbox"] == 0, after
    assert after["tasks"] <= before["tasks"], (before, after)
    grown = after["process_resident_memory_bytes"] - before["process_resident_memory_bytes"]
    assert grown < 64 << 20, f"the server grew {grown / 2**20:.0f} MiB over 50 sandboxes"
