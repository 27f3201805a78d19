"""Sweeps: return expired claims to claimable, then have every claimer look for work.

A sweep runs at start, right after every (re)connect of the listener, and every
`sweep_interval`. It is what makes notifications optional: a row whose notification was never
heard is found here.

It is also where a failing source (see relay.claimer) is checked again: its table and columns
are checked and its queries compiled anew, and if that works its claimer tries again.

And where relay's triggers are checked: a missing one (a migration dropped its table and made
it anew, or moved the source to another table, as Documenso's "Document" became "Envelope") is
installed again as `relay install` would, if relay's role may; if not, the source is
`untriggered` (readiness fails naming why) and its rows are found by sweeps alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Protocol

import psycopg

from relay import logs
from relay.config import ConfigError
from relay.db import catalog
from relay.db.store import RETRYABLE

log = logs.get("relay.sweeper")


class RescueStore(Protocol):
    async def rescue(self, source: str) -> int: ...
    async def prepare(self, names: Iterable[str] | None = None) -> None: ...
    async def trigger_problems(self, names: Iterable[str] | None = None) -> dict[str, str]: ...
    async def reinstall(self, name: str) -> None: ...


class Sweepable(Protocol):
    failure: str | None

    def wake(self) -> None: ...
    def retry(self) -> None: ...
    def fail(self, reason: str) -> None: ...
    async def diagnose(self, error: psycopg.Error) -> None: ...


class Sweeper:
    def __init__(
        self, store: RescueStore, claimers: Mapping[str, Sweepable], interval: float
    ) -> None:
        self.store = store
        self.claimers = claimers
        self.interval = interval
        self._kick = asyncio.Event()
        self._kick.set()  # sweep at start
        self.sweeps = 0
        self.rescued: dict[str, int] = {}  # rows whose expired claims sweeps returned, per source
        self._swept = asyncio.Condition()
        self._sweeping = False
        # Sources whose triggers are missing and could not be installed again: why.
        self.untriggered: dict[str, str] = {}

    def sweep_now(self) -> None:
        self._kick.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.interval):
                    await self._kick.wait()
            except TimeoutError:
                pass
            if stop.is_set():
                return
            self._kick.clear()
            await self.sweep()

    async def sweep(self) -> None:
        self._sweeping = True
        try:
            await self._sweep()
        finally:
            self._sweeping = False
        async with self._swept:
            self._swept.notify_all()

    async def _sweep(self) -> None:
        for source, claimer in self.claimers.items():
            try:
                if claimer.failure is not None:
                    await self.store.prepare([source])
                rescued = await self.store.rescue(source)
            except RETRYABLE as exc:
                log.warning("sweep.failed", source=source, error=logs.first_line(exc))
                continue
            except ConfigError as exc:
                claimer.fail(logs.first_line(exc))  # still failing, for this reason
                continue
            except psycopg.Error as exc:
                # The table changed under this source: it stops alone (see relay.claimer).
                await claimer.diagnose(exc)
                continue
            if claimer.failure is not None:
                claimer.retry()
            await self._triggers(source)
            if rescued:
                self.rescued[source] = self.rescued.get(source, 0) + rescued
                log.warning(
                    "sweep.rescued",
                    source=source,
                    rows=rescued,
                    reason="claim expired (a relay died or lost the database mid-delivery?)",
                )
        self.sweeps += 1
        for claimer in self.claimers.values():
            claimer.wake()

    async def _triggers(self, source: str) -> None:
        try:
            problem = (await self.store.trigger_problems([source])).get(source)
        except (*RETRYABLE, psycopg.Error) as exc:
            log.warning("sweep.failed", source=source, error=logs.first_line(exc))
            return
        if problem is None or catalog.STALE in problem:
            # A stale trigger still wakes relay; it may be another relay version's (a rolling
            # upgrade): `relay check` reports it, and `relay install` replaces it.
            self.untriggered.pop(source, None)
            return
        try:
            await self.store.reinstall(source)
        except RETRYABLE as exc:
            log.warning("sweep.failed", source=source, error=logs.first_line(exc))
            return
        except (ConfigError, psycopg.Error) as exc:
            reason = f"{problem}; relay could not install it again: {logs.first_line(exc)}"
            if self.untriggered.get(source) != reason:  # once per change
                log.error(
                    "source.untriggered",
                    source=source,
                    problem=reason,
                    hint="its rows are found by sweeps alone until `relay install` is run by a "
                    "role that may create triggers on its table",
                )
            self.untriggered[source] = reason
            return
        self.untriggered.pop(source, None)
        log.warning("source.reinstalled", source=source, was=problem)
        # Rows written while the trigger was missing woke nobody: look for them now.
        self.claimers[source].wake()

    async def quiet(self) -> None:
        """Wait until a sweep has run and none is asked for (used by tests and readiness)."""
        async with self._swept:
            await self._swept.wait_for(
                lambda: self.sweeps > 0 and not self._kick.is_set() and not self._sweeping
            )
