"""kind = "table" on a user's table as it is (issue 9): no processing status and no attempts
column needed, the due column only read, a row not yet due claimed when it falls due, a dead row
put back to pending by the application sent at once with fresh attempts; filters that split one
table between two sources, for claims, wake-ups and `relay status`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web

from tests import systems
from tests.integration.user_tables import (
    Gate,
    another_receiver,
    execute,
    table_config,
    table_source,
)
from tests.support import Receiver, install, raw_config, refusal, run_cli, running, write_config

NOTICES = """
CREATE TABLE notices (
    id            serial PRIMARY KEY,
    body          jsonb NOT NULL DEFAULT '{}',
    state         text NOT NULL DEFAULT 'pending',
    scheduled_for timestamptz,
    last_error    text
);
"""
LONG_AGO = "2001-02-03 04:05:06+00"


def notices(url: str, **overrides: Any) -> dict[str, Any]:
    """A source on `notices`: no processing status, no attempts column, `due` only read."""
    return table_source(
        "notices",
        url,
        status="state",
        due="scheduled_for",
        last_error="last_error",
        payload="body",
        **overrides,
    )


async def notice(db: str, key: int) -> dict[str, Any]:
    [row] = await systems.rows(db, "SELECT * FROM notices WHERE id = %s", (key,))
    return row


async def leases(db: str, source: str) -> list[dict[str, Any]]:
    return await systems.rows(
        db, "SELECT key, attempts FROM relay.leases WHERE source = %s ORDER BY key", (source,)
    )


async def columns(db: str) -> list[tuple[str, str]]:
    found = await systems.rows(
        db,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = 'notices' ORDER BY ordinal_position",
    )
    return [(r["column_name"], r["data_type"]) for r in found]


def attempts(receiver: Receiver) -> list[str]:
    return [r.headers["relay-attempt"] for r in receiver.received]


async def test_a_table_without_processing_status_or_attempts_column_delivers_and_due_is_only_read(
    db: str, receiver: Receiver
) -> None:
    def answer(_: web.Request, nth: int) -> web.StreamResponse:
        return web.Response(status=503 if nth == 1 else 200)

    gate = Gate(answer, held={1, 2})
    receiver.behaviour = gate
    execute(db, NOTICES)
    shape = await columns(db)
    config = table_config(db, {"notices": notices(receiver.url)}, relay={"sweep_interval": 600})
    await install(config)
    async with running(config):
        [key] = [
            r["id"]
            for r in await systems.rows(
                db,
                "INSERT INTO notices (body, scheduled_for) VALUES ('{\"n\": 1}', %s) RETURNING id",
                (LONG_AGO,),
            )
        ]
        due = (await notice(db, key))["scheduled_for"]

        # Claimed: the row keeps its status (there is no processing one) and its due time; the
        # claim and its attempt count are in relay.leases.
        await receiver.wait_count(1)
        row = await notice(db, key)
        assert (row["state"], row["scheduled_for"]) == ("pending", due)
        assert await leases(db, "notices") == [{"key": str(key), "attempts": 1}]
        gate.release(1)  # 503: a retry

        # The retry's claim: still the application's due time, the attempt counted by relay.
        await receiver.wait_count(2)
        row = await notice(db, key)
        assert (row["state"], row["scheduled_for"]) == ("pending", due)
        assert row["last_error"] == "HTTP 503"
        assert await leases(db, "notices") == [{"key": str(key), "attempts": 2}]
        gate.release(2)
    # Stopped gracefully: the 200 is settled.
    row = await notice(db, key)
    assert (row["state"], row["scheduled_for"], row["last_error"]) == ("done", due, None)
    assert row["body"] == {"n": 1}
    assert attempts(receiver) == ["1", "2"]
    assert await leases(db, "notices") == []  # settled done: relay keeps nothing of it
    assert await columns(db) == shape


async def test_a_row_not_yet_due_is_claimed_when_due_by_the_timer(
    db: str, receiver: Receiver
) -> None:
    execute(db, NOTICES)
    config = table_config(db, {"notices": notices(receiver.url)}, relay={"sweep_interval": 600})
    await install(config)
    # One row scheduled before relay starts, one while it runs and due sooner: its INSERT left
    # nothing claimable now, yet relay must hear of it and set its timer to it, not to the
    # first row's time (nor to the next sweep's).
    [before] = await systems.rows(
        db,
        "INSERT INTO notices (scheduled_for) VALUES (now() + interval '3 seconds') "
        "RETURNING id, scheduled_for",
    )
    async with running(config) as relay:
        sweeps = relay.sweeper.sweeps
        [during] = await systems.rows(
            db,
            "INSERT INTO notices (scheduled_for) VALUES (now() + interval '0.5 seconds') "
            "RETURNING id, scheduled_for",
        )
        await receiver.wait_count(2, timeout=10)
        assert relay.sweeper.sweeps == sweeps  # no sweep found them: timers did
    by_id = {r.id: r for r in receiver.received}
    for row, late in ((during, 2.0), (before, 5.0)):
        due: datetime = row["scheduled_for"]
        arrived = by_id[f"notices_{row['id']}"].at
        assert arrived >= due.timestamp() - 0.01, f"sent {due.timestamp() - arrived:.3f}s early"
        assert arrived < due.timestamp() + late, f"sent {arrived - due.timestamp():.2f}s late"
        assert (await notice(db, row["id"]))["scheduled_for"] == due


async def test_a_dead_row_put_back_to_pending_is_sent_at_once_with_attempt_1(
    db: str, receiver: Receiver
) -> None:
    async def fail_twice(_: web.Request, nth: int) -> web.StreamResponse:
        return web.Response(status=503 if nth <= 2 else 200)

    receiver.behaviour = fail_twice
    execute(db, NOTICES)
    await systems.watch(db, "notices")
    config = table_config(
        db, {"notices": notices(receiver.url, max_attempts=2)}, relay={"sweep_interval": 600}
    )
    await install(config)
    async with running(config) as relay:
        sweeps = relay.sweeper.sweeps
        [key] = [
            r["id"]
            for r in await systems.rows(db, "INSERT INTO notices DEFAULT VALUES RETURNING id")
        ]
        await systems.wait_rows(
            db, "SELECT state FROM notices", None, lambda rs: rs == [{"state": "dead"}]
        )
        assert await leases(db, "notices") == []  # dead: its attempt count went with it
        # The application's documented way to retry a dead letter.
        execute(db, "UPDATE notices SET state = 'pending' WHERE id = %s", (key,))
        await receiver.wait_count(3)
        assert relay.sweeper.sweeps == sweeps  # its notification, not a sweep, found it
    assert attempts(receiver) == ["1", "2", "1"]
    row = await notice(db, key)
    assert (row["state"], row["last_error"]) == ("done", None)


# -- filters -----------------------------------------------------------------------------------

JOBS = """
CREATE TABLE jobs (
    id        serial PRIMARY KEY,
    job_type  text NOT NULL,
    lane      text NOT NULL DEFAULT 'default',
    payload   jsonb NOT NULL DEFAULT '{}',
    status    text NOT NULL DEFAULT 'pending'
);
"""
# Inserted in this order, so the row neither source takes comes first in every claim's order.
JOB_ROWS = [("summary", "gpu"), ("ocr", "default"), ("summary", "default"), ("ocr", "gpu")]


def split_sources(ocr_url: str, other_url: str) -> dict[str, Any]:
    """Two sources splitting `jobs`: every OCR job, and the other jobs of the default lane."""

    return {
        "ocr": table_source("jobs", ocr_url, payload="payload", filter="job_type = 'ocr'"),
        "other": table_source(
            "jobs", other_url, payload="payload", filter="job_type <> 'ocr' AND lane = 'default'"
        ),
    }


async def add_jobs(db: str) -> list[int]:
    found = await systems.rows(
        db,
        "INSERT INTO jobs (job_type, lane) SELECT t, l FROM unnest(%s::text[], %s::text[]) "
        "WITH ORDINALITY AS j(t, l, n) ORDER BY n RETURNING id",
        ([t for t, _ in JOB_ROWS], [lane for _, lane in JOB_ROWS]),
    )
    return [r["id"] for r in found]


async def test_two_sources_split_one_table_by_filter(
    db: str, receiver: Receiver, tmp_config: Path
) -> None:
    execute(db, JOBS)
    await systems.watch(db, "jobs")
    async with another_receiver() as other:
        raw = raw_config(db, sources=split_sources(receiver.url, other.url))
        config = write_config(tmp_config, raw)
        await install(config)
        async with running(config) as relay:
            gpu_summary, ocr, summary, gpu_ocr = await add_jobs(db)
            await receiver.wait_ids({f"ocr_{ocr}", f"ocr_{gpu_ocr}"})
            await other.wait_ids({f"other_{summary}"})
            await systems.wait_rows(
                db,
                "SELECT count(*) AS n FROM jobs WHERE status = 'done'",
                None,
                lambda rs: rs == [{"n": 3}],
            )
            # A sweep finds nothing more for either source: the gpu-lane summary job is no one's.
            await relay.sweeper.sweep()
            assert await relay.store.claim("ocr", 10, 30) == []
            assert await relay.store.claim("other", 10, 30) == []
            counts = {name: await relay.store.counts(name) for name in ("ocr", "other")}
        assert sorted(receiver.ids()) == sorted([f"ocr_{ocr}", f"ocr_{gpu_ocr}"])
        assert other.ids() == [f"other_{summary}"]
    statuses = {r["id"]: r["status"] for r in await systems.rows(db, "SELECT * FROM jobs")}
    assert statuses == {gpu_summary: "pending", ocr: "done", summary: "done", gpu_ocr: "done"}
    # Each source counts its own rows only: not the other's, not the row no one takes.
    assert counts == {"ocr": {"done": 2}, "other": {"done": 1}}
    code, output = await run_cli(tmp_config, "status")
    assert code == 0, output
    assert "ocr: done=2;" in output and "other: done=1;" in output


async def test_a_filtered_out_row_wakes_no_source(db: str) -> None:
    execute(db, JOBS)
    config = table_config(db, split_sources("http://127.0.0.1:9/a", "http://127.0.0.1:9/b"))
    await install(config)
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute("LISTEN relay")
        execute(db, "INSERT INTO jobs (job_type, lane) VALUES ('summary', 'gpu')")
        execute(db, "UPDATE jobs SET payload = '{\"x\": 1}'")
        execute(db, "INSERT INTO jobs (job_type, lane) VALUES ('ocr', 'gpu')")
        # Notifications arrive in commit order: one for the first two statements would come
        # before the OCR job's.
        heard = [n.payload async for n in conn.notifies(timeout=10, stop_after=1)]
    assert heard == ["ocr"]


async def test_a_filter_that_is_not_a_boolean_expression_is_refused_naming_the_key(
    db: str,
) -> None:
    execute(db, JOBS)
    sources = split_sources("http://127.0.0.1:9/a", "http://127.0.0.1:9/b")
    sources["other"]["filter"] = "lane"  # text, not boolean
    message = await refusal(table_config(db, sources))
    assert message.startswith("sources.other.filter: "), message
