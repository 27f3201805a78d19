"""A mapping onto a Prisma-style table: text keys, an enum status, timestamp(3) without time
zone, the whole row as the payload, a fixed target URL."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from aiohttp import web

from relay import config as config_mod
from relay.config import ConfigError
from relay.db.store import Store
from tests.support import Receiver, fetch_rows, insert_rows, install, raw_config, running

SCHEMA = """
CREATE TYPE "JobStatus" AS ENUM ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED');
CREATE TABLE "Job" (
    id          text PRIMARY KEY,
    status      "JobStatus" NOT NULL DEFAULT 'PENDING',
    retried     integer NOT NULL DEFAULT 0,
    "runAt"     timestamp(3) without time zone,
    data        jsonb,
    "lastError" text
);
"""


def job_source(url: str, **overrides: Any) -> dict[str, Any]:
    source: dict[str, Any] = {
        "kind": "table",
        "table": "Job",
        "key": "id",
        "status": "status",
        "pending": "PENDING",
        "processing": "PROCESSING",
        "done": "COMPLETED",
        "dead": "FAILED",
        "attempts": "retried",
        "max_attempts": 2,
        "due": "runAt",
        "last_error": "lastError",
        "url": url,
    }
    source.update(overrides)
    return source


@pytest.fixture
def job_db(db: str) -> str:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return db


async def jobs(db: str) -> dict[str, tuple[str, int, str | None]]:
    async with await psycopg.AsyncConnection.connect(db) as conn:
        cur = await conn.execute('SELECT id, status::text, retried, "lastError" FROM "Job"')
        return {r[0]: (r[1], r[2], r[3]) for r in await cur.fetchall()}


async def test_whole_row_is_delivered_and_enum_status_settled(
    job_db: str, receiver: Receiver
) -> None:
    config = config_mod.from_mapping(
        raw_config(job_db, sources={"jobs": job_source(receiver.url)}), {}
    )
    await install(config)
    async with running(config):
        async with await psycopg.AsyncConnection.connect(job_db, autocommit=True) as conn:
            await conn.execute(
                """INSERT INTO "Job" (id, data) VALUES ('ckx1', '{"to": "a@example.com"}')"""
            )
        await receiver.wait_count(1)
    body = receiver.received[0].json
    assert body["id"] == "ckx1"
    assert body["data"] == {"to": "a@example.com"}
    assert receiver.received[0].id == "jobs_ckx1"
    rows = await jobs(job_db)
    assert rows["ckx1"][0] == "COMPLETED"


async def test_enum_row_goes_dead_after_max_attempts(job_db: str, receiver: Receiver) -> None:
    async def fail(_: web.Request, __: int) -> web.Response:
        return web.Response(status=503, text="down for maintenance")

    receiver.behaviour = fail
    config = config_mod.from_mapping(
        raw_config(job_db, sources={"jobs": job_source(receiver.url)}), {}
    )
    await install(config)
    async with running(config):
        async with await psycopg.AsyncConnection.connect(job_db, autocommit=True) as conn:
            await conn.execute("""INSERT INTO "Job" (id) VALUES ('ckx2')""")
        await receiver.wait_count(2)
    # A graceful stop waits for in-flight deliveries and their settles, so the row is final.
    status, retried, error = (await jobs(job_db))["ckx2"]
    assert (status, retried) == ("FAILED", 2)
    assert error is not None and "HTTP 503: down for maintenance" in error
    assert len(receiver.received) == 2


async def test_a_status_value_missing_from_the_enum_is_a_config_error(job_db: str) -> None:
    config = config_mod.from_mapping(
        raw_config(job_db, sources={"jobs": job_source("http://x.test/", done="DONE")}), {}
    )
    store = Store(config.database_url, config.sources)
    await store.open()
    try:
        with pytest.raises(
            ConfigError, match=r"sources\.jobs\.done: 'DONE' is not a value of enum"
        ):
            await store.prepare()
    finally:
        await store.close()


async def test_a_settle_the_database_rejects_is_logged_and_the_relay_goes_on(
    db: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # A trigger of the user's refuses to mark one particular row delivered.
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            """
            CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.status = 'delivered' AND NEW.url LIKE '%refuse%' THEN
                    RAISE EXCEPTION 'row % may not be delivered', NEW.id;
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse BEFORE UPDATE ON webhook_delivery_queue
                FOR EACH ROW EXECUTE FUNCTION refuse();
            """
        )
    config = config_mod.from_mapping(raw_config(db, relay={"max_in_flight": 1}), {})
    await install(config)
    async with running(config):
        (bad,) = await insert_rows(db, receiver.url + "?refuse", 1)
        await receiver.wait_ids({f"deliveries_{bad}"})
        (good,) = await insert_rows(db, receiver.url, 1)
        await receiver.wait_ids({f"deliveries_{good}"})
    rows = await fetch_rows(db)
    assert rows[good]["status"] == "delivered"
    assert rows[bad]["status"] == "processing"  # left to its claim expiry, not lost
    assert any("settle.rejected" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("key_type", "key_values"),
    [
        ("bigint", ["9007199254740993", "2"]),
        ("uuid", ["'6f1c0e7e-3d3b-4f7a-9a51-0d6c1c1f2a10'", "gen_random_uuid()"]),
        ("numeric(20, 2)", ["12.50", "7"]),
        ("varchar(40)", ["'a b ''quoted'' key'", "'é'"]),
    ],
)
@pytest.mark.parametrize("due_type", ["timestamptz", "timestamp", "timestamp(3)"])
async def test_settles_match_their_claim_for_every_key_and_due_type(
    db: str, receiver: Receiver, key_type: str, key_values: list[str], due_type: str
) -> None:
    # The claim's due time is its token, so it must come back from relay byte for byte, in a
    # session time zone far from UTC, whatever the key's type.
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET timezone = 'Pacific/Chatham'")
        conn.execute(
            f"CREATE TABLE typed (k {key_type} PRIMARY KEY, status text NOT NULL DEFAULT "
            f"'pending', attempts int NOT NULL DEFAULT 0, due {due_type})"
        )
        for value in key_values:
            conn.execute(f"INSERT INTO typed (k) VALUES ({value})")
    source = {
        "kind": "table",
        "table": "typed",
        "key": "k",
        "status": "status",
        "attempts": "attempts",
        "due": "due",
        "url": receiver.url,
    }
    config = config_mod.from_mapping(raw_config(db, sources={"typed": source}), {})
    await install(config)
    async with running(config) as relay:
        await receiver.wait_count(len(key_values))
    assert relay.settler.lost == 0
    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute("SELECT status, attempts FROM typed").fetchall()
    assert rows == [("done", 1)] * len(key_values)
    assert len(receiver.received) == len(key_values)
