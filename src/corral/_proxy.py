"""The allowlist proxy: the only way out of a box whose network mode is ``allowlist``.

One proxy per box, on the host, listening on a socket that corral created
*inside the box's network namespace* (127.0.0.1:3128 there) before the box
ran anything: the box has no other route anywhere, and the listener being
per box is its credential — one box cannot use another's rules.

It speaks HTTP CONNECT (for TLS) and plain HTTP forwarding. It resolves names
itself and connects to the address it checked (no DNS rebinding), refuses
internal addresses (``_netrules``), checks that a TLS ClientHello's SNI names
the host that was allowed (no domain fronting), and records every decision.
Every read is bounded in size and time, so a slowloris, a huge request line,
garbage or thousands of connections cost the host bounded resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from ._netrules import Decision, IPAddress, RuleError, Rules, canonical_host, parse_address

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
        self._answers: dict[tuple[str, int], bool] = {}
        self.hosts = {canonical_host(k): v for k, v in (hosts or {}).items()}
        self.events: deque[NetworkEvent] = deque(maxlen=MAX_EVENTS)
        self.on_event = on_event
        self._server: asyncio.Server | None = None
        self._active: set[asyncio.Task[None]] = set()

    async def serve(self, sock: socket.socket) -> None:
        # the box's side reads with HEAD_LIMIT: readuntil() then refuses a longer head
        self._server = await asyncio.start_server(self._handle, sock=sock, limit=HEAD_LIMIT)

    def update(self, allow: tuple[str, ...], deny: tuple[str, ...]) -> None:
        """New rules, for new connections (raises RuleError, changing nothing, if one is bad)."""
        self.rules = Rules(allow, deny)

    def shutdown(self) -> None:
        """Stop listening and cut every connection (without waiting)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._active):
            task.cancel()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._active):
            task.cancel()
        if self._active:
            await asyncio.gather(*self._active, return_exceptions=True)

    def _record(self, event: NetworkEvent) -> None:
        self.events.append(event)
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(event)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._active) >= MAX_CONNECTIONS:
            await _refuse(writer, 503, "too many connections through this box's proxy")
            return
        self._active.add(task)
        try:
            await self._serve_one(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except TimeoutError:
            with contextlib.suppress(OSError):
                await _refuse(writer, 408, "request head not received in time")
        finally:
            self._active.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await asyncio.wait_for(reader.readexactly(1), HEAD_TIMEOUT_S)
        if first == b"\x05":
            await asyncio.wait_for(self._socks_handshake(reader, writer), HEAD_TIMEOUT_S)
            return
        try:
            head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            head = b""
        if not head or len(head) > HEAD_LIMIT:
            await _refuse(writer, 431, "request head too large")
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _refuse(writer, 400, "not an HTTP/1 proxy request")
            return
        method, target, _ = parts
        headers = [tuple(line.split(":", 1)) for line in lines[1:] if ":" in line]
        if method == "CONNECT":
            await self._connect(target, reader, writer)
        else:
            await self._forward(method, target, headers, reader, writer)

    # -- deciding and connecting -----------------------------------------------------

    async def _open(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str, float, str] | NetworkEvent:
        """Decide and connect; a NetworkEvent (already recorded) when refused.

        An allowed connection is recorded by ``_allowed`` when it ends, with
        its byte counts."""
        started = time.monotonic()
        try:
            host = canonical_host(host)
        except RuleError as exc:
            return self._deny(host, port, None, Decision(False, "", str(exc)))
        decision = self.rules.decide_name(host, port)
        if not decision.allowed and decision.reason == "not on the allowlist":
            decision = await self._ask(host, port, decision)
        if not decision.allowed:
            return self._deny(host, port, None, decision)
        addresses = await self._resolve(host, port)
        if not addresses:
            return self._deny(host, port, None, Decision(False, decision.rule, "name not found"))
        last: Decision | None = None
        for address in addresses:
            verdict = self.rules.decide_address(address, port)
            if not verdict.allowed:
                last = verdict
                continue
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(str(address), port, limit=STREAM_LIMIT),
                    CONNECT_TIMEOUT_S,
                )
            except (OSError, TimeoutError) as exc:
                last = Decision(False, decision.rule, f"connection failed: {exc}")
                continue
            return up_reader, up_writer, str(address), started, verdict.rule or decision.rule
        assert last is not None
        return self._deny(host, port, str(addresses[0]), last)

    async def _ask(self, host: str, port: int, decision: Decision) -> Decision:
        """An unlisted host: ask the approval callback, once per host and port."""
        if self.approve is None:
            return decision
        key = (host, port)
        if key not in self._answers:
            try:
                answer = self.approve(host, port)
                if inspect.isawaitable(answer):
                    answer = await asyncio.wait_for(answer, APPROVAL_TIMEOUT_S)
                self._answers[key] = bool(answer)
            except Exception:  # a failing or slow callback is a "no"
                self._answers[key] = False
        if self._answers[key]:
            return Decision(True, "approved", "approved by the callback")
        return Decision(False, "approved", "refused by the callback")

    def _allowed(
        self, host: str, port: int, address: str, rule: str, started: float, counts: list[int]
    ) -> None:
        self._record(
            NetworkEvent(
                time.time(),
                host,
                port,
                address,
                True,
                rule,
                "allowed",
                counts[0],
                counts[1],
                time.monotonic() - started,
            )
        )

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

    # -- CONNECT --------------------------------------------------------------------------

    async def _connect(
        self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host, port = _host_port(target, default=443)
        if host is None:
            await _refuse(writer, 400, f"bad CONNECT target {target!r}")
            return
        opened = await self._open(host, port)
        if isinstance(opened, NetworkEvent):
            await _refuse(writer, 403, f"{host}:{port} is not allowed: {opened.reason}")
            return
        await self._tunnel(
            host, port, opened, reader, writer, b"HTTP/1.1 200 Connection established\r\n\r\n"
        )

    async def _tunnel(
        self,
        host: str,
        port: int,
        opened: tuple[asyncio.StreamReader, asyncio.StreamWriter, str, float, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ok: bytes,
    ) -> None:
        up_reader, up_writer, address, started, rule = opened
        counts = [0, 0]
        try:
            writer.write(ok)
            await writer.drain()
            first = await asyncio.wait_for(_read_record(reader), HEAD_TIMEOUT_S)
            sni = client_hello_sni(first)
            if sni is not None and _safe_canonical(sni) != _safe_canonical(host):
                # domain fronting: the TLS session names another host than the
                # one that was allowed
                self._deny(
                    host, port, address, Decision(False, "", f"TLS SNI {sni!r} does not match")
                )
                return
            up_writer.write(first)
            counts[0] += len(first)
            await _splice(reader, writer, up_reader, up_writer, counts)
        finally:
            up_writer.close()
            self._allowed(host, port, address, rule, started, counts)

    # -- SOCKS5 (remote DNS: names travel to the proxy, which resolves and checks them) --

    async def _socks_handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        (count,) = await reader.readexactly(1)
        methods = await reader.readexactly(count)
        if 0 not in methods:
            writer.write(b"\x05\xff")  # only "no authentication": the listener is the credential
            return
        writer.write(b"\x05\x00")
        version, command, _, kind = await reader.readexactly(4)
        if version != 5 or command != 1:  # CONNECT only: no BIND, no UDP ASSOCIATE
            writer.write(b"\x05\x07\x00\x01" + bytes(6))
            return
        if kind == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif kind == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        elif kind == 3:
            (length,) = await reader.readexactly(1)
            host = (await reader.readexactly(length)).decode("ascii", errors="replace")
        else:
            writer.write(b"\x05\x08\x00\x01" + bytes(6))
            return
        (port,) = struct.unpack(">H", await reader.readexactly(2))
        opened = await self._open(host, port)
        if isinstance(opened, NetworkEvent):
            writer.write(b"\x05\x02\x00\x01" + bytes(6))  # connection not allowed by ruleset
            return
        await self._tunnel(host, port, opened, reader, writer, b"\x05\x00\x00\x01" + bytes(6))

    # -- plain HTTP -------------------------------------------------------------------------

    async def _forward(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, ...]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if not target.startswith("http://"):
            await _refuse(writer, 400, "only absolute http:// targets (use CONNECT for https)")
            return
        rest = target[len("http://") :]
        authority, slash, path = rest.partition("/")
        host, port = _host_port(authority, default=80)
        if host is None:
            await _refuse(writer, 400, f"bad target {target!r}")
            return
        fields = {k.strip().lower(): v.strip() for k, v in headers}
        host_header, _ = _host_port(fields.get("host", authority), default=port)
        if host_header is None or _safe_canonical(host_header) != _safe_canonical(host):
            await _refuse(writer, 403, "the Host header does not match the request target")
            return
        if "transfer-encoding" in fields:
            await _refuse(writer, 411, "send a Content-Length body through this proxy")
            return
        length = int(fields.get("content-length", "0") or 0)
        if not 0 <= length <= MAX_BODY:
            await _refuse(writer, 413, "request body too large")
            return
        opened = await self._open(host, port)
        if isinstance(opened, NetworkEvent):
            await _refuse(writer, 403, f"{host}:{port} is not allowed: {opened.reason}")
            return
        up_reader, up_writer, address, started, rule = opened
        counts = [0, 0]
        try:
            # one request per connection, sent upstream as origin-form, with
            # our own Connection header: nothing else can ride along to
            # another virtual host on the same server
            kept = [
                f"{k}:{v}"
                for k, v in headers
                if k.strip().lower()
                not in ("connection", "proxy-connection", "proxy-authorization", "keep-alive")
            ]
            request = f"{method} {slash}{path} HTTP/1.1\r\n" + "\r\n".join(kept)
            head = request.encode("latin-1") + b"\r\nConnection: close\r\n\r\n"
            up_writer.write(head)
            counts[0] += len(head) + length
            if length:
                up_writer.write(await asyncio.wait_for(reader.readexactly(length), IDLE_TIMEOUT_S))
            await up_writer.drain()
            writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)
            while data := await asyncio.wait_for(up_reader.read(1 << 18), IDLE_TIMEOUT_S):
                counts[1] += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            up_writer.close()
            self._allowed(host, port, address, rule, started, counts)


def listen_in_box(box_pid: int, port: int = PORT) -> socket.socket:
    """A listening socket on 127.0.0.1:``port`` inside the network namespace of
    the box whose init is ``box_pid`` (still blocked, so nothing in the box can
    have taken the port first).

    setns() changes only the calling thread's namespace, so a short-lived
    thread enters the box's namespace, creates the socket, and ends; the
    socket stays in that namespace and is served by the host's event loop.
    Needs CAP_SYS_ADMIN over the namespace: corral running as root.
    """
    import ctypes
    import os
    import threading

    result: list[socket.socket | BaseException] = []

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/proc/{box_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into the box's network: {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(128)
            sock.setblocking(False)
            result.append(sock)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=enter, name="corral-netns")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


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


async def _read_record(reader: asyncio.StreamReader) -> bytes:
    """The client's first TLS record (or the first bytes of whatever it sends)."""
    head = await reader.read(5)
    if len(head) == 5 and head[0] == 0x16:
        (length,) = struct.unpack(">H", head[3:5])
        return head + await reader.readexactly(min(length, 1 << 14))
    return head


def client_hello_sni(record: bytes) -> str | None:
    """The server_name of a TLS ClientHello record, or None (not TLS, or no SNI)."""
    try:
        if len(record) < 9 or record[0] != 0x16 or record[5] != 0x01:
            return None
        pos = 9 + 2 + 32  # record header, handshake header, client version, random
        pos += 1 + record[pos]  # session id
        (ciphers,) = struct.unpack_from(">H", record, pos)
        pos += 2 + ciphers
        pos += 1 + record[pos]  # compression methods
        (ext_total,) = struct.unpack_from(">H", record, pos)
        pos += 2
        end = min(pos + ext_total, len(record))
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from(">HH", record, pos)
            pos += 4
            if ext_type == 0:  # server_name
                (list_len,) = struct.unpack_from(">H", record, pos)
                item = pos + 2
                while item + 3 <= pos + 2 + list_len:
                    name_type, name_len = struct.unpack_from(">BH", record, item)
                    if name_type == 0:
                        return record[item + 3 : item + 3 + name_len].decode("ascii")
                    item += 3 + name_len
                return None
            pos += ext_len
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


async def _splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    counts: list[int],
) -> None:
    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, index: int) -> None:
        dst.transport.set_write_buffer_limits(high=WRITE_BUFFER)
        try:
            while data := await asyncio.wait_for(src.read(1 << 18), IDLE_TIMEOUT_S):
                counts[index] += len(data)
                dst.write(data)
                await dst.drain()
        finally:
            with contextlib.suppress(OSError):
                if dst.can_write_eof():
                    dst.write_eof()

    await asyncio.gather(
        pipe(reader, up_writer, 0), pipe(up_reader, writer, 1), return_exceptions=True
    )
