"""Attempt logs of a table source (issue 9): relay's own relay.attempts (one row per attempt,
bodies cut to max_body_chars), a table of the user's with its columns mapped to the row and the
attempt, and retention (keep_rows, keep) run at each sweep, by one relay at a time."""

from __future__ import annotations

from typing import Any

import psycopg
from aiohttp import web

from relay.db import catalog
from tests import systems
from tests.integration.user_tables import execute, table_config, table_source
from tests.support import Receiver, install, running

OUTBOX = """
CREATE TABLE outbox (
    id       serial PRIMARY KEY,
    payload  jsonb NOT NULL DEFAULT '{}',
    status   text NOT NULL DEFAULT 'pending'
);
CREATE TABLE delivery_log (
    id           bigserial PRIMARY KEY,
    outbox_id    integer NOT NULL,
    attempt      smallint,
    status_code  integer,
    error        text,
    answer       text,
    logged_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""
LONG = "x" * 500


def outbox(url: str, log: dict[str, Any]) -> dict[str, Any]:
    return table_source("outbox", url, payload="payload", attempt_log=log)


async def fail_first(_: web.Request, nth: int) -> web.StreamResponse:
    if nth == 1:
        return web.Response(status=502, text="E" * 300)
    return web.Response(text="R" * 300)


async def deliver(db: str, receiver: Receiver, log: dict[str, Any], rows: int = 1) -> None:
    """`rows` outbox rows, each failing once then delivered, with this attempt log."""
    receiver.behaviour = fail_first
    execute(db, OUTBOX)
    await systems.watch(db, "outbox")
    config = table_config(db, {"outbox": outbox(receiver.url, log)})
    await install(config)
    async with running(config):
        execute(
            db,
            "INSERT INTO outbox (payload) SELECT jsonb_build_object('n', g, 'pad', %s::text) "
            "FROM generate_series(1, %s) g",
            (LONG, rows),
        )
        await systems.wait_rows(
            db,
            "SELECT status FROM outbox",
            None,
            lambda rs: len(rs) == rows and all(r["status"] == "done" for r in rs),
        )


async def test_relay_attempts_get_one_bounded_row_per_attempt(db: str, receiver: Receiver) -> None:
    await deliver(db, receiver, {"table": "relay", "max_body_chars": 40})
    logged = await systems.rows(db, "SELECT * FROM relay.attempts ORDER BY attempt")
    assert [(r["source"], r["key"], r["attempt"], r["outcome"], r["status"]) for r in logged] == [
        ("outbox", "1", 1, "retry", 502),
        ("outbox", "1", 2, "done", 200),
    ]
    first, second = logged
    assert first["error"].startswith("HTTP 502: EEE")
    assert second["error"] is None
    assert first["response_body"] == "E" * 40 and second["response_body"] == "R" * 40
    for r in logged:
        assert len(r["request_body"]) == 40 and r["request_body"].startswith('{"n": 1')
        assert r["url"] == receiver.url
        assert r["worker"] and r["ms"] >= 0 and r["at"] is not None
        assert r["response_headers"]["Content-Type"].startswith("text/plain")
    assert first["at"] <= second["at"]


async def test_a_users_log_table_gets_its_mapped_columns(db: str, receiver: Receiver) -> None:
    log = {
        "table": "public.delivery_log",
        "columns": {
            "outbox_id": "id",
            "attempt": "attempt.number",
            "status_code": "response.status",
            "error": "attempt.error",
            "answer": "response.body",
        },
        "max_body_chars": 10,
    }
    await deliver(db, receiver, log)
    logged = await systems.rows(
        db, "SELECT outbox_id, attempt, status_code, error, answer FROM delivery_log ORDER BY id"
    )
    assert logged == [
        {
            "outbox_id": 1,
            "attempt": 1,
            "status_code": 502,
            "error": "HTTP 502: " + "E" * 200,  # http.error_body_chars
            "answer": "E" * 10,
        },
        {"outbox_id": 1, "attempt": 2, "status_code": 200, "error": None, "answer": "R" * 10},
    ]


async def test_keep_rows_deletes_the_oldest_beyond_n_at_a_sweep(
    db: str, receiver: Receiver
) -> None:
    log = {"table": "public.delivery_log", "columns": {"outbox_id": "id"}}
    log |= {"time_column": "logged_at", "keep_rows": 3}
    await deliver(db, receiver, log, rows=4)  # 8 attempts; the 3 latest stay
    before = await systems.rows(db, "SELECT id FROM delivery_log ORDER BY logged_at DESC")
    assert len(before) == 8
    config = table_config(db, {"outbox": outbox(receiver.url, log)})
    async with running(config) as relay:  # its start-up sweep ran the retention
        after = await systems.rows(db, "SELECT id FROM delivery_log ORDER BY logged_at DESC")
        assert after == before[:3]
        # Nothing more to delete on the next sweep.
        await relay.sweeper.sweep()
        assert await systems.rows(db, "SELECT id FROM delivery_log ORDER BY logged_at DESC") == (
            after
        )


async def test_keep_deletes_attempts_older_than_it_and_one_relay_at_a_time(
    db: str, receiver: Receiver
) -> None:
    log = {"table": "relay", "keep": "1d"}
    await deliver(db, receiver, log)
    execute(
        db,
        "INSERT INTO relay.attempts (source, key, attempt, at) VALUES "
        "('outbox', '1', 0, now() - interval '2 days'), "
        "('outbox', '1', 0, now() - interval '25 hours'), "
        "('another', '1', 0, now() - interval '2 days')",
    )
    config = table_config(db, {"outbox": outbox(receiver.url, log)}, relay={"sweep_interval": 600})
    spec = config.sources[0].spec.log
    assert spec.own  # relay's own log: its lock names the source
    lock = f"relay.attempt_log {catalog.Table('x', spec.schema, spec.table).qualified} outbox"
    kept = "SELECT source, attempt FROM relay.attempts ORDER BY source, attempt"
    async with await psycopg.AsyncConnection.connect(db) as holder:
        # Another relay is deleting: this one's sweep skips the retention.
        await holder.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (lock,))
        async with running(config) as relay:
            assert len(await systems.rows(db, kept)) == 5
            await holder.rollback()
            await relay.sweeper.sweep()
            assert await systems.rows(db, kept) == [
                {"source": "another", "attempt": 0},  # not this source's log
                {"source": "outbox", "attempt": 1},
                {"source": "outbox", "attempt": 2},
            ]
