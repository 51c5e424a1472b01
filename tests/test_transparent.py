"""Allowlist mode, transparent: programs that ignore the proxy variables go
through the proxy too (the box's nftables rules redirect every TCP connection),
and names resolve only through corral's DNS responder.

Every target is a server on 127.0.0.1 reached through the policy's ``hosts``
mapping (and the explicit ``127.0.0.1`` IP rule the SSRF guard needs); the
hard-coded address the box tries is 127.0.0.2: were the guard broken, the
only thing reached would be the host's loopback.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import corral
from corral import AsyncSandbox, NetworkEvent, Policy
from corral.backends.linux._netns import ruleset

from . import test_network as _net
from .conftest import unprivileged_user
from .test_network import Servers, policy

servers = _net.servers  # the fixture: loopback HTTP(S) servers

NODE = shutil.which("node", path="/usr/bin:/usr/local/bin")

# a program that opens its own sockets: getaddrinfo, then connect, no proxy variables
RAW = r"""
import json, socket, sys
port, out = int(sys.argv[1]), {}
def get(host, family=socket.AF_UNSPEC):
    try:
        info = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        return f"gaierror {e.errno}"
    s = socket.socket(info[0], socket.SOCK_STREAM); s.settimeout(5)
    try:
        s.connect(info[4])
        s.sendall(f"GET /raw HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):  # the proxy sends Connection: close upstream
            data += chunk
        return data.decode().split("\r\n\r\n", 1)[-1] if data else "closed"
    except OSError as e:
        return type(e).__name__
out["allowed"] = get("pypi.test")
out["allowed6"] = get("pypi.test", socket.AF_INET6)
out["denied"] = get("evil.test")
out["hardcoded"] = get("127.0.0.2")
try:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"x", ("127.0.0.2", 9)); out["udp"] = "sent"
except OSError as e:
    out["udp"] = type(e).__name__
print(json.dumps(out))
"""

NODE_CODE = r"""
const http = require("http"), https = require("https"), fs = require("fs");
const [port, sport] = process.argv.slice(1).map(Number);
const ca = fs.readFileSync("/etc/corral-test-ca.pem");
const out = {};
function get(mod, url, opts) {
  return new Promise((ok) => {
    const req = mod.get(url, opts || {}, (r) => {
      let b = ""; r.on("data", (c) => b += c); r.on("end", () => ok(b));
    });
    req.on("error", (e) => ok(e.code || String(e)));
    req.setTimeout(5000, () => { req.destroy(); ok("timeout"); });
  });
}
(async () => {
  out.http = await get(http, `http://pypi.test:${port}/node`);
  out.https = await get(https, `https://secure.test:${sport}/node`, { ca });
  out.denied = await get(http, `http://evil.test:${port}/node`);
  try { out.fetch = await (await fetch(`http://pypi.test:${port}/fetch`)).text(); }
  catch (e) { out.fetch = String(e.cause && e.cause.code || e); }
  console.log(JSON.stringify(out));
})();
"""


def _policy(servers: Servers) -> Policy:
    return policy(servers, ["pypi.test", f"secure.test:{servers.https_port}", "127.0.0.1"])


async def _run(p: Policy, argv: list[str]) -> tuple[dict[str, str], list[NetworkEvent]]:
    env = {"PATH": "/usr/bin:/bin"}  # no proxy variables: the redirect must carry it
    async with AsyncSandbox(p.with_env(env, replace=True), timeout_s=60) as sb:
        result = await sb.commands.run(argv)
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout), await sb.network.events()


async def test_raw_sockets_dns_and_ipv6_go_through_the_proxy(servers: Servers) -> None:
    out, events = await _run(
        _policy(servers), ["/usr/bin/python3", "-c", RAW, str(servers.http_port)]
    )
    hello = f"hello pypi.test:{servers.http_port} /raw"
    assert out["allowed"] == out["allowed6"] == hello
    assert out["denied"] == "gaierror -2"  # NXDOMAIN from corral's responder
    assert out["hardcoded"] in ("ConnectionResetError", "closed")
    assert out["udp"] == "PermissionError"
    dns = {(e.host, e.allowed, e.reason) for e in events if e.port == 53}
    assert ("evil.test", False, "DNS A: not on the allowlist") in dns
    assert any(host == "pypi.test" and ok for host, ok, _ in dns)
    refused = [e for e in events if e.host == "127.0.0.2"]
    assert refused
    assert not refused[0].allowed
    assert refused[0].reason == "loopback address (SSRF guard)"
    opened = [e for e in events if e.host == "pypi.test" and e.port == servers.http_port]
    assert len(opened) == 2
    assert all(e.allowed and e.address == "127.0.0.1" for e in opened)


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_node_http_https_and_fetch_ignore_proxy_variables_and_still_work(
    servers: Servers,
) -> None:
    argv = [str(NODE), "-e", NODE_CODE, str(servers.http_port), str(servers.https_port)]
    out, events = await _run(_policy(servers), argv)
    assert out == {
        "http": f"hello pypi.test:{servers.http_port} /node",
        "https": f"hello secure.test:{servers.https_port} /node",
        "denied": "ENOTFOUND",
        "fetch": f"hello pypi.test:{servers.http_port} /fetch",
    }
    assert any(e.host == "evil.test" and not e.allowed for e in events)


async def test_sni_must_match_the_name_the_address_stands_for(servers: Servers) -> None:
    """TLS to pypi.test's synthetic address naming other.test in its SNI: refused."""
    code = r"""
import socket, ssl, sys
ctx = ssl.create_default_context(cafile="/etc/corral-test-ca.pem")
addr = socket.getaddrinfo("secure.test", int(sys.argv[1]))[0][4]
try:
    raw = socket.create_connection(addr, timeout=5)
    with ctx.wrap_socket(raw, server_hostname="other.test") as s:
        print("reached")
except (OSError, ssl.SSLError) as e:
    print("refused", type(e).__name__)
"""
    env = {"PATH": "/usr/bin:/bin"}
    p = _policy(servers).with_env(env, replace=True)
    async with AsyncSandbox(p, timeout_s=60) as sb:
        result = await sb.commands.run(["/usr/bin/python3", "-c", code, str(servers.https_port)])
        events = await sb.network.events()
    assert result.stdout.decode().startswith("refused"), result
    assert any("does not match secure.test" in e.reason for e in events)


def test_ruleset_redirects_dns_and_tcp_and_drops_the_rest() -> None:
    text = ruleset(transparent_port=3129, dns_port=1053)
    assert "udp dport 53 redirect to :1053" in text
    assert text.index("udp dport 53") < text.index("ip daddr 127.0.0.1 return")
    assert "meta l4proto tcp redirect to :3129" in text
    assert "policy drop" in text


def test_an_ordinary_user_gets_the_same_walls(servers: Servers) -> None:
    user = unprivileged_user()
    if os.geteuid() != 0 or user is None:
        pytest.skip("needs root to run the CLI as the unprivileged user")
    src = Path(corral.__file__).resolve().parents[1]  # the corral under test
    with tempfile.TemporaryDirectory(prefix="corral-test-tp-") as tmp:
        os.chmod(tmp, 0o755)
        shutil.copytree(src / "corral", Path(tmp) / "corral")
        for path in Path(tmp).rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        policy_file = Path(tmp) / "policy.json"
        p = _policy(servers).with_env({"PATH": "/usr/bin:/bin"}, replace=True)
        policy_file.write_text(json.dumps(p.to_dict()))
        policy_file.chmod(0o644)
        argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        argv += ["--", sys.executable, "-m", "corral", "run", "--policy", str(policy_file)]
        argv += ["--", "/usr/bin/python3", "-c", RAW, str(servers.http_port)]
        proc = subprocess.run(
            argv,
            capture_output=True,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": tmp},
            cwd="/",
            timeout=120,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["allowed"] == out["allowed6"] == f"hello pypi.test:{servers.http_port} /raw"
    assert out["denied"] == "gaierror -2"
    assert out["hardcoded"] in ("ConnectionResetError", "closed")


BIG = hashlib.sha256(b"corral").digest() * (1 << 19)  # 16 MiB, not zeros: corruption shows


class _BigHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BIG)))
        self.end_headers()
        self.wfile.write(BIG)

    def log_message(self, *args: object) -> None:
        pass


async def test_the_relay_moves_every_byte_and_counts_them() -> None:
    """Through the kernel's splice both ways: the body arrives whole, in both
    modes, and the events count what went up and down."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _BigHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    code = r"""
import hashlib, os, sys, urllib.request
print(hashlib.sha256(urllib.request.urlopen(sys.argv[1], timeout=30).read()).hexdigest())
"""
    p = Policy.preset("default").with_network(
        mode="allowlist", allow=["big.test", "127.0.0.1"], hosts={"big.test": "127.0.0.1"}
    )
    try:
        async with AsyncSandbox(p, timeout_s=60) as sb:  # proxy variables: plain HTTP forwarding
            via_variables = await sb.commands.run(
                ["/usr/bin/python3", "-c", code, f"http://big.test:{port}/"]
            )
            events = await sb.network.events()
        bare = p.with_env({"PATH": "/usr/bin:/bin"}, replace=True)
        async with AsyncSandbox(bare, timeout_s=60) as sb:  # transparent
            transparent = await sb.commands.run(
                ["/usr/bin/python3", "-c", code, f"http://big.test:{port}/"]
            )
            events += await sb.network.events()
    finally:
        server.shutdown()
        server.server_close()
    digest = hashlib.sha256(BIG).hexdigest()
    assert via_variables.stdout.decode().strip() == digest, via_variables
    assert transparent.stdout.decode().strip() == digest, transparent
    relayed = [e for e in events if e.host == "big.test" and e.port == port]
    assert len(relayed) == 2
    for event in relayed:
        assert len(BIG) < event.bytes_down < len(BIG) + 1024  # the body and the head
        assert 0 < event.bytes_up < 1024


OWN_DNS_C = r"""/* Resolves like a static Go binary: its own DNS query over UDP to the
   resolv.conf nameserver, then connect() and one HTTP GET. argv: name port */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char ns[64] = "127.0.0.1", line[256];
    FILE *f = fopen("/etc/resolv.conf", "r");
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "nameserver %63s", ns) == 1) break;
    unsigned char q[512] = {0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0}, r[512];
    int n = 12;
    for (char *label = strtok(strdup(argv[1]), "."); label; label = strtok(NULL, ".")) {
        q[n++] = (unsigned char)strlen(label);
        memcpy(q + n, label, strlen(label));
        n += (int)strlen(label);
    }
    q[n++] = 0; q[n++] = 0; q[n++] = 1; q[n++] = 0; q[n++] = 1;
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(53)};
    inet_pton(AF_INET, ns, &a.sin_addr);
    struct timeval tv = {5, 0};
    setsockopt(u, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sendto(u, q, n, 0, (struct sockaddr *)&a, sizeof a);
    int got = (int)recv(u, r, sizeof r, 0);
    if (got < 12) { puts("no answer"); return 0; }
    if ((r[3] & 15) != 0) { printf("rcode %d\n", r[3] & 15); return 0; }
    if (r[7] == 0 || got < n + 16) { puts("no address"); return 0; }
    struct sockaddr_in t = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    memcpy(&t.sin_addr, r + got - 4, 4);  /* the one A record ends the message */
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&t, sizeof t) != 0) { perror("connect"); return 0; }
    char req[256];
    int len = snprintf(req, sizeof req, "GET /static HTTP/1.0\r\nHost: %s\r\n\r\n", argv[1]);
    write(s, req, len);
    char body[4096];
    int total = 0, k;
    while ((k = (int)read(s, body + total, sizeof body - 1 - total)) > 0) total += k;
    body[total] = 0;
    char *start = strstr(body, "\r\n\r\n");
    puts(start ? start + 4 : "closed");
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler to build the static binary")
async def test_a_static_binary_with_its_own_resolver(servers: Servers, world_dir: Path) -> None:
    """Like a static Go binary: no libc resolver, no proxy variables; its own DNS
    query to the resolv.conf nameserver, then connect()."""
    (world_dir / "own_dns.c").write_text(OWN_DNS_C)
    binary = world_dir / "own_dns"
    subprocess.run(
        ["gcc", "-static", "-O1", "-o", str(binary), str(world_dir / "own_dns.c")],
        check=True,
        capture_output=True,
    )
    binary.chmod(0o755)
    p = _policy(servers).with_filesystem(
        read_only=[f"{servers.cafile}:/etc/corral-test-ca.pem", f"{binary}:/opt/own_dns"]
    )
    port = str(servers.http_port)
    env = {"PATH": "/usr/bin:/bin"}
    async with AsyncSandbox(p.with_env(env, replace=True), timeout_s=60) as sb:
        allowed = await sb.commands.run(["/opt/own_dns", "pypi.test", port])
        denied = await sb.commands.run(["/opt/own_dns", "evil.test", port])
        events = await sb.network.events()
    assert allowed.stdout.decode().strip() == f"hello pypi.test:{port} /static"
    assert denied.stdout.decode().strip() == "rcode 3"  # NXDOMAIN
    assert any(e.host == "evil.test" and e.port == 53 and not e.allowed for e in events)


async def test_the_approval_callback_decides_transparent_connections(servers: Servers) -> None:
    """With a callback, every name resolves (to a stand-in) and the callback
    decides at connect time, with the port; its "no" is a refusal on record."""
    asked: list[tuple[str, int]] = []

    def approve(host: str, port: int) -> bool:
        asked.append((host, port))
        return host == "pypi.test"

    env = {"PATH": "/usr/bin:/bin"}
    p = policy(servers, ["127.0.0.1"]).with_env(env, replace=True)
    async with AsyncSandbox(p, timeout_s=60, on_network_request=approve) as sb:
        result = await sb.commands.run(["/usr/bin/python3", "-c", RAW, str(servers.http_port)])
        events = await sb.network.events()
    out = json.loads(result.stdout)
    assert out["allowed"] == f"hello pypi.test:{servers.http_port} /raw"
    assert out["denied"] in ("ConnectionResetError", "closed")  # resolved, then refused
    assert ("pypi.test", servers.http_port) in asked
    assert ("evil.test", servers.http_port) in asked
    assert any(e.host == "evil.test" and e.reason == "refused by the callback" for e in events)


async def test_relayed_connections_leave_no_descriptor_behind(servers: Servers) -> None:
    """Each relayed connection holds duplicates and pipes while it runs; none
    outlives it (nor the box's listeners the box)."""
    code = r"""
import socket, sys, urllib.request
port = int(sys.argv[1])
for i in range(20):
    urllib.request.urlopen(f"http://pypi.test:{port}/v{i}", timeout=10).read()
    s = socket.create_connection(("pypi.test", port), timeout=10)
    s.sendall(b"GET /t HTTP/1.1\r\nHost: pypi.test\r\n\r\n")
    while s.recv(4096):
        pass
"""
    p = _policy(servers)
    async with AsyncSandbox(p, timeout_s=60) as sb:  # warm: imports, the event loop's own fds
        await sb.commands.run(["/bin/true"])
    before = len(os.listdir("/proc/self/fd"))
    async with AsyncSandbox(p, timeout_s=60) as sb:
        result = await sb.commands.run(["/usr/bin/python3", "-c", code, str(servers.http_port)])
        assert result.exit_code == 0, result.stderr
        assert len([e for e in await sb.network.events() if e.port == servers.http_port]) == 40
    assert len(os.listdir("/proc/self/fd")) == before
