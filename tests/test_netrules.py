"""The SSRF guard's judgement of addresses and rules (pure), and the server's use of it.

Every IPv6 spelling of an IPv4 address is judged by the IPv4 address it
carries as well as by its own range: a NAT64 or 6to4 address of the metadata
endpoint is the metadata endpoint once a translator or relay forwards it.
"""

from __future__ import annotations

import ipaddress
import os

import pytest

import corral
from corral import Client, RemoteError
from corral.net._rules import Rules, address_hazard, embedded_ipv4, unsafe_allow_rule

from .server_helpers import serving

# (spelling, the embedded IPv4 it must be judged by, words the reason must carry)
EMBEDDED = [
    ("::ffff:169.254.169.254", "169.254.169.254", "cloud metadata"),
    ("::ffff:127.0.0.1", "127.0.0.1", "loopback"),
    ("::a9fe:a9fe", "169.254.169.254", "IPv4-compatible address embedding the cloud metadata"),
    ("::7f00:1", "127.0.0.1", "IPv4-compatible address embedding the loopback"),
    ("::ffff:0:a9fe:a9fe", "169.254.169.254", "IPv4-translated address embedding"),
    ("64:ff9b::a9fe:a9fe", "169.254.169.254", "NAT64 address embedding the cloud metadata"),
    ("64:ff9b::169.254.169.254", "169.254.169.254", "NAT64 address embedding the cloud metadata"),
    ("64:ff9b::7f00:1", "127.0.0.1", "NAT64 address embedding the loopback"),
    ("64:ff9b::a00:1", "10.0.0.1", "NAT64 address embedding the private"),
    ("64:ff9b::6440:1", "100.64.0.1", "NAT64 address embedding the CGNAT"),
    ("64:ff9b::c0a8:101", "192.168.1.1", "NAT64 address embedding the private"),
    ("64:ff9b::e000:1", "224.0.0.1", "NAT64 address embedding the multicast"),
    ("64:ff9b::", "0.0.0.0", "NAT64 address embedding the unspecified"),
    # RFC 8215's local-use prefix, at each RFC 6052 prefix length (the u octet skipped)
    ("64:ff9b:1::a9fe:a9fe", "169.254.169.254", "local-use NAT64 (/96)"),
    ("64:ff9b:1:0:a9:fea9:fe00:0", "169.254.169.254", "local-use NAT64"),  # /64
    ("64:ff9b:1:a9:fe:a9fe::", "169.254.169.254", "local-use NAT64"),  # /56
    ("64:ff9b:1:a9fe:a9:fe00::", "169.254.169.254", "local-use NAT64"),  # /48
    ("2002:a9fe:a9fe::", "169.254.169.254", "6to4 address embedding the cloud metadata"),
    ("2002:7f00:1::1", "127.0.0.1", "6to4 address embedding the loopback"),
    ("2002:a00:1:1::1", "10.0.0.1", "6to4 address embedding the private"),
    # Teredo: server 65.54.227.120, client 127.0.0.1 obfuscated (xor 0xffffffff)
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1", "Teredo client address embedding"),
]

# IPv6 ranges that are internal by themselves, whatever they embed
OWN_RANGE = [
    ("fec0::1", "site-local"),
    ("fec0:0:0:1::a9fe:a9fe", "site-local"),
    ("feff:ffff::1", "site-local"),
    ("64:ff9b:1::808:808", "local-use NAT64"),  # a site's own translator
    ("2002:808:808::1", "6to4"),
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "IETF protocol"),  # Teredo of public 8.8.8.8
    ("::2", "IPv4-compatible"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fd00:ec2::254", "cloud metadata"),
    ("fd12:3456::1", "private"),
    ("fe80::1", "link-local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("100::1", "discard-only"),
    ("169.254.169.254", "cloud metadata"),
    ("100.64.1.1", "CGNAT"),
    ("192.0.2.1", "documentation"),
]

PUBLIC = ["93.184.215.14", "2606:4700:4700::1111", "64:ff9b::808:808", "64:ff9b::5db8:d70e"]


@pytest.mark.parametrize(("spelling", "inner", "words"), EMBEDDED)
def test_an_embedded_internal_ipv4_is_refused(spelling: str, inner: str, words: str) -> None:
    address = ipaddress.ip_address(spelling)
    assert ipaddress.IPv4Address(inner) in {v4 for _, v4 in embedded_ipv4(address)}
    why = address_hazard(address)
    assert words in why, why
    # a name resolving there is refused; an address rule naming it is refused by servers
    decision = Rules(("any.test",), ()).decide_address(address, 80)
    assert not decision.allowed
    assert decision.reason == f"{why} (SSRF guard)"
    assert unsafe_allow_rule(f"[{spelling}]:80").endswith(why)
    assert unsafe_allow_rule(spelling)


@pytest.mark.parametrize(("spelling", "name"), OWN_RANGE)
def test_internal_ipv6_ranges_are_refused(spelling: str, name: str) -> None:
    why = address_hazard(ipaddress.ip_address(spelling))
    assert name in why, why
    assert unsafe_allow_rule(spelling)


@pytest.mark.parametrize("spelling", PUBLIC)
def test_public_addresses_and_their_nat64_forms_pass(spelling: str) -> None:
    """A DNS64 host's answer for a public name stays usable."""
    assert address_hazard(ipaddress.ip_address(spelling)) == ""
    assert unsafe_allow_rule(spelling) == ""


@pytest.mark.parametrize(
    ("rule", "refused"),
    [
        ("64:ff9b::/96", True),  # every IPv4 address, the metadata endpoint included
        ("64:ff9b::a9fe:a900/120", True),
        ("64:ff9b::a00:0/104", True),
        ("64:ff9b::/64", True),
        ("64:ff9b:1::/48", True),
        ("64:ff9b:1:a9fe::/64", True),
        ("2002::/16", True),
        ("2002:a9fe::/32", True),
        ("2001::/32", True),
        ("fec0::/10", True),
        ("::/96", True),
        ("::/0", True),
        ("::/8", True),
        ("64:ff9b::808:800/120", False),  # NAT64 of 8.8.8.0/24
        ("2606:4700::/32", False),
        ("8.8.8.0/24", False),
    ],
)
def test_cidr_rules_are_judged_by_what_they_cover(rule: str, refused: bool) -> None:
    assert bool(unsafe_allow_rule(rule)) is refused, unsafe_allow_rule(rule)


@pytest.mark.skipif(os.geteuid() != 0, reason="the server tests run as root here")
def test_the_api_refuses_embedded_internal_rules() -> None:
    """corral serve refuses such rules at create and at a rules update, like any
    private address (``Service.check_rules`` asks ``unsafe_allow_rule``)."""
    rules = ["[64:ff9b::a9fe:a9fe]:80", "2002:a9fe:a9fe::", "fec0::/10", "[::ffff:0:7f00:1]"]
    with serving() as server, Client(server.url, api_key=server.key("net")) as client:
        for rule in rules:
            policy = corral.Policy.preset("default").with_network(mode="allowlist", allow=[rule])
            with pytest.raises(RemoteError) as refused:
                client.sandbox(policy).start()
            assert (refused.value.status, refused.value.code) == (403, "policy_forbidden")
            assert "is refused on this server" in str(refused.value)
        allowlist = corral.Policy.preset("default").with_network(mode="allowlist", allow=["a.test"])
        with client.sandbox(allowlist, runtime=None) as sb:
            with pytest.raises(RemoteError) as live:
                sb.network.update(allow=["a.test", "64:ff9b::a9fe:a900/120"])
            assert live.value.code == "policy_forbidden"
