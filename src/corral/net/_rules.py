"""Network rules: which hosts and addresses a box may reach through the proxy.

Pure functions, no I/O but name resolution in ``check_addresses``' caller.

* A rule is a domain (``example.com``), a subdomain wildcard (``*.example.com``:
  subdomains only, never the apex), an IP address or a CIDR block, each with
  an optional port (``api.example.com:443``, ``[2001:db8::1]:8443``).
* Deny wins over allow; anything unlisted is denied.
* Names are lowercased and IDNA-encoded; numeric host spellings
  (``2852039166``, ``0xa9.0xfe.0xa9.0xfe``) are canonicalized to the address
  they mean before matching, so they cannot slip past an IP rule.
* Addresses a name resolves to are refused when they are loopback, private,
  link-local, site-local, CGNAT, multicast, unspecified, reserved, a cloud
  metadata endpoint or one of the host's own — unless an IP/CIDR allow rule
  names them. An IPv6 address is judged by its own range and by every IPv4
  address it embeds (IPv4-mapped/-compatible/-translated, NAT64, 6to4,
  Teredo): ``64:ff9b::a9fe:a9fe`` is the metadata endpoint behind a NAT64.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA = (ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("fd00:ec2::254/128"))
CGNAT = ipaddress.ip_network("100.64.0.0/10")
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


class RuleError(ValueError):
    """A malformed rule; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Rule:
    text: str
    domain: str | None = None  # exact name, or the suffix after "*." for wildcards
    wildcard: bool = False
    network: IPNetwork | None = None
    port: int | None = None

    def matches_name(self, host: str, port: int) -> bool:
        if self.domain is None or (self.port is not None and self.port != port):
            return False
        if self.wildcard:
            return host.endswith("." + self.domain)
        return host == self.domain

    def matches_address(self, address: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.wildcard and self.domain == "":  # deny "*": every address too
            return True
        if self.network is None:
            return False
        return address.version == self.network.version and address in self.network


def canonical_host(host: str) -> str:
    """Lowercase, IDNA-encoded; numeric spellings of an IPv4 address as dotted quad."""
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise RuleError("empty host")
    address = parse_address(host)
    if address is not None:
        return str(address)
    if len(host) > 253:
        raise RuleError("a host name longer than 253 characters")
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise RuleError(f"{host[:80]!r} is not a valid host name: {exc}") from None
    labels = encoded.split(".")
    if len(encoded) > 253 or any(
        not label or len(label) > 63 or not set(label) <= _LABEL_CHARS for label in labels
    ):
        # no control characters, spaces or NUL: names reach prompts, logs and events
        raise RuleError(f"{host[:80]!r} is not a valid host name")
    return encoded


def parse_address(host: str) -> IPAddress | None:
    """The address ``host`` spells, in any spelling inet_aton accepts, or None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefx." for c in host) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def parse_rule(text: str, *, allow: bool) -> Rule:
    raw = text.strip()
    if not raw:
        raise RuleError("empty rule")
    host, port = _split_port(raw)
    if host == "*":
        if allow:
            raise RuleError("'*' alone would allow everything: list the hosts instead")
        return Rule(raw, domain="", wildcard=True, port=port)
    if "/" in host:
        try:
            network = ipaddress.ip_network(host.strip("[]"), strict=False)
        except ValueError:
            raise RuleError(f"{raw!r} is not a valid CIDR block") from None
        return Rule(raw, network=network, port=port)
    if host.startswith("*."):
        return Rule(raw, domain=canonical_host(host[2:]), wildcard=True, port=port)
    if "*" in host:
        raise RuleError(f"{raw!r}: '*' is only allowed as the first label ('*.example.com')")
    canonical = canonical_host(host)
    address = parse_address(canonical)
    if address is not None:
        return Rule(raw, network=ipaddress.ip_network(address), port=port)
    return Rule(raw, domain=canonical, port=port)


def _split_port(raw: str) -> tuple[str, int | None]:
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise RuleError(f"{raw!r}: unclosed '['")
        host, rest = raw[: end + 1], raw[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise RuleError(f"{raw!r}: expected ':port' after ']'")
        return host, _port(raw, rest[1:])
    if raw.count(":") == 1:
        host, _, port = raw.partition(":")
        return host, _port(raw, port)
    return raw, None


def _port(raw: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise RuleError(f"{raw!r}: the port must be 1-65535")
    return int(text)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str  # the rule that decided, or why nothing did
    reason: str
    port_named: bool = False  # the deciding rule names this very port


class Rules:
    def __init__(self, allow: tuple[str, ...], deny: tuple[str, ...]) -> None:
        self.allow = tuple(parse_rule(r, allow=True) for r in allow)
        self.deny = tuple(parse_rule(r, allow=False) for r in deny)

    def decide_name(self, host: str, port: int) -> Decision:
        """Before resolution: may the box ask for ``host:port`` at all?"""
        address = parse_address(host)
        if address is not None:
            return self.decide_address(address, port, requested_by_address=True)
        for rule in self.deny:
            if rule.matches_name(host, port) or (rule.wildcard and rule.domain == ""):
                return Decision(False, rule.text, "denied by rule")
        for rule in self.allow:
            if rule.matches_name(host, port):
                return Decision(True, rule.text, "allowed by rule", rule.port is not None)
        return Decision(False, "", "not on the allowlist")

    def decide_lookup(self, host: str) -> Decision:
        """For the box's DNS responder: may ``host`` be looked up at all, i.e. does
        some allow rule name it on some port and no port-less deny rule refuse it?
        (The port is decided when the box connects.)"""
        for rule in self.deny:
            if rule.port is None and (
                rule.matches_name(host, 0) or (rule.wildcard and rule.domain == "")
            ):
                return Decision(False, rule.text, "denied by rule")
        for rule in self.allow:
            if rule.domain is not None and rule.matches_name(host, rule.port or 0):
                return Decision(True, rule.text, "allowed by rule")
        return Decision(False, "", "not on the allowlist")

    def decide_address(
        self, address: IPAddress, port: int, *, requested_by_address: bool = False
    ) -> Decision:
        """May the proxy connect to ``address``? (For a name: each address it resolved to.)"""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # what Linux would connect to
        for rule in self.deny:
            if rule.matches_address(address, port):
                return Decision(False, rule.text, "denied by rule")
        for rule in self.allow:
            if rule.matches_address(address, port):
                return Decision(
                    True, rule.text, "allowed by an address rule", rule.port is not None
                )
        hazard = address_hazard(address)
        if hazard:
            return Decision(False, "", f"{hazard} (SSRF guard)")
        if requested_by_address:
            return Decision(False, "", "an address not on the allowlist")
        return Decision(True, "", "public address")


# Internal ranges by name, checked explicitly (Python's is_private/is_reserved
# tables change between versions). The first match names the hazard.
_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), name)
    for net, name in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "CGNAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible"),  # routed by sit0's automatic tunnel, where loaded
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("::ffff:0:0:0/96", "IPv4-translated"),  # SIIT, RFC 6145
        ("64:ff9b:1::/48", "local-use NAT64"),  # RFC 8215: a site's own translator
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol"),  # Teredo 2001::/32 included
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "6to4"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "SRv6 SID"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),  # deprecated (RFC 3879), still routed inside sites
        ("ff00::/8", "multicast"),
    )
)
# The NAT64 well-known prefix (RFC 6052): its own range is globally routable
# (Python counts it reserved, inside ::/8); an address in it is judged only
# by the IPv4 address it embeds, which is what the translator connects to.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
_RESERVED_V6 = ipaddress.IPv6Network("::/8")


def embedded_ipv4(address: IPAddress) -> tuple[tuple[str, ipaddress.IPv4Address], ...]:
    """The IPv4 addresses an IPv6 address carries, each with its kind: IPv4-mapped
    and -compatible, IPv4-translated (SIIT), NAT64 (the well-known prefix, and the
    local-use prefix 64:ff9b:1::/48 at each RFC 6052 prefix length), 6to4 and
    Teredo (server and de-obfuscated client). Empty for IPv4 and other IPv6."""
    if not isinstance(address, ipaddress.IPv6Address):
        return ()
    value = int(address)
    low = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    if address.ipv4_mapped is not None:
        found.append(("IPv4-mapped", address.ipv4_mapped))
    elif value >> 32 == 0xFFFF0000:
        found.append(("IPv4-translated", low))
    elif value >> 32 == 0 and value > 1:
        found.append(("IPv4-compatible", low))
    elif address in NAT64:
        found.append(("NAT64", low))
    elif address in LOCAL_NAT64:
        # RFC 6052 section 2.2: behind a /n prefix the IPv4 address starts at bit
        # n and skips bits 64-71 (the "u" octet); the site picks n, so each is judged
        bits = f"{value:0128b}"
        for n in (96, 64, 56, 48):
            inner = bits[96:] if n == 96 else (bits[n:64] + bits[72:])[:32]
            found.append((f"local-use NAT64 (/{n})", ipaddress.IPv4Address(int(inner, 2))))
    if address.sixtofour is not None:
        found.append(("6to4", address.sixtofour))
    if address.teredo is not None:
        found.append(("Teredo server", address.teredo[0]))
        found.append(("Teredo client", address.teredo[1]))
    return tuple(found)


def unsafe_allow_rule(text: str) -> str:
    """Why an allow rule would open the SSRF guard (an address rule that covers
    an internal or metadata address, directly or as the IPv4 address an IPv6
    one embeds, or this host's addresses), or ""."""
    network = parse_rule(text, allow=True).network
    if network is None:
        return ""  # a name: its addresses still pass the guard
    if network.num_addresses == 1:
        hazard = address_hazard(network.network_address)
        return f"{network.network_address} is internal: {hazard}" if hazard else ""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(NAT64):
        # judged by the IPv4 block its addresses embed
        shift = 128 - network.prefixlen
        v4 = ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, max(0, 32 - shift)), strict=False
        )
        why = unsafe_allow_rule(str(v4))
        return f"its NAT64 addresses embed {v4}: {why}" if why else ""
    for covered, name in (*((m, "cloud metadata") for m in METADATA), *_RANGES):
        if covered.version == network.version and network.overlaps(covered):
            return f"it covers {covered} ({name})"
    if isinstance(network, ipaddress.IPv6Network) and network.overlaps(_RESERVED_V6):
        return f"it covers {_RESERVED_V6} (reserved)"
    for address in host_addresses():
        if address.version == network.version and address in network:
            return "it covers this host's own address"
    return ""


def address_hazard(address: IPAddress) -> str:
    """Why connecting to ``address`` would reach something it must not, as a phrase
    ("loopback address", "NAT64 address embedding the cloud metadata address
    169.254.169.254"), or "". An IPv6 address is judged by its own range and by
    every IPv4 address it embeds (``embedded_ipv4``)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address_hazard(address.ipv4_mapped)  # Linux connects to the IPv4 itself
    # NAT64, 6to4, Teredo, SIIT: a translator or relay connects to the embedded
    # IPv4, so 64:ff9b::a9fe:a9fe reaches the metadata endpoint (SSRF)
    for kind, inner in embedded_ipv4(address):
        hazard = _own_hazard(inner)
        if hazard:
            return f"{kind} address embedding the {hazard} address {inner}"
    hazard = _own_hazard(address)
    return f"{hazard} address" if hazard else ""


def _own_hazard(address: IPAddress) -> str:
    if any(address in net for net in METADATA if net.version == address.version):
        return "cloud metadata"
    for network, name in _RANGES:
        if network.version == address.version and address in network:
            return name
    if address in NAT64:
        return ""  # judged by what it embeds (above), not by Python's ::/8 "reserved"
    checks = (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("site-local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    )
    for name, hit in checks:
        if hit:
            return name
    if address in host_addresses():
        return "the host's own"
    return ""


@functools.cache
def host_addresses() -> frozenset[IPAddress]:
    """Addresses of this host's interfaces (best effort, without a netlink library)."""
    found: set[IPAddress] = set()
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        infos = []
    for info in infos:
        addr = parse_address(str(info[4][0]).split("%")[0])
        if addr is not None:
            found.add(addr)
    try:
        # IPv4 addresses of every interface: the routing trie marks them
        # "/32 host LOCAL", under the line naming the address
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            previous = ""
            for line in f:
                if "/32 host LOCAL" in line:
                    addr = parse_address(previous.strip().lstrip("|-+ ").strip())
                    if addr is not None:
                        found.add(addr)
                previous = line
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                hexaddr = line.split()[0]
                found.add(ipaddress.IPv6Address(int(hexaddr, 16)))
    except OSError:
        pass
    return frozenset(found)
