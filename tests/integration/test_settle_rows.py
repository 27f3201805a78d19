"""One row's failure stays that row's: a write the database refuses inside a settle batch (a
"WebhookCall" whose webhook was deleted mid-flight, a value a column or a trigger refuses) is
recorded as far as it can be for that row, and every other row of the batch settles normally.
The Settler runs here on a real store and a real database, with batches built by hand so that
the rows surely share one batch."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from relay import config as config_mod
from relay.config import Config
from relay.db.store import Store
from relay.settler import Settler
from relay.sources.base import Outcome, Settlement
from relay.sources.documenso_jobs import WebhookCall
from tests.integration.documenso_migrations import documenso_execute
from tests.integration.documenso_schema import JOBS, WEBHOOKS
from tests.support import install, prepared_store, raw_config


def execute(url: str, statement: str, params: Any = None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, params)


def queue(db: str, n: int) -> None:
    """`n` pending rows to a target nothing listens on (these tests settle by hand)."""
    execute(
        db,
        "INSERT INTO webhook_delivery_queue (url) "
        "SELECT 'http://127.0.0.1:9/' FROM generate_series(1, %s)",
        (n,),
    )


class CountingStore(Store):
    """The real store, counting the statements a settle takes."""

    settles = 0

    async def settle(self, source: str, settlements: Any) -> set[Any]:
        self.settles += 1
        return await super().settle(source, settlements)


@contextlib.asynccontextmanager
async def prepared(config: Config) -> AsyncIterator[CountingStore]:
    """relay installed for `config`, and a store ready to claim and settle."""
    await install(config)
    async with prepared_store(config, CountingStore) as store:
        yield store


def delivered(claimed: list[Any]) -> list[Settlement]:
    return [Settlement(r.key, r.lease, Outcome.done, http_status=200) for r in claimed]


async def settle(store: Store, source: str, batch: list[Settlement]) -> set[Any] | None:
    written: list[set[Any] | None] = []
    settler = Settler(
        store, on_settled=lambda _, __, keys: written.append(keys), sources=store.sources
    )
    for settlement in batch:
        settler.add(source, settlement)
    settler.close()
    await settler.run()
    (keys,) = written
    return keys


def call(webhook: str) -> WebhookCall:
    return WebhookCall(
        status="SUCCESS",
        url="http://127.0.0.1:9/hook",
        request='{"event": "DOCUMENT_SENT"}',
        code=200,
        headers="{}",
        body='"ok"',
        webhook_id=webhook,
        event="DOCUMENT_SENT",
    )


async def test_a_webhook_deleted_mid_flight_holds_back_no_other_tenants_job(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    documenso_execute(db, JOBS + WEBHOOKS)
    documenso_execute(
        db,
        """
        INSERT INTO "Webhook" ("id", "webhookUrl", "userId", "teamId")
        VALUES ('wh_a', 'http://127.0.0.1:9/a', 1, 1), ('wh_b', 'http://127.0.0.1:9/b', 2, 2);
        INSERT INTO "BackgroundJob" ("id", "jobId", "name", "version", "updatedAt", "payload")
        SELECT 'job_' || w, 'internal.execute-webhook', 'Execute Webhook', '1.0.0',
               now() AT TIME ZONE 'UTC',
               jsonb_build_object('event', 'DOCUMENT_SENT', 'webhookId', 'wh_' || w)
        FROM unnest(ARRAY['a', 'b']) AS w;
        """,
    )
    config = config_mod.from_mapping(
        raw_config(db, sources={"jobs": {"kind": "documenso_jobs"}}), {}
    )
    async with prepared(config) as store:
        claimed = await store.claim("jobs", 10, 30.0)
        assert sorted(r.key for r in claimed) == ["job_a", "job_b"]
        # Tenant b deletes its webhook while both requests are in flight.
        documenso_execute(db, """DELETE FROM "Webhook" WHERE "id" = 'wh_b'""")
        batch = [
            Settlement(
                r.key, r.lease, Outcome.done, http_status=200, record=call(f"wh_{r.key[-1]}")
            )
            for r in claimed
        ]
        settled = await settle(store, "jobs", batch)
    assert settled == {"job_a", "job_b"}
    with psycopg.connect(db) as conn:
        jobs = conn.execute(
            'SELECT "id", "status"::text FROM "BackgroundJob" ORDER BY "id"'
        ).fetchall()
        calls = conn.execute('SELECT "webhookId" FROM "WebhookCall"').fetchall()
    assert jobs == [("job_a", "COMPLETED"), ("job_b", "COMPLETED")]
    assert calls == [("wh_a",)]
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("settle.call_not_recorded source=jobs key=job_b") for line in lines)


async def test_a_row_whose_write_is_refused_is_settled_alone_with_what_can_be_written(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    execute(
        db,
        """
        ALTER TABLE webhook_delivery_queue
            ADD CONSTRAINT no_secrets_in_errors CHECK (last_error NOT LIKE '%password%');
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.status <> 'processing' AND NEW.url LIKE '%refuse%' THEN
                RAISE EXCEPTION 'row % may not be settled', NEW.id;
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse BEFORE UPDATE ON webhook_delivery_queue
            FOR EACH ROW EXECUTE FUNCTION refuse();
        INSERT INTO webhook_delivery_queue (url)
        SELECT 'http://127.0.0.1:9/' || p FROM unnest(ARRAY['a', 'b', 'refuse', 'd']) AS p;
        """,
    )
    config = config_mod.from_mapping(raw_config(db), {})
    async with prepared(config) as store:
        a, b, refused, d = await store.claim("deliveries", 10, 30.0)
        batch = [
            Settlement(a.key, a.lease, Outcome.done, http_status=200),
            Settlement(b.key, b.lease, Outcome.retry, 60.0, "HTTP 500: bad password", 500),
            Settlement(refused.key, refused.lease, Outcome.done, http_status=200),
            Settlement(d.key, d.lease, Outcome.dead, 0.0, "HTTP 410: gone", 410),
        ]
        settled = await settle(store, "deliveries", batch)
    assert settled == {a.key, b.key, d.key}
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT id, status, last_error, last_response_status FROM webhook_delivery_queue "
            "ORDER BY id"
        ).fetchall()
    assert rows == [
        (a.key, "delivered", None, 200),
        (b.key, "failed", None, None),  # the retry, without the error its column refuses
        (refused.key, "processing", None, None),  # left to its claim's expiry
        (d.key, "dead_letter", "HTTP 410: gone", 410),
    ]
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"settle.details_refused source=deliveries key={b.key}" in line for line in lines)
    assert any(f"settle.rejected source=deliveries key={refused.key}" in line for line in lines)


async def test_a_batch_that_nothing_refuses_is_one_statement(db: str) -> None:
    queue(db, 20)
    config = config_mod.from_mapping(raw_config(db), {})
    async with prepared(config) as store:
        claimed = await store.claim("deliveries", 50, 30.0)
        settled = await settle(store, "deliveries", delivered(claimed))
    assert settled == {r.key for r in claimed} and len(settled) == 20
    assert store.settles == 1


async def test_a_batch_refused_because_the_table_changed_is_not_retried_row_by_row(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A renamed column fails every row alike: writing them one by one took two failing
    # statements and two ERROR lines per row, for every batch.
    queue(db, 5)
    config = config_mod.from_mapping(raw_config(db), {})
    async with prepared(config) as store:
        claimed = await store.claim("deliveries", 10, 30.0)
        execute(db, "ALTER TABLE webhook_delivery_queue RENAME COLUMN last_error TO error_text")
        settled = await settle(store, "deliveries", delivered(claimed))
    assert settled is None  # left to the claims' expiry
    assert store.settles == 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("settle.")]
    assert len(lines) == 1 and lines[0].startswith("settle.rejected source=deliveries rows=5")
