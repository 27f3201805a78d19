"""`/metrics`: Prometheus's text format, on the health server.

Counts live where the work happens, as plain integers on the parts (the deliverer, claimers,
settler, sweeper, listener): a delivery pays no lock or label lookup for them. A collector reads
them at each scrape, over every relay the process runs (two for a moment after a reload), plus
what retired relays had counted, so counters never go back at a reload. Only the two histograms
are observed as the work happens, once per attempt.

Queue depth and the oldest due row's age come from the same statements `relay status` runs
(a count by status, the oldest due row), on one relay only when several share a database: the
one whose listener holds the lead (see relay.listener), every `metrics.sample_interval`
seconds. Other relays report `relay_queue_sampler 0` and no depth, so `max by (source, status)`
over all instances gives one answer.

Labels from a row (system 2's user and partner) are opt-in per source, `[metrics] labels =
{ source = ["field", ...] }`, read from the top-level fields of the JSON payload relay sends;
each source keeps at most `metrics.max_series` combinations, later ones count under `_other`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
import psycopg_pool
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import logs, readers
from relay.readers import ConfigError
from relay.sources.base import Outcome

if TYPE_CHECKING:
    from relay.app import Relay

log = logs.get("relay.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "_other"  # the label value of combinations past metrics.max_series
# What each settlement outcome is called in relay_deliveries_total.
OUTCOME_NAMES = {
    Outcome.done: "delivered",
    Outcome.retry: "retried",
    Outcome.dead: "dead",
    Outcome.release: "released",
}
# Seconds; a receiver on the same host answers in about a millisecond, http.timeout is 10 s.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED = {"source", "outcome", "status", "job"}


@dataclass(frozen=True, slots=True)
class Settings:
    """[metrics]."""

    sample_interval: float = 15.0  # seconds between queue-depth samples; 0: none
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # source -> fields
    max_series: int = 100  # label combinations per source


def parse(raw: Any, sources: Iterable[str]) -> Settings:
    """`[metrics]`: sample_interval, labels = { source = ["field", ...] }, max_series."""
    if raw is None:
        return Settings()
    if not isinstance(raw, dict):
        raise ConfigError("metrics: expected a table (sample_interval, labels, max_series)")
    readers.unknown("metrics", raw, {"sample_interval", "labels", "max_series"})
    interval = readers.duration("metrics.sample_interval", raw.get("sample_interval", 15.0))
    if 0 < interval < 1:
        raise ConfigError(
            "metrics.sample_interval: at least 1 s (each sample counts every source's rows), "
            "or 0 for no queue-depth samples"
        )
    labels_raw = raw.get("labels", {})
    if not isinstance(labels_raw, dict):
        raise ConfigError('metrics.labels: expected a table, e.g. { orders = ["user_id"] }')
    known = set(sources)
    labels: dict[str, tuple[str, ...]] = {}
    for source, names in labels_raw.items():
        where = f"metrics.labels.{source}"
        if source not in known:
            raise ConfigError(
                f"{where}: no source named {source!r}; configured: {', '.join(sorted(known))}"
            )
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f'{where}: expected a list of payload field names, e.g. ["user_id"]')
        for name in names:
            if not _LABEL.match(name) or name.startswith("__") or name in _RESERVED:
                raise ConfigError(
                    f"{where}: {name!r} cannot be a Prometheus label name (letters, digits and "
                    f"_, not starting with a digit or __, and not {', '.join(sorted(_RESERVED))})"
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: a field is named twice")
        labels[source] = tuple(names)
    return Settings(
        sample_interval=interval,
        labels=labels,
        max_series=readers.integer("metrics.max_series", raw.get("max_series", 100)),
    )


class Labelled:
    """Outcomes of one source's attempts by the values of the configured payload fields, with
    at most `cap` combinations (the rest count under `_other`)."""

    def __init__(self, fields: tuple[str, ...], cap: int) -> None:
        self.fields = fields
        self.cap = cap
        self.counts: dict[tuple[str, tuple[str, ...]], int] = {}
        self._seen: set[tuple[str, ...]] = set()
        self._other = (OTHER,) * len(fields)

    def count(self, outcome: Outcome, payload: str | None) -> None:
        values = self._values(payload)
        if values not in self._seen:
            if len(self._seen) >= self.cap:
                values = self._other
            else:
                self._seen.add(values)
        key = (OUTCOME_NAMES[outcome], values)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _values(self, payload: str | None) -> tuple[str, ...]:
        try:
            data = orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            return ("",) * len(self.fields)
        return tuple(_text(data.get(name)) for name in self.fields)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value[:100]
    return orjson.dumps(value).decode()[:100]


class Histograms:
    """The two histograms, observed once per attempt; kept by the process across reloads."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.request_seconds = Histogram(
            "relay_request_duration_seconds",
            "How long each HTTP request took, from sending to the end of the answer.",
            ["source"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.delivered_seconds = Histogram(
            "relay_claim_to_delivered_seconds",
            "From the claim that took the row to the receiver's 2xx answer (the wait for a "
            "delivery slot and the request).",
            ["source"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.committed_seconds = Histogram(
            "relay_commit_to_delivered_seconds",
            "From the writing transaction (the row's created_at, its now()) to the receiver's "
            "2xx answer; for relay's own tables (outbox, Documenso events), whose rows say when "
            "they were written. Read on two clocks: the database's and relay's host.",
            ["source"],
            buckets=BUCKETS,
            registry=registry,
        )
        # Each source's children, bound once (a label lookup per observation costs more).
        self._requests: dict[str, Any] = {}
        self._delivered: dict[str, Any] = {}
        self._committed: dict[str, Any] = {}

    def request(self, source: str, seconds: float) -> None:
        child = self._requests.get(source)
        if child is None:
            child = self._requests[source] = self.request_seconds.labels(source)
        child.observe(seconds)

    def delivered(self, source: str, from_claim: float, since: float | None) -> None:
        """A delivery, `from_claim` seconds after its claim; `since`: when its row was written
        (epoch seconds), if known."""
        child = self._delivered.get(source)
        if child is None:
            child = self._delivered[source] = self.delivered_seconds.labels(source)
        child.observe(from_claim)
        if since is not None:
            committed = self._committed.get(source)
            if committed is None:
                committed = self._committed[source] = self.committed_seconds.labels(source)
            # Two clocks: a database clock ahead of this host's must not make it negative.
            committed.observe(max(time.time() - since, 0.0))


@dataclass(slots=True)
class Sample:
    """The last queue-depth sample (taken by the relay that leads)."""

    at: float = 0.0  # time.monotonic()
    depth: dict[str, dict[str, int]] = field(default_factory=dict)
    oldest_due: dict[str, float | None] = field(default_factory=dict)
    notification_queue: float | None = None


class Sampler:
    """Every `interval` seconds, while this relay's listener leads: counts by status and the
    oldest due row per source, and pg_notification_queue_usage()."""

    def __init__(self, relay: Relay, interval: float) -> None:
        self.relay = relay
        self.interval = interval
        self.sample = Sample()
        self.samples = 0

    async def run(self, stop: asyncio.Event) -> None:
        if self.interval <= 0:
            return
        listener = self.relay.listener
        while not stop.is_set():
            if listener.leads:
                await self.take()
                wait = self.interval
            elif not listener.connected:
                wait = None  # until it connects (and asks for the lead)
            else:
                # Another relay leads: the lead changes hands only at a connect or heartbeat.
                wait = min(self.interval, self.relay.config.heartbeat_interval)
            await _first(stop, listener.up if wait is None else None, wait)

    async def take(self) -> None:
        store = self.relay.store
        sample = Sample(at=time.monotonic())
        try:
            for name, claimer in self.relay.claimers.items():
                if claimer.failure is not None:
                    continue  # its statements fail; readiness and /status say why
                sample.depth[name] = await store.counts(name)
                sample.oldest_due[name] = await store.oldest_due(name)
            sample.notification_queue = await store.notification_queue_usage()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            # The next sample tries again; the last one is kept (with its age) meanwhile.
            log.warning("metrics.sample_failed", error=logs.first_line(exc))
            return
        self.sample = sample
        self.samples += 1


async def _first(stop: asyncio.Event, event: asyncio.Event | None, wait: float | None) -> None:
    """Until `stop` or `event` is set, or `wait` seconds have passed."""
    waits = [asyncio.ensure_future(stop.wait())]
    if event is not None:
        waits.append(asyncio.ensure_future(event.wait()))
    try:
        await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()


# -- the scrape ----------------------------------------------------------------------------


Counts = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def counters(relay: Relay) -> Counts:
    """Every counter `relay` keeps, by metric name and labels."""
    out: Counts = {}

    def add(name: str, value: float, **labels: str) -> None:
        key = (name, tuple(labels.items()))
        out[key] = out.get(key, 0.0) + value

    for source, outcomes in relay.deliverer.outcomes.items():
        for settled, n in outcomes.items():
            add("relay_deliveries", n, source=source, outcome=OUTCOME_NAMES[settled])
    for source, labelled in relay.deliverer.labelled.items():
        for (named, values), n in labelled.counts.items():
            add(
                "relay_deliveries_labelled",
                n,
                source=source,
                outcome=named,
                **dict(zip(labelled.fields, values, strict=True)),
            )
    for source, claimer in relay.claimers.items():
        add("relay_claims", claimer.claims, source=source)
        add("relay_claimed_rows", claimer.claimed, source=source)
    for source in relay.claimers:
        add("relay_settles", relay.settler.settles.get(source, 0), source=source)
        add("relay_settled_rows", relay.settler.settled_rows.get(source, 0), source=source)
        add("relay_swept_rows", relay.sweeper.rescued.get(source, 0), source=source)
    for source, n in relay.deliverer.deferred.items():
        add("relay_deferred_rows", n, source=source)
    add("relay_endpoint_pauses", relay.deliverer.pauses)
    add("relay_settles_lost", relay.settler.lost)
    add("relay_sweeps", relay.sweeper.sweeps)
    add("relay_heartbeats", relay.deliverer.heartbeats)
    # The first connect is not a reconnect.
    add("relay_listener_reconnects", max(relay.listener.connections - 1, 0))
    add("relay_severed_connections", relay.store.watchdog.severed + relay.listener.watchdog.severed)
    stats = relay.store.pool.get_stats()
    add("relay_pool_requests_queued", stats.get("requests_queued", 0))
    add("relay_pool_wait_seconds", stats.get("requests_wait_ms", 0) / 1000)
    add("relay_pool_connection_errors", stats.get("connections_errors", 0))
    add("relay_pool_connections_lost", stats.get("connections_lost", 0))
    for (job, ran), n in relay.scheduler.outcomes.items():
        add("relay_job_runs", n, job=job, outcome=ran)
    return out


_HELP = {
    "relay_deliveries": (
        "Attempts settled, by source and outcome (delivered, retried, dead, released: handed "
        "back unattempted at a stop or a claim too close to expiry).",
        ["source", "outcome"],
    ),
    "relay_deliveries_labelled": (
        "As relay_deliveries, by the payload fields metrics.labels names (at most "
        "metrics.max_series combinations per source; the rest under _other).",
        None,
    ),
    "relay_claims": ("Claim statements run.", ["source"]),
    "relay_claimed_rows": ("Rows claimed.", ["source"]),
    "relay_settles": ("Settle statements written.", ["source"]),
    "relay_settled_rows": ("Rows settled.", ["source"]),
    "relay_swept_rows": (
        "Rows whose claims had expired (a relay died or lost the database mid-delivery) that "
        "sweeps made claimable again.",
        ["source"],
    ),
    "relay_settles_lost": (
        "Settles that found the row no longer held by this claim (expired and taken over, "
        "deleted or changed by the application).",
        [],
    ),
    "relay_deferred_rows": (
        "Rows handed back unsent, no attempt counted, because their endpoint was paused, busy "
        "or slow (endpoints); they come back when it can likely take them.",
        ["source"],
    ),
    "relay_endpoint_pauses": (
        "Times the circuit breaker paused an endpoint (a failed probe pauses it again).",
        [],
    ),
    "relay_sweeps": ("Sweeps run.", []),
    "relay_heartbeats": ("Heartbeat statements extending claims in flight.", []),
    "relay_listener_reconnects": (
        "Times the listener connected again after losing its connection.",
        [],
    ),
    "relay_severed_connections": ("Connections relay cut because they stopped answering.", []),
    "relay_pool_requests_queued": ("Requests for a pool connection that had to wait.", []),
    "relay_pool_wait_seconds": ("Time spent waiting for a pool connection.", []),
    "relay_pool_connection_errors": ("Failed attempts to open a pool connection.", []),
    "relay_pool_connections_lost": ("Pool connections found broken.", []),
    "relay_job_runs": (
        "Scheduled job runs by this process, by outcome (ok, failed).",
        ["job", "outcome"],
    ),
}


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        relays = self.metrics.relays()
        totals = dict(self.metrics.retired)
        for relay in relays:
            for key, value in counters(relay).items():
                totals[key] = totals.get(key, 0.0) + value
        yield from _counter_families(totals)
        if relays:
            yield from _gauges(relays[-1], self.metrics)


def _counter_families(totals: Counts) -> Iterator[Metric]:
    by_name: dict[str, list[tuple[tuple[tuple[str, str], ...], float]]] = {}
    for (name, labels), value in totals.items():
        by_name.setdefault(name, []).append((labels, value))
    for name, (text, label_names) in _HELP.items():
        samples = by_name.get(name, [])
        names = label_names
        if names is None:  # the labelled counter: every source's fields
            names = ["source", "outcome"]
            for labels, _ in samples:
                names += [k for k, _ in labels if k not in names]
        family = CounterMetricFamily(name, text, labels=names)
        for labels, value in sorted(samples):
            given = dict(labels)
            family.add_metric([given.get(n, "") for n in names], value)
        yield family


def _gauge(name: str, text: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text)
    if value is not None:
        family.add_metric([], value)
    return family


def _gauges(relay: Relay, metrics: Metrics) -> Iterator[Metric]:
    """The running (newest) relay's state."""
    yield _gauge("relay_in_flight", "HTTP requests in flight.", relay.deliverer.in_flight)
    yield _gauge(
        "relay_claimed_ahead",
        "Rows claimed and waiting for a delivery slot (at most relay.claim_ahead).",
        relay.deliverer.queued,
    )
    yield _gauge("relay_max_in_flight", "relay.max_in_flight.", relay.config.max_in_flight)
    yield _gauge(
        "relay_listener_connected",
        "1 while the listener is connected and listening.",
        1 if relay.listener.connected else 0,
    )
    notified = relay.listener.notified_at
    yield _gauge(
        "relay_last_notification_age_seconds",
        "Seconds since the listener last received a notification (absent before the first).",
        None if notified is None else time.monotonic() - notified,
    )
    failing = GaugeMetricFamily(
        "relay_source_failing",
        "1 while the database refuses a source's statements.",
        labels=["source"],
    )
    for name, claimer in relay.claimers.items():
        failing.add_metric([name], 1 if claimer.failure is not None else 0)
    yield failing
    stats = relay.store.pool.get_stats()
    yield _gauge("relay_pool_size", "Connections the pool holds.", stats.get("pool_size", 0))
    yield _gauge("relay_pool_available", "Pool connections idle.", stats.get("pool_available", 0))
    yield _gauge(
        "relay_pool_requests_waiting",
        "Requests waiting for a pool connection now.",
        stats.get("requests_waiting", 0),
    )
    yield _gauge("relay_reloads", "Configurations taken on by SIGHUP.", metrics.reloads())
    yield from _endpoint_gauges(relay)
    yield from _sampled(relay)


MAX_ENDPOINT_SERIES = 100


def _endpoint_gauges(relay: Relay) -> Iterator[Metric]:
    endpoints = relay.deliverer.endpoints
    paused = [e for e in endpoints if e.state.value != "open"]
    yield _gauge(
        "relay_endpoints_paused", "Endpoints the circuit breaker holds paused.", len(paused)
    )
    each = GaugeMetricFamily(
        "relay_endpoint_paused",
        f"1 for each paused endpoint (host:port; at most {MAX_ENDPOINT_SERIES}).",
        labels=["endpoint"],
    )
    for endpoint in sorted(paused, key=lambda e: e.key)[:MAX_ENDPOINT_SERIES]:
        each.add_metric([endpoint.key], 1)
    yield each
    yield _gauge(
        "relay_endpoint_waiting",
        "Claimed rows waiting in relay for their endpoint's next free slot.",
        sum(len(e.waiting) for e in endpoints),
    )
    disabled = GaugeMetricFamily(
        "relay_targets_disabled",
        "Targets disabled by their answer (endpoints.disable_on), by source.",
        labels=["source"],
    )
    by_source: dict[str, int] = {}
    for source, _ in endpoints.disabled:
        by_source[source] = by_source.get(source, 0) + 1
    for source, n in sorted(by_source.items()):
        disabled.add_metric([source], n)
    yield disabled


def _sampled(relay: Relay) -> Iterator[Metric]:
    sampler = relay.sampler
    leads = relay.listener.leads and sampler.interval > 0
    yield _gauge(
        "relay_queue_sampler",
        "1 if this relay samples queue depth for every relay on the database.",
        1 if leads else 0,
    )
    sample = sampler.sample
    if not leads or not sample.at:
        return
    yield _gauge(
        "relay_queue_sample_age_seconds",
        "Seconds since the queue-depth figures below were taken.",
        time.monotonic() - sample.at,
    )
    depth = GaugeMetricFamily(
        "relay_queue_depth",
        "Rows by source and status (done rows included).",
        labels=["source", "status"],
    )
    for source, counts in sample.depth.items():
        for status, n in counts.items():
            depth.add_metric([source, str(status)], n)
    yield depth
    oldest = GaugeMetricFamily(
        "relay_oldest_due_age_seconds",
        "How long the oldest row that is due has been waiting (0 when none is).",
        labels=["source"],
    )
    for source, age in sample.oldest_due.items():
        oldest.add_metric([source], age or 0.0)
    yield oldest
    yield _gauge(
        "relay_notification_queue_usage_ratio",
        "pg_notification_queue_usage(): the share of PostgreSQL's notification queue in use.",
        sample.notification_queue,
    )


class Metrics:
    """The process's registry: histograms, and the collector over its relays."""

    def __init__(self, relays: Callable[[], list[Relay]], reloads: Callable[[], int]) -> None:
        self.relays = relays  # the relays running now, oldest first
        self.reloads = reloads
        self.retired: Counts = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.histograms = Histograms(self.registry)
        self.registry.register(_Collector(self))

    def retire(self, relay: Relay) -> None:
        """`relay` has stopped: keep its counts, so that counters never go back."""
        for key, value in counters(relay).items():
            self.retired[key] = self.retired.get(key, 0.0) + value

    def expose(self) -> bytes:
        return generate_latest(self.registry)
