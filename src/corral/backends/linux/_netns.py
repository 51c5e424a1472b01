"""Network mode ``allowlist``, transparent: every way out of the box leads to corral.

While the box is still blocked (before its first process runs), corral enters
the box's network namespace once and, inside it:

* creates the proxy's listeners: 127.0.0.1:3128 (for programs that honour the
  proxy variables), 127.0.0.1:3129 and [::1]:3129 (the transparent side), and
  the DNS responder's UDP sockets 127.0.0.1:1053 and [::1]:1053;
* routes everything through ``lo`` (a default route per family), so that a
  connect() to any address reaches the NAT hook instead of failing with
  ENETUNREACH;
* installs an nftables table (``ruleset``) through libnftables: DNS (UDP and
  TCP port 53, to any address) goes to the responder, every other TCP
  connection leaving the box's own 127.0.0.1/::1 goes to the transparent
  listener (the proxy reads the original destination with SO_ORIGINAL_DST),
  and every other packet (UDP, ICMP, raw) that would leave loopback is
  rejected.

The rules live in a namespace owned by the box's user namespace, where the
box's processes hold no capability: they cannot flush them. Root enters the
namespace from a short-lived thread (``setns`` changes only the calling
thread); an ordinary user from a forked, single-threaded child that joins the
box's user and network namespaces at once through the pidfd and hands the
sockets back over a socketpair.

libnftables is the library ``nft`` is built on (Debian ``libnftables1``);
corral calls it through ctypes, the way Debian's ``python3-nftables`` binding
does, since that binding is not installable into a virtualenv. The two
routes are one RTM_NEWROUTE message each over rtnetlink, written out here
rather than pulling in pyroute2 for them. bwrap's child brings ``lo`` up
while this runs: it is waited for, never done here (bringing it up first
makes bwrap's own RTM_NEWADDR fail with EEXIST).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from corral.net._proxy import PORT as PROXY_PORT

TRANSPARENT_PORT = 3129
DNS_PORT = 1053
LOOPBACK_WAIT_S = 10.0

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1)


class NetnsError(OSError):
    """The box's network namespace could not be set up; the message says which step."""


def ruleset(*, transparent_port: int = TRANSPARENT_PORT, dns_port: int = DNS_PORT) -> str:
    """The nftables ruleset for a box in allowlist mode (pure: tested as text)."""
    return f"""\
table inet corral {{
    chain divert {{
        type nat hook output priority -100; policy accept;
        # DNS to any server (resolv.conf may name the host's): corral's responder,
        # so no name is ever looked up on the host for the box
        udp dport 53 redirect to :{dns_port}
        tcp dport 53 redirect to :{dns_port}
        # the box's own loopback services stay the box's
        ip daddr 127.0.0.1 return
        ip6 daddr ::1 return
        # every other TCP connection: the proxy decides (a program that ignores
        # the proxy variables or hard-codes an address cannot go around it)
        meta l4proto tcp redirect to :{transparent_port}
    }}
    chain guard {{
        type filter hook output priority 0; policy drop;
        # after the redirect only the box's loopback is a destination
        ip daddr 127.0.0.1 accept
        ip6 daddr ::1 accept
        # UDP other than DNS, ICMP, raw sockets: refused, at once (EPERM)
        meta l4proto tcp reject with tcp reset
        reject
    }}
}}
"""


@dataclass
class BoxSockets:
    """The listeners created inside the box's network namespace."""

    proxy: socket.socket  # 127.0.0.1:3128
    transparent: list[socket.socket]  # 127.0.0.1:3129 (and [::1]:3129)
    dns: list[socket.socket]  # UDP 127.0.0.1:1053 (and [::1]:1053)

    def close(self) -> None:
        for sock in [self.proxy, *self.transparent, *self.dns]:
            sock.close()


def prepare_allowlist(box_pidfd: int) -> BoxSockets:
    """Set up the namespace of the (still blocked) box ``box_pidfd`` refers to
    and return its listeners, non-blocking. Raises NetnsError naming the step
    that failed (nothing is left half-done that the box could use: without the
    rules the box has no route and no listener of its own)."""
    socks = _in_box(box_pidfd, _set_up)
    for sock in socks:
        sock.setblocking(False)
    tcp = [s for s in socks if s.type == socket.SOCK_STREAM]
    udp = [s for s in socks if s.type == socket.SOCK_DGRAM]
    return BoxSockets(tcp[0], tcp[1:], udp)


def _set_up() -> list[socket.socket]:
    """Inside the box's namespace: listeners, routes, rules (in that order)."""
    lo = socket.if_nametoindex("lo")
    # bwrap's child brings the box's loopback up (address, then link) while we
    # run: wait for it rather than race it (setting lo up ourselves made bwrap's
    # own RTM_NEWADDR fail for boxes started meanwhile)
    deadline = time.monotonic() + LOOPBACK_WAIT_S
    while True:
        socks: list[socket.socket] = []
        try:
            socks.append(
                _listen(socket.AF_INET, "127.0.0.1", PROXY_PORT, socket.SOCK_STREAM, backlog=128)
            )
            # the loopback address as source: the redirected connection's replies come back
            _add_default_route(socket.AF_INET, lo, "127.0.0.1")
            break
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.ENETDOWN):
                raise
            if time.monotonic() > deadline:
                raise NetnsError(f"the box's loopback did not come up: {exc}") from None
            for sock in socks:
                sock.close()
            time.sleep(0.001)
    families = [(socket.AF_INET, "127.0.0.1")]
    with contextlib.suppress(OSError):  # IPv6 disabled: it has no route either
        _add_default_route(socket.AF_INET6, lo, "::1")
        families.append((socket.AF_INET6, "::1"))
    for family, address in families:
        socks.append(_listen(family, address, TRANSPARENT_PORT, socket.SOCK_STREAM))
    for family, address in families:
        socks.append(_listen(family, address, DNS_PORT, socket.SOCK_DGRAM))
    _nft(ruleset())
    return socks


def _add_default_route(family: int, oif: int, source: str) -> None:
    """``ip route add default dev <oif> src <source>`` over rtnetlink (RTM_NEWROUTE)."""
    attrs = _rtattr(4, struct.pack("=I", oif))  # RTA_OIF
    attrs += _rtattr(7, socket.inet_pton(family, source))  # RTA_PREFSRC
    # rtmsg: family, dst_len 0 (default), src_len, tos, table main, proto static,
    # scope universe, type unicast, flags
    body = struct.pack("=BBBBBBBBI", family, 0, 0, 0, 254, 4, 0, 1, 0) + attrs
    flags = 0x1 | 0x4 | 0x400 | 0x200  # REQUEST, ACK, CREATE, EXCL
    message = struct.pack("=IHHII", 16 + len(body), 24, flags, 1, 0) + body  # RTM_NEWROUTE
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.bind((0, 0))
        nl.sendall(message)
        reply = nl.recv(4096)
    kind = struct.unpack_from("=H", reply, 4)[0]
    (error,) = struct.unpack_from("=i", reply, 16)
    if kind != 2 or error != 0:  # NLMSG_ERROR carrying 0 is the ACK
        raise OSError(-error, f"adding the box's default route: {os.strerror(-error)}")


def _rtattr(kind: int, data: bytes) -> bytes:
    pad = (4 - len(data) % 4) % 4
    return struct.pack("=HH", 4 + len(data), kind) + data + b"\0" * pad


def _listen(
    family: int, address: str, port: int, kind: int, *, backlog: int = 4096
) -> socket.socket:
    sock = socket.socket(family, kind)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(backlog)
    return sock


def _nft(text: str) -> None:
    """Run an nftables script in the calling thread's network namespace."""
    try:
        lib = ctypes.CDLL("libnftables.so.1")
    except OSError as exc:
        raise NetnsError(
            f"libnftables is missing ({exc}): install it with: sudo apt-get install libnftables1"
        ) from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise NetnsError("nft_ctx_new failed")
    try:
        lib.nft_ctx_buffer_error(ctx)
        if lib.nft_run_cmd_from_buffer(ctx, text.encode()) != 0:
            error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            raise NetnsError(f"installing the box's nftables rules failed: {error.strip()}")
    finally:
        lib.nft_ctx_free(ctx)


def _in_box(box_pidfd: int, work: Callable[[], list[socket.socket]]) -> list[socket.socket]:
    if os.geteuid() == 0:
        return _in_thread(box_pidfd, work)
    return _in_child(box_pidfd, work)


def _setns(box_pidfd: int, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # a pidfd, not a pid: a recycled pid cannot point this into another box (Linux 5.8)
    if libc.setns(box_pidfd, flags) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns into the box's network: {os.strerror(err)}")


def _in_thread(box_pidfd: int, work: Callable[[], list[socket.socket]]) -> list[socket.socket]:
    result: list[list[socket.socket] | BaseException] = []

    def enter() -> None:
        try:
            _setns(box_pidfd, _CLONE_NEWNET)  # this thread only
            result.append(work())
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=enter, name="corral-netns")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        if isinstance(result[0], OSError):
            raise NetnsError(f"setting up the box's network: {result[0]}") from result[0]
        raise result[0]
    return result[0]


def _in_child(box_pidfd: int, work: Callable[[], list[socket.socket]]) -> list[socket.socket]:
    netns, owner = _box_namespaces(box_pidfd)
    try:
        return _fork_in(netns, owner, work)
    finally:
        os.close(netns)
        os.close(owner)


def _box_namespaces(box_pidfd: int) -> tuple[int, int]:
    """(the box's netns, the user namespace owning it), as fds."""
    import fcntl
    import signal

    with open(f"/proc/self/fdinfo/{box_pidfd}") as info:
        pid = next(int(line.split()[1]) for line in info if line.startswith("Pid:"))
    netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # the pidfd still names a live process, so ``pid`` was not recycled
        # before the open: the namespace is the box's, not another process's
        signal.pidfd_send_signal(box_pidfd, 0)
        owner = fcntl.ioctl(netns, _NS_GET_USERNS)
    except BaseException:
        os.close(netns)
        raise
    return netns, owner


def _fork_in(
    netns: int, owner: int, work: Callable[[], list[socket.socket]]
) -> list[socket.socket]:
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the child: single-threaded, it may join a user namespace
        code = 1
        try:
            parent_end.close()
            # the user namespace that owns the box's netns (the box's init may
            # sit in a nested one, where it holds no CAP_NET_ADMIN over it)
            _setns(owner, _CLONE_NEWUSER)
            _setns(netns, _CLONE_NEWNET)
            socks = work()
            socket.send_fds(child_end, [b"ok"], [s.fileno() for s in socks])
            code = 0
        except BaseException as exc:  # reported to the parent, never raised in the child
            with contextlib.suppress(OSError):
                child_end.sendall(f"{type(exc).__name__}: {exc}".encode()[:1000])
        finally:
            os._exit(code)
    child_end.close()
    try:
        message, fds, _, _ = socket.recv_fds(parent_end, 1024, 16)
    finally:
        parent_end.close()
        os.waitpid(pid, 0)
    if message != b"ok" or not fds:
        for fd in fds:
            os.close(fd)
        raise NetnsError(f"setting up the box's network: {message.decode(errors='replace')}")
    return [socket.socket(fileno=fd) for fd in fds]
