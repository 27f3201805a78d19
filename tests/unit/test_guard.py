"""The outbound guard's pure parts: address spellings, ranges, the allow-list, URL display, and
its resolver and socket factory driven directly (no socket connects, no DNS is asked)."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver

from relay import guard
from relay.guard import Allow, Guard, Refused
from tests.network import FixedResolver

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "0x7f000001",
    "0X7F000001",
    "2130706433",
    "017700000001",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "127.1",
    "127.0.1",
    "127.0.0.1.",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "::ffff:127.0.0.1",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_spelling_of_127_0_0_1_is_that_address(host: str) -> None:
    assert guard.parse_ip(host) == ipaddress.IPv4Address("127.0.0.1")


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        # Everything Documenso's isPrivateUrl refuses (packages/lib/server-only/webhooks).
        ("0.0.0.0", "unspecified"),
        ("127.255.255.254", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("[::1]", "loopback"),
        ("[::]", "unspecified"),
        ("[fe80::1]", "link-local"),
        ("[fe80::1%25eth0]", "link-local"),
        ("[fc00::1]", "unique-local"),
        ("[fd12:3456::1]", "unique-local"),
        ("[::ffff:10.0.0.1]", "private"),
        # ... and more.
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.255", "carrier-grade NAT"),
        ("0.1.2.3", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("192.0.0.8", "reserved"),
        ("192.0.2.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("198.51.100.7", "reserved"),
        ("203.0.113.9", "reserved"),
        ("[ff02::1]", "multicast"),
        ("[fec0::1]", "site-local"),
        ("[2001:db8::1]", "reserved"),
        ("[100::1]", "reserved"),
        ("[64:ff9b:1::1]", "private"),
        # IPv6 forms that embed a refused IPv4 address: compatible, NAT64, 6to4, Teredo.
        ("[::127.0.0.1]", "loopback"),
        ("[64:ff9b::10.0.0.5]", "private"),
        ("[2002:a9fe:a9fe::1]", "link-local"),
        ("[2001:0:4136:e378:8000:63bf:f5ff:fffe]", "private"),  # Teredo client 10.0.0.1
        # Reserved for the future: not global unicast.
        ("[4000::1]", "reserved"),
    ],
)
def test_non_public_addresses_are_classified(host: str, kind: str) -> None:
    ip = guard.parse_ip(host)
    assert ip is not None
    found = guard.classify(ip)
    assert found is not None and found.startswith(kind)


@pytest.mark.parametrize(
    "host",
    [
        "8.8.8.8",
        "93.184.216.34",
        "172.15.255.255",
        "172.32.0.1",
        "100.63.255.255",
        "100.128.0.0",
        "169.253.255.255",
        "[2606:4700:4700::1111]",
        "[2a00:1450:4001:80b::200e]",
        "[::ffff:8.8.8.8]",
        "[64:ff9b::8.8.8.8]",
        "[2002:0808:0808::1]",
    ],
)
def test_public_addresses_are_not_classified(host: str) -> None:
    ip = guard.parse_ip(host)
    assert ip is not None
    assert guard.classify(ip) is None


@pytest.mark.parametrize(
    "host", ["example.com", "localhost", "1.2.3.256", "08.1.1.1", "256.1", "0x1g", "a.1", ""]
)
def test_names_and_malformed_numbers_are_not_addresses(host: str) -> None:
    assert guard.parse_ip(host) is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw@/x", "http:///x"),
        (
            "https://user:pw@hooks.example.com:8443/a/b?token=abc#frag",
            "https://hooks.example.com:8443/a/b",
        ),
        ("https://hooks.example.com/a?x=1", "https://hooks.example.com/a"),
        ("https://a@b@hooks.example.com/p", "https://hooks.example.com/p"),
        ("https://hooks.example.com", "https://hooks.example.com"),
        ("https://[::1]:8080/p?q", "https://[::1]:8080/p"),
        ("not a url", "not a url"),
        ("user:pw@host/p?token=1", "host/p"),
        ("", ""),
    ],
)
def test_display_url_keeps_scheme_host_port_and_path_only(url: str, shown: str) -> None:
    assert guard.display_url(url) == shown


def test_allow_entries_are_addresses_networks_or_host_names() -> None:
    allowed = guard.allow(["10.0.0.0/8", "192.168.1.20", "::1", "Hooks.Internal.", "fd00::/8"])
    assert allowed.permits(ipaddress.ip_address("10.200.0.1"))
    assert allowed.permits(ipaddress.ip_address("192.168.1.20"))
    assert not allowed.permits(ipaddress.ip_address("192.168.1.21"))
    assert allowed.permits(ipaddress.ip_address("::1"))
    assert allowed.permits(ipaddress.ip_address("fd00::5"))
    assert not allowed.permits(ipaddress.ip_address("127.0.0.1"))
    assert allowed.permits_host("hooks.internal")
    assert not allowed.loopback


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "10.0.0.0/33", "not a host!", "a..b", "-x.com"])
def test_a_bad_allow_entry_says_what_is_expected(entry: str) -> None:
    with pytest.raises(ValueError, match=r"expected|CIDR"):
        guard.allow_entry(entry)


# -- Guard.target: address literals are checked before any request ----------------------------


def _guard(*allow: str, resolver: AbstractResolver | None = None) -> Guard:
    return Guard(guard.allow(allow), resolver or FixedResolver({}), _no_socket)


def _no_socket(addr_info: guard.AddrInfo) -> socket.socket:
    raise AssertionError(f"the guard let a socket be made for {addr_info[4]}")


@pytest.mark.parametrize("host", [*LOOPBACK_SPELLINGS[:-1], "[::1]", "localhost", "a.localhost"])
def test_loopback_urls_are_refused_in_every_spelling_naming_the_key(host: str) -> None:
    with pytest.raises(Refused) as refused:
        _guard().target(f"http://{host}:8080/hook?token=t")
    reason = refused.value.reason
    assert reason.startswith("refused: target ")
    assert "loopback" in reason and "http.allow" in reason
    assert "token" not in reason


def test_a_refusal_names_the_address_the_spelling_stands_for() -> None:
    with pytest.raises(Refused, match=r"target 0x7f000001 is 127\.0\.0\.1, a loopback address"):
        _guard().target("http://0x7f000001/")
    with pytest.raises(Refused, match=r"target 169\.254\.169\.254 is a link-local"):
        _guard().target("http://169.254.169.254/latest/meta-data/")


def test_an_allowed_address_in_a_legacy_spelling_is_requested_in_its_canonical_form() -> None:
    target = _guard("127.0.0.0/8").target("http://2130706433:8080/hook?x=1")
    assert str(target) == "http://127.0.0.1:8080/hook?x=1"
    assert _guard("127.0.0.0/8").target("http://[::ffff:127.0.0.1]:1/").host == "127.0.0.1"


def test_public_literals_and_names_pass_to_the_resolver_stage() -> None:
    g = _guard()
    assert g.target("https://8.8.8.8/x").host == "8.8.8.8"
    assert g.target("https://hooks.example.com/x").host == "hooks.example.com"


@pytest.mark.parametrize("url", ["ftp://x/", "not a url", "http:///x", "http://user:pw@/x", ""])
def test_invalid_targets_raise_invalid_target(url: str) -> None:
    with pytest.raises(guard.InvalidTarget):
        _guard().target(url)


def test_an_allowed_localhost_name_is_not_refused_by_name() -> None:
    assert _guard("localhost").target("http://localhost:1/").host == "localhost"


# -- the resolver and the socket factory, driven directly ---------------------------------------


TABLE = {
    "internal.test": ["10.0.0.5"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": ["93.184.216.34", "192.168.1.1"],
    "ula.test": ["fd00::1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "public.test": ["93.184.216.34", "2606:4700::1111"],
    "allowed.test": ["10.9.9.9"],
}


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("internal.test", "10.0.0.5, a private"),
        ("metadata.test", "169.254.169.254, a link-local"),
        ("mixed.test", "192.168.1.1, a private"),
        ("ula.test", "fd00::1, a unique-local"),
        ("mapped.test", "127.0.0.1, a loopback"),
    ],
)
async def test_a_name_resolving_to_any_refused_address_is_refused(name: str, shown: str) -> None:
    g = _guard(resolver=FixedResolver(TABLE))
    with pytest.raises(Refused) as refused:
        await g.resolver.resolve(name, 443)
    assert refused.value.reason == (
        f"refused: target {name} resolves to {shown} address; relay does not send to "
        f"non-public addresses unless http.allow lists them"
    )


async def test_public_names_and_allowed_names_resolve() -> None:
    g = _guard("allowed.test", "fd00::/8", resolver=FixedResolver(TABLE))
    assert [r["host"] for r in await g.resolver.resolve("public.test", 443)] == TABLE["public.test"]
    assert [r["host"] for r in await g.resolver.resolve("allowed.test", 443)] == ["10.9.9.9"]
    assert [r["host"] for r in await g.resolver.resolve("ula.test", 443)] == ["fd00::1"]


async def test_localhost_is_refused_without_asking_the_resolver() -> None:
    resolver = FixedResolver({"localhost": ["8.8.8.8"]})
    with pytest.raises(Refused, match="loopback name"):
        await _guard(resolver=resolver).resolver.resolve("localhost", 80)
    assert resolver.asked == []


def _info(address: str) -> guard.AddrInfo:
    if ":" in address:
        return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, 80, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, 80))


def test_the_socket_factory_refuses_before_any_socket_exists() -> None:
    made: list[object] = []

    def record(addr_info: guard.AddrInfo) -> socket.socket:
        made.append(addr_info[4])
        return socket.socket(addr_info[0], addr_info[1], addr_info[2])

    g = Guard(guard.allow(["192.168.7.0/24"]), FixedResolver(TABLE), record)
    for address in ("10.0.0.5", "127.0.0.1", "::1", "fe80::1", "::ffff:169.254.169.254"):
        with pytest.raises(Refused):
            g.socket_factory(_info(address))
    assert made == []
    g.socket_factory(_info("93.184.216.34")).close()
    g.socket_factory(_info("192.168.7.1")).close()
    assert made == [("93.184.216.34", 80), ("192.168.7.1", 80)]


async def test_addresses_of_an_allowed_name_pass_the_socket_factory_but_not_as_literals() -> None:
    made: list[object] = []

    def record(addr_info: guard.AddrInfo) -> socket.socket:
        made.append(addr_info[4])
        return socket.socket(addr_info[0], addr_info[1], addr_info[2])

    g = Guard(guard.allow(["allowed.test"]), FixedResolver(TABLE), record)
    await g.resolver.resolve("allowed.test", 80)
    g.socket_factory(_info("10.9.9.9")).close()
    assert made == [("10.9.9.9", 80)]
    with pytest.raises(Refused):
        g.target("http://10.9.9.9/")


def test_allow_default_is_empty() -> None:
    assert Allow() == guard.allow([])


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "ftp://example.com/"])
def test_a_refused_target_keeps_no_callers_frame_alive(url: str) -> None:
    # The cached refusal used to be raised again and again: its traceback grew by the caller's
    # frames with every raise, keeping each row (and its payload) alive for as long as the URL
    # stayed in the cache.
    g = _guard()

    def deliver() -> BaseException:
        try:
            g.target(url)
        except (Refused, guard.InvalidTarget) as exc:
            return exc
        raise AssertionError("not refused")

    first, again = deliver(), deliver()
    assert first is not again
    depth = 0
    tb = again.__traceback__
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    assert depth <= 2
