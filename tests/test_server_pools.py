"""Warm pools inside a real ``corral serve`` on 127.0.0.1: a matching create is
served by a ready box (the pool-hit metric says so), nothing crosses from one
user to the next, pooled boxes count against no key until handed out, and a
shutdown (or a ``kill -9`` and a restart) leaves no box and no workspace."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import corral
from corral import Client
from corral.backends.linux._cgroups import leftover_cgroups

from .server_helpers import CORRAL, ServerProcess, free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the server tests run as root here")


def _metrics(server: ServerProcess) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {server.metrics_key}"}  # type: ignore[attr-defined]
    text = httpx.get(f"{server.url}/metrics", headers=headers, timeout=10).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(corral_pool_\w+)\{([^}]*)\} (\S+)$", line)
        if m:
            found[f"{m[1]}{{{m[2]}}}"] = float(m[3])
    return found


def _metric(server: ServerProcess, name: str, pool: str, state: str | None = None) -> float:
    labels = f'pool="{pool}"' + (f',state="{state}"' if state else "")
    return _metrics(server).get(f"{name}{{{labels}}}", 0.0)


def _wait_ready(server: ServerProcess, pool: str, n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while _metric(server, "corral_pool_boxes", pool, "ready") < n:
        assert time.monotonic() < deadline, f"pool {pool} did not fill: {_metrics(server)}"
        time.sleep(0.2)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(
        None,
        "--pool",
        "policy=default,runtime=default,size=2,kernels=python",
        "--pool",
        "policy=strict,runtime=none,size=1",
        "--pool-max-starting",
        "1",
    )
    proc.metrics_key = proc.key("metrics")  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.cleanup()


def test_a_matching_create_is_served_by_the_pool_and_no_state_crosses(
    server: ServerProcess,
) -> None:
    pool = "default/default"
    alice, bob = server.key("alice"), server.key("bob")
    server.start()
    _wait_ready(server, pool, 2)
    hits = _metric(server, "corral_pool_hits_total", pool)
    with Client(server.url, api_key=alice) as client:
        sb = client.sandbox("default")
        sb.start()
        assert _metric(server, "corral_pool_hits_total", pool) == hits + 1
        # its identity and record are made at hand-out
        info = client.get(sb.id)
        assert info.state == "running"
        assert abs(info.created_at - time.time()) < 30
        assert info.expires_at == pytest.approx(info.created_at + 300, abs=1)
        # alice leaves everything she can behind
        assert sb.run_code("secret = 42\nsecret").text == "42"
        sb.files.write("alice.txt", b"alice's")
        sb.commands.run("sleep 1000", background=True)
        sb.commands.run("echo ALICE=1 >> ~/.profile; mkdir -p /tmp/alice")
        alice_id = sb.id
        sb.close()
    _wait_ready(server, pool, 2)
    with Client(server.url, api_key=bob) as client:
        sb = client.sandbox("default")
        sb.start()
        assert _metric(server, "corral_pool_hits_total", pool) == hits + 2
        assert sb.id != alice_id
        assert sb.files.list(".") == []
        result = sb.run_code("secret")
        assert result.error is not None
        assert result.error.name == "NameError"
        ps = sb.commands.run("ps -eo args")
        assert b"sleep 1000" not in ps.stdout
        assert b"alice" not in sb.commands.run("ls -a /tmp").stdout
        assert b"ALICE" not in sb.commands.run("env; cat ~/.profile 2>/dev/null || true").stdout
        # another key's sandbox stays absent
        with pytest.raises(corral.RemoteError) as absent:
            client.get(alice_id)
        assert absent.value.status == 404
        sb.close()


def test_requests_that_differ_from_every_pool_start_cold(server: ServerProcess) -> None:
    key = server.key("cold")
    server.start()
    _wait_ready(server, "default/default", 2)
    _wait_ready(server, "strict/none", 1)
    before = _metrics(server)
    with Client(server.url, api_key=key) as client:
        # another runtime, env (a different policy), network approval: none is pooled
        for sb in (
            client.sandbox("default", runtime=None),
            client.sandbox("default", env={"X": "1"}),
            client.sandbox("default", on_network_request=lambda host, port: False),
        ):
            sb.start()
            assert sb.commands.run("true").exit_code == 0
            sb.close()
        # the runtime-less strict pool
        sb = client.sandbox("strict", runtime=None)
        sb.start()
        assert sb.commands.run("echo ok").stdout == b"ok\n"
        sb.close()
    after = _metrics(server)
    default = 'pool="default/default"'
    assert after.get(f"corral_pool_hits_total{{{default}}}") == before.get(
        f"corral_pool_hits_total{{{default}}}"
    )
    assert after['corral_pool_hits_total{pool="strict/none"}'] == 1


def test_pooled_boxes_count_against_a_key_only_once_handed_out(server: ServerProcess) -> None:
    key = server.key("one", "--max-sandboxes", "1")
    server.start()
    _wait_ready(server, "default/default", 2)
    with Client(server.url, api_key=key) as client:
        assert client.list() == []  # the two ready boxes are nobody's
        sb = client.sandbox("default")
        sb.start()
        hits = _metric(server, "corral_pool_hits_total", "default/default")
        with pytest.raises(corral.RemoteError) as full:
            client.sandbox("default").start()
        assert (full.value.status, full.value.code) == (429, "quota_exceeded")
        # the refused create took nothing from the pool
        assert _metric(server, "corral_pool_hits_total", "default/default") == hits
        assert _metric(server, "corral_pool_misses_total", "default/default") == 0
        assert [s.id for s in client.list()] == [sb.id]
        sb.close()


def test_e2b_create_goes_through_the_pool(server: ServerProcess) -> None:
    key = server.key("e2b")
    server.start()
    _wait_ready(server, "default/default", 2)
    hits = _metric(server, "corral_pool_hits_total", "default/default")
    reply = httpx.post(
        f"{server.url}/e2b/api/sandboxes",
        json={"templateID": "base", "timeout": 60},
        headers={"X-API-Key": key},
        timeout=60,
    )
    assert reply.status_code == 201, reply.text
    assert _metric(server, "corral_pool_hits_total", "default/default") == hits + 1
    sid = reply.json()["sandboxID"]
    gone = httpx.delete(f"{server.url}/e2b/api/sandboxes/{sid}", headers={"X-API-Key": key})
    assert gone.status_code == 204


def test_shutdown_and_kill_9_leave_no_pooled_box(server: ServerProcess) -> None:
    key = server.key("leak")
    server.start()
    _wait_ready(server, "default/default", 2)
    _wait_ready(server, "strict/none", 1)
    assert server.proc is not None
    boxes = _descendants(server.proc.pid)
    assert len(boxes) >= 6  # bwrap, agent and kernel of each pooled box
    workspaces = server.data_dir / "workspaces"
    assert len(os.listdir(workspaces)) == 3
    assert server.stop() in (0, -15)
    assert not [p for p in boxes if _alive(p)]
    assert os.listdir(workspaces) == []  # pooled boxes leave no workspace
    assert str(server.data_dir) not in Path("/proc/self/mounts").read_text()

    # kill -9: the boxes die with the server; the next start removes their workspaces
    server.start()
    _wait_ready(server, "default/default", 2)
    with Client(server.url, api_key=key) as client:
        kept = client.sandbox("default")
        kept.start()
        kept.files.write("kept.txt", b"kept")
    assert server.proc is not None
    old_pid, boxes = server.proc.pid, _descendants(server.proc.pid)
    server.kill9()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in boxes):
        time.sleep(0.1)
    assert not [p for p in boxes if _alive(p)]
    server.port += 1000
    server.url = f"http://127.0.0.1:{server.port}"
    server.start()
    assert server.proc is not None
    names = set(os.listdir(workspaces))
    assert kept.id in names  # a sandbox's workspace stays for its retention
    with Client(server.url, api_key=key) as client:
        assert client.download(kept.id, "kept.txt") == b"kept"
        assert client.get(kept.id).end_reason == "server_restarted"
    # the only other workspaces are the new server's pooled boxes
    new_boxes = {n for n in names if n != kept.id}
    assert len(new_boxes) <= 3
    assert server.stop() in (0, -15)
    assert os.listdir(workspaces) == [kept.id]
    assert not [c for c in leftover_cgroups() if f"box-{old_pid}-" in c]


def test_a_bad_pool_spec_is_one_line_naming_the_field(server: ServerProcess) -> None:
    for spec, needle in (
        ("size=0", "size"),
        ("colour=red", "colour"),
        ("runtime=none,kernels=python", "kernels"),
        ("policy=nosuch", "nosuch"),
        ("runtime=nosuch", "runtime"),
    ):
        out = subprocess.run(
            [
                *CORRAL,
                "serve",
                "--data-dir",
                str(server.data_dir),
                "--port",
                str(free_port()),
                "--pool",
                spec,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0
        assert needle in out.stderr, out.stderr
        assert "Traceback" not in out.stderr, out.stderr


def _agents(pid: int) -> list[int]:
    """The box agents among the server's descendants."""
    found = []
    for child in _descendants(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"/run/corral/agent.py" in argv:
            found.append(child)
    return found


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_a_broken_pooled_box_is_dropped_not_handed_out(sig: int) -> None:
    server = ServerProcess(None, "--pool", "policy=strict,runtime=none,size=1")
    server.metrics_key = server.key("metrics")  # type: ignore[attr-defined]
    try:
        key = server.key("broken")
        server.start()
        pool = "strict/none"
        _wait_ready(server, pool, 1)
        assert server.proc is not None
        agents = _agents(server.proc.pid)
        assert len(agents) == 1
        os.kill(agents[0], sig)  # dead, or alive but never answering its check
        with Client(server.url, api_key=key) as client:
            sb = client.sandbox("strict", runtime=None)
            sb.start()
            assert sb.commands.run("echo fresh").stdout == b"fresh\n"
            sb.close()
        assert _metric(server, "corral_pool_boxes", pool, "dropped") == 1
        # served by a box started since (the refill runs during the check) or cold
        hits = _metric(server, "corral_pool_hits_total", pool)
        assert hits + _metric(server, "corral_pool_misses_total", pool) == 1
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(agents[0]):
            time.sleep(0.1)
        assert not _alive(agents[0])  # the dropped box was ended, not left behind
    finally:
        server.cleanup()
