"""A table source keeps its claims, their expiry and its attempt count in relay.leases: the
user's columns keep the application's meaning, and the application's own moves win."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from aiohttp import web

from tests import systems
from tests.support import (
    Receiver,
    insert_rows,
    install,
    make_config,
    prepared_store,
    queue_source,
    running,
)


async def execute(db: str, query: str, params: dict[str, Any] | None = None) -> None:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute(query, params)


async def fail_first(_: web.Request, nth: int) -> web.Response:
    return web.Response(status=503) if nth == 1 else web.Response(text="ok")


@pytest.mark.parametrize("claims", ["leases", "in_the_row"])
async def test_a_row_the_application_puts_back_to_pending_during_its_retry_wait_goes_at_once(
    db: str, receiver: Receiver, claims: str
) -> None:
    receiver.behaviour = fail_first
    source = queue_source()
    if claims == "in_the_row":
        # Claims kept in a column given to relay (lease_column), not in relay.leases.
        await execute(db, "ALTER TABLE webhook_delivery_queue ADD COLUMN relay_lease timestamptz")
        source["lease_column"] = "relay_lease"
    # The retry would wait an hour; the sweep comes every 10 minutes.
    config = make_config(
        db,
        sources={"deliveries": source},
        relay={"sweep_interval": 600},
        retry={"base": 3600, "max_delay": 3600},
    )
    await install(config)
    await systems.watch(db, "webhook_delivery_queue")
    async with running(config):
        [row] = await insert_rows(db, receiver.url, 1)
        await receiver.wait_count(1)
        waiting = await wait_status(db, row, "failed")
        assert waiting["attempt_count"] == 1
        if claims == "in_the_row":
            # relay's retry time: in its column, an hour ahead.
            assert waiting["relay_lease"] > waiting["created_at"] + timedelta(minutes=59)
        # The operator retries it now, as system 2's runbook says: back to pending, due now.
        # (relay's own retry time is in relay.leases; the write-back copied it to next_retry_at.)
        assert waiting["next_retry_at"] is not None
        await execute(
            db,
            "UPDATE webhook_delivery_queue SET status = 'pending', next_retry_at = NULL "
            "WHERE id = %(id)s",
            {"id": row},
        )
        await receiver.wait_count(2)
        done = await wait_status(db, row, "delivered")
        leases = await systems.value(db, "SELECT count(*) FROM relay.leases")
    # A fresh start: attempt 1 again, not the 2nd of the old count.
    assert [r.headers["relay-attempt"] for r in receiver.received] == ["1", "1"]
    assert done["attempt_count"] == 1
    assert leases == 0  # settled for good: no lease kept (or ever taken, in the row)
    if claims == "in_the_row":
        assert done["relay_lease"] is None


async def test_the_due_column_is_only_read(db: str, receiver: Receiver) -> None:
    receiver.behaviour = fail_first
    config = make_config(db, sources={"deliveries": queue_source_without_write_back()})
    await install(config)
    await systems.watch(db, "webhook_delivery_queue")
    async with running(config):
        [row] = await insert_rows(db, receiver.url, 1)
        await receiver.wait_count(2)
        done = await wait_status(db, row, "delivered")
    # relay neither wrote its claim's expiry nor its retry time there.
    assert done["next_retry_at"] is None


def queue_source_without_write_back(**extra: Any) -> dict[str, Any]:
    from tests.support import queue_source

    source = {k: v for k, v in queue_source(**extra).items() if v is not None}
    del source["on_failure"]
    return source


async def wait_status(db: str, row: int, status: str) -> dict[str, Any]:
    """The row once it has `status`, woken by each change to the table (systems.watch)."""
    rows = await systems.wait_rows(
        db,
        "SELECT * FROM webhook_delivery_queue WHERE id = %(id)s",
        {"id": row},
        lambda found: bool(found) and found[0]["status"] == status,
    )
    return rows[0]


async def test_a_claim_that_began_before_another_relays_claim_committed_leaves_the_row(
    db: str,
) -> None:
    # Relay B's claim starts, then (its filter slow on row 1) relay A claims rows 1 and 2 and
    # commits; B then locks row 1, which A no longer holds a lock on, with B's view of the
    # leases from before A's. B must not take the row: A's lease stands.
    from relay import config as config_mod
    from relay.db.store import Store
    from tests.support import raw_config

    slow = "CASE WHEN id = 1 THEN pg_sleep(1.5) IS NOT NULL ELSE TRUE END"
    configs = {
        name: config_mod.from_mapping(
            raw_config(db, sources={"deliveries": queue_source_without_write_back(**extra)}),
            {},
        )
        # No processing status, no attempts column: a claim writes nothing to the row, so
        # nothing but the lease tells B the row is taken.
        for name, extra in (
            ("a", {"processing": None, "attempts": None}),
            ("b", {"processing": None, "attempts": None, "filter": slow}),
        )
    }
    await install(configs["a"])
    await insert_rows(db, "http://127.0.0.1:9/", 2)
    stores = {n: Store(c.database_url, c.sources) for n, c in configs.items()}
    for store in stores.values():
        await store.open()
        await store.prepare()
    try:
        b_claim = asyncio.create_task(stores["b"].claim("deliveries", 10, 30))
        # B is inside its statement (sleeping on row 1's filter) before A claims. Nothing
        # notifies that, so the server's activity view is polled, bounded.
        async with (
            await psycopg.AsyncConnection.connect(db, autocommit=True) as conn,
            asyncio.timeout(10),
        ):
            while not await (  # noqa: ASYNC110
                await conn.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'")
            ).fetchone():
                await asyncio.sleep(0.01)
        a_rows = await stores["a"].claim("deliveries", 10, 30)
        b_rows = await b_claim
    finally:
        for store in stores.values():
            await store.close()
    assert sorted(r.key for r in a_rows) == [1, 2]
    assert b_rows == []


LEASE_COLLATIONS = (
    "SELECT a.attname::text, c.collname::text FROM pg_attribute AS a "
    "JOIN pg_collation AS c ON c.oid = a.attcollation "
    "WHERE a.attrelid = 'relay.leases'::regclass AND a.attname IN ('source', 'key') "
    "ORDER BY 1"
)


async def test_leases_from_before_the_c_collation_still_settle_and_install_converts_them(
    db: str, receiver: Receiver
) -> None:
    # relay.leases as an earlier install left it: keys in the database's collation. A relay
    # of this version started before `relay install` must still claim and settle (the settle
    # compares its keys byte by byte whatever their collation); `relay install` converts them.
    receiver.behaviour = fail_first
    config = make_config(db)
    await install(config)
    await execute(
        db,
        'ALTER TABLE relay.leases ALTER COLUMN source TYPE text COLLATE "default", '
        'ALTER COLUMN key TYPE text COLLATE "default"',
    )
    await systems.watch(db, "webhook_delivery_queue")
    async with running(config) as relay:
        [row] = await insert_rows(db, receiver.url, 1)
        await receiver.wait_count(2)  # failed once (its lease kept), then delivered
        await wait_status(db, row, "delivered")
    assert relay.settler.lost == 0
    assert await systems.rows(db, "SELECT * FROM relay.leases") == []
    await install(config)
    found = await systems.rows(db, LEASE_COLLATIONS)
    assert [(r["attname"], r["collname"]) for r in found] == [("key", "C"), ("source", "C")]


async def test_a_claimed_row_moved_back_to_pending_is_not_claimed_while_its_lease_holds(
    db: str,
) -> None:
    # With a processing status mapped, a pending row's lease is not looked up before it is
    # locked (a claimed row is processing, not pending): the claim's insert of the lease must
    # still leave alone a row whose claim holds, and take it once the claim has expired.
    config = make_config(db)
    await install(config)
    [row] = await insert_rows(db, "http://127.0.0.1:9/", 1)
    async with prepared_store(config) as store:
        [first] = await store.claim("deliveries", 10, 30)
        await execute(
            db,
            "UPDATE webhook_delivery_queue SET status = 'pending' WHERE id = %(id)s",
            {"id": row},
        )
        assert await store.claim("deliveries", 10, 30) == []
        await execute(db, "UPDATE relay.leases SET due = now() - interval '1 second'")
        [second] = await store.claim("deliveries", 10, 30)
    assert (first.key, first.attempt) == (row, 1)
    assert (second.key, second.attempt) == (row, 2)  # the expired claim counted
