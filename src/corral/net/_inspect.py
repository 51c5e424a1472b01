"""A tunnel's opening, checked before anything goes upstream (pure parsing
over a stream reader): the first TLS ClientHello must name the allowed host
(no domain fronting), plain HTTP/1 in a tunnel gets the plain-HTTP path's
checks, and anything else needs a rule naming the port. Also the HTTP/1 head
parser and the authority helpers the plain-HTTP path shares.
"""

from __future__ import annotations

import asyncio
import re
import struct
from dataclasses import dataclass

from corral.net._events import printable
from corral.net._rules import RuleError, canonical_host, parse_address

HEAD_LIMIT = 64 << 10  # request line and headers
# a tunnel's opening is inspected up to the end of the first ClientHello:
# at most this many bytes and TLS records, or it is refused
INSPECT_BYTES = 1 << 17
INSPECT_RECORDS = 64
HELLO_LIMIT = 1 << 16  # one ClientHello message
_TLS_RECORDS = frozenset(range(20, 25))  # change_cipher_spec, alert, handshake, data, heartbeat
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*")  # an HTTP method is a token
_BAD_HEAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def host_port(authority: str, *, default: int) -> tuple[str | None, int]:
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


def safe_canonical(host: str) -> str:
    try:
        return canonical_host(host)
    except RuleError:
        return "\0invalid"


class Refused(Exception):
    """A tunnel's opening that must not go upstream; ``reason`` is recorded."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _more(reader: asyncio.StreamReader, data: bytes, size: int) -> bytes:
    """``data`` extended from ``reader`` to at least ``size`` bytes (EOF: IncompleteReadError)."""
    if len(data) >= size:
        return data
    return data + await reader.readexactly(size - len(data))


async def inspect_tunnel(
    reader: asyncio.StreamReader,
    data: bytes,
    host: str,
    port: int,
    any_protocol: bool,
    *,
    transparent: bool = False,
) -> bytes:
    """Check a tunnel's opening (``data``, the client's first bytes, read on as
    needed); return the bytes to send upstream first, or raise Refused.

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
            raise Refused(f"TLS to port {port} needs a rule that names the port (host:port)")
        raw, sni = await _read_client_hello(reader, data)
        # a name was allowed: the ClientHello must name it (domain fronting on a
        # shared front end); an address was allowed: no name was checked, so none
        # may be sent
        expected = None if parse_address(host) is not None else host
        if sni != expected:
            shown = "no SNI" if sni is None else f"TLS SNI {printable(sni)!r}"
            raise Refused(f"{shown} does not match {host}")
        return raw
    if data[0] & 0x80:
        data = await _more(reader, data, 3)
        if data[2] == 1:  # msg_type CLIENT-HELLO of an SSLv2 record header
            raise Refused("an SSLv2-format ClientHello (it carries no SNI)")
    if not any_protocol and not transparent:
        raise Refused(
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
            raise Refused("neither TLS nor HTTP/1: other protocols go only to a port a rule names")
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
            raise Refused("only empty lines at the start of a tunnel")
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
            raise Refused("a request line longer than 64 KiB in a tunnel")
        chunk = await reader.read(HEAD_LIMIT)
        if not chunk:
            raise asyncio.IncompleteReadError(data, None)
        data += chunk
    line = data[start:].split(b"\n", 1)[0]
    if b"HTTP/" not in line.upper():
        return other(data)  # a line-based protocol (SMTP's EHLO, Redis), not HTTP
    if line.startswith(b"PRI * HTTP/2"):
        raise Refused("HTTP/2 without TLS (h2c) in a tunnel: its authority cannot be checked")
    while b"\r\n\r\n" not in data[start:]:
        if len(data) > HEAD_LIMIT:
            raise Refused("a request head larger than 64 KiB in a tunnel")
        chunk = await reader.read(HEAD_LIMIT)
        if not chunk:
            raise asyncio.IncompleteReadError(data, None)
        data += chunk
    # the empty lines before the request are not sent on
    raw_head, rest = data[start:].split(b"\r\n\r\n", 1)
    head = parse_head(raw_head)
    if isinstance(head, tuple):
        raise Refused(f"HTTP in a tunnel: {head[1]}")
    fields = {k.lower(): v for k, v in head.headers}
    if "host" in fields:
        named, _ = host_port(fields["host"], default=port)
        if named is None or safe_canonical(named) != host:
            raise Refused("HTTP in a tunnel: the Host header does not match the tunnel's host")
    if not (head.target.startswith("/") or head.target == "*"):
        # absolute-form (and CONNECT's authority-form) win over Host (RFC 9112
        # 3.2.2): they must name the tunnel's host too
        authority = head.target.partition("://")[2].partition("/")[0] or head.target
        named, _ = host_port(authority.rpartition("@")[2], default=port)
        if named is None or safe_canonical(named) != host:
            raise Refused("HTTP in a tunnel: the request target names another host")
    # one request per tunnel, with our own Host and Connection: close, as on the
    # plain-HTTP path: a server MUST NOT process a further request after it (RFC
    # 9112 9.6), so no second request with another Host rides along
    # (and no Upgrade: no switch to another protocol past the check)
    drop = {"host", "connection", "proxy-connection", "proxy-authorization", "keep-alive"}
    drop.add("upgrade")
    kept = "".join(f"{k}: {v}\r\n" for k, v in head.headers if k.lower() not in drop)
    host_field = format_authority(host, port, 80)
    text = (
        f"{head.method} {head.target} {head.version}\r\nHost: {host_field}\r\n"
        f"{kept}Connection: close\r\n\r\n"
    )
    return text.encode("latin-1") + rest


async def _read_client_hello(reader: asyncio.StreamReader, data: bytes) -> tuple[bytes, str | None]:
    """Read TLS records from ``data`` (the first bytes) and ``reader`` until the
    first ClientHello is whole; return every byte read and its server name (None
    if it has none). Raises Refused for anything else.

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
            raise Refused("not a TLS record where one was expected")
        if length > (1 << 14) + 2048 or (kind == 22 and not 0 < length <= 1 << 14):
            raise Refused("a malformed TLS record")
        if pos + 5 + length > INSPECT_BYTES:
            raise Refused(f"no ClientHello within the first {INSPECT_BYTES} bytes")
        data = await _more(reader, data, pos + 5 + length)
        fragment = data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if kind != 22:
            if body:
                raise Refused("another TLS record inside the ClientHello")
            continue  # held back: forwarded only if the ClientHello checks out
        body += fragment
        if len(body) < 4:
            continue
        if body[0] != 1:
            raise Refused("the first TLS handshake message is not a ClientHello")
        needed = 4 + int.from_bytes(body[1:4])
        if needed > HELLO_LIMIT:
            raise Refused("a ClientHello larger than 64 KiB")
        if len(body) >= needed:
            if len(body) > needed:
                # another handshake message after it would be read by the server
                # without the proxy having looked: nothing may follow in its record
                raise Refused("data after the ClientHello in its TLS record")
            return data, _hello_server_name(body)
    raise Refused(f"no ClientHello within the first {INSPECT_RECORDS} TLS records")


def _hello_server_name(message: bytes) -> str | None:
    """The server_name of a whole ClientHello handshake message, canonical; None
    if it has none. Parsed strictly (every length must add up, no extension
    twice, exactly one host_name): where servers could read a message
    differently from the proxy, it is refused (Refused)."""
    try:
        if message[0] != 1 or message[4] != 3:
            raise Refused("a malformed ClientHello")
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
            raise Refused("a malformed ClientHello")
        seen: set[int] = set()
        name: str | None = None
        while pos < len(message):
            ext_type, ext_len = struct.unpack_from(">HH", message, pos)
            pos += 4
            end = pos + ext_len
            if ext_type in seen or end > len(message):
                raise Refused("a malformed ClientHello (an extension twice or overlong)")
            seen.add(ext_type)
            if ext_type == 0:  # server_name (RFC 6066 3)
                (list_len,) = struct.unpack_from(">H", message, pos)
                item = pos + 2
                if item + list_len != end:
                    raise Refused("a malformed server_name extension")
                names = []
                while item < end:
                    name_type, name_len = struct.unpack_from(">BH", message, item)
                    names.append((name_type, message[item + 3 : item + 3 + name_len]))
                    item += 3 + name_len
                if item != end or len(names) != 1 or names[0][0] != 0:
                    raise Refused("a server_name extension without exactly one host name")
                name = safe_canonical(names[0][1].decode("ascii"))
            pos = end
        return name
    except (IndexError, struct.error, UnicodeDecodeError):
        raise Refused("a malformed ClientHello") from None


def parse_head(raw: bytes) -> Head | tuple[int, str]:
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
    return Head(parts[0], parts[1], parts[2], headers)


@dataclass(frozen=True, slots=True)
class Head:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]


def format_authority(host: str, port: int, default: int) -> str:
    """``host:port`` for a Host header (IPv6 in brackets; no port if the default)."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port == default else f"{shown}:{port}"
