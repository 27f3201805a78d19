"""The claimer against a fake store: bounded claims, wake-ups and the due timer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from relay import claimer as claimer_mod
from relay.budget import Slots
from relay.claimer import Claimer
from relay.config import Config
from relay.sources.base import Claimed, Source
from tests.support import make_config

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FakeStore:
    def __init__(self, rows: int) -> None:
        self.waiting = list(range(rows))
        self.claims: list[int] = []
        self.afters: list[int | None] = []
        self.passed_over: list[int] = []  # one key per claim, the first claims
        self.due: float | None = None
        self.claimed_event = asyncio.Event()
        self.next_due_calls = 0
        self.asked = asyncio.Event()

    async def claim(
        self,
        source: str,
        limit: int,
        lease_seconds: float,
        after: int | None = None,
        skip: Sequence[str] = (),
    ) -> list[Claimed]:
        self.claims.append(limit)
        self.afters.append(after)
        passed = set(self.passed_over)  # claims pass over these, as over rows not due yet
        self.passed_over = self.passed_over[1:]
        taken = [k for k in self.waiting if (after is None or k > after) and k not in passed]
        taken = taken[:limit]
        self.waiting = [k for k in self.waiting if k not in taken]
        self.claimed_event.set()
        return [Claimed(k, NOW, 1, 5, None, None, None, "{}") for k in taken]

    async def next_due(self, source: str) -> float | None:
        self.next_due_calls += 1
        self.asked.set()
        return self.due


class HeldDeliveries:
    """Deliveries that finish only when the test says so."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.started: list[Claimed] = []
        self.changed = asyncio.Event()

    def start(self, source: Source, row: Claimed, claimed_at: float) -> None:
        self.started.append(row)
        self.changed.set()

    def skips(self, source: str) -> list[str]:
        return []

    def finish(self, n: int) -> None:
        self.slots.give(n)


def config(max_in_flight: int, batch: int) -> Config:
    return make_config(
        "postgresql://unused/x", relay={"max_in_flight": max_in_flight, "batch_size": batch}
    )


async def wait_until(event: asyncio.Event, predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not predicate():
            event.clear()
            await event.wait()


@dataclass
class Rig:
    slots: Slots
    deliveries: HeldDeliveries
    claimer: Claimer


@asynccontextmanager
async def claiming(store: FakeStore, max_in_flight: int, batch: int) -> AsyncIterator[Rig]:
    """A claimer running on `store` (a budget of max_in_flight + batch rows), stopped at the
    end of the block."""
    cfg = config(max_in_flight=max_in_flight, batch=batch)
    slots = Slots(cfg.max_in_flight, ahead=cfg.batch_size)
    deliveries = HeldDeliveries(slots)
    rig = Rig(slots, deliveries, Claimer(cfg.sources[0], cfg, store, deliveries, slots))
    stop = asyncio.Event()
    task = asyncio.create_task(rig.claimer.run(stop))
    try:
        yield rig
    finally:
        stop.set()
        slots.poke()
        rig.claimer.kick()
        await asyncio.wait_for(task, 5)


async def test_claims_at_most_the_budget_and_refills_in_half_batches() -> None:
    store = FakeStore(rows=20)
    async with claiming(store, max_in_flight=3, batch=4) as rig:  # a budget of 7 rows
        slots, deliveries = rig.slots, rig.deliveries
        # A full batch at once, then the rest of the budget.
        await wait_until(deliveries.changed, lambda: len(deliveries.started) == 7)
        assert store.claims == [4, 3]
        assert (slots.free, slots.held) == (0, 7)
        # One settled row is not enough to claim again (half a batch is)...
        deliveries.finish(1)
        for _ in range(5):
            await asyncio.sleep(0)
        assert store.claims == [4, 3]
        # ... a second one is.
        deliveries.finish(1)
        await wait_until(deliveries.changed, lambda: len(deliveries.started) == 9)
        assert store.claims == [4, 3, 2]
        assert slots.held == 7
        deliveries.finish(7)
        await wait_until(deliveries.changed, lambda: len(deliveries.started) == 16)
        deliveries.finish(7)
        await wait_until(deliveries.changed, lambda: len(deliveries.started) == 20)
        assert max(store.claims) <= 4
    assert [r.key for r in deliveries.started] == list(range(20))


async def test_a_lone_row_is_claimed_at_once_whatever_the_batch() -> None:
    slots = Slots(1, ahead=50)
    stop = asyncio.Event()
    assert await asyncio.wait_for(slots.reserve(50, stop), 1) == 50
    slots.give(50)
    # Nothing held: even with free budget below half a batch in a tiny budget, claim now.
    tiny = Slots(1)
    assert await asyncio.wait_for(tiny.reserve(50, stop), 1) == 1


async def test_outcomes_being_written_hold_budget_but_not_the_rows_claimed_ahead() -> None:
    slots = Slots(2, ahead=2)  # at most 4 undelivered, 6 held
    stop = asyncio.Event()
    assert await slots.reserve(10, stop) == 4
    slots.delivered(4)  # handed to the settler, not yet written
    assert (slots.held, slots.undelivered, slots.free) == (4, 0, 2)
    assert await slots.reserve(10, stop) == 2
    assert slots.free == 0
    slots.settled(4)
    assert (slots.held, slots.undelivered, slots.free) == (2, 2, 2)


async def test_a_wake_claims_again_and_a_short_claim_ends_the_pass() -> None:
    store = FakeStore(rows=2)
    async with claiming(store, max_in_flight=10, batch=10) as rig:
        deliveries = rig.deliveries
        await wait_until(deliveries.changed, lambda: len(deliveries.started) == 2)
        assert store.claims == [10]  # one claim found fewer than asked: the pass ended
        store.waiting = [100]
        store.claimed_event.clear()
        rig.claimer.wake()
        await wait_until(deliveries.changed, lambda: len(deliveries.started) == 3)
        assert store.claims == [10, 10]  # a batch: the budget (10 + 10) has 18 free


async def test_the_next_due_row_sets_a_timer() -> None:
    store = FakeStore(rows=0)
    store.due = 0.05
    async with claiming(store, max_in_flight=10, batch=10):
        # The start-up pass, then the timer's pass 50 ms later, with no wake in between.
        await wait_until(store.claimed_event, lambda: len(store.claims) >= 2)


async def test_while_rows_keep_coming_the_next_due_row_is_looked_up_once_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(claimer_mod, "NEXT_DUE_EVERY", 0.2)
    store = FakeStore(rows=0)
    async with claiming(store, max_in_flight=3, batch=4) as rig:
        deliveries = rig.deliveries
        # The pass at start finds nothing, and looks up the next scheduled row.
        await wait_until(store.asked, lambda: store.next_due_calls == 1)
        # Ten rows, one per notification, each claimed by a pass of its own: none asks again.
        for n in range(10):
            store.waiting.append(n)
            rig.claimer.wake()
            await wait_until(deliveries.changed, lambda n=n: len(deliveries.started) == n + 1)
            deliveries.finish(1)
        assert store.next_due_calls == 1
        # The rows stop coming: by NEXT_DUE_EVERY it looks again, with no wake-up at all.
        await wait_until(store.asked, lambda: store.next_due_calls == 2)


async def test_a_pass_goes_on_after_the_last_key_claimed_and_starts_over_at_the_end() -> None:
    store = FakeStore(rows=20)
    store.passed_over = [2, 2]  # not claimable for the first two claims (its delay runs out)
    async with claiming(store, max_in_flight=40, batch=4) as rig:
        deliveries = rig.deliveries
        await wait_until(deliveries.changed, lambda: len(deliveries.started) == 20)
        # Each full claim goes on after its last key: key 2, passed over at first, is not read
        # again until the end of the order sends the pass back to the start, where it is taken.
        assert store.afters == [None, 4, 8, 12, 16, None]
        assert [r.key for r in deliveries.started][-1] == 2
        await wait_until(store.asked, lambda: store.next_due_calls == 1)  # the pass ended


async def test_a_long_pass_starts_over_every_wrap_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(claimer_mod, "WRAP_EVERY", 0.3)
    store = FakeStore(rows=100)
    async with claiming(store, max_in_flight=4, batch=4) as rig:
        deliveries = rig.deliveries
        await wait_until(deliveries.changed, lambda: len(deliveries.started) == 8)
        assert store.afters == [None, 3]
        # Within WRAP_EVERY of the pass's start, the next claim goes on after key 7 ...
        deliveries.finish(4)
        await wait_until(deliveries.changed, lambda: len(deliveries.started) == 12)
        assert store.afters[-1] == 7
        # ... and once it has passed, from the start (a retry that fell due behind the cursor
        # waits no longer than that).
        await asyncio.sleep(0.35)  # time passing is what this test is about
        deliveries.finish(4)
        await wait_until(deliveries.changed, lambda: len(deliveries.started) == 16)
        assert store.afters[-1] is None
