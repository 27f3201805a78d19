"""Wires the relay together: one TaskGroup per relay, two-phase shutdown; and around it the
process: signals, the health endpoint and configuration reloads (`Service`).

notification -> claimer -> deliverer -> settler, with the sweeper feeding the same claimers.
If any long-running part dies, the TaskGroup cancels the rest and the process exits non-zero
with the reason logged: nothing dies silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any

import psycopg
from aiohttp import web
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from relay import admin, guard, inbox, logs, metrics, notify
from relay.budget import Slots
from relay.claimer import Claimer
from relay.config import Config, ConfigError
from relay.dashboard import History
from relay.db.store import RETRYABLE, Store
from relay.deliverer import Deliverer
from relay.endpoint_states import EndpointStates
from relay.listener import Listener
from relay.scheduler import Scheduler
from relay.server import Route, serve
from relay.settler import Settler
from relay.sources.base import Outcome, Settlement, warn_missing_index
from relay.sweeper import Sweeper

log = logs.get("relay.app")

_AGAIN = (Outcome.retry, Outcome.release)
_FINAL = (Outcome.done, Outcome.dead)
PROGRESS_EVERY = 10.0  # seconds between `delivery.progress` lines (only when there was work)
# Shutdown never waits on the database for long: parts still waiting on it this long after the
# stop have their statements cut off, and so do the last settles after the deliveries ended.
STOP_WAIT = 1.0
FINAL_WRITES = 3.0


def _log_start_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "relay.waiting_for_database",
        attempt=state.attempt_number,
        error=logs.first_line(exc) if exc else "",
    )


class Relay:
    def __init__(
        self,
        config: Config,
        *,
        network: guard.Network | None = None,
        histograms: metrics.Histograms | None = None,
    ) -> None:
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
            self.store,
            on_settled=self._on_settled,
            sources={s.name: s for s in config.sources},
            busy=lambda: self.deliverer.busy,
            # A round of outcomes: what the claim budget leaves room for (relay.budget).
            enough=config.max_in_flight,
        )
        self.deliverer = Deliverer(
            config,
            self.settler,
            self.slots,
            store=self.store,
            network=network,
            histograms=histograms,
        )
        # Disabled targets and pauses, kept in relay.endpoints.
        self.endpoint_states = EndpointStates(
            self.store, self.deliverer.endpoints, reload_every=config.sweep_interval
        )
        self.deliverer.on_endpoint = self.endpoint_states.changed
        self.claimers = {
            s.name: Claimer(s, config, self.store, self.deliverer, self.slots)
            for s in config.sources
        }
        self.sweeper = Sweeper(self.store, self.claimers, config.sweep_interval)
        self._ordered = {s.name for s in config.sources if s.ordered}
        self.scheduler = Scheduler(self.store, config.jobs)
        self.listener = Listener(
            config.listen_url,
            config.notify_channel,
            heartbeat=config.heartbeat_interval,
            on_notify=self._on_notify,
            on_connect=self._on_listening,
            # The listener's connection went silent: the pool's idle ones are on the same path.
            on_silent=self.store.sever_idle,
            probe_timeout=min(config.heartbeat_interval, config.statement_timeout),
            # The relay that holds the lead samples queue depth for /metrics (one per database).
            lead=config.notify_channel if self._samples(config) else None,
        )
        self.sampler = metrics.Sampler(self, config.metrics.sample_interval)
        self.ready = asyncio.Event()  # set once started; for tests and the CLI
        self.history = History(every=PROGRESS_EVERY)  # the dashboard's rates
        self._checked = False

    @staticmethod
    def _samples(config: Config) -> bool:
        return config.metrics.sample_interval > 0 and config.health_host is not None

    # -- callbacks between the parts ---------------------------------------------------------

    def _on_listening(self) -> None:
        # Rows committed while it was away are found by a sweep. And a reconnect means the
        # database had been lost: the pool's connections (claims, settles) are revived now,
        # not on psycopg_pool's reconnect backoff.
        self.sweeper.sweep_now()
        if self.listener.connections > 1:
            self.store.database_back()

    def _on_notify(self, payload: str) -> None:
        claimer = self.claimers.get(payload)
        if claimer is not None:
            claimer.wake()

    def _on_settled(self, source: str, batch: list[Settlement], settled: set[Any] | None) -> None:
        # Written (or given up on): their claim budget is free again.
        self.slots.settled(len(batch))
        if settled and source in self._ordered and any(s.outcome in _FINAL for s in batch):
            # A key's row settled for good lets its next row be claimed: nothing notifies
            # that (relay's own settles send no notification), so claim again now.
            self.claimers[source].wake()
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
            # Endpoints paused, busy or deferred to, and targets disabled (relay.endpoints).
            **self.deliverer.endpoints.status(),
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
                    "delivery.progress",
                    delivered=now[0] - seen[0],
                    failed=now[1] - seen[1],
                    in_flight=self.deliverer.in_flight,
                    queued=self.deliverer.queued,
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
            self.deliverer.skipping(name, compiled.skip_by)
        for name, index in (await self.store.missing_ordering_indexes()).items():
            warn_missing_index(name, index)
        problems = await self.store.trigger_problems()
        for name, problem in problems.items():
            log.warning(
                "source.untriggered",
                source=name,
                problem=problem,
                sweep_interval_s=self.config.sweep_interval,
                hint="a missing trigger is installed again at the first sweep if relay's role "
                "may; until then, and for a stale one until `relay install`, see `relay check`",
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
                "relay.stopped", delivered=self.deliverer.delivered, failed=self.deliverer.failed
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
                tg.create_task(self.sampler.run(stop), name="metrics.sampler"),
                tg.create_task(self.endpoint_states.run(stop), name="endpoint_states"),
                *(
                    tg.create_task(c.run(stop), name=f"claimer:{n}")
                    for n, c in self.claimers.items()
                ),
            ]
            log.info(
                "relay.started",
                worker=self.config.worker_id,
                sources=",".join(self.claimers),
                jobs=",".join(self.scheduler.jobs),
                max_in_flight=self.config.max_in_flight,
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
                log.error("shutdown.settles_abandoned", reason="the database did not answer")
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

    Under a service manager (`notifier`, from NOTIFY_SOCKET) it says READY=1 once the first
    relay listens, RELOADING=1 then READY=1 around each reload, STOPPING=1 on a stop signal,
    and pings the watchdog from this event loop for as long as it runs.
    """

    def __init__(
        self,
        config: Config,
        load: Callable[[], Config] | None = None,
        *,
        network: guard.Network | None = None,
        notifier: notify.Notifier | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or notify.Notifier()  # none: outside systemd, says nothing
        self.network = network  # the guard's resolver and sockets (tests swap them)
        # Where the health endpoint listens: set at start, kept through reloads.
        self._health = (config.health_host, config.health_port)
        self.metrics = metrics.Metrics(self._relays, lambda: self.reloads)
        self.relay = Relay(config, network=network, histograms=self.metrics.histograms)
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

    def _relays(self) -> list[Relay]:
        """The relays running, oldest first (two for a moment after a reload)."""
        return list(self._running) or [self.relay]

    async def _metrics(self, _: web.Request) -> web.Response:
        # Built from plain counters in a few hundred microseconds: no need to leave the loop.
        return web.Response(
            body=self.metrics.expose(), headers={"Content-Type": metrics.CONTENT_TYPE}
        )

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
            log.warning("relay.killed", signal=name, reason="second signal, exiting now")
            os._exit(1)
        log.info("relay.signal", signal=name, next="stopping (send again to exit at once)")
        self.notifier.stopping(
            f"stopping: in-flight deliveries get {self.config.shutdown_grace:g}s to finish"
        )
        self.stop.set()

    def _on_hup(self) -> None:
        log.info("relay.signal", signal="SIGHUP", next="reloading the configuration")
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
            log.info("inbox.listening", host=address[0], port=port)
        return routes.get(None, []), runners

    async def run(self) -> None:
        # For the whole life of the process, start-up included: a loop stuck anywhere stops
        # the pings, and the service manager restarts relay.
        watchdog = asyncio.create_task(self.notifier.watchdog_loop(), name="service.watchdog")
        try:
            await self._serve()
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            self.notifier.close()

    async def _serve(self) -> None:
        runner = None
        shared, runners = await self._serve_inboxes()
        shared.append(("GET", "/metrics", self._metrics))
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
                "health.listening",
                host=self.config.health_host,
                port=self.health_port,
                remote="allowed" if self.config.health_remote else "no",
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
                tg.create_task(self._ready_when_listening(self.relay), name="service.ready")
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
        task.add_done_callback(lambda _: self._stopped(relay))

    def _stopped(self, relay: Relay) -> None:
        # Its counts move to the retired totals in the same step: a scrape sees them once.
        if self._running.pop(relay, None) is not None:
            self.metrics.retire(relay)

    async def _reloads_until_stopped(self) -> None:
        stopped = asyncio.create_task(self.stop.wait(), name="service.stop")
        try:
            while not self.stop.is_set():
                hup = asyncio.create_task(self._hup.wait(), name="service.hup")
                await asyncio.wait({stopped, hup}, return_when=asyncio.FIRST_COMPLETED)
                hup.cancel()
                if self._hup.is_set() and not self.stop.is_set():
                    self._hup.clear()
                    await self._reload_announced(stopped)
        finally:
            stopped.cancel()

    def _state(self) -> str:
        """What `systemctl status` shows while relay runs."""
        shown = f"relaying {','.join(self.relay.claimers) or 'no sources'}"
        if self.health_port is not None:
            host = self._health[0] or ""
            shown += f"; health on {f'[{host}]' if ':' in host else host}:{self.health_port}"
        return shown

    async def _ready_when_listening(self, relay: Relay) -> None:
        """READY=1 once the first relay's listener is connected (not if a stop comes first):
        from then on a committed row is delivered at once, not at the next sweep."""
        waits = {
            asyncio.create_task(relay.listener.up.wait(), name="service.ready.listening"),
            asyncio.create_task(self.stop.wait(), name="service.ready.stop"),
        }
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if relay.listener.up.is_set() and not self.stop.is_set():
            self.notifier.ready(self._state())

    async def _reload_announced(self, stopped: asyncio.Task[Any]) -> None:
        """A reload between RELOADING=1 and READY=1: relay runs on whether it was taken on or
        failed, and STATUS says which."""
        reloads, failures = self.reloads, self.reload_failures
        self.notifier.reloading()
        await self._reload(stopped)
        if self.stop.is_set():
            return  # STOPPING=1 said it already
        if self.reloads > reloads:
            self.notifier.ready(f"reloaded; {self._state()}")
        elif self.reload_failures > failures:
            self.notifier.ready(
                f"reload failed, the running configuration stays (see reload.failed in the "
                f"log); {self._state()}"
            )
        else:
            self.notifier.ready(f"reload skipped: no configuration file; {self._state()}")

    async def _reload(self, stopped: asyncio.Task[Any]) -> None:
        if self.load is None:
            log.info("reload.skipped", reason="no configuration file (the embedded demo)")
            return
        try:
            config = self.load()
            new = Relay(config, network=self.network, histograms=self.metrics.histograms)
        except ConfigError as exc:
            self._reload_failed(str(exc))
            return
        except Exception as exc:
            # A reload is never a reason to stop relaying with the configuration that works.
            log.exception("reload.crashed")
            self._reload_failed(f"{type(exc).__name__}: {exc}")
            return
        if (config.health_host, config.health_port) != self._health:
            log.warning("reload.health_unchanged", reason="a new health.listen takes a restart")
        if config.inboxes != self.config.inboxes:
            log.warning("reload.inbox_unchanged", reason="changed inboxes take a restart")
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
            "reload.done",
            sources=",".join(new.claimers),
            next="the previous configuration stops claiming and finishes its deliveries",
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
        log.error("reload.failed", error=reason, next="the running configuration stays")

    async def _retire(self, old: Relay, new: Relay) -> None:
        """Stop `old` in two phases; then `new` sweeps, so the rows `old` handed back unstarted
        are claimed at once (relay's own settles send no notification)."""
        if old not in self._running:
            return
        stop, task = self._running[old]
        stop.set()
        await asyncio.wait({task})  # its failure, if any, is the TaskGroup's to report
        new.sweeper.sweep_now()
