"""``corral serve`` and ``corral.Client``: a real server subprocess on 127.0.0.1, real clients."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

import corral
from corral import AsyncClient, Client, RemoteError
from corral._client import (
    RemoteCommandHandle,
)
from corral._interpreter import LANGUAGES
from corral._portal import call

from .server_helpers import CORRAL, ServerProcess, serving

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the server tests run as root here")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with serving() as proc:
        yield proc


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> str:
    return server.key("main")


@pytest.fixture(scope="module")
def client(server: ServerProcess, key: str) -> Iterator[Client]:
    with Client(server.url, api_key=key) as c:
        yield c


def _ended(client: Client, sandbox_id: str, timeout_s: float = 15.0) -> corral.SandboxInfo:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = client.get(sandbox_id)
        if info.state == "ended":
            return info
        time.sleep(0.1)
    raise AssertionError(f"sandbox {sandbox_id} did not end")


# -- the whole API through Client ------------------------------------------------------


def test_code_commands_and_files_through_the_client(client: Client) -> None:
    with client.sandbox(policy="default", timeout_s=600, metadata={"user": "42"}) as sb:
        assert sb.run_code("x = 41").error is None
        assert sb.run_code("x + 1").text == "42"
        failed = sb.run_code("1/0")
        assert failed.error is not None
        assert failed.error.name == "ZeroDivisionError"
        assert "ZeroDivisionError" in failed.error.traceback
        plot = sb.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
        png = plot.results[0].png
        assert png is not None
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        html = sb.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
        assert html.results[0].html is not None
        assert "<table" in html.results[0].html

        assert sb.files.write("a.txt", b"hi") == 2
        assert sb.commands.run("cat a.txt").stdout == b"hi"
        sb.files.mkdir("d")
        sb.files.rename("a.txt", "d/b.txt")
        assert [e.name for e in sb.files.list("d")] == ["b.txt"]
        assert sb.files.stat("d/b.txt").size == 2
        assert sb.files.exists("d/b.txt")
        assert not sb.files.exists("a.txt")
        sb.files.remove("d")
        assert not sb.files.exists("d")
        with pytest.raises(FileNotFoundError):
            sb.files.read("missing.txt")

        sb.files.mkdir("sub")
        done = sb.commands.run("echo $GREETING; pwd; exit 3", env={"GREETING": "hey"}, cwd="sub")
        assert (done.exit_code, done.stdout) == (3, b"hey\n/workspace/sub\n")
        assert sb.commands.run("cat", stdin=b"fed").stdout == b"fed"
        assert sb.commands.run("sleep 5", timeout_s=0.5).limit_hit == "timeout"


def test_streaming_callbacks_and_background_commands(client: Client) -> None:
    with client.sandbox() as sb:
        lines: list[bytes] = []
        result = sb.commands.run(
            "for i in 1 2 3; do echo $i; sleep 0.05; done", on_stdout=lines.append
        )
        assert result.ok
        assert b"".join(lines) == b"1\n2\n3\n"

        seen: list[str] = []
        images: list[corral.Result] = []
        sb.run_code(
            "print('a')\nimport matplotlib.pyplot as plt\nplt.plot([1])\nplt.show()\nprint('b')",
            on_stdout=seen.append,
            on_result=images.append,
        )
        assert "".join(seen) == "a\nb\n"
        assert images[0].png is not None

        handle = sb.commands.run("cat; echo done >&2", background=True, stdin=True)
        assert handle.pid is not None
        assert any(p.pid == handle.pid for p in sb.commands.list())
        handle.send_stdin("one ")
        handle.send_stdin(b"two")
        handle.close_stdin()
        finished = handle.wait()
        assert (finished.stdout, finished.stderr) == (b"one two", b"done\n")

        sleeper = sb.commands.run("sleep 60", background=True)
        assert sb.commands.kill(sleeper.pid or 0)
        assert sleeper.wait().signal == 9
        assert not sb.commands.kill(999999)

        events = list(sb.commands.stream("echo out; echo err >&2; exit 4"))
        assert isinstance(events[-1], corral.CommandExit)
        assert events[-1].result.exit_code == 4
        outputs = {(e.stream, e.data) for e in events if isinstance(e, corral.CommandOutput)}
        assert outputs == {("stdout", b"out\n"), ("stderr", b"err\n")}

        context = sb.create_code_context("python")
        sb.run_code("y = 'own'", context=context)
        assert sb.run_code("y", context=context).text == "'own'"
        assert sb.run_code("'y' in dir()").text == "False"
        sb.restart_code_context(context)
        assert sb.run_code("'y' in dir()", context=context).text == "False"
        sb.remove_code_context(context)
        with pytest.raises(RemoteError) as gone:
            sb.run_code("1", context=context)
        assert gone.value.code == "not_found"


async def test_the_async_client_streams(server: ServerProcess, key: str) -> None:
    async with AsyncClient(server.url, api_key=key) as client, client.sandbox() as sb:
        events = [e async for e in sb.stream_code("print(1)\n2 + 2")]
        assert events[0] == ("stdout", "1\n")
        assert events[-1][0] == "done"
        big = os.urandom(3 << 20)
        assert await sb.files.write("big.bin", [big[: 1 << 20], big[1 << 20 :]]) == len(big)
        reader = await sb.files.open_read("big.bin")
        assert reader.size == len(big)
        async with reader:
            assert b"".join([chunk async for chunk in reader]) == big
        handle = await sb.commands.run("echo bg", background=True)
        assert isinstance(handle, RemoteCommandHandle)
        assert (await handle.wait()).stdout == b"bg\n"


def test_a_terminal_through_the_client(client: Client) -> None:
    with client.sandbox(runtime=None) as sb:
        term = sb.pty.create(100, 30, command=["/bin/sh"])
        term.send("stty size; echo marker-$((6*7)); exit 5\n")
        seen = b""
        while b"marker-42" not in seen:
            chunk = term.read(timeout_s=10)
            assert chunk, seen
            seen += chunk
        assert b"30 100" in seen
        assert term.wait().exit_code == 5
        quiet = sb.pty.create(command=["/bin/sh", "-c", "sleep 30"])
        with pytest.raises(TimeoutError):
            quiet.read(timeout_s=0.3)
        quiet.resize(120, 40)
        quiet.kill()
        assert quiet.wait().signal == 9


# -- the service's security -------------------------------------------------------------


def test_every_request_but_health_needs_a_valid_key(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    for method, path in [
        ("GET", "/v1/sandboxes"),
        ("POST", "/v1/sandboxes"),
        ("GET", "/metrics"),
        ("GET", "/v1/audit"),
        ("GET", "/v1/sandboxes/abc/files/content?path=x"),
    ]:
        for headers in ({}, {"Authorization": "Bearer crl_nope_nope"}, {"Authorization": "x"}):
            reply = httpx.request(method, f"{server.url}{path}", headers=headers)
            assert reply.status_code == 401, (method, path, headers)
            assert reply.json()["error"]["code"] == "unauthorized"
    with (
        Client(server.url, api_key="crl_abc_def") as stranger,
        pytest.raises(RemoteError) as refused,
    ):
        stranger.list()
    assert refused.value.status == 401


def test_a_key_sees_only_its_own_sandboxes(server: ServerProcess, client: Client) -> None:
    other = Client(server.url, api_key=server.key("other"))
    with client.sandbox(metadata={"owner": "a"}) as mine:
        assert mine.id not in {s.id for s in other.list()}
        for call in (
            lambda: other.get(mine.id),
            lambda: other.kill(mine.id),
            lambda: other.download(mine.id, "x"),
            lambda: other.connect(mine.id),
        ):
            with pytest.raises(RemoteError) as absent:
                call()
            assert absent.value.status == 404
        # by raw HTTP too, on every kind of route
        headers = {"Authorization": f"Bearer {other._async._http.headers['authorization'][7:]}"}
        for method, tail, body in [
            ("POST", "/code", {"code": "1"}),
            ("POST", "/commands", {"command": "true"}),
            ("GET", "/files", None),
            ("PUT", "/files/content?path=x", None),
            ("GET", "/network/events", None),
            ("DELETE", "", None),
        ]:
            reply = httpx.request(
                method, f"{server.url}/v1/sandboxes/{mine.id}{tail}", headers=headers, json=body
            )
            assert reply.status_code == 404, tail
        assert mine.run_code("1").text == "1"  # untouched
    other.close()


def test_quotas(server: ServerProcess) -> None:
    limited = Client(
        server.url,
        api_key=server.key(
            "small", "--max-sandboxes", "1", "--max-memory", "600M", "--max-lifetime", "120"
        ),
    )
    with limited.sandbox(timeout_s=60) as sb:
        with pytest.raises(RemoteError) as full:
            limited.sandbox(timeout_s=60).start()
        assert (full.value.status, full.value.code) == (429, "quota_exceeded")
        with pytest.raises(RemoteError) as long:
            sb.set_timeout(500)
        assert (long.value.status, long.value.code) == (403, "quota_forbidden")
    with pytest.raises(RemoteError) as lifetime:
        limited.sandbox(timeout_s=600).start()
    assert lifetime.value.status == 403
    big = corral.Policy.preset("default").with_limits(memory_bytes=1 << 30)
    with pytest.raises(RemoteError) as memory:
        limited.sandbox(big, timeout_s=60).start()
    assert (memory.value.status, memory.value.code) == (403, "quota_forbidden")
    assert "memory_bytes" in str(memory.value)
    # the refused creations left nothing running
    assert [s.state for s in limited.list()] == ["ended"]
    limited.close()


def test_policies_that_bind_host_paths_are_refused(client: Client) -> None:
    """An API client must not read the server's files by naming them in a policy."""
    for section in ("read_only", "writable"):
        spec = {"extends": "default", "filesystem": {section: ["/etc:/hostetc"]}}
        reply = httpx.post(
            f"{client.url}/v1/sandboxes",
            json={"policy": spec},
            headers=dict(client._async._http.headers),
        )
        assert reply.status_code == 403
        assert reply.json()["error"] == {
            "code": "policy_forbidden",
            "message": f"filesystem.{section}: binding host paths is not allowed through the API",
        }


def test_invalid_input_names_the_field(client: Client) -> None:
    bad = {"extends": "default", "limits": {"memory_bytes": -1}}
    with pytest.raises(corral.PolicyError) as error:
        call(client._async._json("POST", "/v1/sandboxes", json={"policy": bad}))
    assert error.value.field == "limits.memory_bytes"
    reply = httpx.post(
        f"{client.url}/v1/sandboxes",
        json={"timeout_s": "soon"},
        headers=dict(client._async._http.headers),
    )
    assert reply.status_code == 422
    assert reply.json()["error"]["field"] == "timeout_s"


def test_paths_out_of_the_workspace_are_refused_running_and_ended(client: Client) -> None:
    with client.sandbox() as sb:
        for path in ("../../etc/passwd", "/etc/passwd", "a/../../x"):
            with pytest.raises(corral.PathOutsideWorkspace):
                sb.files.read(path)
        # a link the box plants, to be followed by the server after the box ends
        sb.commands.run("ln -s /etc/shadow secret && mkdir d && ln -s / d/root")
        with pytest.raises(PermissionError, match="outside the workspace"):  # as locally
            sb.files.read("secret")
        box_id = sb.id
    for path in ("secret", "d/root/etc/shadow", "../data/corral.db", "d/root"):
        with pytest.raises((corral.PathOutsideWorkspace, FileNotFoundError)):
            client.download(box_id, path)


def test_special_files_left_by_a_box_cannot_stall_the_server(
    client: Client, server: ServerProcess
) -> None:
    with client.sandbox(runtime=None) as sb:
        sb.commands.run(
            "mkfifo pipe && mkdir d && mkfifo d/pipe && "
            "python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")'"
        )
        box_id = sb.id
    for path in ("pipe", "sock", "pipe/x"):
        with pytest.raises((PermissionError, corral.PathOutsideWorkspace)):
            client.download(box_id, path)
    listing = call(
        client._async._json("GET", f"/v1/sandboxes/{box_id}/files", params={"path": "d"})
    )
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [("pipe", "other")]
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_request_and_upload_size_limits(server: ServerProcess, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    reply = httpx.post(
        f"{server.url}/v1/sandboxes", content=b"{" + b" " * (2 << 20) + b"}", headers=headers
    )
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit still holds
        yield b'{"metadata": {"a": "'
        for _ in range(3):
            yield b"x" * (1 << 20)
        yield b'"}}'

    reply = httpx.post(f"{server.url}/v1/sandboxes", content=chunked(), headers=headers)
    assert (reply.status_code, reply.json()["error"]["code"]) == (413, "too_large")
    for bad in ({"timeout_s": float("nan")}, {"idle_timeout_s": 1e400}, {"runtime": "../etc"}):
        reply = httpx.post(
            f"{server.url}/v1/sandboxes",
            content=json.dumps(bad).replace("Infinity", "1e400"),
            headers={**headers, "content-type": "application/json"},
        )
        assert reply.status_code in (400, 422), (bad, reply.text)


def test_errors_are_json_with_a_stable_code_and_no_host_paths(
    server: ServerProcess, key: str
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    for method, path in [
        ("GET", "/nowhere"),
        ("GET", "/v1/sandboxes/nope"),
        ("DELETE", "/v1/sandboxes/nope"),
        ("POST", "/v1/sandboxes/nope/code"),
        ("PATCH", "/v1/sandboxes"),
    ]:
        reply = httpx.request(method, f"{server.url}{path}", headers=headers, json={"code": "1"})
        assert reply.status_code in (404, 405), path
        body = reply.json()
        assert set(body["error"]) >= {"code", "message"}
        assert str(server.data_dir) not in reply.text
        assert "Traceback" not in reply.text


def test_the_server_refuses_a_public_address_without_keys(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*CORRAL, "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 125
    assert "refusing to listen on 0.0.0.0: no API keys exist" in proc.stderr


def test_a_backend_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "d"
    proc = subprocess.run(
        [*CORRAL, "serve", "--backend", "no-such", "--data-dir", str(data), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 125
    assert proc.stderr.startswith("corral: the backend 'no-such' is not available")
    assert len(proc.stderr.splitlines()) == 1
    assert not data.exists()  # refused before anything was made


# -- lifecycle ---------------------------------------------------------------------------


def test_every_end_has_a_reason(client: Client) -> None:
    closed = client.sandbox()
    closed.start()
    closed.close()
    assert client.get(closed.id).end_reason == "closed"

    timed = client.sandbox(timeout_s=1)
    timed.start()
    with pytest.raises(corral.SandboxBroken, match="timeout"):  # a call in flight says why
        timed.commands.run("sleep 30")
    assert _ended(client, timed.id).end_reason == "timeout"
    with pytest.raises(corral.SandboxBroken, match="timeout"):
        timed.commands.run("true")
    timed.close()

    idle = client.sandbox(idle_timeout_s=1)
    idle.start()
    busy = idle.commands.run("sleep 2.5", background=True)  # running work is not idleness
    time.sleep(1.5)
    assert client.get(idle.id).state == "running"
    busy.wait()
    assert _ended(client, idle.id).end_reason == "idle"
    idle.close()

    crashing = client.sandbox()
    crashing.start()
    # the box kills its own agent: the sandbox dies underneath us
    with pytest.raises(corral.SandboxBroken):
        crashing.commands.run("kill -9 $(pgrep -f agent.py); sleep 5")
    info = _ended(client, crashing.id)
    assert info.end_reason == "crashed"
    crashing.close()


def test_a_disk_hog_meets_the_workspace_bound(client: Client) -> None:
    """As root a served workspace is an image of its share of disk_bytes: writes past it
    fail with ENOSPC in the box, the host holds no more than the bound, and the
    box lives on (it may delete and write again), as on a full disk."""
    limit = 200 << 20
    policy = corral.Policy.preset("default").with_limits(disk_bytes=limit)
    with client.sandbox(policy) as sb:
        r = sb.commands.run(
            "for i in 1 2 3 4 5 6; do head -c 50000000 /dev/zero > f$i || exit 9; done"
        )
        assert r.exit_code == 9, r
        assert b"No space left on device" in r.stderr
        assert sb.is_running()
        used = int(sb.commands.run("du -sb --apparent-size . | cut -f1").stdout)
        share = policy.workspace_bytes  # disk_bytes less /tmp's and /dev/shm's
        assert share is not None
        assert share // 2 < used <= share
        assert sb.commands.run("rm f1 && head -c 1000000 /dev/zero > g").exit_code == 0
        assert client.get(sb.id).state == "running"


def test_metrics_and_the_audit_log(client: Client, server: ServerProcess, key: str) -> None:
    with client.sandbox() as sb:
        sb.run_code("1")
        sb.commands.run("true")
        box_id = sb.id
    actions = [e["action"] for e in client.audit(sandbox_id=box_id)]
    assert actions[0] == "sandbox.create"
    assert {"code.run", "command.run"} <= set(actions)
    assert actions[-1] == "sandbox.end"
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    for name in (
        "corral_sandboxes{",
        "corral_sandbox_creations_total",
        "corral_run_code_seconds_bucket",
        'corral_sandbox_ends_total{reason="closed"}',
        'corral_sandboxes{state="ended"}',
    ):
        assert name in text


def test_listing_filters_by_metadata_and_pages(client: Client) -> None:
    tag = os.urandom(4).hex()
    made = []
    for i in range(3):
        sb = client.sandbox(runtime=None, metadata={"tag": tag, "i": str(i)})
        sb.start()
        made.append(sb)
    try:
        found = call(
            client._async._json(
                "GET", "/v1/sandboxes", params={"metadata": f"tag={tag}", "limit": 2}
            )
        )
        assert len(found["sandboxes"]) == 2
        assert found["next_cursor"] is not None
        everything = client.list(metadata={"tag": tag})
        assert [s.metadata["i"] for s in everything] == ["2", "1", "0"]
        assert [s.id for s in client.list(metadata={"tag": tag, "i": "1"})] == [made[1].id]
    finally:
        for sb in made:
            sb.close()


# -- network -----------------------------------------------------------------------------


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello {self.headers['Host']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_rules_that_reach_the_servers_own_network_are_refused(client: Client) -> None:
    """The proxy connects from the server's namespace: an address rule to
    loopback would let a box talk to corral serve itself (or anything local)."""
    for rule in ("127.0.0.1", "127.0.0.1:8000", "10.0.0.0/8", "0.0.0.0/0", "169.254.169.254"):
        policy = corral.Policy.preset("default").with_network(mode="allowlist", allow=[rule])
        with pytest.raises(RemoteError) as refused:
            client.sandbox(policy).start()
        assert (refused.value.status, refused.value.code) == (403, "policy_forbidden")
        assert "network.allow" in str(refused.value)
    with pytest.raises(RemoteError, match="network.mode"):
        client.sandbox(corral.Policy.preset("default").with_network(mode="open")).start()
    allowlist = corral.Policy.preset("default").with_network(mode="allowlist", allow=["a.test"])
    with client.sandbox(allowlist, runtime=None) as sb:
        with pytest.raises(RemoteError) as live:
            sb.network.update(allow=["a.test", "127.0.0.0/8"])
        assert live.value.code == "policy_forbidden"
        sb.network.update(allow=["a.test", "b.test"])  # names stay behind the SSRF guard
    unbounded = corral.Policy.preset("default").with_limits(output_bytes=None)
    with pytest.raises(RemoteError, match="output_bytes"):
        client.sandbox(unbounded).start()


@pytest.fixture(scope="module")
def trusting_server() -> Iterator[ServerProcess]:
    with serving("--allow-private-network") as proc:
        yield proc


def test_network_events_and_approvals_over_the_api(trusting_server: ServerProcess) -> None:
    client = Client(trusting_server.url, api_key=trusting_server.key("net"))
    web = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    port = web.server_address[1]
    asked: list[tuple[str, int]] = []

    def approve(host: str, port: int) -> bool:
        asked.append((host, port))
        return host == "good.test"

    policy = corral.Policy.preset("default").with_network(
        mode="allowlist",
        allow=["127.0.0.1"],
        hosts={"good.test": "127.0.0.1", "evil.test": "127.0.0.1"},
    )
    fetch = (
        "import sys, urllib.request\n"
        "for url in sys.argv[1:]:\n"
        "    try: print(urllib.request.urlopen(url, timeout=10).read().decode())\n"
        "    except Exception as e: print('refused', e)\n"
    )
    try:
        with client.sandbox(policy, on_network_request=approve) as sb:
            out = sb.commands.run(
                [
                    "/usr/bin/python3",
                    "-c",
                    fetch,
                    f"http://good.test:{port}/",
                    f"http://evil.test:{port}/",
                ]
            ).stdout_text
            assert out.startswith(f"hello good.test:{port}\nrefused")
            assert asked == [("good.test", port), ("evil.test", port)]
            decisions = {(e.host, e.allowed) for e in sb.network.events()}
            assert decisions == {("good.test", True), ("evil.test", False)}
            sb.network.update(deny=["good.test"])
            assert "good.test" in sb.policy.network.deny
            box_id = sb.id
        logged = client.audit(sandbox_id=box_id, action="network.decision")
        assert {(e["detail"]["host"], e["detail"]["allowed"]) for e in logged} == decisions
    finally:
        web.shutdown()
        web.server_close()
        client.close()


# -- many at once ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_fifty_concurrent_sandboxes_run_code(server: ServerProcess, key: str) -> None:
    async with AsyncClient(server.url, api_key=key) as client:

        async def one(i: int) -> str | None:
            async with client.sandbox(timeout_s=600) as sb:
                return (await sb.run_code(f"sum(range({i}))")).text

        texts = await asyncio.gather(*(one(i) for i in range(50)))
        assert texts == [str(sum(range(i))) for i in range(50)]
        assert await client.list(state="running") == []


def test_openapi_document_is_checked_in(server: ServerProcess) -> None:
    served = httpx.get(f"{server.url}/openapi.json").json()
    checked_in = json.loads((Path(__file__).parent.parent / "docs" / "openapi.json").read_text())
    assert served == checked_in, "regenerate with: python -m corral.server._app > docs/openapi.json"


def test_infrastructure_errors_reach_clients_without_host_paths() -> None:
    from corral._errors import public_message

    raw = (
        "bwrap could not set up the box: bwrap: Can't find source path "
        "/var/lib/corral/server/workspaces/0123abcd: No such file or directory; "
        "cannot remove cgroup /sys/fs/cgroup/memory/corral/box-12-34"
    )
    message = public_message(raw)
    assert "/var/lib" not in message
    assert "/sys/fs" not in message
    assert message.count("<host path>") == 2
    assert public_message("sandbox 1 has ended (timeout)") == "sandbox 1 has ended (timeout)"


def test_leaving_a_remote_stream_early_kills_the_command(client: Client) -> None:
    with client.sandbox(runtime=None) as sb:
        events = sb.commands.stream("echo start; sleep 300")
        first = next(iter(events))
        assert isinstance(first, corral.CommandOutput)
        events.close()  # the HTTP response is dropped: the server must end the command
        deadline = time.monotonic() + 10
        while any("sleep" in " ".join(p.argv) for p in sb.commands.list()):
            assert time.monotonic() < deadline, sb.commands.list()
            time.sleep(0.1)
        assert not [
            line
            for line in sb.commands.run("ps -eo args").stdout_text.splitlines()
            if line.startswith("sleep 300")
        ]


def test_revoked_keys_and_other_keys_audit(server: ServerProcess, client: Client) -> None:
    token = server.key("short-lived")
    with Client(server.url, api_key=token) as doomed:
        sb = doomed.sandbox(runtime=None)
        sb.start()
        sb.close()
        # the audit log of one key is invisible to another
        assert doomed.audit(sandbox_id=sb.id)
        assert client.audit(sandbox_id=sb.id) == []
        key_id = token.split("_")[1]
        subprocess.run(
            [*CORRAL, "keys", "revoke", key_id, "--data-dir", str(server.data_dir)], check=True
        )
        time.sleep(2.5)  # answers are cached for 2 s
        with pytest.raises(RemoteError) as revoked:
            doomed.list()
        assert revoked.value.status == 401


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_language_of_the_interpreter_is_accepted_over_the_api(
    server: ServerProcess, key: str, language: str
) -> None:
    """The API's ``language`` is ``_interpreter.Language``: js, typescript, ts too."""
    headers = {"Authorization": f"Bearer {key}"}
    schema = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    assert schema["RunCode"]["properties"]["language"]["enum"] == list(LANGUAGES)
    if language not in ("ts", "typescript"):
        return  # each is run by its own interpreter tests; TypeScript runs here
    with Client(server.url, api_key=key) as c, c.sandbox(timeout_s=120) as sb:
        reply = httpx.post(
            f"{server.url}/v1/sandboxes/{sb.id}/code",
            json={"code": "const n: number = 20 + 1; n * 2", "language": language},
            headers=headers,
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["results"][0]["text"] == "42"
        ex = sb.run_code("type T = {a: number}; const t: T = {a: 1}; t.a + 1", language=language)
        assert ex.text == "2"
