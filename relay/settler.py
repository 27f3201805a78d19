"""Writes settlements: each source's pending ones in one statement, with the attempt records
its kind keeps; a batch the database refuses is written row by row, so one bad row stays alone.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

import psycopg

from relay import logs
from relay.db.store import RETRYABLE
from relay.sources.base import Settlement, Source

log = logs.get("relay.settler")

SETTLE_BATCH = 500
# While requests are still out, a settle waits this long for their outcomes (unless `enough`
# are waiting already): one statement for a round of outcomes costs relay and PostgreSQL far
# less than one each, and nothing waits on it (the receiver has its request; the claim budget
# leaves room for a round of outcomes being written, see relay.budget).
LINGER = 0.003


class SettleStore(Protocol):
    async def settle(self, source: str, settlements: list[Settlement]) -> set[Any]: ...
    async def log(self, source: str, params: dict[str, Any]) -> None: ...


# Told, after each write, which settlements it covered and which keys were still ours (None when
# the write failed and the rows are left to their claim expiry).
OnSettled = Callable[[str, list[Settlement], set[Any] | None], None]


class Settler:
    """Collects settlements and writes each source's pending ones in one statement.

    Nothing waits on a single row's settle: deliveries hand their outcome over and move on, and
    `on_settled` hears about whole batches once they are written (that is where their claim
    budget is given back, so the rows held stay bounded however slow the writes are).
    """

    def __init__(
        self,
        store: SettleStore,
        on_settled: OnSettled,
        sources: Mapping[str, Source],
        *,
        busy: Callable[[], int] = lambda: 0,
        enough: int = 1,
    ) -> None:
        self.store = store
        self.busy = busy  # requests out now
        self.enough = enough  # outcomes worth a statement without waiting
        self.sources = sources
        self.on_settled = on_settled
        self._queue: dict[str, list[Settlement]] = defaultdict(list)
        self._ready = asyncio.Event()
        self._closing = False
        self._waiting = 0  # settlements queued
        self.lost = 0  # settles that found the row no longer ours
        # Settle statements written and the rows they settled, per source (for /metrics).
        self.settles: dict[str, int] = defaultdict(int)
        self.settled_rows: dict[str, int] = defaultdict(int)

    def add(self, source: str, settlement: Settlement) -> None:
        self._queue[source].append(settlement)
        self._waiting += 1
        self._ready.set()

    def close(self) -> None:
        self._closing = True
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            if not self._closing and self._waiting < self.enough and self.busy():
                await asyncio.sleep(LINGER)
            self._ready.clear()
            batch, self._queue = self._queue, defaultdict(list)
            self._waiting = 0
            for source, items in batch.items():
                for start in range(0, len(items), SETTLE_BATCH):
                    chunk = items[start : start + SETTLE_BATCH]
                    settled = await self._write(source, chunk)
                    if settled is not None:
                        self.settles[source] += 1
                        self.settled_rows[source] += len(settled)
                    self.on_settled(source, chunk, settled)
            if self._closing and not self._queue:
                return

    async def _write(self, source: str, items: list[Settlement]) -> set[Any] | None:
        calls_written = False
        try:
            records = [s for s in items if s.record is not None]
            if records:
                try:
                    await self._log(source, records)
                except RETRYABLE:
                    raise
                except psycopg.Error as exc:
                    if not _structural(exc):
                        raise  # a value one row's record holds: row by row below
                    # The log's table changed (renamed, dropped, a privilege revoked): the
                    # records are lost, the rows are settled all the same (delivering them
                    # again would not bring the log back).
                    log.error(
                        "settle.calls_not_recorded",
                        source=source,
                        rows=len(records),
                        error=logs.first_line(exc),
                    )
            calls_written = True
            settled = await self.store.settle(source, items)
        except RETRYABLE as exc:
            # The database stayed away longer than the store retries for. These rows keep
            # their claim until it expires; then a sweep returns them and they are delivered
            # again (at-least-once), with the same id.
            _log_failed(source, items, exc)
            return None
        except psycopg.Error as exc:
            if _structural(exc):
                # The table itself changed (a column renamed, the table dropped, a privilege
                # revoked): no row would do better alone. The rows keep their claims until
                # these expire; the claimer finds the source failing and the sweeps re-check it.
                log.error(
                    "settle.rejected",
                    source=source,
                    rows=len(items),
                    error=logs.first_line(exc),
                    next="the rows keep their claims until these expire",
                )
                return None
            # Not a lost connection: the database refused a write of one row or more (a
            # "WebhookCall" whose webhook was deleted, a value a column or a trigger of the
            # user's refuses). One statement is all or nothing, so each row is written alone,
            # and the others settle as they would have.
            log.warning(
                "settle.batch_rejected",
                source=source,
                rows=len(items),
                error=logs.first_line(exc),
                next="settling the rows one by one",
            )
            written = await self._write_each(source, items, with_calls=not calls_written)
            if written is None:
                return None
            settled, rejected = written
            items = [s for s in items if s.key not in rejected]
        if len(settled) < len(items):
            for settlement in items:
                if settlement.key not in settled:
                    self.lost += 1
                    log.warning(
                        "settle.lost",
                        source=source,
                        key=settlement.key,
                        outcome=settlement.outcome,
                        reason="claim no longer held (expired and taken over, or the row was "
                        "deleted or changed)",
                    )
        return settled

    async def _log(self, source: str, records: list[Settlement]) -> None:
        found = self.sources[source]
        await self.store.log(source, found.kind.log_params(found, records))

    async def _write_each(
        self, source: str, items: list[Settlement], with_calls: bool
    ) -> tuple[set[Any], set[Any]] | None:
        """Each row on its own: the keys settled and the keys the database refused outright;
        None if the database went away meanwhile."""
        settled: set[Any] = set()
        rejected: set[Any] = set()
        for item in items:
            try:
                one = await self._write_one(source, item, with_calls)
            except RETRYABLE as exc:
                _log_failed(source, items, exc)
                return None
            if one is None:
                rejected.add(item.key)
            else:
                settled |= one
        return settled, rejected

    async def _write_one(self, source: str, item: Settlement, with_call: bool) -> set[Any] | None:
        """One row's settle, with less of it each time the database refuses: its attempt record,
        then its error text and HTTP status; what is left is the outcome itself. None if even
        that is refused."""
        if with_call and item.record is not None:
            try:
                await self._log(source, [item])
            except RETRYABLE:
                raise
            except psycopg.Error as exc:
                log.error(
                    "settle.call_not_recorded",
                    source=source,
                    key=item.key,
                    error=logs.first_line(exc),
                )
        try:
            return await self.store.settle(source, [item])
        except RETRYABLE:
            raise
        except psycopg.Error as exc:
            log.error(
                "settle.details_refused",
                source=source,
                key=item.key,
                outcome=item.outcome,
                error=logs.first_line(exc),
                next="settling without the error text and HTTP status",
            )
        try:
            return await self.store.settle(
                source, [replace(item, error=None, http_status=None, detail=None)]
            )
        except RETRYABLE:
            raise
        except psycopg.Error as exc:
            # Nothing of it can be written (a trigger of the user's refuses the row, say): it
            # keeps its claim until that expires, and is then delivered again.
            log.error(
                "settle.rejected",
                source=source,
                key=item.key,
                outcome=item.outcome,
                error=logs.first_line(exc),
            )
            return None


# SQLSTATE classes that say the statement no longer fits the table (undefined column or table,
# insufficient privilege: 42; invalid schema: 3F; feature not supported: 0A), as opposed to a
# value of one row that was refused.
_STRUCTURAL = ("42", "3F", "0A")


def _structural(exc: psycopg.Error) -> bool:
    return (exc.sqlstate or "")[:2] in _STRUCTURAL


def _log_failed(source: str, items: list[Settlement], exc: BaseException) -> None:
    log.error("settle.failed", source=source, rows=len(items), error=logs.first_line(exc))
