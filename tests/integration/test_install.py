"""`relay install` / uninstall against a real database, and the claim query's plan on a backlog."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from relay.db.store import Store, settle_batch_json
from relay.sources.base import Outcome, Settlement
from tests.support import install, make_config, queue_source

TRIGGERS = """
    SELECT tgrelid::regclass::text, tgname, tgtype
    FROM pg_trigger WHERE tgname LIKE 'relay\\_notify\\_%' AND NOT tgisinternal
    ORDER BY 1, 2
"""


async def query(db: str, text: str, params: dict[str, Any] | None = None) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        cur = await conn.execute(text, params)
        return await cur.fetchall()


def both_sources(db: str) -> Any:
    return make_config(
        db,
        sources={
            "deliveries": queue_source(),
            "events": {"kind": "outbox", "url": "http://127.0.0.1:9/hook"},
        },
    )


async def test_install_twice_gives_the_same_statement_level_triggers(db: str) -> None:
    config = both_sources(db)
    await install(config)
    first = await query(db, TRIGGERS)
    await install(config)
    second = await query(db, TRIGGERS)
    assert second == first
    assert [(table, name) for table, name, _ in second] == [
        ("relay.outbox", "relay_notify_events_insert"),
        ("relay.outbox", "relay_notify_events_update"),
        ("webhook_delivery_queue", "relay_notify_deliveries_insert"),
        ("webhook_delivery_queue", "relay_notify_deliveries_update"),
    ]
    # Bit 0 of tgtype is FOR EACH ROW: every trigger fires once per statement instead.
    assert all(tgtype & 1 == 0 for _, _, tgtype in second)


async def test_uninstall_removes_triggers_and_functions_but_keeps_the_outbox_rows(
    db: str,
) -> None:
    config = both_sources(db)
    await install(config)
    [(published,)] = await query(db, "SELECT relay.publish('order.created', '{\"id\": 1}')")
    store = Store(db, config.sources, channel=config.notify_channel)
    await store.open()
    try:
        await store.uninstall()
        await store.uninstall()  # idempotent
    finally:
        await store.close()
    assert await query(db, TRIGGERS) == []
    functions = await query(
        db,
        "SELECT p.oid::regprocedure::text FROM pg_proc AS p "
        "WHERE p.pronamespace = 'relay'::regnamespace",
    )
    assert functions == []
    assert await query(db, "SELECT id, topic, payload FROM relay.outbox") == [
        (published, "order.created", {"id": 1})
    ]
    # The demo table and its rows are not relay's: untouched as well.
    assert await query(db, "SELECT to_regclass('public.webhook_delivery_queue') IS NOT NULL") == [
        (True,)
    ]


async def explain(db: str, query: str, params: dict[str, Any]) -> str:
    """The plan of one of the demo source's compiled queries, as relay would run it."""
    config = make_config(db)
    store = Store(db, config.sources, channel=config.notify_channel)
    await store.open()
    try:
        await store.prepare()
        compiled = store.compiled["deliveries"].queries[query]
    finally:
        await store.close()
    async with (
        await psycopg.AsyncConnection.connect(db) as conn,
        conn.transaction(force_rollback=True),
    ):
        cur = await conn.execute(sql.SQL("EXPLAIN ") + compiled, params)
        return "\n".join(row[0] for row in await cur.fetchall())


async def test_claim_query_uses_the_waiting_index_on_a_large_delivered_backlog(db: str) -> None:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO webhook_delivery_queue (url, status, attempt_count, delivered_at) "
            "SELECT 'http://127.0.0.1:9/hook', 'delivered', 1, now() "
            "FROM generate_series(1, 50000)"
        )
        await conn.execute(
            "INSERT INTO webhook_delivery_queue (url, status, next_retry_at) "
            "SELECT 'http://127.0.0.1:9/hook', "
            "       CASE WHEN g % 2 = 0 THEN 'pending' ELSE 'failed' END, "
            "       CASE WHEN g % 2 = 0 THEN NULL ELSE now() - interval '1 minute' END "
            "FROM generate_series(1, 200) g"
        )
        await conn.execute("ANALYZE webhook_delivery_queue")
    plan = await explain(db, "claim", {"limit": 50, "lease_seconds": 30, "worker": "w"})
    assert "webhook_delivery_queue_waiting_idx" in plan, plan
    assert "Seq Scan" not in plan, plan


async def test_settle_query_looks_rows_up_by_key_whatever_the_statistics(db: str) -> None:
    # 20,000 pending rows analysed with none processing: joined only on the JSON batch, the
    # planner chose a sequential scan of the whole table for every settle.
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO webhook_delivery_queue (url) "
            "SELECT 'http://127.0.0.1:9/hook' FROM generate_series(1, 20000)"
        )
        await conn.execute("VACUUM ANALYZE webhook_delivery_queue")
    lease = datetime.now(UTC)
    batch = [Settlement(key, lease, Outcome.done, http_status=200) for key in range(1, 13)]
    keys = [s.key for s in batch]
    params = {"batch": settle_batch_json(batch), "keys": keys}
    plan = await explain(db, "settle", params)
    assert "Seq Scan on webhook_delivery_queue" not in plan, plan
    assert "Seq Scan on leases" not in plan, plan
    assert "webhook_delivery_queue_pkey" in plan, plan
