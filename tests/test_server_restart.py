"""``kill -9`` of the server in the middle of runs and uploads, then a restart:
nothing half-written looks whole, every old sandbox has an end reason, its
workspace stays downloadable, and nothing is left running or mounted."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral import Client
from corral._portal import call
from corral.backends.linux._cgroups import leftover_cgroups

from .server_helpers import ServerProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the server tests run as root here")


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess()
    try:
        yield proc
    finally:
        proc.cleanup()


@pytest.mark.slow
def test_kill_9_mid_run_and_upload_then_restart(server: ServerProcess) -> None:
    key = server.key("crash")
    server.start()
    assert server.proc is not None
    old_pid = server.proc.pid
    client = Client(server.url, api_key=key)
    first = client.sandbox()
    first.start()
    first.files.write("whole.txt", b"complete")
    first.commands.run("sleep 1000", background=True)
    second = client.sandbox()
    second.start()

    uploading = threading.Event()
    outcomes: dict[str, BaseException | object] = {}

    def upload() -> None:
        def chunks() -> Iterator[bytes]:
            for i in range(10_000):
                if i == 4:
                    uploading.set()
                yield b"x" * (1 << 20)
                time.sleep(0.02)

        try:
            outcomes["upload"] = second.files.write("partial.bin", chunks())
        except BaseException as exc:
            outcomes["upload"] = exc

    def cell() -> None:
        try:
            outcomes["cell"] = first.run_code("import time\ntime.sleep(100)")
        except BaseException as exc:
            outcomes["cell"] = exc

    threads = [threading.Thread(target=upload), threading.Thread(target=cell)]
    for thread in threads:
        thread.start()
    assert uploading.wait(30)
    time.sleep(1.0)  # the cell is running, the upload half-way
    box_processes = _descendants(old_pid)
    assert len(box_processes) > 4  # bwrap, agents, the kernel, sleep…
    server.kill9()
    for thread in threads:
        thread.join(30)
    # the calls in flight end with an error, not a hang and not a result
    assert isinstance(outcomes["upload"], corral.SandboxBroken)
    assert isinstance(outcomes["cell"], corral.SandboxBroken)

    # every process of every box died with the server (pdeathsig)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in box_processes):
        time.sleep(0.1)
    assert not [p for p in box_processes if _alive(p)]

    server.port += 1000
    server.url = f"http://127.0.0.1:{server.port}"
    server.start()
    client.close()
    with Client(server.url, api_key=key) as again:
        for box in (first, second):
            info = again.get(box.id)
            assert (info.state, info.end_reason) == ("ended", "server_restarted")
            assert info.workspace_available
        assert again.download(first.id, "whole.txt") == b"complete"
        names = [
            e["name"]
            for e in call(
                again._async._json("GET", f"/v1/sandboxes/{second.id}/files", params={"path": "."})
            )["entries"]
        ]
        assert "partial.bin" not in names
        with pytest.raises(FileNotFoundError):
            again.download(second.id, "partial.bin")
    # no temp file of the upload is left on the host either
    workspace = server.data_dir / "workspaces" / second.id
    assert not [p for p in workspace.rglob("*") if p.name.startswith(".corral-upload-")]
    mounts = Path("/proc/self/mounts").read_text()
    assert str(server.data_dir) not in mounts
    assert not [c for c in leftover_cgroups() if f"box-{old_pid}-" in c]


def test_a_clean_shutdown_ends_sandboxes_with_its_own_reason(server: ServerProcess) -> None:
    key = server.key("stop")
    server.start()
    with Client(server.url, api_key=key) as client:
        sb = client.sandbox(runtime=None)
        sb.start()
        sb.files.write("kept.txt", b"kept")
        assert server.stop() in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    server.start()
    with Client(server.url, api_key=key) as client:
        info = client.get(sb.id)
        assert info.end_reason == "server_shutdown"
        assert client.download(sb.id, "kept.txt") == b"kept"


def test_workspaces_are_purged_when_their_retention_ends(tmp_path: Path) -> None:
    server = ServerProcess(None, "--retention", "2s")
    try:
        key = server.key("short")
        server.start()
        with Client(server.url, api_key=key) as client:
            with client.sandbox(runtime=None) as sb:
                sb.files.write("f.txt", b"1")
            assert client.download(sb.id, "f.txt") == b"1"
            time.sleep(3.5)
            with pytest.raises(corral.RemoteError) as gone:
                client.download(sb.id, "f.txt")
            assert (gone.value.status, gone.value.code) == (410, "purged")
            assert client.get(sb.id).end_reason == "closed"  # the record outlives the files
            assert not (server.data_dir / "workspaces" / sb.id).exists()
    finally:
        server.cleanup()
