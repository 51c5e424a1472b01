"""The box's DNS responder (allowlist mode): names the policy allows, nothing else.

Every DNS query the box sends (to any server: the box's nftables rules
redirect port 53) arrives here, on UDP sockets corral created inside the
box's network namespace and serves from the host's event loop. A name the
rules allow (``Rules.decide_lookup``), or any name when an approval callback
decides at connect time, is answered with a synthetic address from a private
pool (``Proxy.synthetic``); the proxy maps that address back to the name when
the box connects to it, and only then resolves the name itself and applies
the SSRF guard. Nothing is ever looked up on the host for a query: an
unlisted name gets NXDOMAIN. Every query is recorded as a ``NetworkEvent``
on port 53. Messages are parsed and built with dnspython.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from corral.net._events import NetworkEvent, printable
from corral.net._rules import RuleError, canonical_host

if TYPE_CHECKING:
    from corral.net._proxy import Proxy

TTL_S = 30
MAX_QUERY = 4096  # bytes: larger datagrams are dropped unread


class DnsResponder(asyncio.DatagramProtocol):
    """Answers the box's queries on one UDP socket for ``proxy``'s rules."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self.transport is None or len(data) > MAX_QUERY:
            return
        reply = self.answer(data)
        if reply is not None:
            with contextlib.suppress(OSError):
                self.transport.sendto(reply, addr)

    def answer(self, data: bytes) -> bytes | None:
        """The reply to one query in wire format (None: not a query, dropped)."""
        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError):
            return None
        if query.flags & dns.flags.QR:
            return None  # a response sent to us: never answered (no reflection loops)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        kind = dns.rdatatype.to_text(question.rdtype)
        raw = question.name.to_text(omit_final_dot=True)
        try:
            name = canonical_host(raw)
        except RuleError:
            name = ""
        verdict = self.proxy.decide_lookup(name) if name else None
        if verdict is None or not verdict[0]:
            reason = verdict[2] if verdict is not None else "not a valid host name"
            # refused here, never looked up on the host: no lookup leaks the name
            response.set_rcode(dns.rcode.NXDOMAIN)
            self.proxy._record(
                NetworkEvent(
                    time.time(),
                    name or printable(raw),
                    53,
                    None,
                    False,
                    verdict[1] if verdict else "",
                    f"DNS {kind}: {reason}",
                )
            )
            return response.to_wire()
        _, rule, reason = verdict
        addresses = self.proxy.synthetic(name)
        if addresses is None:
            response.set_rcode(dns.rcode.REFUSED)
            self.proxy._record(
                NetworkEvent(
                    time.time(), name, 53, None, False, rule, f"DNS {kind}: too many names"
                )
            )
            return response.to_wire()
        answer = None
        if question.rdclass == dns.rdataclass.IN and question.rdtype == dns.rdatatype.A:
            answer = str(addresses[0])
        elif question.rdclass == dns.rdataclass.IN and question.rdtype == dns.rdatatype.AAAA:
            answer = str(addresses[1])
        if answer is not None:
            response.answer.append(
                dns.rrset.from_text(question.name, TTL_S, "IN", question.rdtype, answer)
            )
        # other types (HTTPS, MX, TXT): an empty answer, so clients fall back to A/AAAA
        self.proxy._record(
            NetworkEvent(time.time(), name, 53, answer, True, rule, f"DNS {kind}: {reason}")
        )
        return response.to_wire()


async def serve_dns(proxy: Proxy, socks: list[socket.socket]) -> list[asyncio.DatagramTransport]:
    """Serve ``socks`` (UDP, non-blocking) with ``proxy``'s rules; close the transports to stop."""
    loop = asyncio.get_running_loop()
    transports = []
    for sock in socks:
        transport, _ = await loop.create_datagram_endpoint(lambda: DnsResponder(proxy), sock=sock)
        transports.append(transport)
    return transports
