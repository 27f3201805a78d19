"""Heartbeat-extended claims (issue 9): a claim of 1 s while a request runs for 2.5 s (http.timeout
4 s). relay extends the claim while the request is in flight and writes the heartbeat column, so
the row is delivered once: neither a second relay sweeping every second beside it nor anyone
else's claim takes it over."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from aiohttp import web

from relay.db.store import Store
from tests import systems
from tests.integration.user_tables import execute, table_config, table_source
from tests.support import Receiver, install, running

TASKS = """
CREATE TABLE tasks (
    id            serial PRIMARY KEY,
    status        text NOT NULL DEFAULT 'pending',
    worker_id     text,
    heartbeat_at  timestamptz,
    payload       jsonb NOT NULL DEFAULT '{}'
);
"""
CLAIM = 1.0  # relay.claim_timeout
TAKES = 2.5  # how long the receiver works on the request


def relay_config(db: str, url: str, worker: str) -> Any:
    source = table_source(
        "tasks",
        url,
        heartbeat="heartbeat_at",
        payload="payload",
        on_claim={"worker_id": "attempt.worker"},
    )
    return table_config(
        db,
        {"tasks": source},
        relay={"claim_timeout": CLAIM, "sweep_interval": 1, "worker_id": worker},
        http={"timeout": 4},
    )


async def task(db: str) -> dict[str, Any]:
    [row] = await systems.rows(db, "SELECT * FROM tasks")
    return row


async def test_a_request_longer_than_its_claim_is_delivered_once(
    db: str, receiver: Receiver
) -> None:
    async def slow(_: web.Request, __: int) -> web.StreamResponse:
        await asyncio.sleep(TAKES)  # the work itself: an OCR job, an LLM call
        return web.Response(text="done")

    receiver.behaviour = slow
    execute(db, TASKS)
    await systems.watch(db, "tasks")
    first, second = (relay_config(db, receiver.url, w) for w in ("relay-a", "relay-b"))
    await install(first)
    probe = Store(db, first.sources, worker="probe")
    await probe.open()
    try:
        await probe.prepare()
        async with running(first) as a, running(second) as b:
            execute(db, "INSERT INTO tasks DEFAULT VALUES")
            await receiver.wait_count(1)
            claimed = await task(db)
            sweeps = (a.sweeper.sweeps, b.sweeper.sweeps)
            # Past the claim's own lifetime: only the heartbeat keeps it.
            await asyncio.sleep(CLAIM * 1.6)
            assert await probe.claim("tasks", 10, 30) == []
            assert len(receiver.received) == 1
            beating = await task(db)
            await systems.wait_rows(
                db, "SELECT status FROM tasks", None, lambda rs: rs == [{"status": "done"}]
            )
            # Both relays swept while the request ran (and found nothing to take over).
            assert a.sweeper.sweeps > sweeps[0] and b.sweeper.sweeps > sweeps[1]
    finally:
        await probe.close()
    assert len(receiver.received) == 1
    assert a.settler.lost == b.settler.lost == 0
    holder = a if claimed["worker_id"] == "relay-a" else b
    assert claimed["worker_id"] in ("relay-a", "relay-b")
    assert holder.deliverer.heartbeats >= 2
    started: datetime = claimed["heartbeat_at"]
    assert started is not None  # written at claim
    assert beating["heartbeat_at"] > started  # and again while the request ran
    assert beating["worker_id"] == claimed["worker_id"]
    assert (await task(db))["status"] == "done"


async def test_a_heartbeat_writes_the_column_of_a_blank_padded_key(db: str) -> None:
    # A char(n) key comes back blank-padded, its lease holds it as text without the padding:
    # the heartbeat must still find the row (it compared the two as Python text before).
    execute(
        db,
        "CREATE TABLE codes (code char(8) PRIMARY KEY, status text NOT NULL DEFAULT 'pending', "
        "heartbeat_at timestamptz); INSERT INTO codes (code) VALUES ('ab'), ('cd')",
    )
    source = table_source("codes", "http://127.0.0.1:9/", key="code", heartbeat="heartbeat_at")
    config = table_config(db, {"codes": source})
    await install(config)
    store = Store(db, config.sources)
    await store.open()
    try:
        await store.prepare()
        rows = await store.claim("codes", 10, 30)
        assert sorted(r.key for r in rows) == ["ab      ", "cd      "]
        execute(db, "UPDATE codes SET heartbeat_at = NULL")
        ours = await store.heartbeat("codes", [(r.key, r.lease) for r in rows], 30)
    finally:
        await store.close()
    assert ours == {"ab", "cd"}
    beaten = await systems.rows(db, "SELECT code, heartbeat_at FROM codes ORDER BY code")
    assert [r["heartbeat_at"] is not None for r in beaten] == [True, True]
