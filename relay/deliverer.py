"""Sign, POST, classify the outcome, settle.

Delivery happens outside any transaction: the claim committed before the request starts and the
settle is a separate statement after it ends. Settles from concurrent deliveries are batched into
one statement per source (the `Settler`), which also keeps the pool small under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import psycopg
from yarl import URL

from relay import endpoints, guard, httpclient, logs, metrics, retry
from relay.budget import Slots
from relay.config import Config
from relay.db.store import RETRYABLE, oversize_reason
from relay.settler import Settler
from relay.sources.base import (
    Claimed,
    Dead,
    Detail,
    Failed,
    Outcome,
    Request,
    Settlement,
    Source,
)

log = logs.get("relay.deliverer")


@dataclass(slots=True)
class Attempt:
    """What one HTTP attempt came to."""

    ok: bool
    http_status: int | None
    error: str | None
    retry_after: float | None = None
    headers: dict[str, str] | None = None
    body: bytes = b""
    ms: float = 0.0  # how long it took
    # No request was or will be made (a refused or invalid target): dead at once, no retries.
    final: bool = False


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt, kept in memory for the dashboard's recent failures."""

    at: float  # time.time()
    source: str
    key: Any
    attempt: int
    outcome: str  # retry or dead
    http_status: int | None
    error: str


RECENT_FAILURES = 50


@dataclass(slots=True)
class Job:
    """A claimed row on its way: queued, waiting for its endpoint, or admitted (`ticket`)."""

    source: Source
    row: Claimed
    claimed_at: float  # loop time its claim's clock started
    request: Request | None = None
    target: URL | None = None
    shaped_at: datetime | None = None
    endpoint: endpoints.Endpoint | None = None
    ticket: float | None = None  # set once its endpoint let it send (a slot is taken)


class Jobs:
    """The workers' queue: claimed rows in claim order, with rows their endpoint has just let
    through (after waiting for it) ahead of them."""

    def __init__(self) -> None:
        self._items: deque[Job] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()

    def put(self, job: Job, *, first: bool = False) -> None:
        if first:
            self._items.appendleft(job)
        else:
            self._items.append(job)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    async def get(self) -> Job:
        # The job stays queued until a woken worker takes it: a worker cancelled while it
        # wakes loses nothing.
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except asyncio.CancelledError:
                if getter.done() and not getter.cancelled():
                    self._wake_one()  # its wake-up goes to another worker
                raise
        return self._items.popleft()

    def take_all(self) -> list[Job]:
        taken = list(self._items)
        self._items.clear()
        return taken

    def __len__(self) -> int:
        return len(self._items)


def excerpt(body: bytes, limit: int) -> str:
    """At most `limit` characters from the start of a response body, for last_error and the
    log: decoded leniently, NUL dropped (PostgreSQL text cannot hold it, and one NUL would fail
    the whole settle batch), other control characters escaped so that a body can neither forge
    a log line nor drive a terminal that shows it."""
    if limit <= 0:
        return ""
    text = body[: limit * 4].decode("utf-8", "replace").replace("\x00", "").strip()
    return logs.escape(text)[:limit]


class HeartbeatStore(Protocol):
    async def heartbeat(
        self, source: str, rows: Sequence[tuple[Any, datetime]], lease_seconds: float
    ) -> set[Any]: ...


class Deliverer:
    """`max_in_flight` workers that take claimed rows in order, deliver each and hand its
    settlement to the Settler. Rows claimed ahead of a free worker wait in `_jobs` (the claim
    budget bounds them to `claim_ahead` rows), and rows whose endpoint is busy wait in its line
    or are deferred (relay.endpoints)."""

    def __init__(
        self,
        config: Config,
        settler: Settler,
        slots: Slots,
        *,
        store: HeartbeatStore | None = None,
        rand: Callable[[], float] = random.random,
        network: guard.Network | None = None,
        histograms: metrics.Histograms | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.settler = settler
        self.slots = slots
        self.rand = rand
        self.network = network or guard.Network()
        self._guard: guard.Guard | None = None
        self._jobs = Jobs()
        # A row let through by the slot the current worker's request just freed: that worker
        # sends it next (set and taken with no await between, so it is the worker's own).
        self._next: Job | None = None
        # Per host and port: request caps, rates, the circuit breaker, disabled targets.
        self.endpoints = endpoints.Endpoints(config.endpoints, probe_wait=config.http_timeout)
        # Told when an endpoint is paused or resumed, or a target disabled (to record it).
        self.on_endpoint: Callable[[str, dict[str, Any]], None] | None = None
        self._idle = asyncio.Event()
        self._finish = asyncio.Event()
        self._client: httpclient.Client | None = None
        # A claimed row starts its request only if its claim outlives the request's timeout
        # and its settle, so no delivery is still running when another worker may take the row.
        self._start_within = {s.name: config.start_within(s) for s in config.sources}
        # The sources whose write-backs or attempt logs read what was sent and answered; set
        # from their compiled statements once the store has prepared them (`wants_detail`).
        self._wants: dict[str, frozenset[str]] = {s.name: frozenset() for s in config.sources}
        # Rows held (queued or in flight) of the sources whose claims heartbeat: key -> lease.
        self._held: dict[str, dict[Any, datetime]] = {
            s.name: {} for s in config.sources if s.heartbeat
        }
        self.heartbeats = 0  # heartbeat statements run (for status and tests)
        self.deferred = {s.name: 0 for s in config.sources}  # rows deferred, per source
        # Per source whose claim can pass over rows by URL or topic (`skipping`): the
        # claimed row's field, and the values its claims pass over (endpoints.Skips).
        self._skip_by: dict[str, str] = {}
        self._skips: dict[str, endpoints.Skips] = {}
        self.pauses = 0  # endpoints paused by the breaker
        self.busy = 0
        self.delivered = 0
        self.failed = 0
        # Settlements handed to the settler, per source and outcome (for /metrics and the
        # dashboard), and the last failed attempts.
        self.outcomes: dict[str, dict[Outcome, int]] = {
            s.name: dict.fromkeys(Outcome, 0) for s in config.sources
        }
        self.recent_failures: deque[Failure] = deque(maxlen=RECENT_FAILURES)
        self.histograms = histograms
        # Outcomes by payload fields, for the sources [metrics] labels names.
        self.labelled = {
            name: metrics.Labelled(fields, config.metrics.max_series)
            for name, fields in config.metrics.labels.items()
        }
        # DEBUG: one line per success costs a fifth of relay's CPU at thousands a second; INFO
        # gets the `delivery.progress` summary instead (failures are always logged), unless
        # [log] deliveries asks for the line at INFO.
        self._success_level = logging.INFO if config.log_deliveries else logging.DEBUG

    def wants_detail(self, source: str, outcomes: frozenset[str]) -> None:
        """The outcomes whose settlements carry what was sent and answered (`Detail`)."""
        self._wants[source] = outcomes

    def skipping(self, source: str, by: str | None) -> None:
        """The claimed row's field (`url` or `topic`) whose values the source's claims can
        pass over (Compiled.skip_by), or None."""
        if by is None:
            self._skip_by.pop(source, None)
            self._skips.pop(source, None)
        else:
            self._skip_by[source] = by
            self._skips[source] = endpoints.Skips()

    def skips(self, source: str) -> list[str]:
        """The URLs or topics the source's next claim passes over (see endpoints.Skips)."""
        skips = self._skips.get(source)
        return [] if skips is None else skips.current(asyncio.get_running_loop().time())

    async def open(self) -> None:
        allowed = self.config.http_allow
        self._guard = guard.Guard(
            allowed, self.network.resolver or guard.default_resolver(), self.network.make_socket
        )
        if allowed.networks or allowed.hosts:
            log.info(
                "guard.allowing",
                networks=",".join(str(n) for n in allowed.networks) or "-",
                hosts=",".join(sorted(allowed.hosts)) or "-",
                key="http.allow",
            )
        # Addresses are checked per connection, not per request (connections are kept alive);
        # a request costs one cached lookup of its URL in the guard.
        self._client = httpclient.Client(
            self._guard,
            timeout=self.config.http_timeout,
            user_agent=self.config.user_agent,
            max_idle=self.config.max_in_flight,
            ssl_context=self.network.ssl_context,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    @property
    def in_flight(self) -> int:
        return self.busy

    @property
    def queued(self) -> int:
        """Rows claimed and waiting for a worker or for their endpoint."""
        return len(self._jobs) + sum(len(e.waiting) for e in self.endpoints)

    async def run(self) -> None:
        """The workers, until `drain` has finished with them. A worker that dies of a bug takes
        the relay down with the reason, as every other part does; none dies silently."""
        async with asyncio.TaskGroup() as tg:
            workers = [
                tg.create_task(self._work(), name=f"deliver:{n}")
                for n in range(self.config.max_in_flight)
            ]
            if self._held and self.store is not None:
                workers.append(tg.create_task(self._heartbeat(), name="deliver:heartbeat"))
            await self._finish.wait()
            # Cancelled mid-request, a worker hands its row back (see `_work`).
            for worker in workers:
                worker.cancel()

    def start(self, source: Source, row: Claimed, claimed_at: float) -> None:
        """Take a claimed row; `claimed_at` (loop time) is when its claim's clock started.
        Its request is built and its endpoint asked here, as it is claimed: a row its
        endpoint lets through goes to the workers, one it cannot take yet waits in the
        endpoint's line (no worker wakes for it), one it cannot take soon is deferred."""
        held = self._held.get(source.name)
        if held is not None:
            held[row.key] = row.lease
        job = Job(source, row, claimed_at)
        try:
            early = self._shape(job)
        except Exception as exc:  # a bug here must not lose the row or kill the relay
            log.exception("delivery.crashed", source=source.name, key=row.key)
            crashed = Attempt(False, None, f"relay error: {exc!r}")
            early = self._settle_attempt(source, row, crashed, None, None)
        if early is not None:
            self._hand_over(source, early)
        elif job.ticket is not None:
            self._jobs.put(job)

    async def _heartbeat(self) -> None:
        """Extend the claims of the rows held, a third of a claim's lifetime apart: a claim can
        be short (a crashed relay's rows return in seconds) while a request runs for its whole
        http.timeout. A row whose claim was lost meanwhile is left to its settle, which finds
        it no longer ours and changes nothing."""
        assert self.store is not None
        lifetime = self.config.claim_timeout
        while True:
            await asyncio.sleep(lifetime / 3)
            # The sources at once, each bounded by the next round: one slow source must not
            # let the others' claims lapse.
            await asyncio.gather(
                *(
                    self._extend(name, list(held.items()), lifetime)
                    for name, held in self._held.items()
                    if held
                )
            )

    async def _extend(self, name: str, rows: list[tuple[Any, datetime]], lifetime: float) -> None:
        assert self.store is not None
        try:
            async with asyncio.timeout(lifetime / 3):
                await self.store.heartbeat(name, rows, lifetime)
            self.heartbeats += 1
        except (TimeoutError, psycopg.Error, *RETRYABLE) as exc:
            log.warning(
                "heartbeat.failed",
                source=name,
                rows=len(rows),
                error=logs.first_line(exc) if not isinstance(exc, TimeoutError) else "timed out",
                next="tried again at the next round; a claim that lapses meanwhile may be "
                "taken over",
            )

    async def drain(self, grace: float) -> None:
        """Hand back the rows no request has started for, let the requests in flight finish
        for up to `grace` seconds, then end `run` (which hands back the rest)."""
        try:
            await self._wait_idle(grace)
        finally:
            self._finish.set()

    async def _wait_idle(self, grace: float) -> None:
        released = self._release_queued()
        if released:
            log.info("shutdown.released_unstarted", rows=released)
        if not self.busy:
            return
        log.info("shutdown.draining", in_flight=self.busy, grace_s=grace)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self.busy:
                    self._idle.clear()
                    await self._idle.wait()
        if self.busy:
            log.warning("shutdown.releasing", unfinished=self.busy)

    def _release_queued(self) -> int:
        jobs = self._jobs.take_all()
        for endpoint in self.endpoints:
            if endpoint.timer is not None:
                endpoint.timer.cancel()
                endpoint.timer = None
            jobs.extend(endpoint.waiting)
            endpoint.waiting.clear()
        for job in jobs:
            self._release(job)
        return len(jobs)

    def _release(self, job: Job) -> None:
        """Hand a row back unsent, its attempt not counted (and its endpoint slot, if any)."""
        if job.endpoint is not None and job.ticket is not None:
            job.endpoint.cancel(job.ticket)
            job.ticket = None
        self._hand_over(job.source, Settlement(job.row.key, job.row.lease, Outcome.release))

    def _hand_over(self, source: Source, settlement: Settlement) -> None:
        held = self._held.get(source.name)
        if held is not None:
            held.pop(settlement.key, None)
        self.outcomes[source.name][settlement.outcome] += 1
        if settlement.error is not None:
            self.recent_failures.append(
                Failure(
                    time.time(),
                    source.name,
                    settlement.key,
                    settlement.attempt,
                    settlement.outcome.value,
                    settlement.http_status,
                    settlement.error,
                )
            )
        self.settler.add(source.name, settlement)
        self.slots.delivered(1)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        job: Job | None = None
        while True:
            # The row its endpoint let through when this worker's request freed a slot, if
            # any, else the next in line.
            if job is None:
                job = await self._jobs.get()
            source, row = job.source, job.row
            if loop.time() - job.claimed_at > self._start_within[source.name]:
                # It waited so long for a slot that its claim could expire mid-request.
                log.warning(
                    "delivery.released",
                    source=source.name,
                    key=row.key,
                    reason="claim too close to expiry to start a request (raise "
                    "relay.claim_timeout or lower relay.claim_ahead)",
                )
                self._release(job)
                job = None
                continue
            self.busy += 1
            self._next = None
            try:
                settlement = await self._deliver(job)
            except asyncio.CancelledError:
                # Shutdown ran out of grace: hand the row back without counting the attempt.
                self._release(job)
                raise
            except Exception as exc:  # a bug here must not lose the row or kill the relay
                log.exception("delivery.crashed", source=source.name, key=row.key)
                if job.endpoint is not None and job.ticket is not None:
                    job.endpoint.cancel(job.ticket)
                crashed = Attempt(False, None, f"relay error: {exc!r}")
                settlement = self._settle_attempt(source, row, crashed, None, None)
            finally:
                self.busy -= 1
                if not self.busy:
                    self._idle.set()
            claimed_at, job, self._next = job.claimed_at, self._next, None
            self._hand_over(source, settlement)
            if self.histograms is not None and settlement.outcome is Outcome.done:
                self.histograms.delivered(source.name, loop.time() - claimed_at, row.since)

    # -- endpoints --------------------------------------------------------------------------

    def _admit(self, job: Job, target: URL) -> Settlement | None:
        """Let the row's request go (None, `job.ticket` set), wait for its endpoint (None, the
        row in the endpoint's waiting line) or come back later (a release with a delay)."""
        endpoint = self.endpoints.get(target)
        now = asyncio.get_running_loop().time()
        if endpoint.waiting:
            if not endpoint.has_room(now):
                # Behind a line that cannot move now, it joins the line: whether its turn is
                # too far off to wait for is for the look at the line's tail (_trim, at most
                # every TRIM_EVERY), not a reckoning per row.
                endpoint.waiting.append(job)
                self._tick_after(endpoint, endpoint.next_start - now)
                return None
            self._let_through(endpoint)  # the rows before it first
        # Behind the rows still waiting: its turn is that much further.
        gate, value = endpoint.admit(now, len(endpoint.waiting))
        if gate is endpoints.Gate.go:
            job.endpoint, job.ticket = endpoint, value
            return None
        if gate is endpoints.Gate.wait or not job.source.defers:
            # (A row whose settle cannot give it a due time waits here however long.)
            endpoint.waiting.append(job)
            self._tick_after(endpoint, value)
            return None
        return self._deferred(job, endpoint, value)

    def _deferred(self, job: Job, endpoint: endpoints.Endpoint, wait: float) -> Settlement:
        """The row handed back, due when its endpoint can likely take it (paced)."""
        now = asyncio.get_running_loop().time()
        delay = endpoint.defer(now, wait)
        self.deferred[job.source.name] += 1
        by = self._skip_by.get(job.source.name)
        value = None if by is None else getattr(job.row, by)
        if value is not None:
            # Its URL's (or topic's) other rows would come back too: the claims pass over
            # them until this one is due.
            self._skips[job.source.name].add(value, endpoint, now + delay)
        log.debug(
            "delivery.deferred",
            source=job.source.name,
            key=job.row.key,
            endpoint=endpoint.key,
            state=endpoint.state.value,
            retry_in_s=round(delay, 3),
        )
        return Settlement(job.row.key, job.row.lease, Outcome.release, delay)

    def _tick_after(self, endpoint: endpoints.Endpoint, wait: float) -> None:
        """Look at an endpoint's line again in `wait` seconds (its first row's turn).

        One timer per endpoint: a slot freed before it fires lets the rows through anyway
        (`_ended`), and the timer then finds them gone or still waiting. An endpoint at its cap
        frees slots only as requests end, so its timer is only for looking at the line's tail
        now and then (`_trim`; a hanging endpoint's requests do not end), not at its first
        row's turn, a fraction of a millisecond off under load."""
        if endpoint.in_flight >= endpoint.cap:
            wait = max(wait, endpoints.TRIM_EVERY)
        wait = min(wait, endpoints.PARK_WITHIN)
        if endpoint.timer is None:
            loop = asyncio.get_running_loop()
            endpoint.timer = loop.call_later(max(wait, 0.001), self._on_timer, endpoint)

    def _on_timer(self, endpoint: endpoints.Endpoint) -> None:
        endpoint.timer = None
        self._let_through(endpoint)

    def _let_through(self, endpoint: endpoints.Endpoint, freed: bool = False) -> None:
        """The rows waiting for an endpoint: those it can take now go to the workers (the
        first, when the current worker's request `freed` a slot, to that worker), those it
        cannot take soon are deferred, the rest wait for the next slot or tick."""
        now = asyncio.get_running_loop().time()
        while endpoint.waiting:
            if not endpoint.has_room(now):
                # Full (or the rate's next start not yet): the line moves as requests end, or
                # at the timer; its tail is looked at now and then.
                self._tick_after(endpoint, endpoint.next_start - now)
                self._trim(endpoint, now)
                return
            gate, value = endpoint.admit(now, 0)
            if gate is endpoints.Gate.wait or (
                gate is endpoints.Gate.defer and not endpoint.waiting[0].source.defers
            ):
                self._tick_after(endpoint, value)
                self._trim(endpoint, now)
                return
            job = endpoint.waiting.popleft()
            if gate is endpoints.Gate.defer:
                self._hand_over(job.source, self._deferred(job, endpoint, value))
                continue
            job.endpoint, job.ticket = endpoint, value
            if freed and self._next is None:
                self._next = job
            else:
                self._jobs.put(job, first=True)

    def _trim(self, endpoint: endpoints.Endpoint, now: float) -> None:
        """Defer the rows at the end of an endpoint's line whose turn is no longer near (its
        requests take longer than when they joined it): they hold claim budget the other
        endpoints' rows need. At most every TRIM_EVERY."""
        if now < endpoint.trimmed_at + endpoints.TRIM_EVERY:
            return
        endpoint.trimmed_at = now
        while len(endpoint.waiting) > 1 and endpoint.waiting[-1].source.defers:
            gate, value = endpoint.admit(now, len(endpoint.waiting) - 1)
            if gate is not endpoints.Gate.defer:
                return
            job = endpoint.waiting.pop()
            self._hand_over(job.source, self._deferred(job, endpoint, value))

    def _ended(self, job: Job, result: Attempt) -> None:
        """A request ended: the endpoint's slot back, its breaker told, its waiting rows on."""
        endpoint, ticket = job.endpoint, job.ticket
        assert endpoint is not None and ticket is not None
        job.ticket = None
        answered = result.ms / 1000 if result.http_status is not None else None
        now = asyncio.get_running_loop().time()
        failed = endpoints.is_failure(result.http_status, result.final)
        change = endpoint.finish(ticket, now, answered, failed)
        if change == "paused":
            self.pauses += 1
            log.warning(
                "endpoint.paused",
                endpoint=endpoint.key,
                pause_s=endpoint.pause,
                reason=endpoint.reason,
                error=result.error,
                next="one request probes it after the pause; its rows wait without using attempts",
            )
        elif change == "resumed":
            log.info("endpoint.resumed", endpoint=endpoint.key)
        if change is not None and self.on_endpoint is not None:
            self.on_endpoint(change, {"endpoint": endpoint.key, **endpoint.status(now)})
        if endpoint.waiting:
            self._let_through(endpoint, freed=True)

    def _disable(self, source: Source, target: URL, result: Attempt) -> None:
        """The target answered a status in endpoints.disable_on: no more requests to it for
        this source until re-enabled; the row goes dead with the reason (kept, replayable)."""
        shown = self.endpoints.target(target)
        reason = (
            f"HTTP {result.http_status} from {guard.display_url(shown)}: target disabled for "
            f"source {source.name} (endpoints.disable_on); its rows are settled dead and kept; "
            f"`relay enable {source.name} {guard.display_url(shown)}` then `relay retry "
            f"{source.name}` sends them"
        )
        if (source.name, shown) not in self.endpoints.disabled:
            self.endpoints.disable(source.name, shown, reason, time.time())
            log.warning(
                "target.disabled",
                source=source.name,
                target=guard.display_url(shown),
                status=result.http_status,
            )
            if self.on_endpoint is not None:
                self.on_endpoint(
                    "disabled", {"source": source.name, "target": shown, "reason": reason}
                )
        result.final = True
        result.error = f"{result.error}; {reason}"

    # -- one attempt -----------------------------------------------------------------------

    def _dead(self, source: Source, row: Claimed, reason: str) -> Settlement:
        self.failed += 1
        log.error("delivery.dead", source=source.name, key=row.key, reason=reason)
        return Settlement(row.key, row.lease, Outcome.dead, 0.0, reason, None, row.attempt)

    async def _deliver(self, job: Job) -> Settlement:
        """Send an admitted row's request (`start` built it) and come to its settlement."""
        source, row = job.source, job.row
        request, target, now = job.request, job.target, job.shaped_at
        assert request is not None and target is not None and now is not None
        if self._wants[source.name]:
            now = datetime.now(UTC)  # what the attempt log and write-backs see as its start
        result = await self._post(target, request)
        self._ended(job, result)
        if result.http_status in self.config.endpoints.disable_on:
            self._disable(source, target, result)
        if self.histograms is not None:
            self.histograms.request(source.name, result.ms / 1000)
        return self._attempted(source, row, request, result, now)

    def _shape(self, job: Job) -> Settlement | None:
        """Everything before the request: the row's checks, its request, its target and its
        endpoint's say. A settlement if it ends here (dead, failed, deferred)."""
        source, row = job.source, job.row
        if row.oversize is not None:
            reason = oversize_reason(source.name, row.oversize, self.config.max_payload_bytes)
            return self._dead(source, row, reason)
        if row.attempt > row.max_attempts:
            return self._dead(
                source,
                row,
                f"claimed {row.attempt} times with at most {row.max_attempts} attempts allowed: "
                f"earlier claims expired without a settle (the relay crashed or lost the "
                f"database while delivering this row)",
            )
        now = datetime.now(UTC)
        request = source.kind.request(source, row, now)
        if isinstance(request, Dead):
            return self._dead(source, row, request.reason)
        if isinstance(request, Failed):
            # No request, no record: a failed attempt all the same (logged, retried or dead).
            failed = Attempt(False, None, request.reason)
            return self._settle_attempt(source, row, failed, None, None)
        target = self._checked(request.url, request.origin)
        if isinstance(target, Attempt):
            return self._attempted(source, row, request, target, now)
        disabled = self.endpoints.disabled_reason(source.name, target)
        if disabled is not None:
            return self._dead(source, row, disabled)
        job.request, job.target, job.shaped_at = request, target, now
        return self._admit(job, target)

    def _attempted(
        self, source: Source, row: Claimed, request: Request, result: Attempt, now: datetime
    ) -> Settlement:
        labelled = self.labelled.get(source.name)
        record = source.kind.record(source, row, request, result)
        settlement = self._settle_attempt(source, row, result, record, None)
        if labelled is not None:
            labelled.count(settlement.outcome, row.payload)
        if settlement.outcome in self._wants[source.name]:
            # Only for outcomes a write-back or an attempt log reads (decoding and parsing an
            # answer costs CPU on every delivery otherwise).
            settlement = replace(settlement, detail=self._detail(source, request, result, now))
        return settlement

    def _detail(self, source: Source, request: Request, result: Attempt, now: datetime) -> Detail:
        cap = self.config.max_response_bytes
        body = result.body[:cap]
        text = body.decode("utf-8", "replace").replace("\x00", "") if body else None
        parsed: str | None = None
        if body:
            try:
                parsed = orjson.dumps(orjson.loads(body)).decode()
                if "\\u0000" in parsed:
                    parsed = None
            except orjson.JSONDecodeError:
                parsed = None
        return Detail(
            method=request.method,
            url=guard.display_url(request.url),
            request_headers={
                k: v for k, v in request.headers.items() if k.lower() not in request.private
            },
            request_body=request.body.decode("utf-8", "replace").replace("\x00", ""),
            response_headers=result.headers,
            response_body=text,
            response_json=parsed,
            started_at=now,
            finished_at=datetime.now(UTC),
            ms=result.ms,
            worker=self.config.worker_id,
        )

    def _settle_attempt(
        self,
        source: Source,
        row: Claimed,
        result: Attempt,
        record: Any,
        detail: Detail | None,
    ) -> Settlement:
        if result.ok:
            self.delivered += 1
            if log.isEnabledFor(self._success_level):
                log.log(
                    self._success_level,
                    "delivery.succeeded",
                    source=source.name,
                    key=row.key,
                    attempt=row.attempt,
                    status=result.http_status,
                    ms=round(result.ms, 1),
                )
            return Settlement(
                row.key,
                row.lease,
                Outcome.done,
                http_status=result.http_status,
                attempt=row.attempt,
                detail=detail,
                record=record,
            )
        self.failed += 1
        error = result.error or "failed"
        if result.final:
            decision: retry.Retry | retry.Dead = retry.Dead("no request can reach this target")
        else:
            decision = retry.decide(
                source.retry,
                row.attempt,
                row.max_attempts,
                result.http_status,
                result.retry_after,
                self.rand(),
            )
        if isinstance(decision, retry.Dead):
            log.error(
                "delivery.dead",
                source=source.name,
                key=row.key,
                attempt=row.attempt,
                status=result.http_status,
                error=error,
                why=decision.reason,
            )
            outcome, wait = Outcome.dead, 0.0
        else:
            wait = decision.delay
            log.warning(
                "delivery.failed",
                source=source.name,
                key=row.key,
                attempt=row.attempt,
                status=result.http_status,
                retry_in_s=round(wait, 3),
                error=error,
            )
            outcome = Outcome.retry
        return Settlement(
            row.key,
            row.lease,
            outcome,
            wait,
            error,
            result.http_status,
            row.attempt,
            detail,
            record,
        )

    def _checked(self, url: str | None, origin: str) -> URL | Attempt:
        """The URL to request, or, for a target the guard refuses or that is no http(s) URL,
        the failed attempt it comes to without any request. `origin` says where it came from."""
        assert self._guard is not None, "Deliverer.open() was not called"
        try:
            return self._guard.target(url or "")
        except guard.Refused as exc:
            return Attempt(False, None, exc.reason, final=True)
        except guard.InvalidTarget:
            shown = guard.display_url(url) if url is not None else None
            return Attempt(
                False,
                None,
                f"invalid target URL {shown!r}{origin}: it must be an http:// or https:// URL "
                f"with a host",
                final=True,
            )

    async def _post(self, url: URL, request: Request) -> Attempt:
        started = time.perf_counter()
        attempt = await self._request(
            url, request.method, request.body, request.headers, request.keep_headers
        )
        attempt.ms = (time.perf_counter() - started) * 1000
        return attempt

    async def _request(
        self, url: URL, method: str, body: bytes, headers: dict[str, str], keep_headers: bool
    ) -> Attempt:
        assert self._client is not None, "Deliverer.open() was not called"
        try:
            # At most max_response_bytes of the body are read: a huge or endless response
            # cannot grow memory (its connection is closed instead of reused).
            resp = await self._client.request(
                url, method, body, headers, self.config.max_response_bytes
            )
        except TimeoutError:
            return Attempt(
                False, None, f"no response within {self.config.http_timeout:g}s (http.timeout)"
            )
        except guard.Refused as exc:
            return Attempt(False, None, exc.reason, final=True)
        except httpclient.HttpError as exc:
            return Attempt(False, None, str(exc), final=exc.final)
        status = resp.status
        headers_seen = dict(resp.headers) if keep_headers else None
        if 200 <= status < 300:
            return Attempt(True, status, None, None, headers_seen, resp.body)
        retry_after = retry.parse_retry_after(resp.header("Retry-After"), datetime.now(UTC))
        if _redirect(status):
            # Never followed (it could lead anywhere, the guard's refusals included), and
            # nothing of its body is kept.
            error = f"HTTP {status}: redirect not followed; set the final URL"
            return Attempt(False, status, error, retry_after, headers_seen)
        snippet = excerpt(resp.body, self.config.error_body_chars)
        error = f"HTTP {status}" + (f": {snippet}" if snippet else "")
        return Attempt(False, status, error, retry_after, headers_seen, resp.body)


def _redirect(status: int) -> bool:
    return 300 <= status < 400
