"""The claim budget shared by every source's claimer: how many rows may be claimed and not yet
settled, whatever the backlog (see `Slots`)."""

from __future__ import annotations

import asyncio


class Slots:
    """The claim budget shared by every source's claimer. Two bounds, whatever the backlog:

    - rows claimed and not yet delivered (waiting for a request slot, or in a request): at most
      `in_flight + ahead`;
    - rows claimed and not yet settled (those, and delivered rows whose outcome is still being
      written): at most `2 * in_flight + ahead`. The extra `in_flight` is room for a round of
      settles in progress, which would otherwise eat into the rows claimed ahead and leave the
      requests waiting for a claim.

    Once rows are held, a claim waits until at least half of `ahead` is free, so that under load
    each claim takes a good part of a batch; when nothing is held it claims at once, which keeps
    a lone row's latency to one round trip.
    """

    def __init__(self, in_flight: int, ahead: int = 0) -> None:
        self.size = 2 * in_flight + ahead
        self.undelivered_size = in_flight + ahead
        self.held = 0  # claimed, not yet settled
        self.undelivered = 0  # claimed, not yet handed to the settler
        self._enough = max(1, ahead // 2)
        self._freed = asyncio.Event()

    @property
    def free(self) -> int:
        return min(self.size - self.held, self.undelivered_size - self.undelivered)

    async def reserve(self, most: int, stop: asyncio.Event) -> int:
        """Wait for enough free budget and take up to `most`; 0 when stopping."""
        while self.free < min(most, self._enough, self.undelivered_size):
            if stop.is_set():
                return 0
            self._freed.clear()
            await self._freed.wait()
        if stop.is_set():
            return 0
        taken = min(most, self.free)
        self.held += taken
        self.undelivered += taken
        return taken

    def delivered(self, n: int = 1) -> None:
        """Rows whose outcome went to the settler (still held until it is written)."""
        if n:
            self.undelivered -= n
            self._freed.set()

    def settled(self, n: int) -> None:
        """Rows whose outcome is written (or given up on): no longer held."""
        if n:
            self.held -= n
            self._freed.set()

    def give(self, n: int = 1) -> None:
        """Budget taken and not used (a claim found fewer rows), or rows done with entirely."""
        if n:
            self.held -= n
            self.undelivered -= n
            self._freed.set()

    def poke(self) -> None:
        self._freed.set()
