"""Network mode ``allowlist``: real boxes, the real proxy, real HTTP(S) servers on 127.0.0.1.

Test domains are mapped to the loopback servers with the policy's ``hosts``
override; since loopback is an internal address, every test that must reach
them also allows ``127.0.0.1`` by an explicit IP rule — and one test checks
that without it the proxy refuses.
"""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import json
import os
import shutil
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import corral
from corral import AsyncSandbox, Policy
from corral.net import _rules as _netrules

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="allowlist mode needs root here")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello {self.headers.get('Host')} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class Servers:
    http_port: int
    https_port: int
    cafile: Path


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    tmp = Path(tempfile.mkdtemp(prefix="corral-test-tls-"))  # reachable by box uids
    tmp.chmod(0o755)
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=secure.test",
            "-addext",
            "subjectAltName=DNS:secure.test,DNS:other.test",
        ],
        check=True,
        capture_output=True,
    )
    cert.chmod(0o644)
    plain = _Server(("127.0.0.1", 0), _Handler)
    secure = _Server(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (plain, secure)]
    for thread in threads:
        thread.start()
    try:
        yield Servers(plain.server_address[1], secure.server_address[1], cert)
    finally:
        for server in (plain, secure):
            server.shutdown()
            server.server_close()
        shutil.rmtree(tmp)


def policy(servers: Servers, allow: list[str], *, deny: tuple[str, ...] = ()) -> Policy:
    hosts = {
        "pypi.test": "127.0.0.1",
        "evil.test": "127.0.0.1",
        "secure.test": "127.0.0.1",
        "other.test": "127.0.0.1",
    }
    return (
        Policy.preset("default")
        .with_filesystem(read_only=[f"{servers.cafile}:/etc/corral-test-ca.pem"])
        .with_network(mode="allowlist", allow=allow, deny=list(deny), hosts=hosts)
    )


FETCH = r"""
import json, socket, ssl, sys, urllib.request
out = {}
for url in sys.argv[1:]:
    try:
        ctx = ssl.create_default_context(cafile="/etc/corral-test-ca.pem")
        with urllib.request.urlopen(url, timeout=10, context=ctx) as r:
            out[url] = r.read().decode()
    except urllib.error.HTTPError as e:
        out[url] = f"HTTP {e.code}: {e.read().decode().strip()}"
    except Exception as e:
        out[url] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def fetch(policy: Policy, *urls: str) -> tuple[dict[str, str], corral.RunResult]:
    result = corral.run(["/usr/bin/python3", "-c", FETCH, *urls], policy=policy)
    assert result.exit_code == 0, result.stderr_text
    return json.loads(result.stdout), result


def test_allowed_domains_work_and_the_rest_is_refused(servers: Servers) -> None:
    p = policy(servers, ["pypi.test", f"secure.test:{servers.https_port}", "127.0.0.1"])
    http_ok = f"http://pypi.test:{servers.http_port}/simple/"
    https_ok = f"https://secure.test:{servers.https_port}/x"
    unlisted = f"http://evil.test:{servers.http_port}/steal"
    seen, result = fetch(p, http_ok, https_ok, unlisted)
    assert seen[http_ok] == f"hello pypi.test:{servers.http_port} /simple/"
    assert seen[https_ok] == f"hello secure.test:{servers.https_port} /x"
    assert seen[unlisted].startswith("HTTP 403: corral proxy: evil.test")
    assert "not on the allowlist" in seen[unlisted]
    decisions = {(e.host, e.allowed) for e in result.network}
    assert ("pypi.test", True) in decisions
    assert ("evil.test", False) in decisions


def test_loopback_targets_need_an_explicit_ip_rule(servers: Servers) -> None:
    seen, result = fetch(policy(servers, ["pypi.test"]), f"http://pypi.test:{servers.http_port}/")
    assert "loopback address (SSRF guard)" in next(iter(seen.values()))
    assert [e.reason for e in result.network] == ["loopback address (SSRF guard)"]


def test_deny_wins_and_numeric_spellings_are_canonicalized(servers: Servers) -> None:
    p = policy(servers, ["pypi.test", "127.0.0.1"], deny=("pypi.test",))
    port = servers.http_port
    urls = [f"http://pypi.test:{port}/", f"http://2130706433:{port}/", f"http://0x7f.0.0.1:{port}/"]
    seen, _ = fetch(p.with_network(deny=["pypi.test", "127.0.0.0/8"]), *urls)
    assert all(v.startswith("HTTP 403") for v in seen.values()), seen
    meta = [
        "http://169.254.169.254/latest/meta-data/",
        "http://2852039166/",
        "http://0xa9.0xfe.0xa9.0xfe/",
    ]
    seen, result = fetch(policy(servers, ["pypi.test"]), *meta)
    assert all(v.startswith("HTTP 403") for v in seen.values()), seen
    assert {e.host for e in result.network} == {"169.254.169.254"}


def test_sni_must_match_the_connect_host(servers: Servers) -> None:
    code = rf"""
import socket, ssl
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"CONNECT secure.test:{servers.https_port} HTTP/1.1\r\nHost: secure.test\r\n\r\n")
assert s.recv(100).startswith(b"HTTP/1.1 200")
ctx = ssl.create_default_context(cafile="/etc/corral-test-ca.pem")
try:
    ctx.wrap_socket(s, server_hostname="other.test")
    print("fronted")
except (ssl.SSLError, OSError) as e:
    print("refused")
"""
    result = corral.run(
        ["/usr/bin/python3", "-c", code],
        policy=policy(servers, [f"secure.test:{servers.https_port}", "127.0.0.1"]),
    )
    assert result.stdout_text.strip() == "refused", result.stderr_text
    assert any("SNI 'other.test' does not match" in e.reason for e in result.network)


def test_no_other_way_out(servers: Servers) -> None:
    code = r"""
import socket
out = []
# the box's own loopback (nothing listens), then a hard-coded address the
# redirect hands to the proxy: refused by the SSRF guard (were it broken, the
# host's loopback would be the only thing reached)
for addr in [("127.0.0.1", PORT), ("127.0.0.2", PORT)]:
    try:
        s = socket.create_connection(addr, timeout=3)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        out.append("connected" if s.recv(100) else "closed")
    except OSError as e:
        out.append(type(e).__name__)
try:
    socket.getaddrinfo("evil.test", 80); out.append("resolved")
except OSError:
    out.append("no dns")
print(out)
""".replace("PORT", str(servers.http_port))
    result = corral.run(
        ["/usr/bin/python3", "-c", code], policy=policy(servers, ["pypi.test", "127.0.0.1"])
    )
    assert result.stdout_text.strip() in (
        "['ConnectionRefusedError', 'ConnectionResetError', 'no dns']",
        "['ConnectionRefusedError', 'closed', 'no dns']",
    )


def test_garbage_huge_heads_and_floods_do_not_hurt_the_proxy(servers: Servers) -> None:
    code = rf"""
import socket, urllib.request
out = {{}}
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"\x16\x03\x01garbage\r\n\r\n")
out["garbage"] = s.recv(200).split(b"\r\n")[0].decode()
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"GET http://pypi.test/" + b"a" * 100000)
out["huge"] = s.recv(200).split(b"\r\n")[0].decode()
held = []
for _ in range(2000):
    try:
        held.append(socket.create_connection(("127.0.0.1", 3128), timeout=5))
    except OSError as e:
        out["flood_error"] = str(e); break
out["held"] = len(held)
busy = [c.recv(100).split(b"\r\n")[0].decode() for c in held[-5:]]
out["flood"] = busy
for c in held:
    c.close()
import time; time.sleep(0.5)
after = urllib.request.urlopen("http://pypi.test:{servers.http_port}/ok", timeout=10)
out["after"] = after.read().decode()
print(repr(out))
"""
    p = policy(servers, ["pypi.test", "127.0.0.1"]).with_limits(open_files=4096, wall_time_s=60)
    result = corral.run(["/usr/bin/python3", "-c", code], policy=p)
    assert result.stdout, result  # a box that died says how (limit, signal, stderr)
    out = eval(result.stdout_text)
    assert out["garbage"] == "HTTP/1.1 400 Bad Request"
    assert out["huge"] == "HTTP/1.1 431 Request Header Fields Too Large"
    assert out["held"] == 2000
    assert set(out["flood"]) == {"HTTP/1.1 503 Service Unavailable"}
    assert out["after"].startswith("hello pypi.test")


async def test_rules_change_while_the_box_runs(servers: Servers) -> None:
    async with AsyncSandbox(policy(servers, ["127.0.0.1"]), timeout_s=60) as sb:
        url = f"http://pypi.test:{servers.http_port}/"
        get = [
            "/usr/bin/python3",
            "-c",
            f"import urllib.request as u\ntry: print(u.urlopen({url!r}).status)\n"
            "except Exception as e: print(e)",
        ]
        assert b"403" in (await sb.commands.run(get)).stdout
        await sb.network.update(allow=["127.0.0.1", "pypi.test"])
        assert (await sb.commands.run(get)).stdout == b"200\n"
        assert [e.allowed for e in await sb.network.events()] == [False, True]


def test_rules_unit() -> None:
    rules = _netrules.Rules(
        ("*.github.com", "api.example.com:443", "[2001:db8::1]"), ("uploads.github.com",)
    )
    assert rules.decide_name("api.github.com", 443).allowed
    assert not rules.decide_name("github.com", 443).allowed  # a wildcard never matches the apex
    assert not rules.decide_name("uploads.github.com", 443).allowed  # deny wins
    assert rules.decide_name("api.example.com", 443).allowed
    assert not rules.decide_name("api.example.com", 80).allowed
    assert _netrules.canonical_host("BÜCHER.example") == "xn--bcher-kva.example"
    assert _netrules.canonical_host("0xa9.0xfe.0xa9.0xfe") == "169.254.169.254"
    assert _netrules.canonical_host("2852039166") == "169.254.169.254"
    hazard = _netrules.address_hazard
    assert hazard(ipaddress.ip_address("::ffff:10.0.0.1")) == "private address"
    assert hazard(ipaddress.ip_address("100.64.1.1")) == "CGNAT address"
    assert hazard(ipaddress.ip_address("fd00:ec2::254")) == "cloud metadata address"
    assert hazard(ipaddress.ip_address("93.184.215.14")) == ""
    assert rules.decide_address(_netrules.parse_address("2001:db8::1"), 443).allowed  # type: ignore[arg-type]


def test_cli_allow_domain(servers: Servers, tmp_path: Path) -> None:
    import sys

    url = f"http://evil.test:{servers.http_port}/x"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral",
            "run",
            "--allow-domain",
            "pypi.test",
            "--",
            "/usr/bin/python3",
            "-c",
            f"import urllib.request as u\ntry: u.urlopen({url!r})\nexcept Exception as e: print(e)",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert b"403" in proc.stdout
    assert b"corral: refused evil.test" in proc.stderr


def test_approval_callback_is_consulted_once_per_host(servers: Servers) -> None:
    asked: list[tuple[str, int]] = []

    def approve(host: str, port: int) -> bool:
        asked.append((host, port))
        return host == "pypi.test"

    port = servers.http_port
    urls = [
        f"http://pypi.test:{port}/a",
        f"http://pypi.test:{port}/b",
        f"http://evil.test:{port}/c",
    ]
    result = corral.run(
        ["/usr/bin/python3", "-c", FETCH, *urls],
        policy=policy(servers, ["127.0.0.1"]),
        on_network_request=approve,
    )
    seen = json.loads(result.stdout)
    assert seen[urls[0]].startswith("hello pypi.test")
    assert seen[urls[1]].startswith("hello pypi.test")
    assert "refused by the callback" in seen[urls[2]]
    assert asked == [("pypi.test", port), ("evil.test", port)]
    allowed = [e for e in result.network if e.allowed]
    assert all(e.bytes_down > 0 and e.bytes_up > 0 for e in allowed)


def test_socks5_with_remote_dns(servers: Servers) -> None:
    code = rf"""
import socket, struct
def socks(host):
    s = socket.create_connection(("127.0.0.1", 3128))
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    name = host.encode()
    port = struct.pack(">H", {servers.http_port})
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port)
    reply = s.recv(10)
    if reply[1] != 0:
        return "refused %d" % reply[1]
    s.sendall(b"GET / HTTP/1.0\r\nHost: " + name + b"\r\n\r\n")
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    return reply.split(b"\r\n\r\n", 1)[1].decode()
print(socks("pypi.test")); print(socks("evil.test"))
"""
    # a tunnel to a port other than 443 needs a rule naming the port
    result = corral.run(
        ["/usr/bin/python3", "-c", code],
        policy=policy(servers, [f"pypi.test:{servers.http_port}", "127.0.0.1"]),
    )
    lines = result.stdout_text.splitlines()
    assert lines[0].startswith("hello pypi.test")
    assert lines[1] == "refused 2"
    result = corral.run(
        ["/usr/bin/python3", "-c", code], policy=policy(servers, ["pypi.test", "127.0.0.1"])
    )
    assert result.stdout_text.splitlines() == ["refused 2", "refused 2"]
    assert "needs a rule that names the port" in result.network[0].reason


@pytest.fixture
def simple_index(tmp_path: Path) -> Iterator[int]:
    """A PEP 503 simple index with one tiny wheel, served on loopback."""
    import zipfile

    root = Path(tempfile.mkdtemp(prefix="corral-test-index-"))
    wheel = "corraldemo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(root / wheel, "w") as z:
        z.writestr("corraldemo/__init__.py", "VALUE = 42\n")
        z.writestr(
            "corraldemo-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: corraldemo\nVersion: 1.0\n",
        )
        z.writestr(
            "corraldemo-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr("corraldemo-1.0.dist-info/RECORD", "")
    (root / "simple" / "corraldemo").mkdir(parents=True)
    (root / "simple" / "corraldemo" / "index.html").write_text(
        f'<html><body><a href="/{wheel}">{wheel}</a></body></html>'
    )

    def handler(*args: object) -> http.server.SimpleHTTPRequestHandler:
        return http.server.SimpleHTTPRequestHandler(*args, directory=str(root))  # type: ignore[arg-type]

    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(root)


@pytest.mark.skipif(_runtime_missing := corral._runtime.find() is None, reason="no code runtime")
async def test_pip_download_through_the_proxy(servers: Servers, simple_index: int) -> None:
    async with AsyncSandbox(policy(servers, ["pypi.test", "127.0.0.1"]), timeout_s=120) as sb:
        result = await sb.commands.run(
            [
                "/opt/corral/runtime/bin/python",
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-d",
                "dl",
                "--index-url",
                f"http://pypi.test:{simple_index}/simple/",
                "--trusted-host",
                "pypi.test",
                "corraldemo",
            ],
            timeout_s=90,
        )
        assert result.exit_code == 0, result.stderr_text
        names = [e.name for e in await sb.files.list("dl")]
        assert names == ["corraldemo-1.0-py3-none-any.whl"]


SMUGGLE = r"""
import json, socket, ssl
def ask(raw):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    s.sendall(raw)
    reply = b""
    try:
        while chunk := s.recv(65536):
            reply += chunk
    except OSError:
        pass
    return reply.split(b"\r\n")[0].decode(errors="replace")
out = {}
target = b"http://pypi.test:HTTP/x"
out["bare_lf"] = ask(b"GET " + target + b" HTTP/1.1\r\nX-A: 1\nHost: evil.test\r\n\r\n")
two = b"Host: evil.test\r\nHost: pypi.test\r\n"
out["two_hosts"] = ask(b"GET " + target + b" HTTP/1.1\r\n" + two + b"\r\n")
out["long_host"] = ask(b"CONNECT " + b"a" * 60000 + b".test:443 HTTP/1.1\r\n\r\n")
out["control"] = ask(b"CONNECT x\x1b]0;pwned\x07.test:443 HTTP/1.1\r\n\r\n")
# TLS split so the SNI sits in a second record, and TLS without any SNI
def hello(name):
    ctx = ssl.create_default_context()
    inc, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, outgoing, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()
def tunnel(record_bytes):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    s.sendall(b"CONNECT secure.test:HTTPS HTTP/1.1\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    s.sendall(record_bytes)
    try:
        return "closed" if s.recv(100) == b"" else "answered"
    except OSError:
        return "closed"
full = hello("other.test")
body = full[5:]
def record(part):
    return b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part
split = record(body[:40]) + record(body[40:])
out["sni_split"] = tunnel(split)
out["no_sni"] = tunnel(hello(None))
print(json.dumps(out))
"""


def test_smuggling_and_fronting_tricks_are_refused(servers: Servers) -> None:
    code = SMUGGLE.replace("HTTPS", str(servers.https_port)).replace(
        "HTTP/x", f"{servers.http_port}/x"
    )
    p = policy(servers, ["pypi.test", f"secure.test:{servers.https_port}", "127.0.0.1"])
    result = corral.run(["/usr/bin/python3", "-c", code], policy=p)
    assert result.exit_code == 0, result.stderr_text
    out = json.loads(result.stdout)
    assert out["bare_lf"] == "HTTP/1.1 400 Bad Request"
    assert out["two_hosts"] == "HTTP/1.1 400 Bad Request"
    assert out["long_host"].startswith("HTTP/1.1 4")
    assert out["control"] == "HTTP/1.1 400 Bad Request"
    assert out["sni_split"] == "closed"
    assert out["no_sni"] == "closed"
    assert all(len(e.host) <= 253 and e.host.isprintable() for e in result.network)


async def test_concurrent_requests_ask_once() -> None:
    from corral.net._proxy import Proxy
    from corral.net._rules import Rules

    asked = []

    async def approve(host: str, port: int) -> bool:
        asked.append(host)
        await asyncio.sleep(0.1)
        return False

    proxy = Proxy(Rules((), ()), approve=approve)
    from corral.net._rules import Decision

    denied = Decision(False, "", "not on the allowlist")
    answers = await asyncio.gather(*(proxy._ask("x.test", 443, denied) for _ in range(20)))
    assert asked == ["x.test"]
    assert not any(a.allowed for a in answers)


def test_the_hosts_own_addresses_are_known() -> None:
    """Every IPv4 address of every interface counts as the host's own (SSRF guard)."""
    listing = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    addresses = {line.split()[3].split("/")[0] for line in listing.splitlines()}
    known = {str(a) for a in _netrules.host_addresses()}
    assert addresses <= known, addresses - known


def test_allowlist_as_an_ordinary_user(servers: Servers, world_readable_src: Path) -> None:
    """Without root the proxy's listener is made by a forked child that joins the
    box's user namespace first: the same walls, the same answers."""
    from .conftest import Runner, unprivileged_user

    if unprivileged_user() is None:
        pytest.skip("no unprivileged test user")
    user_box = Runner("user", world_readable_src)
    ok = f"http://pypi.test:{servers.http_port}/u"
    bad = f"http://evil.test:{servers.http_port}/u"
    result = user_box(
        ["/usr/bin/python3", "-c", FETCH, ok, bad], policy(servers, ["pypi.test", "127.0.0.1"])
    )
    seen = json.loads(result.stdout)
    assert seen[ok].startswith("hello pypi.test")
    assert "not on the allowlist" in seen[bad]
    assert any(not e.allowed and e.host == "evil.test" for e in result.network)


OPEN_PROBE = r"""
import json, socket, sys
out = {"interfaces": sorted(n for _, n in socket.if_nameindex())}
try:
    socket.create_connection(("pypi.org", 443), timeout=15).close()
    out["registry"] = "connected"
except OSError as e:
    out["registry"] = repr(e)
for host in ("10.0.2.2", "127.0.0.1"):
    try:
        socket.create_connection((host, int(sys.argv[1])), timeout=3)
        out[host] = "reached"
    except OSError as e:
        out[host] = type(e).__name__
print(json.dumps(out))
"""


def test_open_mode_reaches_out_but_not_the_hosts_loopback(servers: Servers) -> None:
    """Mode open: a NAT in user space (slirp4netns) in the box's own namespace.
    This machine reaches the package registries, so pypi.org is the outside."""
    result = corral.run(
        ["/usr/bin/python3", "-c", OPEN_PROBE, str(servers.http_port)],
        policy=Policy.preset("default").with_network(mode="open"),
    )
    out = json.loads(result.stdout)
    assert out["interfaces"] == ["lo", "tap0"]
    assert out["registry"] == "connected"
    assert out["10.0.2.2"] != "reached"  # --disable-host-loopback
    assert out["127.0.0.1"] == "ConnectionRefusedError"  # the box's own loopback
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert "slirp4netns" not in ps  # ended with the box


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts of the host's own: root only")
def test_open_mode_leaves_the_hosts_shared_mounts_mounted() -> None:
    """slirp4netns's sandbox detaches its old root after a pivot_root in a
    namespace where only "/" was made private: run as root, it unmounted every
    mount below a shared one on the host (it took the test cluster's
    /run/netns name; on a systemd host everything is shared). A shared tmpfs
    with a mount under it, as `ip netns add` makes /run/netns, must survive an
    open-mode box."""
    top = Path(tempfile.mkdtemp(prefix="corral-test-propagation-"))
    inner = top / "inner"
    subprocess.run(["mount", "-t", "tmpfs", "corral-test", str(top)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(top)], check=True)
        inner.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "corral-test-inner", str(inner)], check=True)
        result = corral.run(
            ["/usr/bin/python3", "-c", "print(open('/proc/net/route').read().count('tap0'))"],
            policy=Policy.preset("default").with_network(mode="open"),
        )
        assert result.exit_code == 0, result.stderr
        assert int(result.stdout) > 0  # slirp4netns did configure the box's network
        assert os.path.ismount(inner), "an open-mode box unmounted a host mount"
    finally:
        subprocess.run(["umount", "-R", str(top)], check=False)
        top.rmdir()


# Runs under `unshare --net`: a network namespace with nothing but loopback, in
# which every IPv6 spelling below is made a local address. Were the SSRF guard
# broken, the proxy's dial could reach nothing but the counting listener here:
# no packet can leave the machine, whatever the guard does.
EMBEDDED_E2E = r"""
import json, socket, subprocess, sys, threading
import corral
from corral import Policy

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for prefix in PREFIXES:
    subprocess.run(["ip", "-6", "route", "add", "local", prefix, "dev", "lo"], check=True)
reached = {"guarded": 0, "control": 0}

def listen(family, host, label):
    sock = socket.socket(family)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # 127.0.0.1 too
    sock.bind((host, 0))
    sock.listen(64)
    def serve():
        while True:
            conn, _ = sock.accept()
            reached[label] += 1
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\nreached")
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()[1]

port = listen(socket.AF_INET6, "::", "guarded")
control = listen(socket.AF_INET, "127.0.0.1", "control")
names = {f"e{i}.test": spelling for i, spelling in enumerate(SPELLINGS)}
BOX = r'''
import json, socket, sys
port, names = int(sys.argv[1]), json.loads(sys.argv[2])
def ask(raw):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    s.sendall(raw)
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    return reply.decode(errors="replace")
out = {}
for target in [*names, *(f"[{a}]" for a in names.values()), "control.test"]:
    p = sys.argv[3] if target == "control.test" else port
    out["CONNECT " + target] = ask(f"CONNECT {target}:{p} HTTP/1.1\r\n\r\n".encode())
    out["GET " + target] = ask(f"GET http://{target}:{p}/ HTTP/1.1\r\n\r\n".encode())
print(json.dumps(out))
'''
policy = Policy.preset("default").with_network(
    mode="allowlist",
    allow=[f"{n}:{port}" for n in names] + [f"control.test:{control}", f"127.0.0.1:{control}"],
    hosts={**names, "control.test": "127.0.0.1"},
)
argv = ["/usr/bin/python3", "-c", BOX, str(port), json.dumps(names), str(control)]
result = corral.run(argv, policy=policy)
events = [[e.host, e.address, e.allowed, e.reason] for e in result.network]
print(json.dumps({"box": result.stdout_text, "err": result.stderr_text, "events": events,
                  "reached": reached, "names": names}))
"""

EMBEDDED_SPELLINGS = [
    "::ffff:127.0.0.1",  # IPv4-mapped: Linux dials 127.0.0.1 itself
    "64:ff9b::7f00:1",  # NAT64 (RFC 6052)
    "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata endpoint
    "64:ff9b:1::7f00:1",  # local-use NAT64 (RFC 8215)
    "2002:7f00:1::1",  # 6to4
    "2002:a9fe:a9fe::1",
    "::7f00:1",  # IPv4-compatible
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT)
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "fec0::1",  # site-local
]


def test_ipv6_spellings_of_internal_addresses_are_refused_before_dialling() -> None:
    """A name allowed by rule that resolves to an IPv6 address embedding an
    internal IPv4 (or in an internal IPv6 range) is refused by the SSRF guard,
    as is the address itself; the proxy never dials it."""
    prefixes = ["64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "::/96", "::ffff:0:0:0/96"]
    prefixes += ["2001::/32", "fec0::/10"]
    script = EMBEDDED_E2E.replace("PREFIXES", repr(prefixes)).replace(
        "SPELLINGS", repr(EMBEDDED_SPELLINGS)
    )
    src = Path(corral.__file__).parent.parent
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(src)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    box = json.loads(out["box"])
    assert out["reached"] == {"guarded": 0, "control": 2}, out  # the control proves the setup
    for request, reply in box.items():
        if request.endswith("control.test"):
            assert reply.endswith("reached"), (request, reply)
        else:
            assert reply.startswith("HTTP/1.1 403"), (request, reply)
            assert "SSRF guard" in reply or "not on the allowlist" in reply, (request, reply)
    refused = [e for e in out["events"] if not e[2]]
    assert len(refused) == 4 * len(EMBEDDED_SPELLINGS), out["events"]
    by_name = {e[0]: e for e in refused if e[0].endswith(".test")}
    assert set(by_name) == set(out["names"])
    for name, (_, address, _, reason) in by_name.items():
        # a name allowed by rule: only the guard stands between the box and the address
        assert reason.endswith("(SSRF guard)"), (name, reason)
        assert ipaddress.ip_address(address) == ipaddress.ip_address(out["names"][name])


# Runs under `unshare --net` (only loopback exists, so the proxy may dial port
# 443 on 127.0.0.1): raw sinks stand in for the servers and record every byte
# that reaches them, so "refused" means "nothing went upstream".
TUNNEL_E2E = r"""
import json, socket, subprocess, threading
import corral
from corral import Policy

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
payloads = {}

def sink(port):
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    payloads[sock.getsockname()[1]] = []
    def serve():
        while True:
            conn, _ = sock.accept()
            got = payloads[sock.getsockname()[1]]
            got.append("")
            index = len(got) - 1
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            got[index] = data.hex()
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()[1]

tls_port, named_port = sink(443), sink(0)
policy = Policy.preset("default").with_network(
    mode="allowlist",
    allow=["secure.test", f"plain.test:{named_port}", "127.0.0.1"],
    hosts={"secure.test": "127.0.0.1", "other.test": "127.0.0.1", "plain.test": "127.0.0.1"},
)
result = corral.run(["/usr/bin/python3", "-c", BOX, str(named_port)], policy=policy)
events = [[e.host, e.allowed, e.reason] for e in result.network]
print(json.dumps({"box": result.stdout_text, "err": result.stderr_text, "events": events,
                  "payloads": payloads, "tls_port": tls_port, "named_port": named_port}))
"""

TUNNEL_BOX = r"""
import json, socket, ssl, struct, sys, time
named = int(sys.argv[1])

def hello(name):
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()

def record(kind, body):
    return bytes([kind, 3, 3]) + len(body).to_bytes(2, "big") + body

def fragments(message, size):
    return b"".join(record(22, message[i : i + size]) for i in range(0, len(message), size))

CCS, ALERT = record(20, b"\x01"), record(21, b"\x01\x00")
HEARTBEAT, DATA = record(24, b"\x01\x00\x00"), record(23, b"\x00" * 5)
ok, other = hello("secure.test"), hello("other.test")
ok_msg, other_msg = ok[5:], other[5:]
sslv2 = bytes([0x80, 0x2E, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10]) + bytes(37)
http = "GET /x HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive\r\n\r\n"
cases = {
    # port 443, allowed by a rule without a port: TLS only, SNI checked
    "ok": ("secure.test:443", [ok]),
    "ccs_then_other": ("secure.test:443", [CCS + other]),
    "alert_then_other": ("secure.test:443", [ALERT + other]),
    "heartbeat_then_other": ("secure.test:443", [HEARTBEAT + other]),
    "data_then_other": ("secure.test:443", [DATA + other]),
    "all_four_then_other": ("secure.test:443", [CCS + ALERT + HEARTBEAT + DATA + other]),
    "ccs_then_ok": ("secure.test:443", [CCS + ok]),
    "fragments_other": ("secure.test:443", [fragments(other_msg, 40)]),
    "fragments_ok": ("secure.test:443", [fragments(ok_msg, 40)]),
    "slow_other": ("secure.test:443", [CCS[:2], CCS[2:] + other[:3], other[3:]]),
    "interleaved": ("secure.test:443", [record(22, ok_msg[:40]) + CCS + record(22, ok_msg[40:])]),
    "coalesced": ("secure.test:443", [record(22, ok_msg + other_msg)]),
    "records_cap": ("secure.test:443", [CCS * 100 + ok]),
    "no_sni": ("secure.test:443", [hello(None)]),
    "sslv2": ("secure.test:443", [sslv2]),
    "http_on_443": ("secure.test:443", [http.format("secure.test").encode()]),
    "ssh_on_443": ("secure.test:443", [b"SSH-2.0-OpenSSH_9.0\r\n"]),
    "socks_ccs_then_other": ("socks secure.test:443", [CCS + other]),
    # an address allowed by an address rule: no name was checked, none may be sent
    "address_no_sni": ("127.0.0.1:443", [hello(None)]),
    "address_with_sni": ("127.0.0.1:443", [ok]),
    # a port the rule names: other protocols pass, TLS and HTTP are still checked
    "named_other_sni": (f"plain.test:{named}", [CCS + other]),
    "named_http_ok": (f"plain.test:{named}", [http.format(f"plain.test:{named}").encode()]),
    "named_http_other_host": (f"plain.test:{named}", [http.format("evil.test").encode()]),
    "named_http_absolute": (
        f"plain.test:{named}",
        [b"GET http://evil.test/ HTTP/1.1\r\nHost: plain.test\r\n\r\n"],
    ),
    "named_http_split": (
        f"plain.test:{named}",
        [b"GE", b"T /x HTTP/1.1\r\nHost: ev", b"il.test\r\n\r\n"],
    ),
    "named_h2c": (f"plain.test:{named}", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]),
    "named_binary": (f"plain.test:{named}", [b"\x00\x00\x00\x08\x04\xd2\x16\x2f"]),
    "named_smtp": (f"plain.test:{named}", [b"EHLO box.test\r\n"]),
    "named_not_tls_0x16": (f"plain.test:{named}", [b"\x16\x00binary"]),
}

def run(target, chunks):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    if target.startswith("socks "):
        host, port = target[6:].rsplit(":", 1)
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        name = bytes([len(host)]) + host.encode()
        s.sendall(b"\x05\x01\x00\x03" + name + struct.pack(">H", int(port)))
        reply = s.recv(10)
    else:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        reply = s.recv(100)
    for chunk in chunks:
        s.sendall(chunk)
        time.sleep(0.05)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    return reply.hex()

out = {}
for name, (target, chunks) in cases.items():
    out[name] = [target, run(target, chunks), b"".join(chunks).hex()]
print(json.dumps(out))
"""

# the case, and what must reach the server: all of it, nothing, or a rewritten head
TUNNEL_EXPECT = {
    "ok": "all",
    "ccs_then_other": "SNI 'other.test' does not match",
    "alert_then_other": "SNI 'other.test' does not match",
    "heartbeat_then_other": "SNI 'other.test' does not match",
    "data_then_other": "SNI 'other.test' does not match",
    "all_four_then_other": "SNI 'other.test' does not match",
    "ccs_then_ok": "all",
    "fragments_other": "SNI 'other.test' does not match",
    "fragments_ok": "all",
    "slow_other": "SNI 'other.test' does not match",
    "interleaved": "another TLS record inside the ClientHello",
    "coalesced": "data after the ClientHello",
    "records_cap": "no ClientHello within the first 64 TLS records",
    "no_sni": "no SNI does not match",
    "sslv2": "SSLv2-format ClientHello",
    "http_on_443": "not TLS",
    "ssh_on_443": "not TLS",
    "socks_ccs_then_other": "SNI 'other.test' does not match",
    "address_no_sni": "all",
    "address_with_sni": "TLS SNI 'secure.test' does not match 127.0.0.1",
    "named_other_sni": "SNI 'other.test' does not match",
    "named_http_ok": "rewritten",
    "named_http_other_host": "the Host header does not match",
    "named_http_absolute": "the request target names another host",
    "named_http_split": "the Host header does not match",
    "named_h2c": "h2c",
    "named_binary": "all",
    "named_smtp": "all",
    "named_not_tls_0x16": "all",
}


def test_a_tunnel_is_inspected_up_to_its_first_client_hello() -> None:
    """Whatever precedes or fragments the ClientHello, nothing reaches the server
    before it is whole and names the allowed host; a tunnel on 443 carries TLS
    only; on a port a rule names, other protocols pass but TLS and HTTP are
    checked (the HTTP request goes up alone, with the proxy's Host)."""
    src = Path(corral.__file__).parent.parent
    proc = subprocess.run(
        [
            "unshare",
            "--net",
            "--",
            sys.executable,
            "-c",
            TUNNEL_E2E.replace("BOX", repr(TUNNEL_BOX)),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(src)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["box"], out["err"]
    box = json.loads(out["box"])
    assert list(box) == list(TUNNEL_EXPECT)
    arrived = {
        port: [bytes.fromhex(p) for p in payloads] for port, payloads in out["payloads"].items()
    }
    by_port: dict[str, list[str]] = {}
    for name, (target, _, _) in box.items():
        by_port.setdefault(str(out["named_port"] if "plain" in target else 443), []).append(name)
    assert {p: len(names) for p, names in by_port.items()} == {
        p: len(v) for p, v in arrived.items()
    }  # every case reached its server's accept (the dial precedes the inspection)
    events = out["events"]
    assert len(events) == len(TUNNEL_EXPECT)
    for port, names in by_port.items():
        for name, payload in zip(names, arrived[port], strict=True):
            expect = TUNNEL_EXPECT[name]
            sent = bytes.fromhex(box[name][2])
            event = events[list(box).index(name)]
            if expect == "all":
                assert payload == sent, name
                assert event[1], (name, event)
            elif expect == "rewritten":
                head = payload.decode()
                assert head.startswith("GET /x HTTP/1.1\r\nHost: plain.test:"), head
                assert head.endswith("\r\nConnection: close\r\n\r\n"), head
                assert "keep-alive" not in head, head
                assert event[1], (name, event)
            else:
                assert payload == b"", (name, payload[:80])  # nothing went upstream
                assert not event[1], (name, event)
                assert expect in event[2], (name, event)
