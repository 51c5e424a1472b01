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
internal addresses (``_rules``), holds a tunnel's opening until it is
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
import inspect
import ipaddress
import resource
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from corral.net._events import Approval, NetworkEvent, printable
from corral.net._inspect import (
    HEAD_LIMIT,
    Refused,
    format_authority,
    host_port,
    inspect_tunnel,
    parse_head,
    safe_canonical,
)
from corral.net._relay import IDLE_TIMEOUT_S, detach, pipe, send_all, splice, splice_both
from corral.net._rules import (
    Decision,
    IPAddress,
    RuleError,
    Rules,
    canonical_host,
    parse_address,
)

PORT = 3128
# asyncio's buffer for the upstream side (it pauses reading at twice this)
STREAM_LIMIT = 256 << 10
HEAD_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256
MAX_EVENTS = 10_000
MAX_BODY = 64 << 20  # a plain-HTTP request body forwarded upstream
APPROVAL_TIMEOUT_S = 300.0
MAX_NAMES = 65_536  # distinct names one box's DNS responder hands addresses for
MAX_QUESTIONS = 1024  # distinct hosts one box may have the callback asked about
_SO_ORIGINAL_DST = 80
# the DNS responder answers allowed names with addresses from these pools; the
# proxy maps them back to the name (RFC 2544's benchmarking block and a ULA
# prefix: never routed anywhere, and refused by the SSRF guard if unmapped)
SYNTHETIC_V4 = ipaddress.IPv4Network("198.18.0.0/15")
SYNTHETIC_V6 = ipaddress.IPv6Network("fdc0:4272:616c::/64")


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
        parsed = parse_head(head[:-4])
        if isinstance(parsed, tuple):
            await _refuse(writer, *parsed)
            return
        method, target, headers = parsed.method, parsed.target, parsed.headers
        if method == "CONNECT":
            host, port = host_port(target, default=443)
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
            return self._deny(printable(host), port, None, Decision(False, "", str(exc)))
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
        self._replace(opened.event, final)

    def _replace(self, event: NetworkEvent, new: NetworkEvent | None) -> None:
        """Put ``new`` where ``event`` is in the log (None: take it out); gone
        already (evicted by newer events) is fine. Found by identity from the
        newest end, where a connection's own event almost always is: a
        ``deque.index`` would compare (dataclass ``__eq__``) against up to
        MAX_EVENTS older events on every connection's close."""
        events = self.events
        for back, candidate in enumerate(reversed(events), 1):
            if candidate is event:
                if new is None:
                    del events[-back]
                else:
                    events[-back] = new
                return

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
                    writer, 403, f"{printable(host)}:{port} is not allowed: {opened.reason}"
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
            down = asyncio.ensure_future(pipe(opened.reader, writer, counts, 1))
            # ... the client's first bytes are inspected before anything goes up
            first = await asyncio.wait_for(reader.read(HEAD_LIMIT), IDLE_TIMEOUT_S)
            if first:
                try:
                    first = await asyncio.wait_for(
                        inspect_tunnel(
                            reader,
                            first,
                            opened.event.host,
                            port,
                            opened.any_protocol,
                            transparent=transparent,
                        ),
                        HEAD_TIMEOUT_S,
                    )
                except (Refused, TimeoutError, asyncio.IncompleteReadError) as exc:
                    reason = (
                        exc.reason
                        if isinstance(exc, Refused)
                        else "the tunnel's opening (ClientHello or request head) did not arrive"
                    )
                    self._replace(opened.event, None)
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
                await splice_both(reader, writer, opened.reader, opened.writer, first, counts)
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
        host, port = host_port(authority, default=80)
        if host is None:
            await _refuse(writer, 400, f"bad target {target[:100]!r}")
            return
        fields = {k.lower(): v for k, v in headers}
        if "host" in fields:
            host_header, _ = host_port(fields["host"], default=port)
            if host_header is None or safe_canonical(host_header) != safe_canonical(host):
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
            await _refuse(writer, 403, f"{printable(host)}:{port} is not allowed: {opened.reason}")
            return
        counts = [0, 0]
        try:
            # one request per connection, sent upstream in origin-form with our
            # own Host and Connection headers: nothing rides along to another
            # virtual host on the same server
            drop = ("host", "connection", "proxy-connection", "proxy-authorization", "keep-alive")
            kept = [f"{k}: {v}" for k, v in headers if k.lower() not in drop]
            authority_out = format_authority(opened.event.host, port, 80)
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
            server, buffered = await detach(opened.reader, opened.writer)
            try:
                client, _ = await detach(None, writer)
            except BaseException:
                server.close()
                raise
            try:
                if buffered:
                    await send_all(client, buffered)
                    counts[1] += len(buffered)
                await splice(server, client, counts, 1)
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
