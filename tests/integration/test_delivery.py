"""Delivery end to end: real PostgreSQL, real HTTP on loopback, the relay running in-process.

Final row states are read after the `running` block ends: a graceful stop lets in-flight
deliveries finish and writes their settles, so no test polls the database.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiohttp import web

from relay import signing
from relay.sources.base import Claimed
from tests.support import (
    WAIT,
    Behaviour,
    Receiver,
    delivery_ids,
    fetch_rows,
    insert_rows,
    install,
    make_config,
    running,
)

# -- helpers -----------------------------------------------------------------------------------


async def insert_values(db: str, rows: list[dict[str, Any]]) -> list[int]:
    """Insert queue rows given as column dicts, all in ONE statement; returns their ids."""
    columns = sorted({c for row in rows for c in row})
    values = ", ".join(
        "(" + ", ".join(f"%({c}_{i})s" for c in columns) + ")" for i in range(len(rows))
    )
    params = {f"{c}_{i}": row.get(c) for i, row in enumerate(rows) for c in columns}
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        cur = await conn.execute(
            f"INSERT INTO webhook_delivery_queue ({', '.join(columns)}) "
            f"VALUES {values} RETURNING id",
            params,
        )
        return [r[0] for r in await cur.fetchall()]


async def execute(db: str, query: str, params: dict[str, Any] | None = None) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


@contextlib.asynccontextmanager
async def listening(db: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A separate connection that LISTENs on relay's channel, as an observer."""
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute("LISTEN relay")
        yield conn


async def notifications(
    conn: psycopg.AsyncConnection[Any], timeout: float, stop_after: int | None = None
) -> list[psycopg.Notify]:
    return [n async for n in conn.notifies(timeout=timeout, stop_after=stop_after)]


def blocked_until(gate: asyncio.Event) -> Behaviour:
    async def behaviour(_: web.Request, __: int) -> web.StreamResponse:
        async with asyncio.timeout(WAIT):
            await gate.wait()
        return web.Response(status=200, text="ok")

    return behaviour


# -- notifications and start-up ------------------------------------------------------------


async def test_10k_row_insert_sends_few_notifications_and_delivers_each_row_once(
    db: str, receiver: Receiver
) -> None:
    n = 10_000
    config = make_config(db, relay={"max_in_flight": 50, "batch_size": 200, "sweep_interval": 600})
    await install(config)
    async with (
        running(config) as relay,
        listening(db) as observer,
    ):
        sweeps = relay.sweeper.sweeps
        async with await psycopg.AsyncConnection.connect(db) as conn, conn.transaction():
            await conn.execute("SET LOCAL track_functions = 'pl'")
            cur = await conn.execute(
                "INSERT INTO webhook_delivery_queue (url, payload) "
                "SELECT %s, jsonb_build_object('n', g) FROM generate_series(1, %s) g "
                "RETURNING id",
                (receiver.url, n),
            )
            ids = [r[0] for r in await cur.fetchall()]
            cur = await conn.execute(
                "SELECT pg_stat_get_xact_function_calls('relay.notify_deliveries'::regproc)"
            )
            row = await cur.fetchone()
            trigger_calls = row[0] if row else None
        # The statement-level trigger ran once for the whole 10,000-row statement.
        assert trigger_calls == 1
        notes = await notifications(observer, timeout=WAIT, stop_after=1)
        assert notes, "the insert sent no notification"
        notes += await notifications(observer, timeout=0.5)
        await receiver.wait_count(n, timeout=90)
        # Anything the relay's own claims and settles sent while it delivered.
        notes += await notifications(observer, timeout=0.2)
        assert relay.sweeper.sweeps == sweeps  # found by the notification, not by a sweep
    assert 1 <= len(notes) <= 3, f"{len(notes)} notifications for one INSERT statement"
    assert {note.payload for note in notes} == {"deliveries"}
    got = receiver.ids()
    assert len(got) == n, f"{len(got) - len(set(got))} duplicate deliveries"
    assert set(got) == {f"deliveries_{i}" for i in ids}
    rows = await fetch_rows(db)
    assert {r["status"] for r in rows.values()} == {"delivered"}
    assert {r["attempt_count"] for r in rows.values()} == {1}


async def test_rows_committed_while_relay_was_stopped_are_delivered_at_start(
    db: str, receiver: Receiver
) -> None:
    # No `install`: no trigger, no notification; the start-up sweep must find them.
    config = make_config(db, relay={"sweep_interval": 600})
    ids = await insert_rows(db, receiver.url, 3)
    async with running(config):
        await receiver.wait_ids({f"deliveries_{i}" for i in ids}, timeout=10)
    rows = await fetch_rows(db)
    assert [rows[i]["status"] for i in ids] == ["delivered"] * 3
    assert sorted(receiver.ids()) == sorted(f"deliveries_{i}" for i in ids)


# -- failures and retries --------------------------------------------------------------------


async def test_http_500_then_200_is_delivered_on_retry_with_the_same_webhook_id(
    db: str, receiver: Receiver
) -> None:
    async def fail_once(_: web.Request, nth: int) -> web.StreamResponse:
        return web.Response(status=500, text="boom") if nth == 1 else web.Response(text="ok")

    receiver.behaviour = fail_once
    config = make_config(db)
    await install(config)
    async with running(config):
        [key] = await insert_rows(db, receiver.url, 1)
        await receiver.wait_count(2, timeout=10)
    assert receiver.ids() == [f"deliveries_{key}"] * 2
    assert [r.headers["relay-attempt"] for r in receiver.received] == ["1", "2"]
    assert receiver.received[0].body == receiver.received[1].body
    row = (await fetch_rows(db))[key]
    assert row["status"] == "delivered"
    assert row["attempt_count"] == 2
    assert row["last_error"] is None
    assert row["last_response_status"] == 200
    assert row["delivered_at"] is not None


async def test_http_500_forever_ends_dead_letter_after_max_attempts(
    db: str, receiver: Receiver
) -> None:
    async def always_500(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=500, text="still broken")

    receiver.behaviour = always_500
    config = make_config(db)
    await install(config)
    async with running(config):
        [key] = await insert_rows(db, receiver.url, 1, max_attempts=3)
        await receiver.wait_count(3, timeout=10)
    assert receiver.ids() == [f"deliveries_{key}"] * 3
    row = (await fetch_rows(db))[key]
    assert row["status"] == "dead_letter"
    assert row["attempt_count"] == 3
    assert row["last_response_status"] == 500
    assert "HTTP 500" in row["last_error"]
    assert "still broken" in row["last_error"]
    assert row["delivered_at"] is None


async def test_receiver_that_hangs_past_http_timeout_is_retried_and_delivered(
    db: str, receiver: Receiver
) -> None:
    config = make_config(db, http={"timeout": 0.5})
    await install(config)
    never = asyncio.Event()  # set only when the test ends, so the hung handler can return
    seen_by_second_attempt: dict[str, Any] = {}

    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as peek:

        async def hang_once(request: web.Request, nth: int) -> web.StreamResponse:
            if nth == 1:
                await never.wait()
                return web.Response(text="too late")
            # The row as the second attempt finds it: what the first attempt recorded.
            cur = await peek.execute(
                "SELECT status, attempt_count, last_error FROM webhook_delivery_queue "
                "WHERE id = %s",
                (int(request.headers["webhook-id"].rpartition("_")[2]),),
            )
            seen_by_second_attempt["row"] = await cur.fetchone()
            return web.Response(text="ok")

        receiver.behaviour = hang_once
        try:
            async with running(config):
                [key] = await insert_rows(db, receiver.url, 1)
                await receiver.wait_count(2, timeout=10)
        finally:
            never.set()

    assert receiver.ids() == [f"deliveries_{key}"] * 2
    status, attempts, last_error = seen_by_second_attempt["row"]
    assert (status, attempts) == ("processing", 2)
    assert "no response within 0.5s" in last_error and "http.timeout" in last_error
    row = (await fetch_rows(db))[key]
    assert row["status"] == "delivered"
    assert row["attempt_count"] == 2


async def test_invalid_url_row_is_dead_and_valid_row_in_same_statement_is_delivered(
    db: str, receiver: Receiver
) -> None:
    config = make_config(db)
    await install(config)
    async with running(config):
        bad_text, bad_scheme, good = await insert_values(
            db, [{"url": "not a url"}, {"url": "ftp://x"}, {"url": receiver.url}]
        )
        await receiver.wait_ids({f"deliveries_{good}"}, timeout=10)
    assert receiver.ids() == [f"deliveries_{good}"]
    rows = await fetch_rows(db)
    assert rows[good]["status"] == "delivered"
    for key, url in ((bad_text, "not a url"), (bad_scheme, "ftp://x")):
        assert rows[key]["status"] == "dead_letter"
        assert "invalid target URL" in rows[key]["last_error"]
        assert repr(url) in rows[key]["last_error"]
        assert rows[key]["last_response_status"] is None


async def test_row_deleted_after_its_notification_is_skipped_and_later_rows_delivered(
    db: str, receiver: Receiver
) -> None:
    # One delivery slot, held by a blocked request, and nothing claimed ahead of it: the
    # notified row cannot be claimed before the test deletes it.
    gate = asyncio.Event()
    receiver.behaviour = blocked_until(gate)
    config = make_config(db, relay={"max_in_flight": 1, "claim_ahead": 0, "sweep_interval": 600})
    await install(config)
    async with running(config) as relay, listening(db) as observer:
        [blocker] = await insert_rows(db, receiver.url, 1)
        await receiver.wait_count(1, timeout=10)
        assert await notifications(observer, timeout=WAIT, stop_after=1)  # the blocker's
        [deleted] = await insert_rows(db, receiver.url, 1)
        assert await notifications(observer, timeout=WAIT, stop_after=1)
        await execute(db, "DELETE FROM webhook_delivery_queue WHERE id = %(id)s", {"id": deleted})
        gate.set()
        [later] = await insert_rows(db, receiver.url, 1)
        await receiver.wait_ids({f"deliveries_{blocker}", f"deliveries_{later}"}, timeout=10)
        lost = relay.settler.lost
    assert f"deliveries_{deleted}" not in receiver.ids()
    assert lost == 0
    rows = await fetch_rows(db)
    assert deleted not in rows
    assert rows[blocker]["status"] == rows[later]["status"] == "delivered"


async def test_row_inserted_and_deleted_in_one_transaction_is_never_requested(
    db: str, receiver: Receiver
) -> None:
    config = make_config(db)
    await install(config)
    async with running(config):
        async with await psycopg.AsyncConnection.connect(db) as conn, conn.transaction():
            cur = await conn.execute(
                "INSERT INTO webhook_delivery_queue (url) VALUES (%s) RETURNING id",
                (receiver.url,),
            )
            row = await cur.fetchone()
            assert row is not None
            deleted = row[0]
            await conn.execute("DELETE FROM webhook_delivery_queue WHERE id = %s", (deleted,))
            cur = await conn.execute(
                "INSERT INTO webhook_delivery_queue (url) VALUES (%s) RETURNING id",
                (receiver.url,),
            )
            row = await cur.fetchone()
            assert row is not None
            good = row[0]
        await receiver.wait_ids({f"deliveries_{good}"}, timeout=10)
    assert receiver.ids() == [f"deliveries_{good}"]
    assert (await fetch_rows(db))[good]["status"] == "delivered"


async def test_row_deleted_while_in_flight_does_not_stop_later_deliveries(
    db: str, receiver: Receiver
) -> None:
    gate = asyncio.Event()
    receiver.behaviour = blocked_until(gate)
    config = make_config(db, relay={"sweep_interval": 600})
    await install(config)
    async with running(config) as relay:
        [deleted] = await insert_rows(db, receiver.url, 1)
        await receiver.wait_count(1, timeout=10)
        await execute(db, "DELETE FROM webhook_delivery_queue WHERE id = %(id)s", {"id": deleted})
        gate.set()
        [later] = await insert_rows(db, receiver.url, 1)
        await receiver.wait_ids({f"deliveries_{later}"}, timeout=10)
        lost = relay.settler.lost
    assert lost == 1  # the settle found the row gone and let it be
    rows = await fetch_rows(db)
    assert deleted not in rows
    assert rows[later]["status"] == "delivered"


# -- back-pressure and timing ----------------------------------------------------------------


async def test_requests_never_exceed_max_in_flight_and_claims_run_one_batch_ahead(
    db: str, receiver: Receiver
) -> None:
    gate = asyncio.Event()
    receiver.behaviour = blocked_until(gate)
    # (One receiver: its endpoint may take every slot.)
    config = make_config(
        db, relay={"max_in_flight": 5, "batch_size": 10}, endpoints={"max_in_flight": 5}
    )
    await install(config)
    count = "SELECT count(*) FROM webhook_delivery_queue WHERE status = %(s)s"
    async with running(config) as relay:
        claimed = asyncio.Event()
        real_claim = relay.store.claim

        async def observed_claim(*args: Any) -> list[Claimed]:
            rows = await real_claim(*args)
            if relay.slots.free == 0:
                claimed.set()
            return rows

        relay.store.claim = observed_claim  # type: ignore[method-assign]
        ids = await insert_rows(db, receiver.url, 100)
        await receiver.wait_count(5, timeout=10)
        # With every request stuck, the claimer fills the budget (5 requests + one batch of 10
        # waiting) and then must stop claiming.
        await asyncio.wait_for(claimed.wait(), 10)
        [(processing,)] = await execute(db, count, {"s": "processing"})
        [(pending,)] = await execute(db, count, {"s": "pending"})
        in_receiver = len(receiver.received)
        queued, busy = relay.deliverer.queued, relay.deliverer.in_flight
        gate.set()
        await receiver.wait_count(100, timeout=WAIT)
    assert in_receiver == 5, f"{in_receiver} requests at once with max_in_flight 5"
    assert (busy, queued) == (5, 10)
    assert processing == 15, f"{processing} rows claimed with 5 slots and batch_size 10"
    assert pending == 85
    assert sorted(receiver.ids()) == sorted(f"deliveries_{i}" for i in ids)
    rows = await fetch_rows(db)
    assert {r["status"] for r in rows.values()} == {"delivered"}


async def test_claims_are_extended_while_their_rows_wait_and_run(
    db: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # One request slot and one row claimed ahead of it; claims of 1.5 s, requests of up to 3 s.
    # The first request hangs until its timeout; meanwhile relay's heartbeats keep both claims,
    # so no other worker could take them, nothing is handed back, and each row is sent once
    # per attempt.
    async def first_hangs(_: web.Request, nth: int) -> web.StreamResponse:
        if len(receiver.received) == 1:
            await asyncio.sleep(5)  # the receiver hangs; relay's timeout ends it
        return web.Response(text="ok")

    receiver.behaviour = first_hangs
    config = make_config(
        db,
        relay={"max_in_flight": 1, "claim_ahead": 1, "claim_timeout": 1.5, "sweep_interval": 600},
        http={"timeout": 3},
    )
    await install(config)
    async with running(config) as relay:
        hung, waiting = await insert_rows(db, receiver.url, 2)
        await receiver.wait_for(lambda got: len(got) >= 3, timeout=WAIT)
        lost = relay.settler.lost
        heartbeats = relay.deliverer.heartbeats
    by_id: dict[str, list[str]] = {}
    for r in receiver.received:
        by_id.setdefault(r.id, []).append(r.headers["relay-attempt"])
    assert by_id[f"deliveries_{waiting}"] == ["1"]
    assert by_id[f"deliveries_{hung}"] == ["1", "2"]
    assert lost == 0  # every settle found its claim still held
    assert heartbeats >= 1
    assert not [r for r in caplog.records if "delivery.released" in r.getMessage()]
    rows = await fetch_rows(db)
    assert rows[waiting]["attempt_count"] == 1
    assert {r["status"] for r in rows.values()} == {"delivered"}


async def test_retry_is_delivered_when_due_not_at_the_next_sweep(
    db: str, receiver: Receiver
) -> None:
    async def fail_once(_: web.Request, nth: int) -> web.StreamResponse:
        return web.Response(status=503) if nth == 1 else web.Response(text="ok")

    receiver.behaviour = fail_once
    config = make_config(
        db, relay={"sweep_interval": 600}, retry={"base": 0.3, "jitter": 0, "max_delay": 60}
    )
    await install(config)
    async with running(config) as relay:
        sweeps = relay.sweeper.sweeps
        [key] = await insert_rows(db, receiver.url, 1)
        await receiver.wait_count(2, timeout=10)
        assert relay.sweeper.sweeps == sweeps  # no sweep found it: the timer did
    first, second = receiver.received
    assert first.id == second.id == f"deliveries_{key}"
    gap = second.at - first.at
    assert 0.25 <= gap < 10, f"retry came {gap:.2f}s after the failure (scheduled for 0.3s)"
    assert (await fetch_rows(db))[key]["status"] == "delivered"


# -- the outbox --------------------------------------------------------------------------------


def outbox_config(db: str, receiver: Receiver) -> Any:
    return make_config(
        db, sources={"events": {"kind": "outbox", "topics": {"order.*": receiver.url}}}
    )


async def fetch_outbox(db: str) -> dict[int, dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute("SELECT * FROM relay.outbox ORDER BY id")
        return {r["id"]: r for r in await cur.fetchall()}


async def test_outbox_publish_is_delivered_to_the_topic_target(db: str, receiver: Receiver) -> None:
    config = outbox_config(db, receiver)
    await install(config)
    async with running(config):
        [(key,)] = await execute(
            db, """SELECT relay.publish('order.created', '{"id": 7}'::jsonb)"""
        )
        await receiver.wait_count(1, timeout=10)
    [got] = receiver.received
    assert got.json == {"id": 7}
    assert got.headers["relay-topic"] == "order.created"
    assert got.id == f"events_{key}"
    row = (await fetch_outbox(db))[key]
    assert row["status"] == "delivered"
    assert row["attempts"] == 1
    assert row["delivered_at"] is not None


async def test_outbox_topic_without_target_is_dead_naming_the_topic(
    db: str, receiver: Receiver
) -> None:
    config = outbox_config(db, receiver)
    await install(config)
    async with running(config):
        # Both in one transaction: the unroutable row has the lower id, so it is claimed no
        # later than the routable one whose arrival the test waits for.
        [(orphan, routed)] = await execute(
            db,
            "SELECT relay.publish('invoice.paid', '{}'::jsonb), "
            "relay.publish('order.shipped', '{}'::jsonb)",
        )
        await receiver.wait_ids({f"events_{routed}"}, timeout=10)
    assert receiver.ids() == [f"events_{routed}"]
    rows = await fetch_outbox(db)
    assert rows[routed]["status"] == "delivered"
    assert rows[orphan]["status"] == "dead"
    assert "'invoice.paid'" in rows[orphan]["last_error"]


# -- signing -----------------------------------------------------------------------------------


async def test_secret_column_signs_with_a_verifiable_standard_webhooks_signature(
    db: str, receiver: Receiver
) -> None:
    key_bytes = bytes(range(32))
    secret = "whsec_" + base64.b64encode(key_bytes).decode()
    config = make_config(db)
    await install(config)
    async with running(config):
        [key] = await insert_rows(db, receiver.url, 1, secret=secret)
        await receiver.wait_count(1, timeout=10)
    [got] = receiver.received
    header = got.headers["webhook-signature"]
    timestamp = int(got.headers["webhook-timestamp"])
    assert got.id == f"deliveries_{key}"
    assert header.startswith("v1,")
    assert abs(timestamp - time.time()) < 60
    assert signing.verify(key_bytes, got.id, timestamp, got.body, header)
    # The same, computed from the Standard Webhooks spec rather than with relay's own code.
    content = f"{got.id}.{timestamp}.".encode() + got.body
    expected = base64.b64encode(hmac.new(key_bytes, content, hashlib.sha256).digest()).decode()
    assert header.split() == [f"v1,{expected}"]
    # And the signature is bound to the key and the content.
    assert not signing.verify(b"another key", got.id, timestamp, got.body, header)
    assert not signing.verify(key_bytes, got.id, timestamp, got.body + b" ", header)


async def test_a_nul_byte_in_an_error_response_does_not_fail_the_settles_beside_it(
    db: str, receiver: Receiver
) -> None:
    # PostgreSQL text cannot hold NUL. Quoted as it came in last_error, it failed the whole
    # settle batch, successes included, and those rows waited for their claims to expire.
    async def nul_for_the_first(request: web.Request, __: int) -> web.StreamResponse:
        if request.headers["webhook-id"] == f"deliveries_{ids[0]}":
            return web.Response(status=500, body=b"bad\x00body")
        return web.Response(text="ok")

    receiver.behaviour = nul_for_the_first
    config = make_config(db, retry={"base": 60, "max_delay": 60})
    await install(config)
    async with running(config) as relay:
        ids = await insert_rows(db, receiver.url, 3)
        await receiver.wait_ids(delivery_ids(ids))
    # The graceful stop wrote every settle; none was rejected.
    assert relay.settler.lost == 0
    rows = await fetch_rows(db)
    assert (rows[ids[0]]["status"], rows[ids[0]]["last_error"]) == ("failed", "HTTP 500: badbody")
    assert [rows[i]["status"] for i in ids[1:]] == ["delivered", "delivered"]


async def test_a_receivers_cookies_are_never_sent_back(db: str, receiver: Receiver) -> None:
    async def sets_a_cookie(_: web.Request, __: int) -> web.StreamResponse:
        response = web.Response(text="ok")
        response.set_cookie("session", "secret-of-this-receiver")
        return response

    receiver.behaviour = sets_a_cookie
    # A host name, not an IP address: a cookie jar takes cookies only from named hosts.
    url = receiver.url.replace("127.0.0.1", "localhost")
    config = make_config(db, relay={"max_in_flight": 1})
    await install(config)
    async with running(config):
        first = await insert_rows(db, url, 1)
        await receiver.wait_ids(delivery_ids(first))
        second = await insert_rows(db, url, 1)
        await receiver.wait_ids(delivery_ids(second))
    assert "Set-Cookie" not in receiver.received[0].headers  # what relay sent, not the answer
    assert all("Cookie" not in r.headers for r in receiver.received)


# -- logs --------------------------------------------------------------------------------------


async def test_successes_are_counted_in_progress_lines_not_logged_one_by_one(
    db: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    config = make_config(db)
    await install(config)
    async with running(config):
        ids = await insert_rows(db, receiver.url, 3)
        await receiver.wait_ids(delivery_ids(ids))
    # Stopping writes the last progress line and the totals.
    lines = [r.getMessage() for r in caplog.records]
    assert not any("delivery.succeeded" in line for line in lines)
    progress = [line for line in lines if line.startswith("delivery.progress")]
    assert progress == ["delivery.progress delivered=3 failed=0 in_flight=0 queued=0"]
    assert "relay.stopped delivered=3 failed=0" in lines
