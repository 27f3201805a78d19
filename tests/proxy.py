"""A TCP proxy on 127.0.0.1 that can go silent without closing anything.

Between relay and PostgreSQL it forwards bytes both ways until told to freeze: then it stops
reading from the sockets it has (their kernel buffers still accept, and acknowledge, what
arrives, as a stuck NAT or middlebox does), sends nothing, and keeps every socket open: no FIN,
no RST. `freeze_existing` freezes the connections open now and lets new ones through;
`freeze_all` also freezes every connection accepted after it (the database "stops answering"
on all connections). `thaw` lets everything flow again, bytes held meanwhile included.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Self

import psycopg

CHUNK = 64 * 1024


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream one."""

    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


class FreezableProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self.frozen_all = False
        self._links: set[_Link] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @classmethod
    def for_url(cls, url: str) -> Self:
        info = psycopg.conninfo.conninfo_to_dict(url)
        return cls(str(info.get("host") or "127.0.0.1"), int(str(info.get("port") or 5432)))

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by this proxy's."""
        info = psycopg.conninfo.conninfo_to_dict(url)
        info.update(host="127.0.0.1", port=str(self.port))
        return psycopg.conninfo.make_conninfo(**info)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for link in list(self._links):
            for w in link.writers:
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
        self._links.clear()
        if self._server is not None:
            await self._server.wait_closed()

    def freeze_existing(self) -> int:
        """Existing connections go silent; returns how many."""
        for link in self._links:
            link.flowing.clear()
        return len(self._links)

    def freeze_all(self) -> None:
        self.frozen_all = True
        self.freeze_existing()

    def thaw(self) -> None:
        self.frozen_all = False
        for link in self._links:
            link.flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link()
        if not self.frozen_all:
            link.flowing.set()
        self._links.add(link)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            self._links.discard(link)
            return
        link.writers = [writer, up_writer]
        for pump in (
            asyncio.create_task(self._pump(link, reader, up_writer), name="proxy.up"),
            asyncio.create_task(self._pump(link, up_reader, writer), name="proxy.down"),
        ):
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                await link.flowing.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                # Frozen while reading: hold the bytes until thawed.
                await link.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side closed (only ever while flowing): close the other, as a proxy does.
            for w in link.writers:
                w.close()
            self._links.discard(link)
