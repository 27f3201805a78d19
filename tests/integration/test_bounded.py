"""Rows are bounded: a payload over relay.max_payload_bytes, or a URL, secret or topic over
8 KiB, is measured in the claim statement, never loaded, and its row is settled dead with the
reason; the other rows go on."""

from __future__ import annotations

from dataclasses import astuple
from typing import Any

import psycopg

from relay import config as config_mod
from relay.db.store import Store
from relay.sources.base import MAX_FIELD_BYTES, Claimed
from tests.integration.documenso_migrations import documenso_execute
from tests.integration.documenso_schema import JOBS, WEBHOOKS
from tests.support import Receiver, fetch_rows, install, raw_config, running

MB = 1024 * 1024


def execute(url: str, statement: str, params: Any = None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, params)


async def claim_all(config: config_mod.Config, source: str) -> list[Claimed]:
    store = Store(config.database_url, config.sources, max_payload_bytes=config.max_payload_bytes)
    await store.open()
    try:
        await store.prepare()
        return await store.claim(source, 50, 30.0)
    finally:
        await store.close()


def largest_text(rows: list[Claimed]) -> int:
    return max(len(v) for row in rows for v in astuple(row) if isinstance(v, str))


async def test_the_claim_does_not_load_what_is_too_large(db: str) -> None:
    execute(
        db,
        "INSERT INTO webhook_delivery_queue (url, payload) VALUES "
        "('http://127.0.0.1:9/small', '{\"n\": 1}'), "
        "('http://127.0.0.1:9/big', jsonb_build_object('blob', repeat('x', 3 * 1024 * 1024))), "
        "('http://127.0.0.1:9/' || repeat('u', 9000), '{\"n\": 3}')",
    )
    config = config_mod.from_mapping(raw_config(db, relay={"max_payload_bytes": MB}), {})
    small, big, long_url = await claim_all(config, "deliveries")
    assert (small.payload, small.oversize) == ('{"n": 1}', None)
    assert (big.payload, big.oversize) == (None, f"payload {3 * MB + 12}")
    assert (long_url.url, long_url.oversize) == (None, f"url {19 + 9000}")
    assert largest_text([small, big, long_url]) < MAX_FIELD_BYTES


async def test_a_whole_row_payload_is_measured_too(db: str) -> None:
    execute(
        db,
        "CREATE TABLE docs (id int PRIMARY KEY, status text NOT NULL DEFAULT 'pending', "
        "attempts int NOT NULL DEFAULT 0, due timestamptz, body text);"
        "INSERT INTO docs (id, body) VALUES (1, 'short'), (2, repeat('b', 2000000))",
    )
    source = {
        "kind": "table",
        "table": "docs",
        "key": "id",
        "status": "status",
        "attempts": "attempts",
        "due": "due",
        "url": "http://127.0.0.1:9/hook",
    }
    config = config_mod.from_mapping(
        raw_config(db, relay={"max_payload_bytes": 4096}, sources={"docs": source}), {}
    )
    short, long = await claim_all(config, "docs")
    assert short.payload is not None and '"body": "short"' in short.payload
    assert long.payload is None
    assert long.oversize is not None and long.oversize.startswith("payload 2000")
    assert largest_text([short, long]) < 4096


async def test_rows_too_large_end_dead_with_the_reason_and_the_rest_is_delivered(
    db: str, receiver: Receiver
) -> None:
    config = config_mod.from_mapping(raw_config(db, relay={"max_payload_bytes": MB}), {})
    await install(config)
    async with running(config):
        execute(
            db,
            "INSERT INTO webhook_delivery_queue (url, payload) "
            "SELECT %(url)s, jsonb_build_object('blob', repeat('x', 5 * 1024 * 1024)) "
            "FROM generate_series(1, 3)",
            {"url": receiver.url},
        )
        execute(
            db,
            "INSERT INTO webhook_delivery_queue (url) VALUES (%(url)s || '?' || repeat('q', 9000))",
            {"url": receiver.url},
        )
        execute(db, "INSERT INTO webhook_delivery_queue (url) VALUES (%s)", (receiver.url,))
        await receiver.wait_ids({"deliveries_5"})
    rows = await fetch_rows(db)
    assert receiver.ids() == ["deliveries_5"]
    assert [rows[i]["status"] for i in range(1, 6)] == ["dead_letter"] * 4 + ["delivered"]
    assert rows[1]["last_error"] == (
        f"too large to deliver (payload {5 * MB + 12} bytes): a payload may have at most "
        f"relay.max_payload_bytes = {MB} bytes, a URL, secret or topic 8192; shrink the row or "
        f"raise relay.max_payload_bytes, then run `relay retry-dead deliveries`"
    )
    assert rows[4]["last_error"].startswith(f"too large to deliver (url {len(receiver.url) + 9001}")


async def test_a_documenso_job_too_large_fails_without_being_sent(
    db: str, receiver: Receiver
) -> None:
    documenso_execute(db, JOBS + WEBHOOKS)
    documenso_execute(
        db,
        """INSERT INTO "Webhook" ("id", "webhookUrl", "userId", "teamId")
           VALUES ('wh_1', %s, 1, 1)""",
        (receiver.url,),
    )
    source = {"kind": "documenso_jobs"}
    # Below aiohttp's "large body" warning (1 MiB), which the tests turn into an error: a job
    # sent would reach the receiver.
    config = config_mod.from_mapping(
        raw_config(db, relay={"max_payload_bytes": 64 * 1024}, sources={"jobs": source}), {}
    )
    await install(config)
    async with running(config):
        documenso_execute(
            db,
            """
            INSERT INTO "BackgroundJob" ("id", "jobId", "name", "version", "updatedAt", "payload",
                                         "maxRetries")
            SELECT 'job_' || n, 'internal.execute-webhook', 'Execute Webhook', '1.0.0',
                   now() AT TIME ZONE 'UTC',
                   jsonb_build_object('event', 'DOCUMENT_SENT', 'webhookId', 'wh_1',
                                      'data', repeat('d', CASE WHEN n = 1 THEN 300 * 1024
                                                               ELSE 10 END)), 0
            FROM generate_series(1, 2) AS n
            """,
        )
        await receiver.wait_ids({"jobs_job_2"})
    with psycopg.connect(db) as conn:
        states = conn.execute(
            'SELECT "id", "status"::text FROM "BackgroundJob" ORDER BY "id"'
        ).fetchall()
    assert receiver.ids() == ["jobs_job_2"]
    assert states == [("job_1", "FAILED"), ("job_2", "COMPLETED")]
