"""Claims batches for one source when woken, when a timer falls due, or when swept.

Rows are claimed ahead of the delivery slots: while `max_in_flight` requests are out, up to
`claim_ahead` more claimed rows wait for a slot, so a slot that frees starts its next request at
once and claims stay whole batches under load (one claim and one settle statement per dozens of
rows, not per row). The budget (`Slots`) is fixed, whatever the backlog. Then the claimer sets a
timer to the next row that is scheduled for later, so a retry is delivered when it falls due
rather than at the next sweep.

A source whose claim the database refuses for a reason other than a lost connection (its table
dropped, a column renamed, a privilege revoked) is failing: its claimer stops claiming, says why
once, and waits for the sweeper to find the table usable again (`retry`); the other sources'
claimers go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import psycopg

from relay import logs
from relay.budget import Slots
from relay.config import Config, ConfigError
from relay.db.store import RETRYABLE
from relay.sources.base import Claimed, Source

log = logs.get("relay.claimer")

RECHECK_FLOOR = 0.1  # seconds: the soonest a timer-driven claim pass repeats
# While passes keep finding rows, the soonest row scheduled for later is looked up at most this
# often (a pass that finds nothing always looks). Rows come at the rate of their notifications;
# one `next_due` statement per pass doubled the statements of a single-row delivery.
NEXT_DUE_EVERY = 1.0


# A claim pass through a backlog goes on from the last key it claimed instead of from the
# start of the key order, and starts over when a claim comes back short (it reached the end) or
# after WRAP_EVERY seconds. Rows a claim passes over without taking them (waiting out a delay
# at the front of the order: a hanging endpoint's deferred rows, retries not due) are then read
# once per pass, not once per claim: a hanging endpoint's 2,000 deferred rows, passed over by
# every claim, cost the healthy endpoint's drain a quarter of its rate (bench: isolation). A row
# behind the cursor that becomes claimable (a retry falling due, a key's next row under
# ordering_key) waits for the start-over: at most WRAP_EVERY, and only while claims come back
# full.
WRAP_EVERY = 0.5


class ClaimStore(Protocol):
    async def claim(
        self,
        source: str,
        limit: int,
        lease_seconds: float,
        after: Any = None,
        skip: Sequence[str] = (),
    ) -> list[Claimed]: ...
    async def next_due(self, source: str) -> float | None: ...
    async def prepare(self, names: Iterable[str] | None = None) -> None: ...


class Starter(Protocol):
    def start(self, source: Source, row: Claimed, claimed_at: float) -> None: ...
    def skips(self, source: str) -> list[str]: ...


class Claimer:
    def __init__(
        self, source: Source, config: Config, store: ClaimStore, deliverer: Starter, slots: Slots
    ) -> None:
        self.source = source
        self.config = config
        self.store = store
        self.deliverer = deliverer
        self.slots = slots
        self._kick = asyncio.Event()
        self._woken = True  # claim once at start
        self._deadline = 0.0
        self._next_due_by = 0.0  # loop time by which next_due runs again
        self._known_due: float | None = None  # loop time the soonest scheduled row falls due
        self.claimed = 0  # rows
        self.claims = 0  # claim statements that returned (for /metrics)
        self.failure: str | None = None  # why this source is failing, if it is
        self.failing = asyncio.Event()  # set while failing, for tests (as the listener's down)
        # Set while it waits with no wake-up pending, for tests: a row written then is found
        # only by a notification, the timer or a sweep.
        self.idle = asyncio.Event()

    # -- called by the listener, the sweeper and the deliverer ---------------------------------

    def wake(self) -> None:
        if self.failure is None:  # a failing source claims only when the sweeper says so
            self._woken = True
            self._kick.set()

    def retry(self) -> None:
        """The sweeper found a failing source's table usable again: try a claim pass."""
        self._woken = True
        self._kick.set()

    async def diagnose(self, error: psycopg.Error) -> None:
        """The database refused one of this source's queries: stop claiming, with the most
        telling reason. The configuration check names the key that no longer fits (a column
        renamed, a table dropped); if it finds nothing, the database's own error is the reason."""
        reason = logs.first_line(error)
        try:
            await self.store.prepare([self.source.name])
        except ConfigError as exc:
            reason = logs.first_line(exc)
        except psycopg.Error:
            pass
        self.fail(reason)

    def fail(self, reason: str) -> None:
        """The database refused this source's queries: stop claiming until `retry`."""
        if reason != self.failure:  # once per change, not once per attempt
            log.error(
                "source.failing",
                source=self.source.name,
                error=reason,
                sweep_interval_s=self.config.sweep_interval,
                next="this source stops; the others go on, and it is checked again at each sweep",
            )
        self.failure = reason
        self.failing.set()

    def schedule(self, delay: float) -> None:
        """A row falls due in `delay` seconds: make sure a claim runs then."""
        when = asyncio.get_running_loop().time() + max(delay, 0.0)
        if when < self._deadline:
            self._deadline = when
            self._kick.set()

    def kick(self) -> None:
        self._kick.set()

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await self._sleep(stop)
            if stop.is_set():
                break
            self._woken = False
            self._deadline = loop.time() + self.config.sweep_interval
            before = self.claimed
            try:
                await self._drain(stop)
                now = loop.time()
                if self.claimed > before and now < self._next_due_by:
                    # Rows came and more may: the soonest scheduled row is as it was looked
                    # up less than NEXT_DUE_EVERY ago; look again by then all the same.
                    wake = self._next_due_by
                    if self._known_due is not None and self._known_due > now:
                        wake = min(wake, self._known_due)
                    self.schedule(max(wake - now, 0.0))
                    continue
                due = await self.store.next_due(self.source.name)
                self._next_due_by = loop.time() + NEXT_DUE_EVERY
            except RETRYABLE as exc:
                # The database is away; the listener's reconnect will wake us, and the timer
                # tries again meanwhile.
                log.warning("claim.failed", source=self.source.name, error=logs.first_line(exc))
                self._deadline = loop.time() + 1.0
                continue
            except psycopg.Error as exc:
                # Not the connection: the database refuses this source's query.
                await self.diagnose(exc)
                continue
            self._known_due = None
            if due is not None:
                # A row not due yet: claim it when it is (a wake-up may come a little early,
                # see WAKE_AHEAD). One already due that this pass did not get (it fell due
                # just after the claim, or another relay holds it): look again shortly, never
                # in a busy loop.
                delay = due if due > 0 else RECHECK_FLOOR
                self._known_due = loop.time() + delay
                self.schedule(delay)

    async def _sleep(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set() and not self._woken:
            # Failing: no timer, only `retry` (or stopping) ends the wait.
            timeout = None if self.failure is not None else self._deadline - loop.time()
            if timeout is not None and timeout <= 0:
                return
            self._kick.clear()
            self.idle.set()
            try:
                async with asyncio.timeout(timeout):
                    await self._kick.wait()
            except TimeoutError:
                return
            finally:
                self.idle.clear()

    async def _drain(self, stop: asyncio.Event) -> None:
        """Claim until the source has nothing claimable left (or we are stopping)."""
        name = self.source.name
        loop = asyncio.get_running_loop()
        after: Any = None  # the cursor: the last key claimed in this pass (WRAP_EVERY)
        wrap_at = 0.0
        while not stop.is_set():
            want = await self.slots.reserve(self.config.batch_size, stop)
            if want == 0:
                return
            # The claims' expiry counts from before the statement (the database's now()).
            began = loop.time()
            if began >= wrap_at:
                after, wrap_at = None, began + WRAP_EVERY
            try:
                # (The rows of endpoints that would defer them are passed over: skips.)
                rows = await self.store.claim(
                    name, want, self.config.claim_timeout, after, self.deliverer.skips(name)
                )
            except BaseException:
                self.slots.give(want)
                raise
            self.slots.give(want - len(rows))
            self.claims += 1
            if self.failure is not None:
                log.warning("source.resumed", source=self.source.name)
                self.failure = None
                self.failing.clear()
            self.claimed += len(rows)
            for row in rows:
                self.deliverer.start(self.source, row, began)
            if len(rows) == want:
                after = _last_key(rows)
                continue
            if after is not None:
                # The end of the key order: the rest from its start.
                after, wrap_at = None, loop.time() + WRAP_EVERY
                continue
            # Notifications that arrived while we claimed have been served by this pass only if
            # they came before the claim; check once more if any did.
            if not self._woken:
                return
            self._woken = False


def _last_key(rows: list[Claimed]) -> Any:
    """The cursor after a claim: its greatest key. (For a text key compared in a collation
    other than Python's, a key that is not the greatest: the next claim then reads a few rows
    again, and misses none.)"""
    try:
        return max(row.key for row in rows)
    except TypeError:  # keys that do not compare in Python: no cursor, from the start
        return None
