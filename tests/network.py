"""What the guard's tests put under relay's HTTP client: a resolver that answers from a table
(so a name can stand for any address without asking DNS) and a socket factory that records
every socket relay opens and refuses any that is not loopback, so that not even a broken guard
can send a test's traffic off this machine."""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult

from relay import guard


class FixedResolver(AbstractResolver):
    """Answers from a table and records every name it was asked; unknown names do not exist."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"test resolver: no such name {host!r}")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in self.table[host]
        ]

    async def close(self) -> None:
        pass


class Tripwire:
    """A socket factory: loopback sockets are made and recorded in `opened`; anything else is
    recorded in `blocked` and refused with an error before a socket exists."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.blocked: list[str] = []

    def __call__(self, addr_info: guard.AddrInfo) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        address = str(sockaddr[0])
        if not ipaddress.ip_address(address.partition("%")[0]).is_loopback:
            self.blocked.append(address)
            raise OSError(f"test tripwire: no connection to {address} from a test")
        self.opened.append(address)
        return socket.socket(family, type_, proto)


def network(table: dict[str, list[str]]) -> tuple[guard.Network, FixedResolver, Tripwire]:
    resolver, tripwire = FixedResolver(table), Tripwire()
    return guard.Network(resolver=resolver, make_socket=tripwire), resolver, tripwire
