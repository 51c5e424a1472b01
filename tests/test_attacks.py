"""Attacks on the fixes for issue 11: each test names the claim it tries to break
and asserts the safe behaviour.

Network rule: every connection a test here makes ends at a listener on
127.0.0.1 (were a guard broken, that listener is all that is reached).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from corral import Client, Policy
from corral.net._proxy import Proxy
from corral.net._rules import Rules

from .conftest import SYSTEM_PYTHON, unprivileged_user
from .server_helpers import serving

# -- the proxy: plain HTTP inside a tunnel to a port a rule names ---------------------


@asynccontextmanager
async def _proxy_to_raw_server() -> AsyncIterator[tuple[int, int, list[bytes]]]:
    """A proxy on 127.0.0.1 allowing ``plain.test:<port>`` (which resolves to a raw
    server on 127.0.0.1 that records what reaches it); yields (proxy port,
    server port, payloads)."""
    arrived: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        with contextlib.suppress(OSError, TimeoutError):
            while chunk := await asyncio.wait_for(reader.read(65536), 2):
                data += chunk
        arrived.append(data)
        writer.close()
        await writer.wait_closed()

    upstream = await asyncio.start_server(record, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    # the name rule names the port (other protocols may pass); the address rule
    # lets the SSRF guard through to the loopback listener, which is the point
    rules = Rules((f"plain.test:{port}", f"127.0.0.1:{port}"), ())
    proxy = Proxy(rules, hosts={"plain.test": "127.0.0.1"})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    await proxy.serve(sock)
    try:
        yield sock.getsockname()[1], port, arrived
    finally:
        await proxy.close()
        upstream.close()
        await upstream.wait_closed()


async def _through_tunnel(opening: bytes) -> bytes:
    """Send ``opening`` in a CONNECT tunnel to plain.test's named port; return what
    reached the upstream server."""
    async with _proxy_to_raw_server() as (proxy_port, port, arrived):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        writer.write(f"CONNECT plain.test:{port} HTTP/1.1\r\nHost: plain.test\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.write(opening)
        await writer.drain()
        writer.write_eof()
        with contextlib.suppress(OSError, TimeoutError):
            while await asyncio.wait_for(reader.read(65536), 5):
                pass
        writer.close()
        await writer.wait_closed()
        for _ in range(100):
            if arrived:
                break
            await asyncio.sleep(0.05)
        return b"".join(arrived)


@pytest.mark.parametrize(
    "opening",
    [
        # RFC 9112 2.2: servers SHOULD skip empty lines before the request line
        # (nginx and llhttp do)
        b"\r\nGET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        b"\n\r\n\nGET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        # RFC 9112 3: recipients MAY take any whitespace as the separator
        # (Python's http.server splits the request line on whitespace)
        b"GET\t/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        b"GET\x0c/\x0cHTTP/1.1\r\nHost: evil.test\r\n\r\n",
    ],
    ids=["crlf_before", "empty_lines_before", "tab_after_method", "formfeeds"],
)
async def test_http_in_a_named_port_tunnel_cannot_name_another_host(opening: bytes) -> None:
    """Claim (SECURITY.md, proxy): "an HTTP/1 request opening such a tunnel gets
    the plain-HTTP checks (Host ... must name the tunnel's host)". An opening
    the proxy does not recognise as HTTP went up untouched, its Host header
    naming another virtual host of the allowed server."""
    arrived = await _through_tunnel(opening)
    assert b"evil.test" not in arrived, arrived


async def test_a_plain_http_request_in_a_named_port_tunnel_still_goes_up() -> None:
    """The control for the test above: a well-formed request is rewritten, not refused."""
    arrived = await _through_tunnel(b"GET /x HTTP/1.1\r\nHost: plain.test\r\n\r\n")
    assert arrived.startswith(b"GET /x HTTP/1.1\r\nHost: plain.test:"), arrived
    assert arrived.endswith(b"Connection: close\r\n\r\n"), arrived


# -- the agent: commands.list() never hides a live process -----------------------------

# A daemon whose main thread ends by the raw exit syscall (the thread, not the
# process): /proc/<pid>/stat then says "Z" for the group leader while its
# other thread runs on, writing a heartbeat.
_ZOMBIE_LEADER = r"""
import ctypes, os, sys, threading, time
if os.fork() == 0:
    os.setsid()
    def beat():
        while True:
            with open("heartbeat", "a") as f:
                f.write(".")
            time.sleep(0.2)
    threading.Thread(target=beat).start()
    time.sleep(0.3)
    ctypes.CDLL(None).syscall(60, 0)  # SYS_exit: this thread only
print("started", flush=True)
"""


async def test_a_process_whose_main_thread_exited_is_still_listed() -> None:
    """Claim (SECURITY.md, agent): "commands.list() shows every live process no
    running command accounts for". A process whose leader thread exited shows
    state Z in /proc/<pid>/stat, and the agent skipped every Z as a zombie."""
    from corral import AsyncSandbox

    async with AsyncSandbox(runtime=None) as sb:
        result = await sb.commands.run(["python3", "-c", _ZOMBIE_LEADER])
        assert result.stdout == b"started\n", result.stderr
        await asyncio.sleep(1)
        before = len(await sb.files.read("heartbeat"))
        await asyncio.sleep(1)
        assert len(await sb.files.read("heartbeat")) > before  # it runs on
        left = await sb.commands.list()
        assert [p.argv[:2] for p in left] == [("python3", "-c")], left
        assert await sb.commands.kill(left[0].pid)
        await asyncio.sleep(0.5)
        stopped = len(await sb.files.read("heartbeat"))
        await asyncio.sleep(1)
        assert len(await sb.files.read("heartbeat")) == stopped


# Double fork: the grandchild, orphaned to the agent, ends its main thread so
# /proc/<pid>/environ (the leader's memory) reads empty: its mark is unreadable
_ZOMBIE_LEADER_ORPHAN = r"""
import ctypes, os, sys, threading, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        def beat():
            while True:
                with open("heartbeat", "a") as f:
                    f.write(".")
                time.sleep(0.2)
        threading.Thread(target=beat).start()
        time.sleep(0.3)
        ctypes.CDLL(None).syscall(60, 0)  # SYS_exit: this thread only
    os._exit(0)
print("started", flush=True)
time.sleep(60)
"""


async def test_a_timed_out_command_takes_its_orphan_whose_main_thread_exited() -> None:
    """Claim (SECURITY.md, agent): a command's tree is "its process's descendants
    plus the orphans carrying its mark", killed at its timeout. An orphan whose
    leader thread exited has an empty /proc/<pid>/environ: its mark was not
    seen, and it outlived the command's timeout without clearing anything."""
    from corral import AsyncSandbox

    async with AsyncSandbox(runtime=None) as sb:
        result = await sb.commands.run(["python3", "-c", _ZOMBIE_LEADER_ORPHAN], timeout_s=2)
        assert result.limit_hit == "timeout", result
        await asyncio.sleep(0.5)
        stopped = len(await sb.files.read("heartbeat"))
        await asyncio.sleep(1)
        assert len(await sb.files.read("heartbeat")) == stopped  # nothing beats on
        assert await sb.commands.list() == []


# -- corral serve: the disk check as an ordinary user -----------------------------------

_WALK_AS_USER = r"""
import json, sys
from pathlib import Path
from corral.server._workspace import _usage
usage = _usage(Path(sys.argv[1]), 1 << 20, 200_000)
print(json.dumps({"bytes": usage.bytes, "files": usage.files, "too_deep": usage.too_deep}))
"""


def test_an_unreadable_directory_does_not_hide_bytes_from_the_disk_check(
    world_readable_src: Path,
) -> None:
    """Claim (SECURITY.md, serve): as an ordinary user "the server measures [the
    workspace] every 2 s and ends a box over disk_bytes". There the box runs
    as the server's own uid: ``chmod 0300 d`` (write and search, no read) and
    whatever it writes in ``d`` is counted as nothing, without bound."""
    user = unprivileged_user()
    if os.geteuid() != 0 or user is None:
        pytest.skip("needs root to run the walker as corral-test")
    top = Path(tempfile.mkdtemp(prefix="corral-test-walk-"))
    try:
        top.chmod(0o755)
        workspace = top / "ws"
        (workspace / "d").mkdir(parents=True)
        (workspace / "d" / "big").write_bytes(os.urandom(4 << 20))  # real blocks
        for path in (workspace, workspace / "d", workspace / "d" / "big"):
            os.chown(path, user.pw_uid, user.pw_gid)
        (workspace / "d").chmod(0o300)  # what the box does to its own directory
        proc = subprocess.run(
            [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
                "--",
                sys.executable,
                "-c",
                _WALK_AS_USER,
                str(workspace),
            ],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(world_readable_src), "HOME": "/"},
            cwd="/",
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        usage = json.loads(proc.stdout)
        # the reaper ends the box when any of these holds (limit 1 MiB here)
        assert usage["bytes"] > 1 << 20 or usage["too_deep"], usage
    finally:
        shutil.rmtree(top)


# -- corral serve: freeing an ended workspace the box made deep ---------------------------

_DEEP = "import os\nfor _ in range(3000):\n    os.mkdir('d'); os.chdir('d')\nprint('deep')"


def test_a_deep_ended_workspace_is_freed() -> None:
    """Claim (SECURITY.md, serve): "Retention purges use shutil.rmtree, which
    walks by fds on Linux", and `DELETE /v1/sandboxes/{id}/workspace` frees an
    ended one early. A box that leaves 3,000 nested directories makes that
    removal fail (and the reaper's purge loop stops at it, for every key)."""
    policy = Policy.from_dict(
        {"name": "q", "limits": {"disk_bytes": 100 << 20}, "filesystem": {"tmp_bytes": 4 << 20}}
    )
    with serving() as server:
        try:
            token = server.key("q")
            with Client(server.url, api_key=token) as client:
                sb = client.sandbox(policy, timeout_s=120)
                sb.start()
                made = sb.commands.run([SYSTEM_PYTHON, "-c", _DEEP])
                assert made.stdout_text == "deep\n", made.stderr_text
                sb.close()
                headers = {"Authorization": f"Bearer {token}"}
                with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
                    gone = http.delete(f"/v1/sandboxes/{sb.id}/workspace")
                    assert gone.status_code == 200, gone.text
                assert not (server.data_dir / "workspaces" / sb.id).exists()
        finally:
            # the helpers' own shutil.rmtree fails on this tree too: rm walks it
            server.stop()
            subprocess.run(["rm", "-rf", "--", str(server.data_dir / "workspaces")], check=False)
