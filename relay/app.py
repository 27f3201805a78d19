"""Wires the relay together: one TaskGroup, signals, two-phase shutdown.

notification -> claimer -> deliverer -> settler, with the sweeper feeding the same claimers.
If any long-running part dies, the TaskGroup cancels the rest and the process exits non-zero
with the reason logged: nothing dies silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from relay import guard
from relay.claimer import Claimer, Slots
from relay.config import Config
from relay.deliverer import Deliverer, Settler
from relay.listener import Listener
from relay.server import serve
from relay.store import RETRYABLE, Outcome, Settlement, Store
from relay.sweeper import Sweeper

log = logging.getLogger("relay.app")

_AGAIN = (Outcome.retry, Outcome.release)
PROGRESS_EVERY = 10.0  # seconds between `delivery.progress` lines (only when there was work)


def _log_start_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "relay.waiting_for_database attempt=%d error=%s",
        state.attempt_number,
        str(exc).strip().splitlines()[0] if exc else "",
    )


class Relay:
    def __init__(self, config: Config, *, network: guard.Network | None = None) -> None:
        self.config = config
        self.store = Store(
            config.database_url,
            config.sources,
            max_payload_bytes=config.max_payload_bytes,
            channel=config.notify_channel,
            max_size=4 + len(config.sources),
            retry_for=max(config.claim_timeout / 2, 5.0),
            retry=config.retry,
            pgbouncer=config.pgbouncer,
        )
        self.slots = Slots(config.max_in_flight, ahead=config.claim_ahead)
        self.settler = Settler(self.store, on_settled=self._on_settled)
        self.deliverer = Deliverer(config, self.settler, self.slots, network=network)
        self.claimers = {
            s.name: Claimer(s, config, self.store, self.deliverer, self.slots)
            for s in config.sources
        }
        self.sweeper = Sweeper(
            self.store, list(self.claimers), list(self.claimers.values()), config.sweep_interval
        )
        self.listener = Listener(
            config.listen_url,
            config.notify_channel,
            heartbeat=config.heartbeat_interval,
            on_notify=self._on_notify,
            on_connect=self.sweeper.sweep_now,
        )
        self.ready = asyncio.Event()  # set once started; for tests and the CLI
        self.health_port: int | None = None

    # -- callbacks between the parts ---------------------------------------------------------

    def _on_notify(self, payload: str) -> None:
        claimer = self.claimers.get(payload)
        if claimer is not None:
            claimer.wake()

    def _on_settled(self, source: str, batch: list[Settlement], settled: set[Any] | None) -> None:
        # Written (or given up on): their claim budget is free again.
        self.slots.settled(len(batch))
        if settled:
            due = [s.delay for s in batch if s.outcome in _AGAIN and s.key in settled]
            if due:
                # Rows claimable again (retries, released rows): wake this source's claimer
                # when the soonest falls due. relay's own settles send no notification.
                self.claimers[source].schedule(min(due))

    def status(self) -> dict[str, Any]:
        return {
            "listener": "connected" if self.listener.connected else "disconnected",
            "worker_id": self.config.worker_id,
            "in_flight": self.deliverer.in_flight,
            "queued": self.deliverer.queued,
            "delivered": self.deliverer.delivered,
            "failed": self.deliverer.failed,
            "sweeps": self.sweeper.sweeps,
            "listener_connections": self.listener.connections,
            "sources": {n: {"claimed": c.claimed} for n, c in self.claimers.items()},
        }

    async def _report(self, stop: asyncio.Event) -> None:
        """Every PROGRESS_EVERY seconds with deliveries in it, one INFO line of counts."""
        seen = (0, 0)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROGRESS_EVERY)
            now = (self.deliverer.delivered, self.deliverer.failed)
            if now != seen:
                # Counts since the previous progress line; totals are in /status.
                log.info(
                    "delivery.progress delivered=%d failed=%d in_flight=%d queued=%d",
                    now[0] - seen[0],
                    now[1] - seen[1],
                    self.deliverer.in_flight,
                    self.deliverer.queued,
                )
                seen = now

    # -- lifecycle ----------------------------------------------------------------------------

    async def start_checks(self) -> None:
        """Open the pool and check every source against the database (ConfigError if wrong)."""
        await self.store.open()
        await self.store.prepare()
        missing = await self.store.check_triggers()
        for name in missing:
            log.warning(
                "source.untriggered source=%s: its wake-up trigger is not installed, so rows are "
                "found only by sweeps every %gs; run `relay install` to deliver them at once",
                name,
                self.config.sweep_interval,
            )

    async def _start(self, stop: asyncio.Event) -> bool:
        """Connect and check; a database that is not there yet is waited for, not fatal."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(RETRYABLE),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            before_sleep=_log_start_retry,
        ):
            with attempt:
                if stop.is_set():
                    return False
                await self.start_checks()
        return True

    async def run(self, stop: asyncio.Event) -> None:
        try:
            if not await self._start(stop):
                return
            await self.deliverer.open()
            runner = None
            if self.config.health_host is not None:
                runner = await serve(self.status, self.config.health_host, self.config.health_port)
                self.health_port = runner.addresses[0][1] if runner.addresses else None
            try:
                await self._run_parts(stop)
            finally:
                if runner is not None:
                    await runner.cleanup()
        finally:
            await self.deliverer.close()
            await self.store.close()
            log.info(
                "relay.stopped delivered=%d failed=%d",
                self.deliverer.delivered,
                self.deliverer.failed,
            )

    async def _run_parts(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            settler = tg.create_task(self.settler.run(), name="settler")
            deliverer = tg.create_task(self.deliverer.run(), name="deliverer")
            parts = [
                tg.create_task(self.listener.run(stop), name="listener"),
                tg.create_task(self.sweeper.run(stop), name="sweeper"),
                tg.create_task(self._report(stop), name="progress"),
                *(
                    tg.create_task(c.run(stop), name=f"claimer:{n}")
                    for n, c in self.claimers.items()
                ),
            ]
            log.info(
                "relay.started worker=%s sources=%s max_in_flight=%d",
                self.config.worker_id,
                ",".join(self.claimers),
                self.config.max_in_flight,
            )
            self.ready.set()
            await stop.wait()
            # Phase one: stop claiming. Phase two: let in-flight deliveries finish within the
            # grace period, hand back the rest, and write the last settles.
            log.info("relay.stopping")
            self.slots.poke()
            self.sweeper.sweep_now()
            for claimer in self.claimers.values():
                claimer.kick()
            await asyncio.gather(*parts)
            await self.deliverer.drain(self.config.shutdown_grace)
            await deliverer
            self.settler.close()
            await settler


def install_signal_handlers(stop: asyncio.Event) -> None:
    """First SIGINT/SIGTERM: graceful stop. Second: exit at once."""
    loop = asyncio.get_running_loop()

    def handler(signum: int) -> None:
        if stop.is_set():
            log.warning("relay.killed signal=%s: second signal, exiting now", signum)
            os._exit(1)
        log.info("relay.signal signal=%s: stopping (send again to exit at once)", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler, sig)
