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
  link-local, CGNAT, multicast, unspecified, reserved, a cloud metadata
  endpoint or one of the host's own — unless an IP/CIDR allow rule names them.
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
            return Decision(False, "", f"{hazard} address (SSRF guard)")
        if requested_by_address:
            return Decision(False, "", "an address not on the allowlist")
        return Decision(True, "", "public address")


_HAZARD_NETWORKS = (
    tuple(
        ipaddress.ip_network(n)
        for n in (
            "0.0.0.0/8",
            "10.0.0.0/8",
            "100.64.0.0/10",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "172.16.0.0/12",
            "192.0.0.0/24",
            "192.168.0.0/16",
            "198.18.0.0/15",
            "224.0.0.0/3",
            "::/127",
            "::ffff:0:0/96",
            "fc00::/7",
            "fe80::/10",
            "ff00::/8",
        )
    )
    + METADATA
)


def unsafe_allow_rule(text: str) -> str:
    """Why an allow rule would open the SSRF guard (an address rule that covers
    loopback, private, link-local, metadata or this host's addresses), or ""."""
    network = parse_rule(text, allow=True).network
    if network is None:
        return ""  # a name: its addresses still pass the guard
    for hazard in _HAZARD_NETWORKS:
        if hazard.version == network.version and network.overlaps(hazard):
            return f"it covers {hazard}"
    for address in host_addresses():
        if address.version == network.version and address in network:
            return "it covers this host's own address"
    return ""


def address_hazard(address: IPAddress) -> str:
    """Why connecting to ``address`` would reach something it must not, or ""."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address_hazard(address.ipv4_mapped) or ""
    if any(address in net for net in METADATA if net.version == address.version):
        return "cloud metadata"
    checks = (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("CGNAT", isinstance(address, ipaddress.IPv4Address) and address in CGNAT),
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
