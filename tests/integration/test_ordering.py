"""Per-key ordering (`ordering_key`) on relay's outbox: a key's rows arrive one at a time in
the order they were written, through failures and retries and with several relays; other keys
go on meanwhile. Real receivers on loopback, a real PostgreSQL, relays in-process."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from typing import Any

import orjson
import psycopg
import pytest
from aiohttp import web
from psycopg import sql

from relay.db.store import Store
from tests.support import WAIT, Receiver, install, make_config, queue_source, running

KINDS = ["outbox", "table", "lean"]  # relay's outbox; the demo queue, with and without processing


def ordered(kind: str, receiver: Receiver, **keys: Any) -> dict[str, Any]:
    """A source keyed by the payload's "doc"."""
    if kind == "outbox":
        base: dict[str, Any] = {"kind": "outbox", "url": receiver.url}
    else:
        base = queue_source()
        base.pop("max_attempts_column")  # retry.max_attempts, as the outbox
        if kind == "lean":
            base.pop("processing")
    return {"events": {**base, "ordering_key": "payload->>'doc'", **keys}}


async def write_docs(db: str, kind: str, target: str, rows: list[tuple[str, int]]) -> None:
    """Each (doc, seq) written in one transaction, in the order given (ids in that order)."""
    docs, seqs = [d for d, _ in rows], [s for _, s in rows]
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        if kind == "outbox":
            await conn.execute(
                "SELECT relay.publish('t', jsonb_build_object('doc', d, 'seq', s)) "
                "FROM unnest(%s::text[], %s::int[]) WITH ORDINALITY AS v(d, s, i) ORDER BY i",
                (docs, seqs),
            )
        else:
            await conn.execute(
                "INSERT INTO webhook_delivery_queue (url, payload) "
                "SELECT %s, jsonb_build_object('doc', d, 'seq', s) "
                "FROM unnest(%s::text[], %s::int[]) WITH ORDINALITY AS v(d, s, i) ORDER BY i",
                (target, docs, seqs),
            )


async def statuses(db: str, kind: str, doc: str) -> list[tuple[str, str]]:
    table = "relay.outbox" if kind == "outbox" else "webhook_delivery_queue"
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        cur = await conn.execute(
            f"SELECT payload->>'seq', status FROM {table} WHERE payload->>'doc' = %s ORDER BY id",
            (doc,),
        )
        return [(seq, status) for seq, status in await cur.fetchall()]


def doc_seq(body: bytes) -> tuple[str, int]:
    payload = orjson.loads(body)
    return payload["doc"], payload["seq"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_keys_rows_arrive_in_order_when_the_first_fails_twice(
    db: str, receiver: Receiver, kind: str
) -> None:
    async def behaviour(request: web.Request, _: int) -> web.StreamResponse:
        doc, seq = doc_seq(await request.read())
        fails = sum(1 for r in receiver.received if doc_seq(r.body) == ("A", 1))
        if (doc, seq) == ("A", 1) and fails <= 2:
            return web.Response(status=503, text="not yet")
        return web.Response(text="ok")

    receiver.behaviour = behaviour
    # No sweep to fall back on: a key's next row is claimed because its head was settled.
    config = make_config(db, sources=ordered(kind, receiver), relay={"sweep_interval": 600})
    await install(config)
    async with running(config):
        await write_docs(db, kind, receiver.url, [("A", 1), ("A", 2), ("A", 3), ("B", 1), ("B", 2)])
        await receiver.wait_count(7)
    arrivals = [doc_seq(r.body) for r in receiver.received]
    # A's requests in order, its second row only after its first went through (third try);
    # B's rows were not held back by A's failures.
    assert [a for a in arrivals if a[0] == "A"] == [("A", 1)] * 3 + [("A", 2), ("A", 3)]
    assert [a for a in arrivals if a[0] == "B"] == [("B", 1), ("B", 2)]
    assert arrivals.index(("B", 2)) < arrivals.index(("A", 2))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("after_dead", ["skip", "hold"])
async def test_a_dead_row_is_skipped_past_or_holds_its_key(
    db: str, receiver: Receiver, after_dead: str, kind: str
) -> None:
    async def behaviour(request: web.Request, _: int) -> web.StreamResponse:
        if doc_seq(await request.read()) == ("A", 1):
            return web.Response(status=500, text="always")
        return web.Response(text="ok")

    receiver.behaviour = behaviour
    config = make_config(
        db,
        sources=ordered(kind, receiver, ordering_dead=after_dead),
        retry={"max_attempts": 2},
    )
    await install(config)
    async with running(config):
        await write_docs(db, kind, receiver.url, [("A", 1), ("A", 2), ("B", 1)])
        # A1 twice (dead), B1; and with "skip", A2 after A1 went dead.
        await receiver.wait_count(4 if after_dead == "skip" else 3)
        await write_docs(db, kind, receiver.url, [("B", 2)])  # another key's: goes through
        await receiver.wait_for(lambda got: ("B", 2) in [doc_seq(r.body) for r in got])
    arrivals = [doc_seq(r.body) for r in receiver.received]
    if after_dead == "skip":
        assert arrivals.index(("A", 2)) > max(i for i, a in enumerate(arrivals) if a == ("A", 1))
    else:
        assert ("A", 2) not in arrivals  # held until A1 is retried
    dead = "dead" if kind == "outbox" else "dead_letter"
    assert await statuses(db, kind, "A") == [
        ("1", dead),
        ("2", "delivered" if after_dead == "skip" else "pending"),
    ]


@pytest.mark.parametrize("kind", KINDS)
async def test_several_relays_deliver_each_keys_rows_one_at_a_time_in_order(
    db: str, receiver: Receiver, kind: str
) -> None:
    keys, per_key = 30, 10
    in_flight: Counter[str] = Counter()
    most: Counter[str] = Counter()
    delivered: dict[str, list[int]] = defaultdict(list)
    all_delivered = asyncio.Event()
    chance = random.Random(14)

    async def behaviour(request: web.Request, _: int) -> web.StreamResponse:
        doc, seq = doc_seq(await request.read())
        in_flight[doc] += 1
        most[doc] = max(most[doc], in_flight[doc])
        try:
            await asyncio.sleep(chance.random() / 200)  # hold the key a few ms
            if chance.random() < 0.2:
                return web.Response(status=500, text="random failure")
            delivered[doc].append(seq)
            if sum(len(v) for v in delivered.values()) == keys * per_key:
                all_delivered.set()
            return web.Response(text="ok")
        finally:
            in_flight[doc] -= 1

    receiver.behaviour = behaviour
    config = make_config(
        db,
        sources=ordered(kind, receiver),
        retry={"max_attempts": 20},
        # The failures are there to hold keys back, not to judge the endpoint: a run of them
        # would pause it for longer than the test waits.
        endpoints={"breaker": {"enabled": False}},
    )
    await install(config)
    rows = [(f"d{k}", s) for s in range(1, per_key + 1) for k in range(keys)]
    async with running(config), running(config), running(config):
        await write_docs(db, kind, receiver.url, rows)
        await asyncio.wait_for(all_delivered.wait(), WAIT)
    assert max(most.values()) == 1, "two requests of one key at once"
    assert all(seqs == list(range(1, per_key + 1)) for seqs in delivered.values()), {
        k: v for k, v in delivered.items() if v != sorted(v)
    }


async def test_the_ordered_claim_probes_each_candidates_key_on_a_large_backlog(
    db: str, receiver: Receiver
) -> None:
    # 100,000 rows waiting over 1,000 keys, a key's head in flight for 100 of them: the claim
    # walks the pending rows in id order and looks each candidate's earlier rows up in the
    # ordering index, never scanning the table.
    config = make_config(db, sources=ordered("outbox", receiver))
    await install(config)
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO relay.outbox (topic, payload, status) "
            "SELECT 't', jsonb_build_object('doc', 'd' || (g % 1000), 'seq', g / 1000), "
            "       CASE WHEN g <= 100 THEN 'processing' ELSE 'pending' END "
            "FROM generate_series(1, 100000) g"
        )
        await conn.execute("VACUUM ANALYZE relay.outbox")
    store = Store(db, config.sources, channel=config.notify_channel)
    await store.open()
    try:
        await store.prepare()
        claim = store.compiled["events"].queries["claim"]
    finally:
        await store.close()
    async with (
        await psycopg.AsyncConnection.connect(db) as conn,
        conn.transaction(force_rollback=True),
    ):
        cur = await conn.execute(
            sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + claim,
            {"limit": 100, "lease_seconds": 30, "worker": "w"},
        )
        plan = "\n".join(row[0] for row in await cur.fetchall())
        cur = await conn.execute(
            "SELECT count(DISTINCT payload->>'doc') FROM relay.outbox WHERE status = 'processing'"
        )
        claimed_keys = (await cur.fetchone() or [0])[0]
    assert "Seq Scan" not in plan, plan
    assert "outbox_relay_order_" in plan, plan
    # The heads of 100 keys not in flight: one per key, no key twice.
    assert claimed_keys == 200, plan


async def test_install_makes_the_ordering_index_and_a_missing_one_is_named(
    db: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(db, sources=ordered("table", receiver))
    await install(config)
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes "
            "WHERE tablename = 'webhook_delivery_queue' AND indexname LIKE '%relay_order%'"
        )
        [(name, definition)] = await cur.fetchall()
        assert "((payload ->> 'doc'::text)), id)" in definition
        assert "'dead_letter'" in definition  # dead rows too, for ordering_dead = "hold"
        await conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    async with running(config):
        pass
    [record] = [r for r in caplog.records if "ordering.index_missing" in r.getMessage()]
    assert name in record.getMessage() and "CREATE INDEX IF NOT EXISTS" in record.getMessage()
