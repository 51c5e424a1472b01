"""The allowlist proxy: the only way out of a box whose network mode is ``allowlist``.

One proxy per box, on the host, listening on a socket that corral created
*inside the box's network namespace* (127.0.0.1:3128 there) before the box
ran anything: the box has no other route anywhere, and the listener being
per box is its credential — one box cannot use another's rules.

It speaks HTTP CONNECT (for TLS), plain HTTP forwarding and SOCKS5 on
127.0.0.1:3128 (the proxy variables), and takes transparently redirected
connections on 3129 (every other TCP connection the box opens: the box's
nftables rules, ``backends/linux/_netns``), deciding those by their original
destination — a stand-in address from the box's DNS responder (``_dns``)
stands for its name. After the decision the bytes move in the kernel
(splice through a pipe each way), counted for the event. It resolves names
itself and connects to the address it checked (no DNS rebinding), refuses
internal addresses (``_netrules``), holds a tunnel's opening until it is
checked — the first TLS ClientHello must name the host that was allowed (no
domain fronting), other protocols need a rule naming the port, plain HTTP in
a tunnel is checked like plain HTTP — and records every decision.
Every read is bounded in size and time, so a slowloris, a huge request line,
garbage or thousands of connections cost the host bounded resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import inspect
import ipaddress
import os
import re
import resource
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import cast

from corral.net._rules import Decision, IPAddress, RuleError, Rules, canonical_host, parse_address

PORT = 3128
HEAD_LIMIT = 64 << 10  # request line and headers
# asyncio's buffer for the upstream side (it pauses reading at twice this)
STREAM_LIMIT = 256 << 10
# how much a relay lets the kernel-bound side buffer before waiting: fewer,
# larger writes (asyncio's default of 64 KiB costs a wake-up per 64 KiB)
WRITE_BUFFER = 1 << 20
HEAD_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0
MAX_CONNECTIONS = 256
MAX_EVENTS = 10_000
MAX_BODY = 64 << 20  # a plain-HTTP request body forwarded upstream
APPROVAL_TIMEOUT_S = 300.0
# a tunnel's opening is inspected up to the end of the first ClientHello:
# at most this many bytes and TLS records, or it is refused
INSPECT_BYTES = 1 << 17
INSPECT_RECORDS = 64
HELLO_LIMIT = 1 << 16  # one ClientHello message
_TLS_RECORDS = frozenset(range(20, 25))  # change_cipher_spec, alert, handshake, data, heartbeat
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*")  # an HTTP method is a token
MAX_NAMES = 65_536  # distinct names one box's DNS responder hands addresses for
MAX_QUESTIONS = 1024  # distinct hosts one box may have the callback asked about
_SO_ORIGINAL_DST = 80
_BAD_HEAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# the DNS responder answers allowed names with addresses from these pools; the
# proxy maps them back to the name (RFC 2544's benchmarking block and a ULA
# prefix: never routed anywhere, and refused by the SSRF guard if unmapped)
SYNTHETIC_V4 = ipaddress.IPv4Network("198.18.0.0/15")
SYNTHETIC_V6 = ipaddress.IPv6Network("fdc0:4272:616c::/64")

# Decides an unlisted host: (host, port) -> bool, or an awaitable of one.
Approval = Callable[[str, int], "bool | Awaitable[bool]"]


@dataclass(frozen=True, slots=True)
class NetworkEvent:
    """One decision of the proxy."""

    time: float
    host: str
    port: int
    address: str | None
    allowed: bool
    rule: str
    reason: str
    bytes_up: int = 0
    bytes_down: int = 0
    duration_s: float = 0.0


class Proxy:
    # every connection of every box in this process: two descriptors each
    _total = 0

    def __init__(
        self,
        rules: Rules,
        *,
        hosts: Mapping[str, str] | None = None,
        on_event: Callable[[NetworkEvent], None] | None = None,
        approve: Approval | None = None,
    ) -> None:
        self.rules = rules
        self.approve = approve
        self._answers: dict[tuple[str, int], asyncio.Future[bool]] = {}
        self.hosts = {canonical_host(k): v for k, v in (hosts or {}).items()}
        self.events: deque[NetworkEvent] = deque(maxlen=MAX_EVENTS)
        self.on_event = on_event
        self._servers: list[asyncio.Server] = []
        self._datagrams: list[asyncio.DatagramTransport] = []
        self._active: set[asyncio.Task[None]] = set()
        # the DNS responder's synthetic addresses and the names they stand for
        self._names: dict[IPAddress, str] = {}
        self._synthetic: dict[str, tuple[IPAddress, IPAddress]] = {}

    async def serve(self, sock: socket.socket) -> None:
        """Serve the proxy-variables listener (HTTP CONNECT, plain HTTP, SOCKS5)."""
        # the box's side reads with HEAD_LIMIT: readuntil() then refuses a longer head
        self._servers.append(await asyncio.start_server(self._handle, sock=sock, limit=HEAD_LIMIT))

    async def serve_transparent(
        self, listeners: list[socket.socket], resolvers: list[socket.socket]
    ) -> None:
        """Serve the transparent listeners (TCP the box's nftables rules redirect,
        read with SO_ORIGINAL_DST) and the box's DNS responder (UDP sockets)."""
        from corral.net._dns import serve_dns

        for sock in listeners:
            self._servers.append(
                await asyncio.start_server(self._handle_transparent, sock=sock, limit=HEAD_LIMIT)
            )
        self._datagrams += await serve_dns(self, resolvers)

    def decide_lookup(self, host: str) -> tuple[bool, str, str]:
        """For the DNS responder: (answer it, rule, reason). An unlisted name is
        answered when an approval callback exists: it decides at connect time,
        with the port."""
        decision = self.rules.decide_lookup(host)
        if not decision.allowed and decision.reason == "not on the allowlist" and self.approve:
            return True, "", "unlisted: the approval callback decides on connect"
        return decision.allowed, decision.rule, decision.reason

    def synthetic(self, host: str) -> tuple[IPAddress, IPAddress] | None:
        """The (IPv4, IPv6) addresses standing for ``host`` in this box (None: pool full)."""
        if host not in self._synthetic:
            index = len(self._synthetic) + 1
            if index >= MAX_NAMES:
                return None
            pair = (SYNTHETIC_V4[index], SYNTHETIC_V6[index])
            self._synthetic[host] = pair
            self._names.update(dict.fromkeys(pair, host))
        return self._synthetic[host]

    def update(self, allow: tuple[str, ...], deny: tuple[str, ...]) -> None:
        """New rules, for new connections (raises RuleError, changing nothing, if one is bad)."""
        self.rules = Rules(allow, deny)

    def shutdown(self) -> None:
        """Stop listening and cut every connection (without waiting)."""
        for server in self._servers:
            server.close()
        for transport in self._datagrams:
            transport.close()
        for task in list(self._active):
            task.cancel()

    async def close(self) -> None:
        """Stop, and wait until every connection has been cut and recorded."""
        self.shutdown()
        if self._active:
            await asyncio.gather(*list(self._active), return_exceptions=True)

    def _record(self, event: NetworkEvent) -> None:
        self.events.append(event)
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(event)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._admit(reader, writer, self._serve_one)

    async def _handle_transparent(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._admit(reader, writer, self._serve_transparent)

    async def _admit(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._active) >= MAX_CONNECTIONS or Proxy._total >= _process_budget():
            # per box, and for the whole process: descriptors are a host resource
            with contextlib.suppress(OSError):
                await _refuse(writer, 503, "too many connections through the proxy")
            writer.close()
            return
        self._active.add(task)
        Proxy._total += 1
        try:
            await serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except TimeoutError:
            with contextlib.suppress(OSError):
                await _refuse(writer, 408, "request not received in time")
        finally:
            Proxy._total -= 1
            self._active.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await asyncio.wait_for(reader.readexactly(1), HEAD_TIMEOUT_S)
        if first == b"\x05":
            # the timeout covers the SOCKS negotiation only, never the tunnel
            wanted = await asyncio.wait_for(_socks_request(reader, writer), HEAD_TIMEOUT_S)
            if wanted is not None:
                await self._open_tunnel(*wanted, reader, writer, socks=True)
            return
        try:
            head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            head = b""
        if not head or len(head) > HEAD_LIMIT:
            await _refuse(writer, 431, "request head too large")
            return
        parsed = _parse_head(head[:-4])
        if isinstance(parsed, tuple):
            await _refuse(writer, *parsed)
            return
        method, target, headers = parsed.method, parsed.target, parsed.headers
        if method == "CONNECT":
            host, port = _host_port(target, default=443)
            if host is None:
                await _refuse(writer, 400, f"bad CONNECT target {target[:100]!r}")
                return
            await self._open_tunnel(host, port, reader, writer, socks=False)
        else:
            await self._forward(method, target, headers, reader, writer)

    async def _serve_transparent(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A connection the box's nftables rules redirected: its original
        destination decides (a synthetic address: the name the DNS responder
        gave it; any other: that address, which needs an IP rule), then its
        opening is checked like a tunnel's (TLS SNI, or HTTP Host)."""
        address, port = _original_destination(writer.get_extra_info("socket"))
        host = self._names.get(address, str(address))
        opened = await self._open(host, port, tunnel=False)
        if isinstance(opened, NetworkEvent):
            _reset(writer)
            return
        await self._relay(opened, reader, writer, port, transparent=True)

    # -- deciding and connecting -----------------------------------------------------

    async def _open(self, host: str, port: int, *, tunnel: bool) -> _Opened | NetworkEvent:
        """Decide and connect; a NetworkEvent (already recorded) when refused.

        A tunnel (CONNECT, SOCKS) carries any protocol, so it goes to 443 only,
        unless the rule that allows it names its port.
        """
        rules = self.rules  # one set of rules for the whole decision
        try:
            host = canonical_host(host)
        except RuleError as exc:
            return self._deny(_printable(host), port, None, Decision(False, "", str(exc)))
        decision = rules.decide_name(host, port)
        if not decision.allowed and decision.reason == "not on the allowlist":
            decision = await self._ask(host, port, decision)
        if not decision.allowed:
            return self._deny(host, port, None, decision)
        addresses = await self._resolve(host, port)
        if not addresses:
            return self._deny(host, port, None, Decision(False, decision.rule, "name not found"))
        last: Decision | None = None
        for address in addresses:
            verdict = rules.decide_address(address, port)
            if not verdict.allowed:
                last = verdict
                continue
            named = decision.port_named or verdict.port_named or decision.rule == "approved"
            if tunnel and port != 443 and not named:
                last = Decision(
                    False,
                    decision.rule,
                    f"a tunnel to port {port} needs a rule that names the port (host:port)",
                )
                break
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(str(address), port, limit=STREAM_LIMIT),
                    CONNECT_TIMEOUT_S,
                )
            except (OSError, TimeoutError) as exc:
                last = Decision(False, decision.rule, f"connection failed: {exc}")
                continue
            rule = verdict.rule or decision.rule
            opened = NetworkEvent(time.time(), host, port, str(address), True, rule, "allowed")
            self._record(opened)  # at once: a connection still open at teardown is on record
            return _Opened(
                up_reader, up_writer, str(address), time.monotonic(), rule, opened, named
            )
        assert last is not None
        return self._deny(host, port, str(addresses[0]), last)

    async def _ask(self, host: str, port: int, decision: Decision) -> Decision:
        """An unlisted host: ask the approval callback, once per host and port."""
        if self.approve is None:
            return decision
        key = (host, port)
        if key not in self._answers:
            if len(self._answers) >= MAX_QUESTIONS:
                return Decision(False, "approved", "too many hosts asked about for this box")
            self._answers[key] = asyncio.ensure_future(self._question(host, port))
        # concurrent requests for one host share one question and its answer
        if await asyncio.shield(self._answers[key]):
            return Decision(True, "approved", "approved by the callback")
        return Decision(False, "approved", "refused by the callback")

    async def _question(self, host: str, port: int) -> bool:
        approve = self.approve
        assert approve is not None
        loop = asyncio.get_running_loop()
        try:
            if inspect.iscoroutinefunction(approve):
                answer = await asyncio.wait_for(approve(host, port), APPROVAL_TIMEOUT_S)
            else:
                # a plain function may block (ask a person): never on the event loop
                answer = await asyncio.wait_for(
                    loop.run_in_executor(None, approve, host, port), APPROVAL_TIMEOUT_S
                )
                if inspect.isawaitable(answer):
                    answer = await asyncio.wait_for(answer, APPROVAL_TIMEOUT_S)
            return bool(answer)
        except Exception:  # a failing or slow callback is a "no"
            return False

    def _closed(self, opened: _Opened, counts: list[int]) -> None:
        """Complete the connection's event with its byte counts and duration."""
        final = dataclasses.replace(
            opened.event,
            bytes_up=counts[0],
            bytes_down=counts[1],
            duration_s=time.monotonic() - opened.started,
        )
        with contextlib.suppress(ValueError):
            self.events[self.events.index(opened.event)] = final

    def _deny(self, host: str, port: int, address: str | None, decision: Decision) -> NetworkEvent:
        event = NetworkEvent(
            time.time(), host, port, address, False, decision.rule, decision.reason
        )
        self._record(event)
        return event

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        literal = parse_address(host)
        if literal is not None:
            return [literal]
        if host in self.hosts:  # a test's resolver override: still checked like any address
            override = parse_address(self.hosts[host])
            return [override] if override is not None else []
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return []
        out: list[IPAddress] = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if address not in out:
                out.append(address)
        return out

    # -- CONNECT and SOCKS5 tunnels -----------------------------------------------------------

    async def _open_tunnel(
        self,
        host: str,
        port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        socks: bool,
    ) -> None:
        opened = await self._open(host, port, tunnel=True)
        if isinstance(opened, NetworkEvent):
            if socks:
                writer.write(b"\x05\x02\x00\x01" + bytes(6))  # not allowed by ruleset
            else:
                await _refuse(
                    writer, 403, f"{_printable(host)}:{port} is not allowed: {opened.reason}"
                )
            return
        ok = (
            b"\x05\x00\x00\x01" + bytes(6)
            if socks
            else b"HTTP/1.1 200 Connection established\r\n\r\n"
        )
        writer.write(ok)
        await writer.drain()
        await self._relay(opened, reader, writer, port, transparent=False)

    async def _relay(
        self,
        opened: _Opened,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        port: int,
        *,
        transparent: bool,
    ) -> None:
        """Check the client's opening, then relay both ways until both ends close."""
        counts = [0, 0]
        down: asyncio.Future[None] | None = None
        try:
            # the server's side flows at once (SSH, SMTP speak first) ...
            down = asyncio.ensure_future(_pipe(opened.reader, writer, counts, 1))
            # ... the client's first bytes are inspected before anything goes up
            first = await asyncio.wait_for(reader.read(HEAD_LIMIT), IDLE_TIMEOUT_S)
            if first:
                try:
                    first = await asyncio.wait_for(
                        _inspect_tunnel(
                            reader,
                            first,
                            opened.event.host,
                            port,
                            opened.any_protocol,
                            transparent=transparent,
                        ),
                        HEAD_TIMEOUT_S,
                    )
                except (_Refused, TimeoutError, asyncio.IncompleteReadError) as exc:
                    reason = (
                        exc.reason
                        if isinstance(exc, _Refused)
                        else "the tunnel's opening (ClientHello or request head) did not arrive"
                    )
                    with contextlib.suppress(ValueError):
                        self.events.remove(opened.event)
                    self._deny(opened.event.host, port, opened.address, Decision(False, "", reason))
                    if transparent:
                        _reset(writer)
                    opened.event = dataclasses.replace(opened.event, allowed=False)
                    return
            if first:
                # decided: from here the kernel moves the bytes (splice), both ways
                down.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await down
                await _splice_both(reader, writer, opened, first, counts)
            else:
                await down
        finally:
            if down is not None and not down.done():
                down.cancel()
            opened.writer.close()
            if opened.event.allowed:
                self._closed(opened, counts)

    # -- plain HTTP -------------------------------------------------------------------------

    async def _forward(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if not target.startswith("http://"):
            await _refuse(writer, 400, "only absolute http:// targets (use CONNECT for https)")
            return
        rest = target[len("http://") :]
        authority, _, path = rest.partition("/")
        if "@" in authority:
            await _refuse(writer, 400, "credentials in the target are not forwarded")
            return
        host, port = _host_port(authority, default=80)
        if host is None:
            await _refuse(writer, 400, f"bad target {target[:100]!r}")
            return
        fields = {k.lower(): v for k, v in headers}
        if "host" in fields:
            host_header, _ = _host_port(fields["host"], default=port)
            if host_header is None or _safe_canonical(host_header) != _safe_canonical(host):
                await _refuse(writer, 403, "the Host header does not match the request target")
                return
        if "transfer-encoding" in fields:
            await _refuse(writer, 411, "send a Content-Length body through this proxy")
            return
        length_text = fields.get("content-length", "0") or "0"
        if not (length_text.isascii() and length_text.isdigit()) or int(length_text) > MAX_BODY:
            await _refuse(writer, 413, "bad or too large Content-Length")
            return
        length = int(length_text)
        opened = await self._open(host, port, tunnel=False)
        if isinstance(opened, NetworkEvent):
            await _refuse(writer, 403, f"{_printable(host)}:{port} is not allowed: {opened.reason}")
            return
        counts = [0, 0]
        try:
            # one request per connection, sent upstream in origin-form with our
            # own Host and Connection headers: nothing rides along to another
            # virtual host on the same server
            drop = ("host", "connection", "proxy-connection", "proxy-authorization", "keep-alive")
            kept = [f"{k}: {v}" for k, v in headers if k.lower() not in drop]
            authority_out = _authority(opened.event.host, port, 80)
            head = (
                f"{method} /{path} HTTP/1.1\r\nHost: {authority_out}\r\n"
                + "".join(f"{line}\r\n" for line in kept)
                + "Connection: close\r\n\r\n"
            ).encode("latin-1")
            opened.writer.write(head)
            counts[0] += len(head)
            left = length
            while left:  # streamed: a body never sits whole in the host's memory
                chunk = await asyncio.wait_for(reader.read(min(left, 1 << 18)), IDLE_TIMEOUT_S)
                if not chunk:
                    return
                opened.writer.write(chunk)
                await opened.writer.drain()
                left -= len(chunk)
                counts[0] += len(chunk)
            await opened.writer.drain()
            # the response: moved by the kernel (splice), counted
            server, buffered = await _detach(opened.reader, opened.writer)
            try:
                client, _ = await _detach(None, writer)
            except BaseException:
                server.close()
                raise
            try:
                if buffered:
                    await _send_all(client, buffered)
                    counts[1] += len(buffered)
                await _splice(server, client, counts, 1)
            finally:
                server.close()
                client.close()
        finally:
            opened.writer.close()
            self._closed(opened, counts)


@dataclass
class _Opened:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    address: str
    started: float
    rule: str
    event: NetworkEvent
    # the deciding rule names the port (or the callback approved host and port):
    # a tunnel may then carry protocols other than TLS
    any_protocol: bool = False


def _printable(text: str) -> str:
    """For messages and events: no control characters, bounded."""
    return "".join(c if c.isprintable() else "?" for c in text[:253])


def _process_budget() -> int:
    # a relayed connection holds up to 8 descriptors: two sockets, their
    # duplicates and a pipe each way
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft // 8)


async def _socks_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[str, int] | None:
    """The SOCKS5 greeting and request (remote DNS): the target, or None if refused."""
    (count,) = await reader.readexactly(1)
    methods = await reader.readexactly(count)
    if 0 not in methods:
        writer.write(b"\x05\xff")  # only "no authentication": the listener is the credential
        return None
    writer.write(b"\x05\x00")
    version, command, _, kind = await reader.readexactly(4)
    if version != 5 or command != 1:  # CONNECT only: no BIND, no UDP ASSOCIATE
        writer.write(b"\x05\x07\x00\x01" + bytes(6))
        return None
    if kind == 1:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif kind == 4:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    elif kind == 3:
        (length,) = await reader.readexactly(1)
        host = (await reader.readexactly(length)).decode("ascii", errors="replace")
    else:
        writer.write(b"\x05\x08\x00\x01" + bytes(6))
        return None
    (port,) = struct.unpack(">H", await reader.readexactly(2))
    return host, port


def _original_destination(sock: socket.socket) -> tuple[IPAddress, int]:
    """Where a redirected connection was going (SO_ORIGINAL_DST from conntrack)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)  # IP6T_SO_ORIGINAL_DST
        (port,) = struct.unpack_from("!H", raw, 2)
        return ipaddress.IPv6Address(raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    (port,) = struct.unpack_from("!H", raw, 2)
    return ipaddress.IPv4Address(raw[4:8]), port


def _reset(writer: asyncio.StreamWriter) -> None:
    """Refuse a redirected connection with a reset (the closest a transparent
    proxy comes to "connection refused": the handshake was already done)."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _refuse(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    reasons = {
        400: "Bad Request",
        403: "Forbidden",
        408: "Request Timeout",
        411: "Length Required",
        413: "Payload Too Large",
        431: "Request Header Fields Too Large",
        503: "Service Unavailable",
    }
    body = f"corral proxy: {message}\n".encode()
    writer.write(
        f"HTTP/1.1 {status} {reasons[status]}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(OSError):
        await writer.drain()


def _host_port(authority: str, *, default: int) -> tuple[str | None, int]:
    authority = authority.strip()
    if authority.startswith("["):
        end = authority.find("]")
        host, rest = authority[1:end], authority[end + 1 :]
    elif authority.count(":") == 1:
        host, _, rest = authority.partition(":")
        rest = ":" + rest
    else:
        host, rest = authority, ""
    if not host:
        return None, default
    if rest.startswith(":"):
        if not rest[1:].isdigit() or not 0 < int(rest[1:]) < 65536:
            return None, default
        return host, int(rest[1:])
    return host, default


def _safe_canonical(host: str) -> str:
    try:
        return canonical_host(host)
    except RuleError:
        return "\0invalid"


class _Refused(Exception):
    """A tunnel's opening that must not go upstream; ``reason`` is recorded."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _more(reader: asyncio.StreamReader, data: bytes, size: int) -> bytes:
    """``data`` extended from ``reader`` to at least ``size`` bytes (EOF: IncompleteReadError)."""
    if len(data) >= size:
        return data
    return data + await reader.readexactly(size - len(data))


async def _inspect_tunnel(
    reader: asyncio.StreamReader,
    data: bytes,
    host: str,
    port: int,
    any_protocol: bool,
    *,
    transparent: bool = False,
) -> bytes:
    """Check a tunnel's opening (``data``, the client's first bytes, read on as
    needed); return the bytes to send upstream first, or raise _Refused.

    * TLS: every record up to the end of the first ClientHello, whatever comes
      before it; the ClientHello must name ``host`` (``_read_client_hello``).
    * An SSLv2-format hello carries no SNI: refused.
    * Anything else only when ``any_protocol`` (a rule names the port), and an
      HTTP/1 request in it is held to the plain-HTTP path's checks: its Host
      and target must name ``host``, and it goes up alone (``Connection: close``).
    * ``transparent`` (a redirected connection, not a tunnel asked for): TLS
      goes to 443 only unless ``any_protocol``, and an HTTP/1 request may go
      to any port, held to the same checks (as the plain-HTTP path allows).
    """
    if data[0] in _TLS_RECORDS and any_protocol:
        data = await _more(reader, data, 2)
        tls = data[1] == 3  # every SSL 3/TLS record says 3.x; on a named port, else not TLS
    else:
        tls = data[0] in _TLS_RECORDS
    if tls:
        if transparent and port != 443 and not any_protocol:
            raise _Refused(f"TLS to port {port} needs a rule that names the port (host:port)")
        raw, sni = await _read_client_hello(reader, data)
        # a name was allowed: the ClientHello must name it (domain fronting on a
        # shared front end); an address was allowed: no name was checked, so none
        # may be sent
        expected = None if parse_address(host) is not None else host
        if sni != expected:
            shown = "no SNI" if sni is None else f"TLS SNI {_printable(sni)!r}"
            raise _Refused(f"{shown} does not match {host}")
        return raw
    if data[0] & 0x80:
        data = await _more(reader, data, 3)
        if data[2] == 1:  # msg_type CLIENT-HELLO of an SSLv2 record header
            raise _Refused("an SSLv2-format ClientHello (it carries no SNI)")
    if not any_protocol and not transparent:
        raise _Refused(
            "not TLS: a tunnel carries other protocols only to a port a rule names (host:port)"
        )
    return await _http_in_tunnel(reader, data, host, port, strict=not any_protocol)


async def _http_in_tunnel(
    reader: asyncio.StreamReader, data: bytes, host: str, port: int, *, strict: bool = False
) -> bytes:
    """Plain HTTP/1 inside a tunnel gets the plain-HTTP path's checks (else another
    virtual host on the allowed server is one Host header away); other protocols
    go through as they are, unless ``strict`` (no rule names the port): then
    anything but an HTTP/1 request is refused."""

    def other(data: bytes) -> bytes:
        if strict:
            raise _Refused("neither TLS nor HTTP/1: other protocols go only to a port a rule names")
        return data

    # servers skip empty lines before a request line (RFC 9112 2.2: nginx and
    # llhttp do), so the request is looked for after them: else "\r\nGET ..."
    # passed as another protocol, its Host naming any virtual host
    start = 0
    while True:
        while start < len(data) and data[start] in b"\r\n":
            start += 1
        if start < len(data):
            break
        if start > 64:
            raise _Refused("only empty lines at the start of a tunnel")
        data += await reader.readexactly(1)
    # an HTTP request opens with a method token and whitespace: read until the
    # token ends, then until the first line ends
    while (token := _TOKEN.match(data, start)) is not None and token.end() == len(data):
        if len(data) - start > 64:
            return other(data)  # no method is that long: not HTTP
        data += await reader.readexactly(1)
    # any whitespace after the method, not only SP: servers MAY split the line
    # on it (RFC 9112 3; Python's http.server does), so "GET\t/ HTTP/1.1" is
    # HTTP too, and refused below as a malformed request line
    if token is None or token.end() == start or data[token.end()] not in b" \t\x0b\x0c\r":
        return other(data)
    while b"\n" not in data[start:]:
        if len(data) > HEAD_LIMIT:
            raise _Refused("a request line longer than 64 KiB in a tunnel")
        chunk = await reader.read(HEAD_LIMIT)
        if not chunk:
            raise asyncio.IncompleteReadError(data, None)
        data += chunk
    line = data[start:].split(b"\n", 1)[0]
    if b"HTTP/" not in line.upper():
        return other(data)  # a line-based protocol (SMTP's EHLO, Redis), not HTTP
    if line.startswith(b"PRI * HTTP/2"):
        raise _Refused("HTTP/2 without TLS (h2c) in a tunnel: its authority cannot be checked")
    while b"\r\n\r\n" not in data[start:]:
        if len(data) > HEAD_LIMIT:
            raise _Refused("a request head larger than 64 KiB in a tunnel")
        chunk = await reader.read(HEAD_LIMIT)
        if not chunk:
            raise asyncio.IncompleteReadError(data, None)
        data += chunk
    # the empty lines before the request are not sent on
    raw_head, rest = data[start:].split(b"\r\n\r\n", 1)
    head = _parse_head(raw_head)
    if isinstance(head, tuple):
        raise _Refused(f"HTTP in a tunnel: {head[1]}")
    fields = {k.lower(): v for k, v in head.headers}
    if "host" in fields:
        named, _ = _host_port(fields["host"], default=port)
        if named is None or _safe_canonical(named) != host:
            raise _Refused("HTTP in a tunnel: the Host header does not match the tunnel's host")
    if not (head.target.startswith("/") or head.target == "*"):
        # absolute-form (and CONNECT's authority-form) win over Host (RFC 9112
        # 3.2.2): they must name the tunnel's host too
        authority = head.target.partition("://")[2].partition("/")[0] or head.target
        named, _ = _host_port(authority.rpartition("@")[2], default=port)
        if named is None or _safe_canonical(named) != host:
            raise _Refused("HTTP in a tunnel: the request target names another host")
    # one request per tunnel, with our own Host and Connection: close, as on the
    # plain-HTTP path: a server MUST NOT process a further request after it (RFC
    # 9112 9.6), so no second request with another Host rides along
    # (and no Upgrade: no switch to another protocol past the check)
    drop = {"host", "connection", "proxy-connection", "proxy-authorization", "keep-alive"}
    drop.add("upgrade")
    kept = "".join(f"{k}: {v}\r\n" for k, v in head.headers if k.lower() not in drop)
    text = (
        f"{head.method} {head.target} {head.version}\r\nHost: {_authority(host, port, 80)}\r\n"
        f"{kept}Connection: close\r\n\r\n"
    )
    return text.encode("latin-1") + rest


async def _read_client_hello(reader: asyncio.StreamReader, data: bytes) -> tuple[bytes, str | None]:
    """Read TLS records from ``data`` (the first bytes) and ``reader`` until the
    first ClientHello is whole; return every byte read and its server name (None
    if it has none). Raises _Refused for anything else.

    Records before the ClientHello (change_cipher_spec, alert, heartbeat,
    application data) are read past and held back with it, never sent ahead of
    the check; a ClientHello may be fragmented across records, but no other
    record may interleave with it (RFC 8446 5.1). At most INSPECT_BYTES and
    INSPECT_RECORDS are read."""
    body = b""
    pos = 0  # the start of the next record in data
    for _ in range(INSPECT_RECORDS):
        data = await _more(reader, data, pos + 5)
        kind, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5])
        if kind not in _TLS_RECORDS or major != 3:
            raise _Refused("not a TLS record where one was expected")
        if length > (1 << 14) + 2048 or (kind == 22 and not 0 < length <= 1 << 14):
            raise _Refused("a malformed TLS record")
        if pos + 5 + length > INSPECT_BYTES:
            raise _Refused(f"no ClientHello within the first {INSPECT_BYTES} bytes")
        data = await _more(reader, data, pos + 5 + length)
        fragment = data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if kind != 22:
            if body:
                raise _Refused("another TLS record inside the ClientHello")
            continue  # held back: forwarded only if the ClientHello checks out
        body += fragment
        if len(body) < 4:
            continue
        if body[0] != 1:
            raise _Refused("the first TLS handshake message is not a ClientHello")
        needed = 4 + int.from_bytes(body[1:4])
        if needed > HELLO_LIMIT:
            raise _Refused("a ClientHello larger than 64 KiB")
        if len(body) >= needed:
            if len(body) > needed:
                # another handshake message after it would be read by the server
                # without the proxy having looked: nothing may follow in its record
                raise _Refused("data after the ClientHello in its TLS record")
            return data, _hello_server_name(body)
    raise _Refused(f"no ClientHello within the first {INSPECT_RECORDS} TLS records")


def _hello_server_name(message: bytes) -> str | None:
    """The server_name of a whole ClientHello handshake message, canonical; None
    if it has none. Parsed strictly (every length must add up, no extension
    twice, exactly one host_name): where servers could read a message
    differently from the proxy, it is refused (_Refused)."""
    try:
        if message[0] != 1 or message[4] != 3:
            raise _Refused("a malformed ClientHello")
        pos = 4 + 2 + 32  # handshake header, legacy version, random
        pos += 1 + message[pos]  # legacy session id
        (ciphers,) = struct.unpack_from(">H", message, pos)
        pos += 2 + ciphers
        pos += 1 + message[pos]  # compression methods
        if pos == len(message):
            return None  # no extensions at all (TLS 1.2 and older)
        (total,) = struct.unpack_from(">H", message, pos)
        pos += 2
        if pos + total != len(message):
            raise _Refused("a malformed ClientHello")
        seen: set[int] = set()
        name: str | None = None
        while pos < len(message):
            ext_type, ext_len = struct.unpack_from(">HH", message, pos)
            pos += 4
            end = pos + ext_len
            if ext_type in seen or end > len(message):
                raise _Refused("a malformed ClientHello (an extension twice or overlong)")
            seen.add(ext_type)
            if ext_type == 0:  # server_name (RFC 6066 3)
                (list_len,) = struct.unpack_from(">H", message, pos)
                item = pos + 2
                if item + list_len != end:
                    raise _Refused("a malformed server_name extension")
                names = []
                while item < end:
                    name_type, name_len = struct.unpack_from(">BH", message, item)
                    names.append((name_type, message[item + 3 : item + 3 + name_len]))
                    item += 3 + name_len
                if item != end or len(names) != 1 or names[0][0] != 0:
                    raise _Refused("a server_name extension without exactly one host name")
                name = _safe_canonical(names[0][1].decode("ascii"))
            pos = end
        return name
    except (IndexError, struct.error, UnicodeDecodeError):
        raise _Refused("a malformed ClientHello") from None


def _parse_head(raw: bytes) -> _Head | tuple[int, str]:
    """An HTTP/1 request head (without its blank line), or (status, why) to refuse it."""
    lines = raw.decode("latin-1").split("\r\n")
    if any(_BAD_HEAD.search(line) for line in lines):
        # a bare \n or \r, NUL or another control character: servers split
        # such heads differently than we do (header and request smuggling)
        return 400, "malformed request head"
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        return 400, "not an HTTP/1 request"
    headers = [
        (k.strip(), v.strip()) for k, sep, v in (ln.partition(":") for ln in lines[1:]) if sep
    ]
    names = [k.lower() for k, _ in headers]
    if names.count("host") > 1 or names.count("content-length") > 1:
        return 400, "duplicate Host or Content-Length header"
    return _Head(parts[0], parts[1], parts[2], headers)


@dataclass(frozen=True, slots=True)
class _Head:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]


def _authority(host: str, port: int, default: int) -> str:
    """``host:port`` for a Host header (IPv6 in brackets; no port if the default)."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port == default else f"{shown}:{port}"


async def _pipe(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, counts: list[int], index: int
) -> None:
    """Copy until EOF (or the idle timeout), counting; then half-close ``dst``
    (not when cancelled: the relay goes on in the kernel, ``_splice_both``)."""
    dst.transport.set_write_buffer_limits(high=WRITE_BUFFER)
    try:
        while data := await asyncio.wait_for(src.read(1 << 18), IDLE_TIMEOUT_S):
            counts[index] += len(data)
            dst.write(data)
            await dst.drain()
    except (OSError, TimeoutError):
        pass
    except asyncio.CancelledError:
        raise
    else:
        with contextlib.suppress(OSError):
            if dst.can_write_eof():
                dst.write_eof()


# -- the zero-copy relay ---------------------------------------------------------------------

SPLICE_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031


async def _detach(
    reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter
) -> tuple[socket.socket, bytes]:
    """Take a connection out of asyncio's hands: its transport stops reading and
    has written everything; returns a duplicate of its socket and the bytes the
    reader had buffered but nobody consumed."""
    # a socket's transport reads and writes (uvloop's are not asyncio.Transport subclasses)
    transport = cast(asyncio.Transport, writer.transport)
    transport.pause_reading()
    transport.set_write_buffer_limits(high=0)
    await writer.drain()  # resumes only once the transport's buffer is empty
    left = b""
    if reader is not None:
        buffer = reader._buffer  # type: ignore[attr-defined]  # no public peek
        left = bytes(buffer)
        buffer.clear()
    sock = writer.get_extra_info("socket")
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    dup.setblocking(False)
    return dup, left


async def _send_all(sock: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_sendall(sock, data), IDLE_TIMEOUT_S)


class _Splicer:
    """One direction of a relay, driven by the event loop like a transport:
    when ``src`` is readable, splice(2) it into a pipe and on into ``dst``; when
    ``dst`` is full, wait for it instead of reading. No byte passes through
    Python. Done (``finished``) at EOF, on an error, or after IDLE_TIMEOUT_S
    without data; then ``dst`` is half-closed."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, counts: list[int], index: int
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.src, self.dst, self.counts, self.index = src, dst, counts, index
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, SPLICE_CHUNK)
        self.held = 0  # bytes in the pipe
        self.eof = False
        self.last = time.monotonic()
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.timer = self.loop.call_later(IDLE_TIMEOUT_S, self._idle)
        self.loop.add_reader(src.fileno(), self._readable)

    def _idle(self) -> None:
        left = self.last + IDLE_TIMEOUT_S - time.monotonic()
        if left > 0:
            self.timer = self.loop.call_later(left, self._idle)
        else:
            self._finish()

    def _readable(self) -> None:
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        for _ in range(16):  # while data keeps coming, without a trip through epoll
            try:
                n = os.splice(self.src.fileno(), self.w, SPLICE_CHUNK, flags=flags)
            except BlockingIOError:
                return
            except OSError:
                self._finish()
                return
            self.last = time.monotonic()
            if n == 0:
                self.eof = True
                self.loop.remove_reader(self.src.fileno())
            self.held += n
            self.counts[self.index] += n
            self._flush()
            if self.held or self.eof:  # dst is full, or done
                return

    def _flush(self) -> None:
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        while self.held:
            try:
                self.held -= os.splice(self.r, self.dst.fileno(), self.held, flags=flags)
            except BlockingIOError:
                # dst is full: stop reading until it drains
                self.loop.remove_reader(self.src.fileno())
                self.loop.add_writer(self.dst.fileno(), self._writable)
                return
            except OSError:
                self._finish()
                return
        if self.eof:
            self._finish()

    def _writable(self) -> None:
        self.loop.remove_writer(self.dst.fileno())
        self._flush()
        if not self.held and not self.finished.done():
            self.loop.add_reader(self.src.fileno(), self._readable)

    def _finish(self) -> None:
        if self.finished.done():
            return
        self.timer.cancel()
        self.loop.remove_reader(self.src.fileno())
        self.loop.remove_writer(self.dst.fileno())
        os.close(self.r)
        os.close(self.w)
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        self.finished.set_result(None)


async def _splice(src: socket.socket, dst: socket.socket, counts: list[int], index: int) -> None:
    """Move bytes ``src`` -> pipe -> ``dst`` with splice(2), counting into
    ``counts[index]``, until EOF or IDLE_TIMEOUT_S without data; then half-close ``dst``."""
    splicer = _Splicer(src, dst, counts, index)
    try:
        await asyncio.shield(splicer.finished)
    finally:
        splicer._finish()  # cancelled (the box closing): stop at once


async def _splice_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    opened: _Opened,
    first: bytes,
    counts: list[int],
) -> None:
    """After the decision: ``first`` (the checked opening) and whatever either side
    had buffered go out, then the kernel relays both ways until both ends close."""
    client, from_client = await _detach(reader, writer)
    try:
        server, from_server = await _detach(opened.reader, opened.writer)
    except BaseException:
        client.close()  # no duplicate descriptor outlives the connection
        raise
    try:
        await _send_all(server, first + from_client)
        counts[0] += len(first) + len(from_client)
        if from_server:
            await _send_all(client, from_server)
            counts[1] += len(from_server)
        down_done = opened.reader.at_eof()
        jobs = [_splice(client, server, counts, 0)]
        if not down_done:
            jobs.append(_splice(server, client, counts, 1))
        elif not from_server:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)
        await asyncio.gather(*jobs)
    except (OSError, TimeoutError):
        pass
    finally:
        client.close()
        server.close()
