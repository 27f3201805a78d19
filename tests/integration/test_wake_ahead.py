"""A row written to fall due a moment later by the database's clock (a writer whose clock is
ahead, a time rounded up, a delivery scheduled seconds ahead) still wakes relay: it is sent when
it falls due, not at the next sweep. Every test here runs with a sweep an hour away, so only a
wake-up and the claimer's timer can deliver the row."""

from __future__ import annotations

import psycopg

from relay import config as config_mod
from tests import systems
from tests.integration.test_documenso_jobs import add_job, documenso_db
from tests.integration.user_tables import execute, table_config, table_source
from tests.support import Receiver, install, make_config, raw_config, running

__all__ = ["documenso_db"]  # the fixture, used by name

NO_SWEEP = {"sweep_interval": 3600}


async def test_an_event_published_to_go_a_second_later_goes_then(
    db: str, receiver: Receiver
) -> None:
    config = make_config(
        db,
        relay=NO_SWEEP,
        sources={"events": {"kind": "outbox", "topics": {"*": receiver.url}}},
    )
    await install(config)
    async with running(config) as relay:
        await relay.claimers["events"].idle.wait()  # its start-up passes done
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT relay.publish('t', '{}'::jsonb, now() + interval '1 second'), "
                "now() + interval '1 second'"
            )
            row = await cur.fetchone()
            assert row is not None
            due = row[1]
        await receiver.wait_count(1)
    # Not before it fell due (the receiver's clock is this machine's, as the database's).
    assert receiver.received[0].at >= due.timestamp()


async def test_a_job_written_by_a_server_whose_clock_is_ahead_goes_at_once(
    documenso_db: str, receiver: Receiver
) -> None:
    # Prisma sets "updatedAt" and "submittedAt" from the application server's clock: here
    # 50 ms ahead of the database's.
    config = config_mod.from_mapping(
        raw_config(documenso_db, relay=NO_SWEEP, sources={"jobs": {"kind": "documenso_jobs"}}), {}
    )
    await install(config)
    async with running(config) as relay:
        await relay.claimers["jobs"].idle.wait()  # its start-up passes done
        add_job(documenso_db, "ahead1", updated="50 milliseconds")
        await receiver.wait_count(1)
    assert receiver.received[0].json["event"] == "DOCUMENT_COMPLETED"


async def test_a_row_due_a_moment_ahead_in_a_millisecond_column_goes_when_due(
    db: str, receiver: Receiver
) -> None:
    # A timestamp(3) due column written with the application's "now" rounded up, or a few
    # milliseconds ahead: the claim that its insert wakes finds it not due yet, and the
    # claimer's timer takes it when it is.
    execute(
        db,
        "CREATE TABLE jobs (id serial PRIMARY KEY, status text NOT NULL DEFAULT 'pending', "
        "due timestamp(3))",
    )
    config = table_config(
        db, {"jobs": table_source("jobs", receiver.url, due="due")}, relay=NO_SWEEP
    )
    await install(config)
    async with running(config) as relay:
        await relay.claimers["jobs"].idle.wait()  # its start-up passes done
        execute(
            db,
            "INSERT INTO jobs (due) VALUES ((now() AT TIME ZONE 'UTC') + interval '30 ms')",
        )
        await receiver.wait_count(1)
    [row] = await systems.rows(
        db, "SELECT EXTRACT(EPOCH FROM due AT TIME ZONE 'UTC') AS t FROM jobs"
    )
    assert receiver.received[0].at >= float(row["t"])  # not before it fell due
