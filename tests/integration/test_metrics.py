"""/metrics: Prometheus's text format on the health server, counting what relay really did
(deliveries by outcome, claims and settles with their rows, reconnects), queue depth sampled by
one relay of several, opt-in labels from the payload with their cap, and counters that never go
back at a reload."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from relay.app import Service
from relay.config import ConfigError
from tests.support import (
    WAIT,
    Receiver,
    insert_rows,
    install,
    make_config,
    publish,
    queue_source,
    serving,
    terminate_backends,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(service: Service) -> Samples:
    """Every sample /metrics answers, by name and labels (parsed as Prometheus parses it)."""
    assert service.health_port
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{service.health_port}/metrics") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def until(check: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> None:
    """Until `check()` holds. What a scrape shows has no event of its own to await (it is read
    from counters as the settles land), so the check is repeated until it holds or times out."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_deliveries_claims_and_settles_are_counted_by_source_and_outcome(
    db: str, receiver: Receiver
) -> None:
    async def fail_first(request: web.Request, count: int) -> web.StreamResponse:
        return web.Response(status=500 if count == 1 or request.path == "/dead" else 200)

    receiver.behaviour = fail_first
    config = make_config(db)
    await install(config)
    async with serving(config) as service:
        before = await scrape(service)
        assert (
            value(before, "relay_deliveries_total", source="deliveries", outcome="delivered") == 0
        )
        await insert_rows(db, receiver.url, 5)
        # One that dies: max_attempts 1 and a receiver that always fails it.
        await insert_rows(db, receiver.url.replace("/hook", "/dead"), 1, max_attempts=1)
        await receiver.wait_count(11)

        async def settled() -> bool:
            samples = await scrape(service)
            return value(samples, "relay_settled_rows_total", source="deliveries") == 11

        await until(settled)
        samples = await scrape(service)

    def count(outcome: str) -> float | None:
        return value(samples, "relay_deliveries_total", source="deliveries", outcome=outcome)

    # The /dead row failed its only attempt (500): dead, not retried.
    assert (count("delivered"), count("retried"), count("dead"), count("released")) == (5, 5, 1, 0)
    claims = value(samples, "relay_claims_total", source="deliveries")
    assert claims is not None and claims >= 1
    assert value(samples, "relay_claimed_rows_total", source="deliveries") == 11
    settles = value(samples, "relay_settles_total", source="deliveries")
    assert settles is not None and 1 <= settles <= 11
    # Every attempt's request is in the histogram; only the 5 deliveries in claim-to-delivered.
    assert value(samples, "relay_request_duration_seconds_count", source="deliveries") == 11
    assert value(samples, "relay_claim_to_delivered_seconds_count", source="deliveries") == 5
    assert value(samples, "relay_listener_connected") == 1
    age = value(samples, "relay_last_notification_age_seconds")
    assert age is not None and 0 <= age < WAIT
    assert value(samples, "relay_in_flight") == 0
    assert value(samples, "relay_max_in_flight") == config.max_in_flight
    pool = value(samples, "relay_pool_size")
    assert pool is not None and pool >= 1


async def test_rows_of_relays_own_tables_have_commit_to_delivered(
    db: str, receiver: Receiver
) -> None:
    config = make_config(
        db,
        sources={
            "events": {"kind": "outbox", "url": receiver.url},
            "deliveries": queue_source(),
        },
    )
    await install(config)
    async with serving(config) as service:
        await publish(db, 3)
        await insert_rows(db, receiver.url, 2)
        await receiver.wait_count(5)

        async def observed() -> bool:
            samples = await scrape(service)
            return (
                value(samples, "relay_claim_to_delivered_seconds_count", source="events"),
                value(samples, "relay_claim_to_delivered_seconds_count", source="deliveries"),
            ) == (3, 2)

        await until(observed)
        samples = await scrape(service)
    # The outbox's rows say when they were written; a table's rows do not.
    assert value(samples, "relay_commit_to_delivered_seconds_count", source="events") == 3
    assert value(samples, "relay_commit_to_delivered_seconds_count", source="deliveries") is None
    # Each was delivered within the test's wait of its commit.
    assert (
        value(samples, "relay_commit_to_delivered_seconds_bucket", source="events", le="30.0") == 3
    )


async def test_listener_reconnects_are_counted(db: str) -> None:
    config = make_config(db, relay={"heartbeat_interval": 0.5})
    await install(config)
    async with serving(config) as service:
        relay = service.relay
        assert value(await scrape(service), "relay_listener_reconnects_total") == 0
        assert relay.listener.backend_pid is not None
        relay.listener.up.clear()
        await terminate_backends(db, [relay.listener.backend_pid])
        await asyncio.wait_for(relay.listener.up.wait(), WAIT)
        assert value(await scrape(service), "relay_listener_reconnects_total") == 1


async def test_queue_depth_is_sampled_by_one_relay_of_several_and_moves_when_it_stops(
    db: str, receiver: Receiver
) -> None:
    config = make_config(db, relay={"heartbeat_interval": 0.5}, metrics={"sample_interval": 1})
    await install(config)
    # A dead row and nothing else: the depth to find.
    await insert_rows(db, receiver.url, 1, status="dead_letter")
    async with serving(config) as first, serving(config) as second:
        one, two = first.relay, second.relay
        # Exactly one listener holds the lead (the first to ask), the other keeps asking.
        assert (one.listener.leads, two.listener.leads) == (True, False)

        async def sampled() -> bool:
            return one.sampler.samples > 0

        await until(sampled)
        leader, other = await scrape(first), await scrape(second)
        assert value(leader, "relay_queue_sampler") == 1
        assert value(other, "relay_queue_sampler") == 0
        assert value(leader, "relay_queue_depth", source="deliveries", status="dead_letter") == 1
        assert value(other, "relay_queue_depth", source="deliveries", status="dead_letter") is None
        assert value(leader, "relay_oldest_due_age_seconds", source="deliveries") == 0
        usage = value(leader, "relay_notification_queue_usage_ratio")
        assert usage is not None and 0 <= usage < 1
        assert two.sampler.samples == 0

        # The leader stops: its connection and lock go, and the other takes over by itself.
        first.stop.set()

        async def taken_over() -> bool:
            return two.listener.leads and two.sampler.samples > 0

        await until(taken_over)
        taken = await scrape(second)
        assert value(taken, "relay_queue_sampler") == 1
        assert value(taken, "relay_queue_depth", source="deliveries", status="dead_letter") == 1


async def test_payload_labels_are_opt_in_and_capped(db: str, receiver: Receiver) -> None:
    config = make_config(db, metrics={"labels": {"deliveries": ["n"]}, "max_series": 3})
    await install(config)
    async with serving(config) as service:
        await insert_rows(db, receiver.url, 5)  # payloads {"n": 1} .. {"n": 5}
        await receiver.wait_count(5)

        async def counted() -> bool:
            samples = await scrape(service)
            total = sum(
                v for (name, _), v in samples.items() if name == "relay_deliveries_labelled_total"
            )
            return total == 5

        await until(counted)
        samples = await scrape(service)
    labelled = {
        dict(labels)["n"]: v
        for (name, labels), v in samples.items()
        if name == "relay_deliveries_labelled_total"
    }
    # The first three values seen have their own series; the other two share _other.
    assert labelled.pop("_other") == 2
    assert sorted(labelled.values()) == [1, 1, 1]
    assert set(labelled) <= {"1", "2", "3", "4", "5"}


async def test_counters_never_go_back_at_a_reload(db: str, receiver: Receiver) -> None:
    config = make_config(db)
    await install(config)
    async with serving(config) as service:
        service.load = lambda: config
        await insert_rows(db, receiver.url, 3)
        await receiver.wait_count(3)

        def delivered(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                samples = await scrape(service)
                got = value(
                    samples, "relay_deliveries_total", source="deliveries", outcome="delivered"
                )
                return got == n

            return check

        await until(delivered(3))
        old = service.relay
        service._on_hup()

        async def reloaded() -> bool:
            return service.reloads == 1 and old not in service._running

        await until(reloaded)
        assert service.relay is not old
        # The retired relay's three are still counted, and the new one's add to them.
        await until(delivered(3))
        await insert_rows(db, receiver.url, 2)
        await until(delivered(5))
        assert value(await scrape(service), "relay_reloads") == 1


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"labels": {"nowhere": ["user"]}}, "metrics.labels.nowhere: no source named"),
        ({"labels": {"deliveries": ["user-id"]}}, "cannot be a Prometheus label name"),
        ({"labels": {"deliveries": ["source"]}}, "cannot be a Prometheus label name"),
        ({"labels": {"deliveries": "user"}}, "expected a list of payload field names"),
        ({"sample_interval": 0.5}, "metrics.sample_interval: at least 1 s"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_metrics_settings_are_refused_with_the_key(
    db: str, metrics: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(db, metrics=metrics)
