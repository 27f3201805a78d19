"""Per-endpoint limits end to end (relay.endpoints): real receivers on loopback, each its own
endpoint (host:port), a real PostgreSQL and the relay running in-process.

- a hanging endpoint holds only its cap of the request slots, and another endpoint's rows are
  all delivered while it hangs;
- an endpoint that keeps failing is paused, its rows wait without using attempts, and it
  resumes by itself once a probe succeeds (on a user's table and on relay's outbox);
- a 410 disables the target for the source: the row and the later ones of that target go dead
  with the reason, without more requests; `relay enable` and `relay retry` send them;
- a rate spaces the requests;
- once a busy endpoint's row is deferred, the claims pass over its other rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web

from relay.app import Relay
from tests.support import (
    WAIT,
    Receiver,
    fetch_rows,
    insert_rows,
    install,
    make_config,
    publish,
    queue_source,
    raw_config,
    run_cli,
    running,
    write_config,
)


class Concurrency:
    """A receiver behaviour that counts requests at once, and answers as `answer` says once
    `release` is set (never, for a hanging endpoint, until the test ends)."""

    def __init__(self, release: asyncio.Event) -> None:
        self.release = release
        self.now = 0
        self.most = 0

    async def __call__(self, _: web.Request, __: int) -> web.StreamResponse:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            async with asyncio.timeout(WAIT * 2):
                await self.release.wait()
        finally:
            self.now -= 1
        return web.Response(text="ok")


def watch_endpoints(relay: Relay) -> asyncio.Queue[tuple[str, dict[str, Any]]]:
    """The endpoint changes (paused, resumed, disabled) as they happen, besides their record."""
    seen: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    record = relay.deliverer.on_endpoint
    assert record is not None

    def changed(change: str, data: dict[str, Any]) -> None:
        seen.put_nowait((change, data))
        record(change, data)

    relay.deliverer.on_endpoint = changed
    return seen


async def next_change(
    seen: asyncio.Queue[tuple[str, dict[str, Any]]], change: str
) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        while True:
            got, data = await seen.get()
            if got == change:
                return data


async def test_a_hanging_endpoint_holds_only_its_cap_and_the_others_keep_going(
    db: str, receiver: Receiver, other: Receiver
) -> None:
    hang = asyncio.Event()
    hanging = Concurrency(hang)
    receiver.behaviour = hanging
    # Requests may hang for a minute: only the cap keeps the healthy endpoint's rows moving.
    config = make_config(
        db,
        relay={"max_in_flight": 6, "claim_timeout": 120},
        endpoints={"max_in_flight": 2},
        http={"timeout": 60},
    )
    await install(config)
    try:
        async with running(config) as relay:
            stuck = await insert_rows(db, receiver.url, 20)  # claimed first
            healthy = await insert_rows(db, other.url, 60)
            await other.wait_count(60, timeout=WAIT)
            status = relay.status()
            hang.set()
    finally:
        hang.set()
    assert hanging.most == 2, f"{hanging.most} requests at once to an endpoint capped at 2"
    assert sorted(int(r.json["n"]) for r in other.received) == sorted(range(1, 61))
    [busy] = [e for key, e in status["endpoints"].items() if key.endswith(f":{receiver.port}")]
    assert busy["in_flight"] == 2 and busy["state"] == "open"
    rows = await fetch_rows(db)
    assert {rows[i]["status"] for i in healthy} == {"delivered"}
    # The hanging endpoint's other rows were not attempted while it hung: deferred or waiting,
    # then delivered once it answered.
    assert max(rows[i]["attempt_count"] for i in stuck) <= 1


@pytest.mark.parametrize(
    "mapping", ["processing", "lean", "in_row"], ids=["processing", "lean", "in_row"]
)
async def test_rows_deferred_ahead_of_others_do_not_hold_up_their_claims(
    db: str, receiver: Receiver, other: Receiver, mapping: str
) -> None:
    # Small claims, and the hanging endpoint's rows first in key order: once they are deferred,
    # each claim must pass over them (they wait out their delay) to the healthy rows behind.
    hang = asyncio.Event()
    receiver.behaviour = Concurrency(hang)
    source = queue_source()
    if mapping == "lean":
        source.pop("processing")
    elif mapping == "in_row":
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            await conn.execute(
                "ALTER TABLE webhook_delivery_queue ADD COLUMN relay_lease timestamptz"
            )
        source["lease_column"] = "relay_lease"
    config = make_config(
        db,
        sources={"deliveries": source},
        relay={"max_in_flight": 6, "batch_size": 10, "claim_timeout": 120},
        endpoints={"max_in_flight": 2},
        http={"timeout": 60},
    )
    await install(config)
    try:
        async with running(config) as relay:
            await insert_rows(db, receiver.url, 50)
            await insert_rows(db, other.url, 200)
            await other.wait_count(200, timeout=WAIT)
            deferred = relay.deliverer.deferred["deliveries"]
            hang.set()
    finally:
        hang.set()
    assert deferred > 0


@pytest.mark.parametrize("kind", ["table", "outbox"])
async def test_a_busy_endpoints_rows_are_passed_over_by_the_claims_not_handed_back_each(
    db: str, receiver: Receiver, other: Receiver, kind: str
) -> None:
    # Once one of a hanging endpoint's rows is deferred, the claims pass over its URL (on the
    # outbox, the topic routed to it) until that row is due: its backlog is not claimed and
    # handed back row by row while another endpoint's rows go on.
    hang = asyncio.Event()
    receiver.behaviour = Concurrency(hang)
    outbox = {"kind": "outbox", "topics": {"slow": receiver.url, "fast": other.url}}
    config = make_config(
        db,
        **({"sources": {"deliveries": outbox}} if kind == "outbox" else {}),
        relay={"max_in_flight": 6, "batch_size": 10, "claim_timeout": 120},
        endpoints={"max_in_flight": 2},
        http={"timeout": 60},
    )
    await install(config)

    async def write(target: str, n: int) -> None:
        if kind == "table":
            await insert_rows(db, receiver.url if target == "slow" else other.url, n)
            return
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            await conn.execute(
                "SELECT relay.publish(%s, jsonb_build_object('n', g)) "
                "FROM generate_series(1, %s) g",
                (target, n),
            )

    try:
        async with running(config) as relay:
            await write("slow", 100)  # first in key order
            await write("fast", 100)
            await other.wait_count(100, timeout=WAIT)
            deferred = relay.deliverer.deferred["deliveries"]
            hang.set()
            # Once it answers, its rows are claimed again, and all arrive.
            await receiver.wait_count(100, timeout=WAIT)
    finally:
        hang.set()
    # The first claims took up to a batch of its rows each before one was deferred; handed
    # back one by one, nearly all 98 not in flight would have been.
    assert 0 < deferred <= 30, f"{deferred} rows deferred"
    assert sorted(int(r.json["n"]) for r in receiver.received) == list(range(1, 101))


def failing_until(healthy: asyncio.Event) -> Callable[[web.Request, int], Any]:
    async def behaviour(_: web.Request, __: int) -> web.StreamResponse:
        if healthy.is_set():
            return web.Response(text="ok")
        return web.Response(status=503, text="down for maintenance")

    return behaviour


BREAKER = {"min_requests": 3, "failure_rate": 0.5, "pause": 1, "max_pause": 2, "window": 60}


@pytest.mark.parametrize("kind", ["table", "outbox"])
async def test_a_failing_endpoint_is_paused_uses_no_attempts_and_resumes_by_itself(
    db: str, receiver: Receiver, kind: str
) -> None:
    healthy = asyncio.Event()
    receiver.behaviour = failing_until(healthy)
    sources = {"deliveries": {"kind": "outbox", "url": receiver.url}} if kind == "outbox" else None
    # Three attempts at most, retried within 50-500 ms: without the breaker every row would
    # be dead long before the endpoint comes back.
    config = make_config(
        db,
        **({"sources": sources} if sources else {}),
        retry={"max_attempts": 3},
        # One request at a time, so that the breaker's count is what decides.
        endpoints={"max_in_flight": 1, "breaker": BREAKER},
    )
    await install(config)
    async with running(config) as relay:
        seen = watch_endpoints(relay)
        if kind == "outbox":
            await publish(db, 10)
        else:
            await insert_rows(db, receiver.url, 10)
        paused = await next_change(seen, "paused")
        assert paused["reason"] == "3 of 3 requests failed in 60s"
        # Its first probe fails: paused again, twice as long.
        await next_change(seen, "paused")
        status = relay.status()
        mark = len(receiver.received)
        healthy.set()  # every request from now on is answered 200
        await next_change(seen, "resumed")
        await receiver.wait_for(lambda got: len({r.id for r in got[mark:]}) == 10)
    assert await delivered(db, kind) == 10
    [entry] = status["endpoints"].values()
    assert entry["state"] == "paused" and "requests failed" in entry["reason"]
    assert relay.deliverer.deferred["deliveries"] > 0
    # While it failed, relay sent it the breaker's three requests and two probes, not
    # 10 rows x 3 attempts; every row was delivered, none used up its attempts.
    failed = len(receiver.received) - 10
    assert failed <= 6, f"{failed} failed requests to a paused endpoint"
    assert await attempts(db, kind) <= 3


async def delivered(db: str, kind: str) -> int:
    table = "relay.outbox" if kind == "outbox" else "webhook_delivery_queue"
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {table} WHERE status = 'delivered'")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def attempts(db: str, kind: str) -> int:
    query = (
        "SELECT max(attempts) FROM relay.outbox"
        if kind == "outbox"
        else "SELECT max(attempt_count) FROM webhook_delivery_queue"
    )
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        cur = await conn.execute(query)
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_410_disables_the_target_for_the_source_and_relay_enable_sends_again(
    db: str, receiver: Receiver, tmp_config: Path
) -> None:
    gone = True

    async def behaviour(request: web.Request, _: int) -> web.StreamResponse:
        if request.path == "/gone" and gone:
            return web.Response(status=410, text="this subscription was removed")
        return web.Response(text="ok")

    receiver.behaviour = behaviour
    target = f"http://127.0.0.1:{receiver.port}/gone"
    config = write_config(tmp_config, raw_config(db))
    await install(config)
    async with running(config) as relay:
        seen = watch_endpoints(relay)
        [first] = await insert_rows(db, target, 1)
        disabled = await next_change(seen, "disabled")
        later = await insert_rows(db, target, 3)
        fine = await insert_rows(db, receiver.url, 3)  # the same host, another target
        # Claimed in order: the later rows of the disabled target were settled before these.
        await receiver.wait_for(lambda got: sum(r.path == "/hook" for r in got) == 3)
        status = relay.status()
    # (A graceful stop writes the settles and the disabled target.)
    assert disabled == {"source": "deliveries", "target": target, "reason": disabled["reason"]}
    assert [r.path for r in receiver.received].count("/gone") == 1  # only the first was sent
    rows = await fetch_rows(db)
    assert rows[first]["last_response_status"] == 410
    for i in [first, *later]:
        assert rows[i]["status"] == "dead_letter"
        assert "target disabled for source deliveries" in rows[i]["last_error"]
        assert "relay enable deliveries" in rows[i]["last_error"]
    assert {rows[i]["status"] for i in fine} == {"delivered"}
    assert status["disabled"] == [
        {
            "source": "deliveries",
            "target": target,
            "reason": disabled["reason"],
            "since": status["disabled"][0]["since"],
        }
    ]
    # Kept in relay.endpoints: `relay status` shows it, `relay enable` lifts it, `relay retry`
    # sends the rows.
    code, out = await run_cli(tmp_config, "status")
    assert code == 0 and f"target {target} disabled since" in out
    code, out = await run_cli(tmp_config, "enable", "deliveries")
    assert code == 0 and f"deliveries: {target} enabled" in out
    gone = False
    code, out = await run_cli(tmp_config, "retry", "deliveries", "--all")
    assert code == 0 and "4 dead rows made claimable again" in out
    async with running(config):
        await receiver.wait_for(lambda got: sum(r.path == "/gone" for r in got) == 5)
    rows = await fetch_rows(db)
    assert {rows[i]["status"] for i in [first, *later]} == {"delivered"}


async def test_a_rate_spaces_the_requests(db: str, receiver: Receiver) -> None:
    config = make_config(db, endpoints={"rate": 20})
    await install(config)
    async with running(config):
        await insert_rows(db, receiver.url, 10)
        await receiver.wait_count(10)
    times = sorted(r.at for r in receiver.received)
    # 20 a second: ten requests span at least 9 intervals of 50 ms (timers fire no earlier).
    assert times[-1] - times[0] >= 9 * 0.05 * 0.95


async def test_a_paused_endpoint_shows_in_relay_status(
    db: str, receiver: Receiver, tmp_config: Path
) -> None:
    receiver.behaviour = failing_until(asyncio.Event())
    breaker = {**BREAKER, "pause": 60, "max_pause": 60}
    raw = raw_config(db, endpoints={"max_in_flight": 1, "breaker": breaker})
    config = write_config(tmp_config, raw)
    await install(config)
    async with running(config) as relay:
        seen = watch_endpoints(relay)
        await insert_rows(db, receiver.url, 5)
        await next_change(seen, "paused")
        await relay.endpoint_states.flushed(1)
        code, out = await run_cli(tmp_config, "status")
    assert code == 0
    assert f"endpoint 127.0.0.1:{receiver.port}: paused by {config.worker_id}" in out
    assert "3 of 3 requests failed in 60s" in out
    # A relay that stops ends its pauses.
    code, out = await run_cli(tmp_config, "status")
    assert "paused by" not in out
