"""Per-endpoint limits: one slow, hanging or failing receiver uses only its share.

An endpoint is a target's host and port. Each has, in this relay process:

- a concurrency cap (`endpoints.max_in_flight`) and an optional rate (`endpoints.rate`,
  requests per second);
- a circuit breaker: after sustained failure (a failure rate over a window) the endpoint is
  paused; after the pause one request goes through as a probe, and its answer resumes the
  endpoint or pauses it again, twice as long;
- targets its answer disabled (`410 Gone`, `endpoints.disable_on`), per source: their rows
  are settled dead with the reason, kept, and replayed with `relay retry` once re-enabled.

A row whose endpoint cannot take a request now waits in relay when its turn is near (within
PARK_WITHIN), and is otherwise handed back with a due time (deferred: no attempt counted) at
which the endpoint can likely take it. Deferred rows are spread at the endpoint's pace (its
rate, or its cap over its response time), so a backlog behind a slow endpoint comes back a
few rows at a time rather than all at once; the rows waiting in relay never fill the claim
budget the other endpoints' rows need.

Claims do not know a row's endpoint (the URL is computed in the claim, per kind), which is why
limits work by waiting and deferring. Once a row is deferred, though, its URL (or the topic
that picked it) is known: the source's claims pass over that value's rows (`Skips`) until the
deferred row's due time, or sooner if the endpoint can take requests again. A hanging
endpoint's backlog is then claimed and handed back a batch at a time, not row by row.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from yarl import URL

from relay import readers
from relay.readers import ConfigError

# A row waits in relay for its endpoint if its request can likely start within this long;
# longer, and it is deferred (handed back with a due time).
PARK_WITHIN = 1.0
# The latest a deferred row is given for an endpoint that is merely busy or slow (a pause can
# be longer).
MAX_DEFER = 300.0
# The tail of an endpoint's line is looked at (rows whose turn is no longer near deferred) at
# most this often: the estimate moves with the requests' age, not with each row.
TRIM_EVERY = 0.1
# An endpoint with every slot taken that has ended no request for STALL_AFTER (or for
# STALL_TIMES of its response times, if longer) is stalled: it may be hanging. Its requests are
# young when a hang begins, so their age alone says a slot may be near, and for the second or so
# until it says otherwise the rows claimed for it joined its line and held the claim budget the
# other endpoints' rows needed (bench isolation: 0.95 of the healthy endpoint's rate; 1.02 with
# this). A stalled endpoint's rows are deferred, for at least STALLED_WAIT. The cost: an
# endpoint with no answer yet whose first requests take longer than STALL_AFTER has the rows
# claimed meanwhile deferred (no attempt counted) rather than waiting in relay.
STALL_AFTER = 0.1
# Ten response times, not a few: with a cap of one or two, an answer four times slower than
# usual is everyday tail latency, not a hang.
STALL_TIMES = 10
STALLED_WAIT = 2 * PARK_WITHIN
# Endpoints tracked at most; idle ones (nothing in flight, waiting or paused) are forgotten
# beyond this, so URLs taken from rows cannot grow memory without bound.
MAX_ENDPOINTS = 10_000
# Disabled targets kept in memory at most (targets come from rows): beyond, the oldest is
# forgotten, and a row for it is sent once more (its 410 ends it dead all the same).
MAX_DISABLED = 10_000
# Values (URLs or topics) a source's claims pass over at most (`Skips`): a parameter of every
# claim, and a comparison per candidate row.
MAX_SKIPS = 100


@dataclass(frozen=True, slots=True)
class Limits:
    max_in_flight: int
    rate: float | None = None  # requests per second


@dataclass(frozen=True, slots=True)
class Breaker:
    enabled: bool = True
    window: float = 60.0  # seconds of outcomes the failure rate is taken over
    # At least this many requests in the window. 20, as Hystrix's request volume: with 10, an
    # endpoint that fails one request in five at random shows 5 of 10 failed now and then (3% of
    # windows), and a pause for what is only noise.
    min_requests: int = 20
    failure_rate: float = 0.5  # and at least this share of them failed
    pause: float = 30.0  # the first pause; each failed probe doubles it
    max_pause: float = 600.0


@dataclass(frozen=True, slots=True)
class Settings:
    default: Limits = Limits(20)
    # By "host" (any port) or "host:port", lower-case.
    hosts: Mapping[str, Limits] = field(default_factory=dict)
    breaker: Breaker = Breaker()
    disable_on: frozenset[int] = frozenset({410})

    def limits(self, host: str, port: int | None) -> Limits:
        return self.hosts.get(f"{host}:{port}") or self.hosts.get(host) or self.default


KEYS = {"max_in_flight", "rate", "disable_on", "breaker", "hosts"}
BREAKER_KEYS = {"enabled", "window", "min_requests", "failure_rate", "pause", "max_pause"}


def _limits(where: str, raw: Mapping[str, Any], default: Limits) -> Limits:
    cap = readers.integer(f"{where}.max_in_flight", raw.get("max_in_flight", default.max_in_flight))
    rate: float | None = default.rate
    if "rate" in raw:
        rate = readers.number(f"{where}.rate", raw["rate"], minimum=0.0) or None
    return Limits(cap, rate)


def parse(raw: Any, max_in_flight: int) -> Settings:
    """`[endpoints]`; an endpoint's cap is half of relay.max_in_flight unless set, so that one
    endpoint never holds every request slot."""
    default = Limits(max(1, max_in_flight // 2))
    if raw is None:
        return Settings(default)
    if not isinstance(raw, dict):
        raise ConfigError("endpoints: expected a table ([endpoints])")
    readers.unknown("endpoints", raw, KEYS)
    default = _limits("endpoints", raw, default)
    if default.max_in_flight > max_in_flight:
        raise ConfigError(
            f"endpoints.max_in_flight ({default.max_in_flight}) is more than "
            f"relay.max_in_flight ({max_in_flight}), the requests relay makes at once; lower it "
            f"or raise relay.max_in_flight"
        )
    hosts_raw = raw.get("hosts", {})
    if not isinstance(hosts_raw, dict):
        raise ConfigError('endpoints.hosts: expected a table, e.g. { "hooks.example.com" = {...} }')
    hosts: dict[str, Limits] = {}
    for name, value in hosts_raw.items():
        where = f"endpoints.hosts.{name!r}"
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table (max_in_flight, rate)")
        readers.unknown(where, value, {"max_in_flight", "rate"})
        host = name.strip().lower()
        if not host or "/" in host or "@" in host:
            raise ConfigError(
                f"{where}: expected a host name or address, optionally with a port "
                f"('hooks.example.com', 'hooks.example.com:8443'), not a URL"
            )
        hosts[host] = _limits(where, value, default)
    breaker_raw = raw.get("breaker", {})
    if not isinstance(breaker_raw, dict):
        raise ConfigError("endpoints.breaker: expected a table")
    readers.unknown("endpoints.breaker", breaker_raw, BREAKER_KEYS)
    b = Breaker()
    pause = readers.duration("endpoints.breaker.pause", breaker_raw.get("pause", b.pause), 1.0)
    breaker = Breaker(
        enabled=readers.boolean("endpoints.breaker.enabled", breaker_raw.get("enabled", True)),
        window=readers.duration(
            "endpoints.breaker.window", breaker_raw.get("window", b.window), 1.0
        ),
        min_requests=readers.integer(
            "endpoints.breaker.min_requests", breaker_raw.get("min_requests", b.min_requests)
        ),
        failure_rate=readers.fraction(
            "endpoints.breaker.failure_rate", breaker_raw.get("failure_rate", b.failure_rate)
        ),
        pause=pause,
        max_pause=readers.duration(
            "endpoints.breaker.max_pause", breaker_raw.get("max_pause", b.max_pause), pause
        ),
    )
    disable_raw = raw.get("disable_on", [410])
    if not isinstance(disable_raw, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and 400 <= s <= 599 for s in disable_raw
    ):
        raise ConfigError(
            "endpoints.disable_on: expected a list of HTTP statuses from 400 to 599, like [410] "
            "([] disables nothing)"
        )
    return Settings(default, hosts, breaker, frozenset(disable_raw))


class Gate(Enum):
    go = "go"  # a request slot was taken: send now
    wait = "wait"  # wait in relay for a slot (soon)
    defer = "defer"  # hand the row back, due after the delay


class State(Enum):
    open = "open"  # taking requests (the breaker is closed)
    paused = "paused"
    probing = "probing"  # one request is testing whether a paused endpoint is back


class _Window:
    """Requests and failures over the last `span` seconds, in ten buckets."""

    __slots__ = ("buckets", "width")

    def __init__(self, span: float) -> None:
        self.width = span / 10
        self.buckets: deque[list[float]] = deque()  # [start, requests, failures]

    def add(self, now: float, failed: bool) -> None:
        start = now - now % self.width
        if not self.buckets or self.buckets[-1][0] != start:
            self.buckets.append([start, 0, 0])
        bucket = self.buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        while self.buckets[0][0] <= now - 10 * self.width:
            self.buckets.popleft()

    def counts(self, now: float) -> tuple[int, int]:
        horizon = now - 10 * self.width
        live = [b for b in self.buckets if b[0] > horizon]
        return int(sum(b[1] for b in live)), int(sum(b[2] for b in live))

    def clear(self) -> None:
        self.buckets.clear()


class Endpoint:
    """One host:port, as this relay sees it (see the module's docstring)."""

    def __init__(self, key: str, limits: Limits, breaker: Breaker, probe_wait: float) -> None:
        self.key = key
        self.cap = limits.max_in_flight
        self.rate = limits.rate
        self.interval = 1 / limits.rate if limits.rate else 0.0
        self.breaker = breaker
        self.probe_wait = probe_wait
        self.in_flight = 0
        self._tickets = 0
        self._started: dict[int, float] = {}  # ticket -> when its request started
        self.waiting: deque[Any] = deque()  # rows waiting in relay for a slot (the deliverer's)
        self.timer: Any = None  # the deliverer's timer for the waiting rows
        self.next_start = 0.0  # the soonest the rate lets the next request start
        self.latency = 0.0  # the answers' response time, moving average (seconds)
        self.moved_at = 0.0  # when a request here last ended, or it went from idle to busy
        self._deferred_to = 0.0  # the latest due time given to a deferred row
        self.trimmed_at = 0.0  # when the deliverer last looked at the line's tail (TRIM_EVERY)
        self.deferred = 0  # rows deferred (for status and /metrics)
        self.state = State.open
        self.until = 0.0  # paused until (monotonic)
        self.pause = breaker.pause
        self.paused_at: float | None = None  # wall time
        self.reason: str | None = None  # the failure that paused it
        self.pauses = 0
        self._probe: int | None = None
        self._window = _Window(breaker.window)

    # -- admission ------------------------------------------------------------------------

    def service_time(self, now: float) -> float:
        """How long a request here takes: its recent response time, or longer while the
        oldest request in flight has taken longer."""
        if not self._started:
            return self.latency
        # Tickets are taken in time order and a dict keeps that order: the first is oldest.
        return max(self.latency, now - next(iter(self._started.values())))

    def wait(self, now: float, ahead: int) -> float:
        """Seconds until a request with `ahead` rows waiting before it could start."""
        wait = 0.0
        queued = self.in_flight + ahead
        if queued >= self.cap:
            wait = (queued - self.cap + 1) / self.cap * self.service_time(now)
            if self.stalled(now):
                wait = max(wait, STALLED_WAIT)
        if self.interval:
            wait = max(wait, self.next_start - now + ahead * self.interval)
        return wait

    def stalled(self, now: float) -> bool:
        """Every slot taken and no request ended for a while (STALL_AFTER)."""
        return self.in_flight >= self.cap and now - self.moved_at > max(
            STALL_AFTER, STALL_TIMES * self.latency
        )

    def admit(self, now: float, ahead: int) -> tuple[Gate, float]:
        """May a row (with `ahead` rows of this endpoint waiting before it) send its request
        now? On `go` a slot is taken (`finish` gives it back) and the value is its ticket;
        otherwise the value is how long until it likely could (`defer` paces a deferral)."""
        probe = False
        if self.state is State.paused:
            if now < self.until:
                return Gate.defer, self.until - now
            self.state, probe = State.probing, True
        elif self.state is State.probing:
            # One request tests the endpoint; the others come back after its answer.
            return Gate.defer, self.probe_wait
        wait = 0.0 if probe else self.wait(now, ahead)
        if wait > 0:
            if wait <= PARK_WITHIN:
                return Gate.wait, wait
            return Gate.defer, wait
        self._tickets += 1
        ticket = self._tickets
        self._started[ticket] = now
        if not self.in_flight:
            self.moved_at = now
        self.in_flight += 1
        if probe:
            self._probe = ticket
        if self.interval:
            self.next_start = max(self.next_start, now) + self.interval
        return Gate.go, float(ticket)

    def has_room(self, now: float) -> bool:
        """Whether the rows waiting could move now: a slot free and the rate's next start
        passed, or the breaker's state to act on (a pause to defer them, a probe to send). Two
        comparisons where `admit` takes a dozen: a row claimed behind a full endpoint's line
        joins it without the line being looked at (its slots free only as requests end)."""
        if self.state is not State.open:
            return True
        return self.in_flight < self.cap and (not self.interval or self.next_start <= now)

    def blocked(self, now: float) -> bool:
        """Whether a row coming now would be deferred (paused, probing, or its turn further
        off than PARK_WITHIN behind the rows waiting)."""
        if self.state is State.paused:
            return now < self.until
        if self.state is State.probing:
            return True
        return self.wait(now, len(self.waiting)) > PARK_WITHIN

    def defer(self, now: float, wait: float) -> float:
        """The delay for a row handed back: no sooner than `wait`, and after the rows deferred
        before it by the endpoint's pace, so that they come back a few at a time."""
        pace = max(self.interval, self.service_time(now) / self.cap)
        at = max(now + wait, self._deferred_to + pace)
        at = min(at, now + max(wait, MAX_DEFER))
        self._deferred_to = at
        self.deferred += 1
        return at - now

    # -- outcomes --------------------------------------------------------------------------

    def finish(self, ticket: float, now: float, answered: float | None, failed: bool) -> str | None:
        """A request ended: `answered` is its response time if an answer came, `failed`
        whether it counts against the endpoint (no answer, 5xx, 408, 429). Returns "paused"
        or "resumed" when the breaker changed state."""
        started = self._started.pop(int(ticket), None)
        if started is None:
            return None
        self.in_flight -= 1
        self.moved_at = now
        if answered is not None:
            self.latency = answered if not self.latency else 0.8 * self.latency + 0.2 * answered
        if self._probe == int(ticket):
            self._probe = None
            if failed:
                self.pause = min(self.pause * 2, self.breaker.max_pause)
                return self._pause(now, self.reason)
            self.state = State.open
            self.pause = self.breaker.pause
            self.paused_at = None
            self._window.clear()
            return "resumed"
        if not self.breaker.enabled or self.state is not State.open:
            return None
        self._window.add(now, failed)
        if failed:
            requests, failures = self._window.counts(now)
            b = self.breaker
            if requests >= b.min_requests and failures >= b.failure_rate * requests:
                self.reason = f"{failures} of {requests} requests failed in {b.window:g}s"
                return self._pause(now, self.reason)
        return None

    def cancel(self, ticket: float) -> None:
        """A slot taken and not used (the row was handed back unsent): nothing learnt."""
        if self._started.pop(int(ticket), None) is None:
            return
        self.in_flight -= 1
        if self._probe == int(ticket):
            self._probe = None
            self.state, self.until = State.paused, 0.0  # the next row probes

    def _pause(self, now: float, reason: str | None) -> str:
        self.state = State.paused
        self.until = now + self.pause
        self.pauses += 1
        if self.paused_at is None:
            self.paused_at = time.time()
        self.reason = reason
        self._deferred_to = 0.0
        return "paused"

    def idle(self, now: float) -> bool:
        return (
            self.state is State.open
            and not self.in_flight
            and not self.waiting
            and self._deferred_to <= now
        )

    def status(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": self.state.value,
            "in_flight": self.in_flight,
            "max_in_flight": self.cap,
            "waiting": len(self.waiting),
            "deferred": self.deferred,
        }
        if self.rate:
            out["rate"] = self.rate
        if self.stalled(now):
            # Every slot taken and no request ended for this long: likely hanging.
            out["stalled_s"] = round(now - self.moved_at, 3)
        if self.state is not State.open:
            out["paused_since"] = self.paused_at
            out["resumes_in_s"] = round(max(self.until - now, 0.0), 3)
            out["reason"] = self.reason
        return out


@dataclass(slots=True)
class Disabled:
    reason: str
    since: float  # wall time


class Endpoints:
    """Every endpoint this relay sends to, and the targets disabled per source."""

    def __init__(
        self,
        settings: Settings,
        probe_wait: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.probe_wait = probe_wait
        self.clock = clock
        self._by_host: dict[tuple[str, int | None], Endpoint] = {}
        # (source, target URL without userinfo or query) -> why and since when
        self.disabled: dict[tuple[str, str], Disabled] = {}

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(list(self._by_host.values()))

    def get(self, url: URL) -> Endpoint:
        host = (url.host or "").lower()
        found = self._by_host.get((host, url.port))
        if found is None:
            if len(self._by_host) >= MAX_ENDPOINTS:
                self._forget_idle()
            limits = self.settings.limits(host, url.port)
            key = f"[{host}]:{url.port}" if ":" in host else f"{host}:{url.port}"
            found = Endpoint(key, limits, self.settings.breaker, self.probe_wait)
            self._by_host[(host, url.port)] = found
        return found

    def _forget_idle(self) -> None:
        now = self.clock()
        for host, endpoint in list(self._by_host.items()):
            if endpoint.idle(now):
                del self._by_host[host]

    def disable(self, source: str, target: str, reason: str, since: float) -> None:
        if len(self.disabled) >= MAX_DISABLED:
            del self.disabled[next(iter(self.disabled))]
        self.disabled[(source, target)] = Disabled(reason, since)

    @staticmethod
    def target(url: URL) -> str:
        """A target as disabled targets are kept: no userinfo, no query, no fragment."""
        return str(url.with_user(None).with_query(None).with_fragment(None))

    def disabled_reason(self, source: str, url: URL) -> str | None:
        if not self.disabled:
            return None
        found = self.disabled.get((source, self.target(url)))
        return found.reason if found is not None else None

    def status(self) -> dict[str, Any]:
        """What /status shows: endpoints that are paused, busy or were deferred to, and the
        disabled targets."""
        now = self.clock()
        shown = {
            e.key: e.status(now)
            for e in self._by_host.values()
            if e.state is not State.open or e.in_flight or e.waiting or e.deferred
        }
        disabled = [
            {"source": source, "target": target, "reason": d.reason, "since": d.since}
            for (source, target), d in sorted(self.disabled.items())
        ]
        return {"endpoints": shown, "disabled": disabled}


class Skips:
    """One source's values (a row's URL, or the topic that picks it: the claim's `skip_by`)
    whose rows its claims pass over: a row with the value was deferred, and until that row is
    due (`until`, monotonic) the value's other rows would be too, unless their endpoint can
    take requests again first. The deferred row's due time wakes the claimer (next_due), which
    then finds the value expired. At most MAX_SKIPS values: beyond, rows are deferred as
    before.

    The claim is given the values' MD5 digests, not the values (`md5(value) = ANY(...)`): a
    URL may carry credentials, and PostgreSQL writes a logged statement's parameters to its
    log (log_min_duration_statement)."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[Endpoint, float]] = {}  # digest -> endpoint, until

    def add(self, value: str, endpoint: Endpoint, until: float) -> None:
        digest = hashlib.md5(value.encode(), usedforsecurity=False).hexdigest()
        if digest not in self._values and len(self._values) < MAX_SKIPS:
            self._values[digest] = (endpoint, until)

    def current(self, now: float) -> list[str]:
        """The digests of the values to pass over now; those that no longer hold are
        dropped."""
        if not self._values:
            return []
        for digest, (endpoint, until) in list(self._values.items()):
            if now >= until or not endpoint.blocked(now):
                del self._values[digest]
        return list(self._values)


def is_failure(status: int | None, final: bool) -> bool:
    """Whether an attempt's result counts against its endpoint's health: no answer (refused,
    reset, timed out), a 5xx, 408 or 429. Another 4xx is the row's problem, not the
    endpoint's; a target relay refused to connect to (`final`) says nothing of it."""
    if status is None:
        return not final
    return status >= 500 or status in (408, 429)
