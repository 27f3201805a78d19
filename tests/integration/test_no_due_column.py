"""A queue table with no due column: relay keeps claims and retry times in relay.leases and
still never changes the table's shape."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from aiohttp import web

from relay import config as config_mod
from relay.config import Config
from relay.db.store import Store
from relay.sources.base import Outcome, Settlement
from tests.support import Receiver, install, raw_config, running

TABLE = """
CREATE TABLE plain_queue (
    id       serial PRIMARY KEY,
    url      text NOT NULL,
    payload  jsonb NOT NULL DEFAULT '{}',
    status   text NOT NULL DEFAULT 'new',
    tries    integer NOT NULL DEFAULT 0,
    error    text
);
"""


def plain_config(db: str, **relay: Any) -> Config:
    source = {
        "kind": "table",
        "table": "plain_queue",
        "key": "id",
        "status": "status",
        "pending": ["new", "retrying"],
        "retry": "retrying",
        "processing": "sending",
        "done": "sent",
        "dead": "given_up",
        "attempts": "tries",
        "max_attempts": 3,
        "last_error": "error",
        "payload": "payload",
        "url_column": "url",
    }
    return config_mod.from_mapping(raw_config(db, sources={"plain": source}, relay=relay), {})


def execute(db: str, statement: str, params: Any = None) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(statement, params)


def rows(db: str) -> dict[int, tuple[str, int, str | None]]:
    with psycopg.connect(db) as conn:
        result = conn.execute("SELECT id, status, tries, error FROM plain_queue").fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in result}


@pytest.fixture
def plain_db(db: str) -> str:
    execute(db, TABLE)
    return db


async def test_delivered_through_notify(plain_db: str, receiver: Receiver) -> None:
    config = plain_config(plain_db, sweep_interval=600)
    await install(config)
    async with running(config) as relay:
        sweeps = relay.sweeper.sweeps
        execute(plain_db, "INSERT INTO plain_queue (url) VALUES (%s)", (receiver.url,))
        await receiver.wait_count(1)
        assert relay.sweeper.sweeps == sweeps
    assert rows(plain_db) == {1: ("sent", 1, None)}


async def test_failure_then_success_waits_its_backoff_and_is_delivered(
    plain_db: str, receiver: Receiver
) -> None:
    async def flaky(_: web.Request, nth: int) -> web.Response:
        return web.Response(status=500 if nth == 1 else 200)

    receiver.behaviour = flaky
    config = plain_config(plain_db, sweep_interval=600)
    await install(config)
    async with running(config):
        execute(plain_db, "INSERT INTO plain_queue (url) VALUES (%s)", (receiver.url,))
        await receiver.wait_count(2)
    first, second = receiver.received
    assert second.at - first.at >= 0.04  # retry.base is 0.05 s, no jitter
    assert first.id == second.id
    assert rows(plain_db) == {1: ("sent", 2, None)}


async def test_failing_forever_ends_dead_after_max_attempts(
    plain_db: str, receiver: Receiver
) -> None:
    async def fail(_: web.Request, __: int) -> web.Response:
        return web.Response(status=503, text="busy")

    receiver.behaviour = fail
    config = plain_config(plain_db)
    await install(config)
    async with running(config):
        execute(plain_db, "INSERT INTO plain_queue (url) VALUES (%s)", (receiver.url,))
        await receiver.wait_count(3)
    status, tries, error = rows(plain_db)[1]
    assert (status, tries) == ("given_up", 3)
    assert error is not None and "HTTP 503" in error
    assert len(receiver.received) == 3


async def test_a_claim_whose_worker_died_is_taken_back(plain_db: str, receiver: Receiver) -> None:
    config = plain_config(plain_db)
    await install(config)
    # What a relay killed mid-delivery leaves behind: the row sending, its lease expired.
    execute(
        plain_db,
        f"""
        INSERT INTO plain_queue (url, status, tries) VALUES ('{receiver.url}', 'sending', 1);
        INSERT INTO relay.leases (source, key, due, token, attempts)
        VALUES ('plain', '1', now() - interval '1s', now() - interval '31s', 1);
        """,
    )
    async with running(config):
        await receiver.wait_count(1)
    assert rows(plain_db) == {1: ("sent", 2, None)}


async def test_a_late_settle_after_takeover_changes_nothing(plain_db: str) -> None:
    config = plain_config(plain_db)
    await install(config)
    execute(plain_db, "INSERT INTO plain_queue (url) VALUES ('http://127.0.0.1:9/')")
    store = Store(config.database_url, config.sources)
    await store.open()
    try:
        await store.prepare()
        (row,) = await store.claim("plain", 10, 30)
        stale = Settlement(row.key, datetime(2000, 1, 1, tzinfo=UTC), Outcome.dead, error="late")
        assert await store.settle("plain", [stale]) == set()
        assert rows(plain_db)[1][0] == "sending"
        assert await store.settle("plain", [Settlement(row.key, row.lease, Outcome.done)]) == {1}
    finally:
        await store.close()
    assert rows(plain_db) == {1: ("sent", 1, None)}
