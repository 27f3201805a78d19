"""Wires the relay together: one TaskGroup per relay, two-phase shutdown; and around it the
process: signals, the health endpoint and configuration reloads (`Service`).

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
from collections.abc import Callable
from typing import Any

import psycopg
from aiohttp import web
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from relay import admin, guard, inbox, logs
from relay.budget import Slots
from relay.claimer import Claimer
from relay.config import Config, ConfigError
from relay.dashboard import History
from relay.db.store import RETRYABLE, Store
from relay.deliverer import Deliverer
from relay.listener import Listener
from relay.scheduler import Scheduler
from relay.server import Route, serve
from relay.settler import Settler
from relay.sources.base import Outcome, Settlement
from relay.sweeper import Sweeper

log = logging.getLogger("relay.app")

_AGAIN = (Outcome.retry, Outcome.release)
PROGRESS_EVERY = 10.0  # seconds between `delivery.progress` lines (only when there was work)
# Shutdown never waits on the database for long: parts still waiting on it this long after the
# stop have their statements cut off, and so do the last settles after the deliveries ended.
STOP_WAIT = 1.0
FINAL_WRITES = 3.0


def _log_start_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "relay.waiting_for_database attempt=%d error=%s",
        state.attempt_number,
        logs.first_line(exc) if exc else "",
    )


class Relay:
    def __init__(self, config: Config, *, network: guard.Network | None = None) -> None:
        self.config = config
        self.store = Store(
            config.database_url,
            config.sources,
            max_payload_bytes=config.max_payload_bytes,
            channel=config.notify_channel,
            # A job holds a connection while its statement runs (up to its timeout): one each,
            # so a slow job never leaves the claims and settles waiting for the pool.
            max_size=4 + len(config.sources) + len(config.jobs),
            retry_for=max(config.claim_timeout / 2, 5.0),
            worker=config.worker_id,
            pgbouncer=config.pgbouncer,
            statement_timeout=config.statement_timeout,
        )
        self.slots = Slots(config.max_in_flight, ahead=config.claim_ahead)
        self.settler = Settler(
            self.store, on_settled=self._on_settled, sources={s.name: s for s in config.sources}
        )
        self.deliverer = Deliverer(
            config, self.settler, self.slots, store=self.store, network=network
        )
        self.claimers = {
            s.name: Claimer(s, config, self.store, self.deliverer, self.slots)
            for s in config.sources
        }
        self.sweeper = Sweeper(self.store, self.claimers, config.sweep_interval)
        self.scheduler = Scheduler(self.store, config.jobs)
        self.listener = Listener(
            config.listen_url,
            config.notify_channel,
            heartbeat=config.heartbeat_interval,
            on_notify=self._on_notify,
            on_connect=self.sweeper.sweep_now,
            # The listener's connection went silent: the pool's idle ones are on the same path.
            on_silent=self.store.sever_idle,
            probe_timeout=min(config.heartbeat_interval, config.statement_timeout),
        )
        self.ready = asyncio.Event()  # set once started; for tests and the CLI
        self.history = History(every=PROGRESS_EVERY)  # the dashboard's rates
        self._checked = False

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

    def failing(self) -> dict[str, str]:
        """The sources that are failing, and why."""
        return {n: c.failure for n, c in self.claimers.items() if c.failure is not None}

    def status(self) -> dict[str, Any]:
        return {
            "listener": "connected" if self.listener.connected else "disconnected",
            "failing": self.failing(),
            # Sources whose triggers are missing and relay could not install them again.
            "untriggered": dict(self.sweeper.untriggered),
            "worker_id": self.config.worker_id,
            "in_flight": self.deliverer.in_flight,
            "queued": self.deliverer.queued,
            "delivered": self.deliverer.delivered,
            "failed": self.deliverer.failed,
            "sweeps": self.sweeper.sweeps,
            "listener_connections": self.listener.connections,
            "sources": {
                n: {"claimed": c.claimed, "failing": c.failure} for n, c in self.claimers.items()
            },
            "severed_connections": self.store.watchdog.severed + self.listener.watchdog.severed,
            "jobs": self.scheduler.status(),
        }

    async def _report(self, stop: asyncio.Event) -> None:
        """Every PROGRESS_EVERY seconds with deliveries in it, one INFO line of counts."""
        seen = (0, 0)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROGRESS_EVERY)
            self.history.sample(self.deliverer.outcomes)
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
        if self.config.jobs:
            await self.store.check_jobs()
        if self.config.inboxes:
            await self.store.check_inboxes(self.config.inboxes)
        for name, compiled in self.store.compiled.items():
            self.deliverer.wants_detail(name, compiled.detail_on)
        problems = await self.store.trigger_problems()
        for name, problem in problems.items():
            log.warning(
                "source.untriggered source=%s problem=%s sweep_interval=%gs hint=%s",
                name,
                problem,
                self.config.sweep_interval,
                "a missing trigger is installed again at the first sweep if relay's role may; "
                "until then, and for a stale one until `relay install`, see `relay check`",
            )
        self._checked = True

    async def start(self, stop: asyncio.Event) -> bool:
        """Connect and check (unless `start_checks` did already); False if stopped first."""
        if self._checked:
            return True
        starting = asyncio.create_task(self._start_waiting(stop), name="relay.start")
        stopped = asyncio.create_task(stop.wait(), name="relay.start.stop")
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                # Stopped while the database did not answer: cut its statements off.
                self.store.interrupt()
                await asyncio.wait({starting}, timeout=STOP_WAIT)
        finally:
            for task in (starting, stopped):
                task.cancel()
            await asyncio.gather(starting, stopped, return_exceptions=True)
        return not starting.cancelled() and starting.result()

    async def _start_waiting(self, stop: asyncio.Event) -> bool:
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
            if not await self.start(stop):
                return
            await self.deliverer.open()
            await self._run_parts(stop)
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
                tg.create_task(self.scheduler.run(stop), name="scheduler"),
                *(
                    tg.create_task(c.run(stop), name=f"claimer:{n}")
                    for n, c in self.claimers.items()
                ),
            ]
            log.info(
                "relay.started worker=%s sources=%s jobs=%s max_in_flight=%d",
                self.config.worker_id,
                ",".join(self.claimers),
                ",".join(self.scheduler.jobs),
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
            # A part waiting on a database that does not answer would hold the stop up for as
            # long as the store retries: cut it off (its claim, if it took one, expires).
            _, waiting = await asyncio.wait(parts, timeout=STOP_WAIT)
            if waiting:
                self.store.interrupt()
                _, waiting = await asyncio.wait(waiting, timeout=STOP_WAIT)
            for part in waiting:
                # Still waiting for a connection the pool cannot make (a statement would have
                # been cut off by interrupt()): safe to cancel; a claimer gives its budget back.
                part.cancel()
            await asyncio.wait(parts)
            for part in parts:
                if not part.cancelled() and part.exception() is not None:
                    raise part.exception()  # type: ignore[misc]
            await self.deliverer.drain(self.config.shutdown_grace)
            await deliverer
            self.settler.close()
            # The last settles are bounded too (and short when the database already failed to
            # answer): rows whose settle cannot be written keep their claims until these
            # expire, and are then delivered again (at least once).
            wait = STOP_WAIT if self.store.interrupted else FINAL_WRITES
            _, waiting = await asyncio.wait({settler}, timeout=wait)
            if waiting:
                self.store.interrupt()
                _, waiting = await asyncio.wait({settler}, timeout=STOP_WAIT)
            if waiting:
                # Waiting for a new connection that does not come (not inside a statement,
                # which interrupt() cut off): safe to cancel.
                settler.cancel()
                log.error("shutdown.settles_abandoned reason=%s", "the database did not answer")
            await asyncio.wait({settler})


# -- the process ----------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)


class Service:
    """The process around the relay: signals, the health endpoint, and reloads.

    SIGINT, SIGTERM and SIGQUIT stop it in two phases (a second one exits at once). SIGHUP
    reloads the configuration with `load` (None: there is no file, nothing to reload): a
    configuration that loads and passes the database checks starts a new Relay at once, and
    the running one stops as on SIGTERM (it claims no more, lets its requests finish within
    shutdown_grace, hands back what it had not started). Side by side they are two relays
    sharing the database, which relay supports anyway (SKIP LOCKED). A configuration that
    fails is logged with the reason and the running one goes on.
    """

    def __init__(
        self,
        config: Config,
        load: Callable[[], Config] | None = None,
        *,
        network: guard.Network | None = None,
    ) -> None:
        self.config = config
        self.network = network  # the guard's resolver and sockets (tests swap them)
        # Where the health endpoint listens: set at start, kept through reloads.
        self._health = (config.health_host, config.health_port)
        self.relay = Relay(config, network=network)
        self.load = load
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()  # the health endpoint is up and the first relay started
        self.health_port: int | None = None
        self.inbox_ports: dict[str, int] = {}  # where each inbox listens (for tests: port 0)
        self.reloads = 0  # configurations taken on by SIGHUP (for status and tests)
        self.reload_failures = 0
        self._hup = asyncio.Event()
        self._running: dict[Relay, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        self._tg: asyncio.TaskGroup | None = None

    def status(self) -> dict[str, Any]:
        return {
            **self.relay.status(),
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
        }

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        # A closed pipe (a receiver gone mid-request, a log reader gone) is an error on that
        # write, never a reason to die; Python ignores it already, this keeps it so.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set():
            log.warning("relay.killed signal=%s reason=%s", name, "second signal, exiting now")
            os._exit(1)
        log.info("relay.signal signal=%s next=%s", name, "stopping (send again to exit at once)")
        self.stop.set()

    def _on_hup(self) -> None:
        log.info("relay.signal signal=SIGHUP next=%s", "reloading the configuration")
        self._hup.set()

    async def _serve_inboxes(self) -> tuple[list[Route], list[web.AppRunner]]:
        """The inboxes' routes for the health server, and the listeners of those with their
        own address. Requests go to the running relay's store (a reload may replace it); the
        inboxes themselves are the start's configuration."""
        routes: dict[tuple[str, int] | None, list[Route]] = {}
        for box in self.config.inboxes:
            handle = inbox.handler(box, lambda: self.relay.store.accept)
            routes.setdefault(box.listen, []).append(("POST", box.path, handle))
        runners = []
        for address, own in routes.items():
            if address is None:
                continue
            runner = await serve(None, *address, own)
            runners.append(runner)
            port = runner.addresses[0][1] if runner.addresses else address[1]
            for box in self.config.inboxes:
                if box.listen == address:
                    self.inbox_ports[box.name] = port
            log.info("inbox.listening host=%s port=%s", address[0], port)
        return routes.get(None, []), runners

    async def run(self) -> None:
        runner = None
        shared, runners = await self._serve_inboxes()
        if self.config.admin_tokens:
            shared += admin.routes(self.config.admin_tokens, lambda: self.relay)
        if self.config.health_host is not None:
            runner = await serve(
                self.status,
                self.config.health_host,
                self.config.health_port,
                shared,
                probe=lambda: self.relay.store.ping(),
            )
            self.health_port = runner.addresses[0][1] if runner.addresses else None
            for box in self.config.inboxes:
                if box.listen is None and self.health_port is not None:
                    self.inbox_ports[box.name] = self.health_port
            # Off loopback only with health.allow_remote = true; said once, so it is on record.
            log.info(
                "health.listening host=%s port=%s remote=%s",
                self.config.health_host,
                self.health_port,
                "allowed" if self.config.health_remote else "no",
            )
        try:
            # A wrong configuration or a missing table ends start-up here, with its message.
            try:
                started = await self.relay.start(self.stop)
            except BaseException:
                await self.relay.store.close()
                raise
            if not started:
                await self.relay.store.close()
                return
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._launch(self.relay)
                self.ready.set()
                await self._reloads_until_stopped()
                for stop, _ in self._running.values():
                    stop.set()
        finally:
            for each in (runner, *runners):
                if each is not None:
                    await each.cleanup()

    def _launch(self, relay: Relay) -> None:
        assert self._tg is not None
        stop = asyncio.Event()
        task = self._tg.create_task(relay.run(stop), name=f"relay:{self.reloads}")
        self._running[relay] = (stop, task)
        task.add_done_callback(lambda _: self._running.pop(relay, None))

    async def _reloads_until_stopped(self) -> None:
        stopped = asyncio.create_task(self.stop.wait(), name="service.stop")
        try:
            while not self.stop.is_set():
                hup = asyncio.create_task(self._hup.wait(), name="service.hup")
                await asyncio.wait({stopped, hup}, return_when=asyncio.FIRST_COMPLETED)
                hup.cancel()
                if self._hup.is_set() and not self.stop.is_set():
                    self._hup.clear()
                    await self._reload(stopped)
        finally:
            stopped.cancel()

    async def _reload(self, stopped: asyncio.Task[Any]) -> None:
        if self.load is None:
            log.info("reload.skipped reason=%s", "no configuration file (the embedded demo)")
            return
        try:
            config = self.load()
            new = Relay(config, network=self.network)
        except ConfigError as exc:
            self._reload_failed(str(exc))
            return
        except Exception as exc:
            # A reload is never a reason to stop relaying with the configuration that works.
            log.exception("reload.crashed")
            self._reload_failed(f"{type(exc).__name__}: {exc}")
            return
        if (config.health_host, config.health_port) != self._health:
            log.warning("reload.health_unchanged reason=%s", "a new health.listen takes a restart")
        if config.inboxes != self.config.inboxes:
            log.warning("reload.inbox_unchanged reason=%s", "changed inboxes take a restart")
        checking = asyncio.create_task(self._check(new), name="reload.check")
        await asyncio.wait({checking, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not checking.done():
            # Stopping: the new configuration will not be needed.
            new.store.interrupt()
            await asyncio.wait({checking}, timeout=STOP_WAIT)
            checking.cancel()
            await asyncio.gather(checking, return_exceptions=True)
            await new.store.close()
            return
        if not checking.result():
            return
        old, self.relay, self.config = self.relay, new, config
        self.reloads += 1
        self._launch(new)
        log.info(
            "reload.done sources=%s next=%s",
            ",".join(new.claimers),
            "the previous configuration stops claiming and finishes its deliveries",
        )
        assert self._tg is not None
        self._tg.create_task(self._retire(old, new), name=f"relay.retire:{self.reloads}")

    async def _check(self, new: Relay) -> bool:
        """The new configuration's database checks; False (and logged) if they fail."""
        try:
            async with asyncio.timeout(max(15.0, 3 * new.config.statement_timeout)):
                await new.start_checks()
            return True
        except (ConfigError, psycopg.Error, TimeoutError, *RETRYABLE) as exc:
            reason = str(exc) if isinstance(exc, ConfigError) else logs.first_line(exc)
            self._reload_failed(reason)
        except Exception as exc:
            # A reload is never a reason to stop relaying with the configuration that works.
            log.exception("reload.crashed")
            self._reload_failed(f"{type(exc).__name__}: {exc}")
        new.store.interrupt()
        await new.store.close()
        return False

    def _reload_failed(self, reason: str) -> None:
        self.reload_failures += 1
        log.error("reload.failed error=%s next=%s", reason, "the running configuration stays")

    async def _retire(self, old: Relay, new: Relay) -> None:
        """Stop `old` in two phases; then `new` sweeps, so the rows `old` handed back unstarted
        are claimed at once (relay's own settles send no notification)."""
        if old not in self._running:
            return
        stop, task = self._running[old]
        stop.set()
        await asyncio.wait({task})  # its failure, if any, is the TaskGroup's to report
        new.sweeper.sweep_now()
