"""The ``/ui`` dashboard, in a real browser (Debian's headless chromium driven by
playwright-core, ``tests/ui/drive.mjs``) against a real ``corral serve`` on 127.0.0.1,
and its CSRF and isolation rules over plain HTTP.

Set-up: ``apt-get install chromium`` and ``npm ci --prefix tests/ui`` (scripts/bootstrap test).
``CORRAL_UI_SCREENSHOTS=1`` copies the screenshots into ``docs/`` (the README shows them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect
from websockets.typing import Origin

from corral.server.ui._routes import csrf_token
from tests.server_helpers import ServerProcess, serving

HERE = Path(__file__).parent
DRIVER = HERE / "ui" / "drive.mjs"
CHROMIUM = Path("/usr/bin/chromium")
DOCS = HERE.parent / "docs"

FILE = "<img src=x onerror=window.__corral_xss=3>.txt"  # no "/": a file name
XSS = "<script>window.__corral_xss=1</script><img src=x onerror=window.__corral_xss=2>"

needs_browser = pytest.mark.skipif(
    not CHROMIUM.exists()
    or shutil.which("node") is None
    or not (HERE / "ui" / "node_modules" / "playwright-core").is_dir(),
    reason="needs /usr/bin/chromium (apt) and tests/ui/node_modules (npm ci --prefix tests/ui)",
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with serving() as srv:
        yield srv


def _api(srv: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _create(api: httpx.Client, **body: object) -> str:
    reply = api.post("/v1/sandboxes", json={"runtime": None, **body})
    assert reply.status_code == 201, reply.text
    return str(reply.json()["id"])


def _run(api: httpx.Client, sandbox_id: str, command: str) -> dict[str, object]:
    reply = api.post(f"/v1/sandboxes/{sandbox_id}/commands", json={"command": command})
    assert reply.status_code == 200, reply.text
    result: dict[str, object] = reply.json()
    return result


@needs_browser
@pytest.mark.timeout(300)
def test_dashboard_in_a_browser(server: ServerProcess, tmp_path: Path) -> None:
    key, other = server.key("ui-a"), server.key("ui-b")
    with _api(server, key) as api, _api(server, other) as api_b:
        theirs = _create(api_b, metadata={"team": "theirs-only"})
        mine = _create(
            api,
            metadata={"team": "blue", "note": XSS},
            # allowlist: denied.test is not allowed (the proxy refuses it); were the
            # rule broken, the name maps to 127.0.0.1, so only loopback is reached
            policy={
                "network": {
                    "mode": "allowlist",
                    "allow": ["allowed.test"],
                    "hosts": {"denied.test": "127.0.0.1", "allowed.test": "127.0.0.1"},
                },
                "limits": {"memory_bytes": 64 << 20},
            },
        )
        _run(api, mine, "echo hello-from-ui")
        wrote = _run(api, mine, f"printf '%s' '{XSS}' > \"$HOME/{FILE}\" && echo '{XSS}'")
        assert wrote["exit_code"] == 0
        _run(
            api,
            mine,
            "python3 -c \"import urllib.request as u; u.urlopen('http://denied.test:9/')\"",
        )
        bomb = _run(api, mine, "python3 -c 'x = [bytearray(1 << 20) for _ in range(4096)]'")
        asking = _create(
            api,
            network_approval=True,
            # ask.test is named by no rule: the server asks; the page answers no
            # (were the answer ignored, the name maps to loopback: nothing leaves)
            policy={
                "network": {
                    "mode": "allowlist",
                    "allow": ["allowed.test"],
                    "hosts": {"ask.test": "127.0.0.1", "allowed.test": "127.0.0.1"},
                }
            },
        )
        started = api.post(
            f"/v1/sandboxes/{asking}/commands",
            json={
                "command": "python3 -c \"import urllib.request as u; u.urlopen('http://ask.test:9/')\"",
                "background": True,
            },
        )
        assert started.status_code == 201, started.text
        shots = tmp_path
        out = subprocess.run(
            [
                "node",
                str(DRIVER),
                json.dumps(
                    {
                        "url": server.url,
                        "key": key,
                        "mine": mine,
                        "theirs": theirs,
                        "asking": asking,
                        "shots": str(shots),
                    }
                ),
            ],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout.strip().splitlines()[-1])

        # the login: a bad key is refused, a good one sets an HttpOnly, SameSite=Strict cookie
        assert seen["login_url"].endswith("/ui/login")
        assert seen["bad_login"] == 1
        assert seen["cookies"] == [
            {"name": "corral_key", "httpOnly": True, "sameSite": "Strict", "path": "/ui"}
        ]
        assert seen["script_cookie"] == ""  # no script can read the key

        # only the caller's sandboxes, filters work, the other key's is as absent as in the API
        assert mine in seen["list"]
        assert theirs not in seen["list"]
        assert "theirs-only" not in seen["list"]
        assert mine in seen["list_running"]
        assert mine in seen["list_blue"]
        assert seen["theirs_status"] == 404
        assert "not_found" in seen["theirs_text"]

        # the sandbox page: its commands, its network decisions, its policy
        assert seen["mine_status"] == 200
        assert seen["state"] == "running"
        assert "hello-from-ui" in seen["runs"]
        assert "bytearray(1 << 20)" in seen["runs"]
        assert bomb["limit_hit"] == "memory"
        assert "memory" in seen["runs"]
        assert "denied.test" in seen["network"]
        assert "denied" in seen["network"]
        assert '"allowlist"' in seen["policy"]

        # hostile strings render as text: nothing ran, no element was injected
        # the sandbox page runs its own static scripts only: no inline script, no eval
        assert "script-src 'self';" in seen["csp"]
        assert "unsafe" not in seen["csp"]
        assert XSS in seen["metadata"]
        assert FILE in seen["files"]
        for page in ("list_xss", "sandbox_xss", "files_xss"):
            assert seen[page] == {"flag": None, "scripts": 0, "imgs": 0}, page
        assert seen["dialogs"] == []

        # the approval: listed, answered from the page, logged as denied
        assert "ask.test" in seen["approvals"]
        assert asking in seen["approvals"]
        assert "Nothing is waiting" in seen["approvals_after"]
        assert "network.approval" in seen["asking_network"]
        assert "ask.test" in seen["asking_network"]
        assert "denied" in seen["asking_network"]
        # extend from the page
        assert seen["expires_after"] > seen["expires_before"]

        # kill from the page: ended, reason closed; the API agrees
        assert seen["state_after"] == "ended"
        assert seen["end_reason"] == "closed"
        info = api.get(f"/v1/sandboxes/{mine}").json()
        assert (info["state"], info["end_reason"]) == ("ended", "closed")
        assert api_b.get(f"/v1/sandboxes/{theirs}").json()["state"] == "running"
        # the ended workspace stays browsable while retained
        assert FILE in seen["files_ended"]
        assert "closed" in seen["overview"]  # ends by reason
        assert "memory" in seen["overview"]  # limit hits by kind
        assert "memory" not in seen["key_page"] or "no limit" in seen["key_page"]

        # no request to any origin but the server's
        origins = {f"{urlsplit(u).scheme}://{urlsplit(u).netloc}" for u in seen["requests"]}
        assert origins == {server.url}, origins
        for name in ("ui-sandbox.png", "ui-overview.png", "ui-sandboxes.png"):
            assert (shots / name).stat().st_size > 1000
            if os.environ.get("CORRAL_UI_SCREENSHOTS"):  # refresh docs/'s pictures
                shutil.copy(shots / name, DOCS / name)


def test_posts_need_the_csrf_token_and_same_origin(server: ServerProcess) -> None:
    key = server.key("ui-csrf")
    with _api(server, key) as api, httpx.Client(base_url=server.url, timeout=60) as ui:
        sandbox_id = _create(api)
        ui.cookies.set("corral_key", key, path="/ui")
        kill = f"/ui/sandboxes/{sandbox_id}/kill"
        # no token: a forged form from a page that could only make the browser send the cookie
        assert ui.post(kill, data={}).status_code == 403
        assert ui.post(kill, data={"csrf": "0" * 64}).status_code == 403
        # the right token, but the browser says the form came from another site
        good = {"csrf": csrf_token(key)}
        assert ui.post(kill, data=good, headers={"Origin": "http://127.0.0.2:1"}).status_code == 403
        assert ui.post(kill, data=good, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert api.get(f"/v1/sandboxes/{sandbox_id}").json()["state"] == "running"
        # a login from another site (login CSRF) is refused too
        login = ui.post("/ui/login", data={"key": key}, headers={"Origin": "http://127.0.0.2:1"})
        assert login.status_code == 403
        # same origin with the token: done
        reply = ui.post(kill, data=good, headers={"Origin": server.url})
        assert reply.status_code == 303
        assert api.get(f"/v1/sandboxes/{sandbox_id}").json()["end_reason"] == "closed"


def test_another_keys_sandbox_cannot_be_killed_or_browsed(server: ServerProcess) -> None:
    key, other = server.key("ui-own"), server.key("ui-other")
    with _api(server, other) as api_b, httpx.Client(base_url=server.url, timeout=60) as ui:
        theirs = _create(api_b)
        with _api(server, key) as api:
            mine = _create(api)
        ui.cookies.set("corral_key", key, path="/ui")
        listed = ui.get("/ui/sandboxes")
        assert listed.status_code == 200
        assert mine in listed.text  # the page works for the key's own
        assert theirs not in listed.text
        token = {"csrf": csrf_token(key)}
        assert ui.post(f"/ui/sandboxes/{theirs}/kill", data=token).status_code == 404
        assert (
            ui.post(f"/ui/sandboxes/{theirs}/extend", data={**token, "timeout_s": "60"}).status_code
            == 404
        )
        assert ui.get(f"/ui/sandboxes/{theirs}/files").status_code == 404
        assert ui.get(f"/ui/sandboxes/{theirs}/download", params={"path": "x"}).status_code == 404
        assert api_b.get(f"/v1/sandboxes/{theirs}").json()["state"] == "running"


def test_pages_without_a_session_go_to_the_login(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as ui:
        for path in ("/ui/sandboxes", "/ui/overview", "/ui/approvals", "/ui/key"):
            reply = ui.get(path)
            assert reply.status_code == 303, path
            assert reply.headers["location"] == "/ui/login"
        ui.cookies.set("corral_key", "crl_bogus_bogus", path="/ui")
        assert ui.get("/ui/sandboxes").headers["location"] == "/ui/login"
        page = ui.get("/ui/login")
        assert "script-src 'none'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_downloads_are_attachments_never_rendered(server: ServerProcess) -> None:
    key = server.key("ui-dl")
    with _api(server, key) as api, httpx.Client(base_url=server.url, timeout=60) as ui:
        sandbox_id = _create(api)
        page = b"<html><script>alert(1)</script></html>"
        put = api.put(
            f"/v1/sandboxes/{sandbox_id}/files/content", params={"path": "x.html"}, content=page
        )
        assert put.status_code == 200, put.text
        ui.cookies.set("corral_key", key, path="/ui")
        got = ui.get(f"/ui/sandboxes/{sandbox_id}/download", params={"path": "x.html"})
        assert got.status_code == 200
        assert got.content == page
        assert got.headers["content-type"] == "application/octet-stream"
        assert got.headers["content-disposition"] == "attachment; filename*=UTF-8''x.html"
        assert got.headers["x-content-type-options"] == "nosniff"
        assert "script-src 'none'" in got.headers["content-security-policy"]
        # a file the box does not have: an error page (the API's status), not a traceback
        missing = ui.get(f"/ui/sandboxes/{sandbox_id}/download", params={"path": "nope"})
        assert (
            missing.status_code
            == api.get(
                f"/v1/sandboxes/{sandbox_id}/files/content", params={"path": "nope"}
            ).status_code
        )
        assert missing.headers["content-type"].startswith("text/html")
        assert "Traceback" not in missing.text


@needs_browser
@pytest.mark.timeout(300)
def test_usage_charts_and_terminal_in_a_browser(server: ServerProcess, tmp_path: Path) -> None:
    key, other = server.key("ui-term"), server.key("ui-term-other")
    with _api(server, key) as api, _api(server, other) as api_b:
        box = _create(api, policy={"limits": {"memory_bytes": 256 << 20}})
        theirs = _create(api_b)
        out = subprocess.run(
            [
                "node",
                str(HERE / "ui" / "terminal.mjs"),
                json.dumps(
                    {
                        "url": server.url,
                        "key": key,
                        "other": other,
                        "box": box,
                        "theirs": theirs,
                        "shots": str(tmp_path),
                    }
                ),
            ],
            capture_output=True,
            text=True,
            timeout=280,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout.strip().splitlines()[-1])

    # the charts: all four drawn, then redrawn by the page as the box burns a core
    # and takes 96 MiB (the values the page shows are the server's samples)
    names = ["usage-cpu", "usage-memory", "usage-pids", "usage-disk"]
    assert [c["id"] for c in seen["charts_idle"]] == names
    assert all(c["points"] >= 1 for c in seen["charts_idle"])
    assert seen["burn_status"] == 201
    assert seen["cpu_busy"] > 50 > seen["cpu_idle"]
    assert seen["memory_busy"] > seen["memory_idle"] + (64 << 20)
    assert all(
        busy["points"] > idle["points"]
        for busy, idle in zip(seen["charts_busy"], seen["charts_idle"], strict=True)
    )
    assert seen["charts_busy"][0]["value"] != seen["charts_idle"][0]["value"]

    # the terminal: typed commands ran in the box, their output shown
    assert seen["echo_seen"]
    assert "corral-42-ok" in seen["screen"]
    # hostile output stays text: no element made, nothing ran, no title, no link followed
    assert seen["payload_seen"]
    assert "<img src=x onerror=window.__corral_xss=1><script>" in seen["screen"]
    assert seen["link_drawn"] == 1  # xterm drew the OSC 8 link; clicking it did nothing
    assert seen["terminal_xss"] == {
        "flag": None,
        "scripts": ["/ui/static/usage.js", "/ui/static/terminal.js"],
        "imgs": 0,
        "title": f"{box} · corral",
    }
    assert seen["popups"] == 0
    assert seen["dialogs"] == []
    assert seen["violations"] == []  # xterm.js runs under the page's CSP, nonce'd styles
    # only the server was asked for anything (the terminal's socket included)
    origins = {f"{urlsplit(u).scheme}://{urlsplit(u).netloc}" for u in seen["requests"]}
    assert origins == {server.url}, origins

    # a second key: no page, no terminal (its own CSRF token or none)
    assert seen["other_status"] == 404
    assert seen["other_ws"] == {"code": 1008, "reason": "stale page: reload it", "received": 0}
    assert seen["other_ws_token"]["code"] == 1011
    assert "no sandbox" in seen["other_ws_token"]["reason"]
    assert seen["other_ws_token"]["received"] == 0
    # one shell was opened (audited), and killed when the page closed it
    with _api(server, key) as api:
        log = api.get("/v1/audit", params={"sandbox_id": box, "action": "pty.create"})
        assert len(log.json()["entries"]) == 1
        processes = api.get(f"/v1/sandboxes/{box}/commands").json()
    assert [p for p in processes["processes"] if p["pty"]] == [], processes
    shot = tmp_path / "ui-terminal.png"
    assert shot.stat().st_size > 1000
    if os.environ.get("CORRAL_UI_SCREENSHOTS"):
        shutil.copy(shot, DOCS / shot.name)


def _terminal_socket(srv: ServerProcess, sandbox_id: str, cookie: str | None, origin: str) -> Any:
    headers = {"Cookie": f"corral_key={cookie}"} if cookie else {}
    return ws_connect(
        f"ws://{urlsplit(srv.url).netloc}/ui/sandboxes/{sandbox_id}/terminal",
        origin=Origin(origin),
        additional_headers=headers,
        open_timeout=30,
    )


def test_the_terminal_socket_checks_origin_session_and_token(server: ServerProcess) -> None:
    key, other = server.key("ui-ws"), server.key("ui-ws-other")
    with _api(server, key) as api:
        box = _create(api)
        # another site's page (the browser names it in Origin): refused at the handshake
        with pytest.raises(InvalidStatus) as refused:
            _terminal_socket(server, box, key, "http://127.0.0.2:1")
        assert refused.value.response.status_code == 403
        # no session
        with pytest.raises(InvalidStatus):
            _terminal_socket(server, box, None, server.url)
        # the session but not the page's token
        with _terminal_socket(server, box, key, server.url) as ws:
            ws.send(json.dumps({"csrf": "0" * 64, "cols": 80, "rows": 24}))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        # another key, with its own valid token: the box is not its
        with _terminal_socket(server, box, other, server.url) as ws:
            ws.send(json.dumps({"csrf": csrf_token(other), "cols": 80, "rows": 24}))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1011
        assert api.get(f"/v1/sandboxes/{box}/commands").json()["processes"] == []
        # the key's own: a shell, listed as a PTY process while the socket is open
        with _terminal_socket(server, box, key, server.url) as ws:
            ws.send(json.dumps({"csrf": csrf_token(key), "cols": 80, "rows": 24}))
            ws.send(b"echo $((40+2))-from-ws\n")
            seen = b""
            while b"42-from-ws" not in seen:
                message = ws.recv(timeout=30)
                assert isinstance(message, bytes)
                seen += message
            listed = api.get(f"/v1/sandboxes/{box}/commands").json()["processes"]
            assert [p["pty"] for p in listed] == [True]
        # closed by the page: the shell is killed, nothing left in the box
        for _ in range(50):
            if not api.get(f"/v1/sandboxes/{box}/commands").json()["processes"]:
                break
            time.sleep(0.2)
        assert api.get(f"/v1/sandboxes/{box}/commands").json()["processes"] == []
        # the shell ending by itself: its exit code, then the socket closes
        with _terminal_socket(server, box, key, server.url) as ws:
            ws.send(json.dumps({"csrf": csrf_token(key), "cols": 80, "rows": 24}))
            ws.send(b"exit 7\n")
            texts = _until_closed(ws)
        assert [json.loads(m) for m in texts] == [{"exit_code": 7}]
        # the box ending under the terminal: the socket closes, saying why
        with _terminal_socket(server, box, key, server.url) as ws:
            ws.send(json.dumps({"csrf": csrf_token(key), "cols": 80, "rows": 24}))
            ws.send(b"echo ready-$((1+1))\n")
            seen = b""
            while b"ready-2" not in seen:
                message = ws.recv(timeout=30)
                assert isinstance(message, bytes)
                seen += message
            assert api.delete(f"/v1/sandboxes/{box}").status_code == 200
            _until_closed(ws)
        assert ws.close_code == 1011
        assert ws.close_reason == f"sandbox {box} has ended (closed)"


def _until_closed(ws: Any) -> list[str]:
    """The text messages until the server closes the socket."""
    texts: list[str] = []
    while True:
        try:
            message = ws.recv(timeout=30)
        except ConnectionClosed:
            return texts
        if isinstance(message, str):
            texts.append(message)


def test_vendored_xterm_is_the_pinned_release(server: ServerProcess) -> None:
    # the files shipped are @xterm/xterm's, byte for byte (sha256 pinned beside the
    # registry's sha512 in scripts/vendor_xterm.py), licence included
    check = subprocess.run(
        ["python3", str(HERE.parent / "scripts" / "vendor_xterm.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    with httpx.Client(base_url=server.url, timeout=60) as ui:
        module = ui.get("/ui/static/xterm.mjs")
        assert module.status_code == 200
        assert module.headers["content-type"].startswith("text/javascript")  # a module needs it
        assert "Permission is hereby granted" in ui.get("/ui/static/xterm.LICENSE").text
