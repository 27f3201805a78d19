"""The outbound guard: relay sends only to public addresses unless `http.allow` opens more.

A target URL can come from a row that any user of the application wrote, so a row must not be
able to make relay reach its own network: loopback services, private ranges, cloud metadata
(169.254.169.254). The check is made on the address a connection is actually opened to, never
on a name resolved earlier, so DNS rebinding cannot slip through:

- `Guard.target` parses a URL (once: targets repeat) and checks a host that is an address, in
  whatever spelling (`0x7f000001`, `2130706433`, `127.1`, `[::ffff:127.0.0.1]` all are
  127.0.0.1); the client never resolves those;
- `Guard.resolver` wraps the resolver: a name is refused as a whole when any address it
  resolves to is refused (as Documenso's `assertNotPrivateUrl` does), before any socket exists;
  the client (relay.httpclient) connects to exactly the addresses it returns;
- `Guard.socket_factory` checks every address once more right before its socket is made: the
  last line, whichever path the address took.

Classification and URL display are pure; only the resolver and the socket factory touch the
network, and only through what they wrap.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from aiohttp import DefaultResolver
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# aiohappyeyeballs' address info: (family, type, proto, canonname, sockaddr).
AddrInfo = tuple[int, int, int, str, tuple[str, int] | tuple[str, int, int, int]]
SocketFactory = Callable[[AddrInfo], socket.socket]

HINT = "relay does not send to non-public addresses unless http.allow lists them"

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# IANA's special-purpose registries, first match wins. Everything Documenso's
# assertNotPrivateUrl refuses is here (0.0.0.0, 10/8, 127/8, 169.254/16, 172.16/12,
# 192.168/16, ::, ::1, fe80::/10, fc00::/7, ::ffff:a.b.c.d), and more.
_V4_RANGES: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/8"), "unspecified"),
    (_V4("10.0.0.0/8"), "private"),
    (_V4("100.64.0.0/10"), "carrier-grade NAT"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.0.0/16"), "link-local"),  # cloud metadata services (169.254.169.254)
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.0.0.0/24"), "reserved"),
    (_V4("192.0.2.0/24"), "reserved (documentation)"),
    (_V4("192.88.99.0/24"), "reserved"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("198.18.0.0/15"), "reserved (benchmarking)"),
    (_V4("198.51.100.0/24"), "reserved (documentation)"),
    (_V4("203.0.113.0/24"), "reserved (documentation)"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("255.255.255.255/32"), "broadcast"),
    (_V4("240.0.0.0/4"), "reserved"),
)
_V6_RANGES: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("64:ff9b:1::/48"), "private"),  # local-use NAT64 (RFC 8215)
    (_V6("100::/64"), "reserved"),  # discard-only
    (_V6("2001:2::/48"), "reserved (benchmarking)"),
    (_V6("2001:10::/28"), "reserved"),  # ORCHID, deprecated
    (_V6("2001:db8::/32"), "reserved (documentation)"),
    (_V6("3fff::/20"), "reserved (documentation)"),
    (_V6("5f00::/16"), "reserved"),  # SRv6 SIDs
    (_V6("fc00::/7"), "unique-local"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "site-local"),
    (_V6("ff00::/8"), "multicast"),
)
_GLOBAL_UNICAST = _V6("2000::/3")
# Forms that carry an IPv4 address inside an IPv6 one; they reach (through a translator or a
# tunnel) the IPv4 address they embed, so they are refused when that one is.
_V4_COMPATIBLE = _V6("::/96")  # deprecated ::a.b.c.d
_NAT64 = _V6("64:ff9b::/96")


def _embedded(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    if ip in _V4_COMPATIBLE or ip in _NAT64:
        return (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF),)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip.teredo is not None:
        return ip.teredo  # (server, client)
    return ()


def classify(ip: IPAddress) -> str | None:
    """What kind of non-public address `ip` is ("loopback", "private", ...), or None if public.

    Give it addresses from `parse_ip`, which turns an IPv4-mapped IPv6 address into the IPv4
    address it is."""
    if isinstance(ip, ipaddress.IPv4Address):
        return next((kind for net, kind in _V4_RANGES if ip in net), None)
    kind = next((kind for net, kind in _V6_RANGES if ip in net), None)
    if kind is not None:
        return kind
    for inner in _embedded(ip):
        inner_kind = classify(inner)
        if inner_kind is not None:
            return f"{inner_kind} (embedded IPv4 {inner})"
    if ip not in _GLOBAL_UNICAST and ip not in _V4_COMPATIBLE and ip not in _NAT64:
        return "reserved"
    return None


_LEGACY_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")


def _legacy_v4(text: str) -> ipaddress.IPv4Address | None:
    """The address inet_aton (and so getaddrinfo) reads in `text`: 1 to 4 dot-separated parts,
    each decimal, octal (leading 0) or hex (0x); the last part fills the remaining bytes, so
    `127.1` and `2130706433` are both 127.0.0.1."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_LEGACY_PART.fullmatch(p) for p in parts):
        return None
    numbers = [
        int(p[2:] or "0", 16) if p[:2].lower() == "0x" else int(p, 8 if p.startswith("0") else 10)
        for p in parts
    ]
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (4 - len(leading)):
        return None
    value = last
    for i, n in enumerate(leading):
        value |= n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def host_name(host: str) -> str:
    """A host as compared with http.allow: lower case, without brackets or trailing dots."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def parse_ip(host: str) -> IPAddress | None:
    """The address a URL host denotes, whatever its spelling, or None if it is a name.

    An IPv4-mapped IPv6 address is the IPv4 address it maps: connecting to one reaches the
    other."""
    text = host_name(host)
    try:
        ip: IPAddress = ipaddress.ip_address(text)
    except ValueError:
        legacy = _legacy_v4(text)
        if legacy is None:
            return None
        ip = legacy
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id:
            ip = ipaddress.IPv6Address(text.partition("%")[0])
    return ip


# -- the allow-list -------------------------------------------------------------------------

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True, slots=True)
class Allow:
    """What `http.allow` opens: networks (an address is a network of one) and host names (an
    allowed name may connect to whatever it resolves to)."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = field(default_factory=frozenset)

    def permits(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)

    def permits_host(self, host: str) -> bool:
        return host_name(host) in self.hosts

    @property
    def loopback(self) -> bool:
        """Whether 127.0.0.1 is open (the demo and the tests need it, and say so)."""
        return self.permits(ipaddress.IPv4Address("127.0.0.1"))


def allow_entry(entry: str) -> IPNetwork | str:
    """One http.allow entry: an address, a network in CIDR or a host name; ValueError says why
    not (without the entry, which the caller names by its key)."""
    ip = parse_ip(entry)
    if ip is not None:
        return ipaddress.ip_network(ip)
    if "/" in entry:
        try:
            return ipaddress.ip_network(entry.strip(), strict=True)
        except ValueError as exc:
            raise ValueError(
                f"not a network in CIDR notation ({exc}); write it like '10.0.0.0/8' or "
                f"'fd00::/8', with the host bits zero"
            ) from None
    name = host_name(entry)
    if not _HOST_NAME.fullmatch(name):
        raise ValueError("expected an IP address, a network like '10.0.0.0/8', or a host name")
    return name


def allow(entries: Iterable[str]) -> Allow:
    networks: list[IPNetwork] = []
    hosts: set[str] = set()
    for entry in entries:
        parsed = allow_entry(entry)
        if isinstance(parsed, str):
            hosts.add(parsed)
        else:
            networks.append(parsed)
    return Allow(tuple(networks), frozenset(hosts))


# -- refusals ------------------------------------------------------------------------------


class Refused(OSError):
    """A connection the guard will not open; `reason` says why and which key allows it.

    An OSError, as the failures of resolving and connecting it stands in for are."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidTarget(ValueError):
    """Not an http:// or https:// URL with a host."""


def _a(kind: str) -> str:
    return f"an {kind}" if kind.startswith("unspecified") else f"a {kind}"


def _is_localhost(name: str) -> bool:
    # RFC 6761: localhost and every name under it are loopback, whatever DNS says.
    return name == "localhost" or name.endswith(".localhost")


def display_url(url: str) -> str:
    """A URL as it may be shown in logs, errors and stored rows: scheme, host, port and path,
    never userinfo (passwords) or the query string and fragment (tokens). Never raises, even on
    text that is no URL at all."""
    text = re.split(r"[?#]", url, maxsplit=1)[0]
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    authority, slash, path = rest.partition("/")
    return f"{scheme}{sep}{authority.rpartition('@')[2]}{slash}{path}"


def address_refusal(host: str, ip: IPAddress, allowed: Allow) -> str | None:
    """Why a connection to `ip` (for `host`) is refused, or None if it may be made."""
    kind = classify(ip)
    if kind is None or allowed.permits(ip):
        return None
    spelled = host_name(host)
    subject = f"{ip} is" if spelled == str(ip) else f"{spelled} is {ip},"
    return f"refused: target {subject} {_a(kind)} address; {HINT}"


def host_refusal(host: str, allowed: Allow) -> str | None:
    """Why a URL host is refused before any lookup (an address, in whatever spelling, or a name
    under localhost), or None: a public address, an allowed one, or a name to resolve."""
    ip = parse_ip(host)
    if ip is not None:
        return address_refusal(host, ip, allowed)
    name = host_name(host)
    if _is_localhost(name) and not allowed.permits_host(name):
        return f"refused: target {name} is a loopback name; {HINT}"
    return None


# -- the guard -----------------------------------------------------------------------------

_TARGET_CACHE = 4096


def default_socket(addr_info: AddrInfo) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    return socket.socket(family=family, type=type_, proto=proto)


def default_resolver() -> AbstractResolver:
    """The system's resolver (getaddrinfo in a thread), as aiohttp's server and client use."""
    return DefaultResolver()


@dataclass(frozen=True, slots=True)
class Network:
    """How the HTTP client reaches the network, under the guard: the resolver for names (None:
    the system's) and what opens a socket; and the TLS context (None: the system's trusted
    CAs). Tests replace them, so that a name can resolve to any address, no socket is made
    without them knowing, and a test's own CA can be trusted."""

    resolver: AbstractResolver | None = None
    make_socket: SocketFactory = default_socket
    ssl_context: ssl.SSLContext | None = None


class Guard:
    """The outbound guard for one HTTP client. `resolver` resolves names (the default one, or a
    test's); `make_socket` opens a socket once the guard has passed its address."""

    def __init__(
        self,
        allowed: Allow,
        resolver: AbstractResolver,
        make_socket: SocketFactory = default_socket,
    ) -> None:
        self.allowed = allowed
        self.resolver: AbstractResolver = _GuardedResolver(self, resolver)
        self._make_socket = make_socket
        self._targets: dict[str, URL | InvalidTarget | Refused] = {}
        # Addresses that allowed host names resolved to: the socket factory, which sees no
        # name, lets them through. Bounded by the names the configuration lists.
        self._vouched: set[IPAddress] = set()

    def target(self, url: str) -> URL:
        """The URL to request, checked as far as it can be before connecting: raises
        InvalidTarget, or Refused when its host is an address the guard refuses. A host spelled
        as an address in any legacy form is requested in its canonical form."""
        found = self._targets.get(url)
        if found is None:
            found = self._check(url)
            if len(self._targets) >= _TARGET_CACHE:
                self._targets.clear()
            self._targets[url] = found
        if isinstance(found, URL):
            return found
        # A fresh exception each time: raising the cached one would grow its traceback with
        # every raise, and with it keep every caller's frame (a row and its payload) alive.
        raise type(found)(*found.args)

    def _check(self, url: str) -> URL | InvalidTarget | Refused:
        try:
            parsed = URL(url)
        except (ValueError, TypeError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.raw_host:
            return InvalidTarget(
                f"invalid target URL {display_url(url)!r}: it must be an http:// or https:// "
                f"URL with a host"
            )
        host = parsed.raw_host
        reason = host_refusal(host, self.allowed)
        if reason is not None:
            return Refused(reason)
        ip = parse_ip(host)
        if ip is None or host == str(ip):
            return parsed
        return parsed.with_host(str(ip))

    def check_resolved(self, host: str, addresses: Sequence[str]) -> None:
        """Raise Refused if any address `host` resolved to is refused (unless the name itself
        is allowed)."""
        if self.allowed.permits_host(host):
            self._vouched.update(ip for a in addresses if (ip := parse_ip(a)) is not None)
            return
        for address in addresses:
            ip = parse_ip(address)
            if ip is None:
                raise Refused(f"refused: target {host_name(host)} resolved to {address!r}")
            kind = classify(ip)
            if kind is not None and not self.allowed.permits(ip):
                raise Refused(
                    f"refused: target {host_name(host)} resolves to {ip}, {_a(kind)} address; "
                    f"{HINT}"
                )

    def socket_factory(self, addr_info: AddrInfo) -> socket.socket:
        """The last check, on the very address about to be used; then the socket."""
        address = str(addr_info[4][0])
        ip = parse_ip(address)
        if ip is None:
            raise Refused(f"refused: {address!r} is not an IP address")
        if ip not in self._vouched:
            reason = address_refusal(address, ip, self.allowed)
            if reason is not None:
                raise Refused(reason)
        return self._make_socket(addr_info)


class _GuardedResolver(AbstractResolver):
    """Resolves with the wrapped resolver and refuses a name any of whose addresses is refused."""

    def __init__(self, guard: Guard, inner: AbstractResolver) -> None:
        self._guard = guard
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        reason = host_refusal(host, self._guard.allowed)
        if reason is not None:
            raise Refused(reason)
        results = await self._inner.resolve(host, port, family)
        self._guard.check_resolved(host, [r["host"] for r in results])
        return results

    async def close(self) -> None:
        await self._inner.close()
