"""What the endpoints did, kept in relay.endpoints: targets disabled by their answer (shared by
every relay on the database, until `relay enable`) and endpoints this relay's breaker paused
(for `relay status`). relay.endpoints holds the limits themselves; this part only records.

Changes are written in the order they happened, one statement each (they are rare: a pause, a
410). The disabled targets are read back at start and every sweep interval, so that a target
one relay disabled is skipped by the others too, and `relay enable` reaches them all. If the
database cannot take the writes, the relay goes on with what it holds in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import psycopg

from relay import logs
from relay.db.store import RETRYABLE
from relay.endpoints import MAX_DISABLED, Endpoints

log = logs.get("relay.endpoints")

# Changes waiting to be written at most; beyond (a flood of distinct targets answering 410
# with the database away), the oldest are dropped from the record, never from memory.
MAX_PENDING = 1000


class StateStore(Protocol):
    async def disabled_targets(self, limit: int) -> list[Any]: ...
    async def record_endpoint(self, change: str, data: dict[str, Any]) -> None: ...


class EndpointStates:
    def __init__(self, store: StateStore, endpoints: Endpoints, reload_every: float) -> None:
        self.store = store
        self.endpoints = endpoints
        self.reload_every = reload_every
        self._changes: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._warned = False
        self.written = 0  # changes written (or given up on)
        self._wrote = asyncio.Condition()

    def changed(self, change: str, data: dict[str, Any]) -> None:
        """The deliverer's `on_endpoint`: queue a change to write."""
        if self._changes.qsize() >= MAX_PENDING:
            self._changes.get_nowait()
        self._changes.put_nowait((change, data))

    async def run(self, stop: asyncio.Event) -> None:
        await self._reload()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                getting = asyncio.ensure_future(self._changes.get())
                done, _ = await asyncio.wait(
                    {getting, stopping},
                    timeout=self.reload_every,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if getting in done:
                    await self._write(*getting.result())
                    continue
                getting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getting
                if not stop.is_set():
                    await self._reload()
        finally:
            stopping.cancel()
        # What is left, then this relay's pauses end with it.
        while not self._changes.empty():
            await self._write(*self._changes.get_nowait())
        await self._write("stopped", {})

    async def flushed(self, n: int) -> None:
        """Until `n` changes are written (or given up on)."""
        async with self._wrote:
            await self._wrote.wait_for(lambda: self.written >= n)

    async def _write(self, change: str, data: dict[str, Any]) -> None:
        try:
            await self.store.record_endpoint(change, data)
        except (psycopg.Error, *RETRYABLE) as exc:
            self._failed("record", exc)
        self.written += 1
        async with self._wrote:
            self._wrote.notify_all()

    async def _reload(self) -> None:
        # Changes not written yet would be undone by reading the table first.
        while not self._changes.empty():
            await self._write(*self._changes.get_nowait())
        try:
            rows = await self.store.disabled_targets(MAX_DISABLED)
        except (psycopg.Error, *RETRYABLE) as exc:
            self._failed("reload", exc)
            return
        found = {(source, target): (reason, since) for source, target, reason, since in rows}
        held = self.endpoints.disabled
        for key in [k for k in held if k not in found]:
            del held[key]  # enabled again (`relay enable`)
        for (source, target), (reason, since) in found.items():
            if (source, target) not in held:
                self.endpoints.disable(source, target, reason, since.timestamp())

    def _failed(self, what: str, exc: BaseException) -> None:
        # Once per run at WARNING (a database away fails every write), then at DEBUG.
        hint = (
            "run `relay install` (relay.endpoints is new in this version)"
            if isinstance(exc, psycopg.errors.UndefinedTable)
            else "tried again at the next change; the limits hold in memory meanwhile"
        )
        if self._warned:
            log.debug("endpoint.not_recorded", doing=what, error=logs.first_line(exc))
        else:
            log.warning("endpoint.not_recorded", doing=what, error=logs.first_line(exc), hint=hint)
        self._warned = True
