"""Documenso's own webhook jobs ("BackgroundJob" internal.execute-webhook), claimed and settled
the way Documenso's local runner does, on Documenso's table shapes."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from aiohttp import web

from relay import config as config_mod
from relay.config import Config, ConfigError
from relay.db.store import Store
from tests import systems
from tests.integration.documenso_migrations import documenso_execute
from tests.integration.documenso_schema import ENVELOPE, JOBS, WEBHOOKS
from tests.support import Receiver, install, raw_config, running

WEBHOOK_JOB = """
INSERT INTO "BackgroundJob" ("id", "jobId", "name", "version", "updatedAt", "payload",
                             "maxRetries", "status", "submittedAt")
VALUES (%(id)s, 'internal.execute-webhook', 'Execute Webhook', '1.0.0',
        (now() AT TIME ZONE 'UTC') + %(updated)s::interval,
        jsonb_build_object('event', 'DOCUMENT_COMPLETED', 'webhookId', %(webhook)s::text,
                           'data', jsonb_build_object('id', 42, 'status', 'COMPLETED')),
        %(max_retries)s, %(status)s, (now() AT TIME ZONE 'UTC') + %(updated)s::interval)
"""


def jobs_config(db: str, **extra: Any) -> Config:
    source = {"kind": "documenso_jobs", **extra}
    return config_mod.from_mapping(raw_config(db, sources={"jobs": source}), {})


def execute(db: str, statements: str, params: dict[str, Any] | None = None) -> None:
    """Documenso's DDL and writes, as Documenso's role."""
    documenso_execute(db, statements, params)


def add_job(db: str, job_id: str, webhook: str = "wh_1", **overrides: Any) -> None:
    params = {"id": job_id, "webhook": webhook, "max_retries": 3, "status": "PENDING"}
    params["updated"] = "0 seconds"
    params.update(overrides)
    execute(db, WEBHOOK_JOB, params)


def job(db: str, job_id: str) -> dict[str, Any]:
    with psycopg.connect(db, row_factory=psycopg.rows.dict_row) as conn:
        row = conn.execute(
            'SELECT *, status::text AS state FROM "BackgroundJob" WHERE id = %s', (job_id,)
        ).fetchone()
        assert row is not None
        return row


def calls(db: str) -> list[dict[str, Any]]:
    with psycopg.connect(db, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(
            'SELECT *, status::text AS state, event::text AS ev FROM "WebhookCall" '
            'ORDER BY "createdAt", id'
        ).fetchall()


@pytest.fixture
def documenso_db(db: str, receiver: Receiver) -> str:
    execute(db, JOBS + WEBHOOKS)
    execute(
        db,
        """
        INSERT INTO "Webhook" ("id", "webhookUrl", "secret", "enabled", "userId", "teamId")
        VALUES ('wh_1', %(url)s, 'hook-secret', true, 1, 1),
               ('wh_off', %(url)s, NULL, false, 1, 1)
        """,
        {"url": receiver.url},
    )
    return db


async def test_webhook_job_is_delivered_recorded_and_completed(
    documenso_db: str, receiver: Receiver
) -> None:
    config = jobs_config(documenso_db)
    await install(config)
    async with running(config):
        add_job(documenso_db, "cjob1")
        await receiver.wait_count(1)
    request = receiver.received[0]
    assert request.headers["X-Documenso-Secret"] == "hook-secret"
    assert list(request.json) == ["event", "payload", "createdAt", "webhookEndpoint"]
    assert request.json["event"] == "DOCUMENT_COMPLETED"
    assert request.json["payload"] == {"id": 42, "status": "COMPLETED"}
    assert request.json["webhookEndpoint"] == receiver.url
    row = job(documenso_db, "cjob1")
    assert row["state"] == "COMPLETED" and row["completedAt"] is not None
    assert row["retried"] == 0
    (call,) = calls(documenso_db)
    assert (call["state"], call["responseCode"], call["webhookId"], call["ev"]) == (
        "SUCCESS",
        200,
        "wh_1",
        "DOCUMENT_COMPLETED",
    )
    assert call["url"] == receiver.url
    assert call["requestBody"] == request.json
    assert call["responseBody"] == "ok"
    # Names in lower case, as fetch's Headers give them to Documenso.
    assert call["responseHeaders"]["content-type"].startswith("text/plain")
    assert all(name == name.lower() for name in call["responseHeaders"])


async def test_failing_receiver_ends_failed_after_max_retries_as_documenso_would(
    documenso_db: str, receiver: Receiver
) -> None:
    async def fail(_: web.Request, __: int) -> web.Response:
        return web.json_response({"error": "nope"}, status=500)

    receiver.behaviour = fail
    config = jobs_config(documenso_db)
    await install(config)
    async with running(config):
        add_job(documenso_db, "cjob2", max_retries=2)
        await receiver.wait_count(3)  # maxRetries + 1 attempts, as Documenso's local runner
    row = job(documenso_db, "cjob2")
    assert row["state"] == "FAILED"
    assert row["retried"] == 2
    assert row["lastRetriedAt"] is not None and row["completedAt"] is not None
    recorded = calls(documenso_db)
    assert [(c["state"], c["responseCode"]) for c in recorded] == [("FAILED", 500)] * 3
    assert recorded[0]["responseBody"] == {"error": "nope"}
    assert len(receiver.received) == 3


@pytest.mark.parametrize(
    ("newest_migration", "attempts"),
    [
        # v1.12.10: the call ran in io.runTask, which gives up after 3 runs.
        ("20250917042725_remove_recipient_unique_email_constraints", 3),
        # v2.17.0: maxRetries + 1.
        ("20260622120000_add_recipient_reminder_count", 4),
    ],
)
async def test_a_failing_webhook_gets_the_attempts_the_detected_documenso_gives_it(
    documenso_db: str, receiver: Receiver, newest_migration: str, attempts: int
) -> None:
    async def fail(_: web.Request, __: int) -> web.Response:
        return web.json_response({"error": "nope"}, status=500)

    receiver.behaviour = fail
    execute(
        documenso_db,
        """CREATE TABLE "_prisma_migrations" (
               id varchar(36) PRIMARY KEY, checksum varchar(64) NOT NULL,
               finished_at timestamptz, migration_name varchar(255) NOT NULL, logs text,
               rolled_back_at timestamptz, started_at timestamptz NOT NULL DEFAULT now(),
               applied_steps_count integer NOT NULL DEFAULT 0)""",
    )
    execute(
        documenso_db,
        """INSERT INTO "_prisma_migrations" (id, checksum, finished_at, migration_name)
           VALUES ('m1', 'x', now(), %(name)s)""",
        {"name": newest_migration},
    )
    config = jobs_config(documenso_db)
    await install(config)
    await systems.watch(documenso_db, "BackgroundJob")
    async with running(config):
        add_job(documenso_db, "cjob5", max_retries=3)
        await systems.wait_rows(
            documenso_db,
            'SELECT status::text AS state FROM "BackgroundJob" WHERE id = %(id)s',
            {"id": "cjob5"},
            lambda rows: rows[0]["state"] == "FAILED",
        )
    assert len(receiver.received) == attempts
    assert len(calls(documenso_db)) == attempts


async def test_a_disabled_webhook_is_called_as_documenso_s_handler_does(
    documenso_db: str, receiver: Receiver
) -> None:
    # Documenso's handler looks the Webhook up by id alone (findUniqueOrThrow): a job already
    # queued for a webhook disabled since is still delivered.
    config = jobs_config(documenso_db)
    await install(config)
    async with running(config):
        add_job(documenso_db, "cjob_off", webhook="wh_off")
        await receiver.wait_count(1)
    assert receiver.received[0].headers["X-Documenso-Secret"] == ""  # its secret is NULL
    assert job(documenso_db, "cjob_off")["state"] == "COMPLETED"
    assert [c["webhookId"] for c in calls(documenso_db)] == ["wh_off"]


async def test_a_job_for_a_deleted_webhook_fails_as_documenso_s_does(
    documenso_db: str, receiver: Receiver
) -> None:
    # findUniqueOrThrow throws before any call: the attempt fails (no "WebhookCall"), the job
    # is retried and ends FAILED after maxRetries + 1 attempts.
    config = jobs_config(documenso_db)
    await install(config)
    await systems.watch(documenso_db, "BackgroundJob")
    async with running(config):
        add_job(documenso_db, "cjob_gone", webhook="wh_deleted", max_retries=1)
        [row] = await systems.wait_rows(
            documenso_db,
            'SELECT status::text AS state, retried FROM "BackgroundJob" WHERE id = %(id)s',
            {"id": "cjob_gone"},
            lambda rows: rows[0]["state"] == "FAILED",
        )
    assert row["retried"] == 1
    assert calls(documenso_db) == []
    assert receiver.received == []


async def test_an_attempt_with_no_answer_is_recorded_as_documenso_records_it(
    documenso_db: str, receiver: Receiver
) -> None:
    # v2.8.1 on: code 0, the error message as the body, no headers.
    execute(
        documenso_db,
        """INSERT INTO "Webhook" ("id", "webhookUrl", "secret", "enabled", "userId", "teamId")
           VALUES ('wh_closed', 'http://127.0.0.1:9/hook', 's', true, 1, 1)""",
    )
    config = jobs_config(documenso_db)
    await install(config)
    await systems.watch(documenso_db, "BackgroundJob")
    async with running(config):
        add_job(documenso_db, "cjob_closed", webhook="wh_closed", max_retries=0)
        await systems.wait_rows(
            documenso_db,
            'SELECT status::text AS state FROM "BackgroundJob" WHERE id = %(id)s',
            {"id": "cjob_closed"},
            lambda rows: rows[0]["state"] == "FAILED",
        )
    (call,) = calls(documenso_db)
    assert (call["state"], call["responseCode"], call["responseHeaders"]) == ("FAILED", 0, {})
    assert isinstance(call["responseBody"], str) and call["responseBody"]


async def test_a_job_processing_under_another_runner_is_left_alone(
    documenso_db: str, receiver: Receiver
) -> None:
    config = jobs_config(documenso_db)
    await install(config)
    add_job(documenso_db, "cjob_theirs", status="PROCESSING", updated="-10 seconds")
    add_job(documenso_db, "cjob_mine", updated="-5 seconds")  # committed before relay started
    async with running(config):
        await receiver.wait_count(1)
    assert receiver.ids() == ["jobs_cjob_mine"]
    theirs = job(documenso_db, "cjob_theirs")
    assert (theirs["state"], theirs["retried"]) == ("PROCESSING", 0)


async def test_a_stuck_job_is_picked_up_after_stuck_after(
    documenso_db: str, receiver: Receiver
) -> None:
    config = jobs_config(documenso_db, stuck_after="1m")
    await install(config)
    add_job(documenso_db, "cjob_stuck", status="PROCESSING", updated="-2 minutes")
    async with running(config):
        await receiver.wait_count(1)
    row = job(documenso_db, "cjob_stuck")
    # The dead runner's attempt counts, as Documenso's "retried" would.
    assert (row["state"], row["retried"]) == ("COMPLETED", 1)
    assert row["lastRetriedAt"] is not None


async def test_other_jobs_are_forwarded_to_their_endpoint(
    documenso_db: str, receiver: Receiver
) -> None:
    config = jobs_config(
        documenso_db, webhooks=False, forward={"send.signing.requested.email": receiver.url}
    )
    await install(config)
    async with running(config):
        execute(
            documenso_db,
            """
            INSERT INTO "BackgroundJob" ("id", "jobId", "name", "version", "updatedAt", "payload")
            VALUES ('cjob_mail', 'send.signing.requested.email', 'Send Signing Email', '1.0.0',
                    now() AT TIME ZONE 'UTC', '{"userId": 1, "documentId": 42}'),
                   ('cjob_seal', 'internal.seal-document', 'Seal Document', '1.0.0',
                    now() AT TIME ZONE 'UTC', '{"documentId": 42}')
            """,
        )
        await receiver.wait_count(1)
    request = receiver.received[0]
    assert request.json == {
        "name": "send.signing.requested.email",
        "payload": {"userId": 1, "documentId": 42},
    }
    assert request.headers["X-Job-Id"] == "cjob_mail"
    assert job(documenso_db, "cjob_mail")["state"] == "COMPLETED"
    assert job(documenso_db, "cjob_seal")["state"] == "PENDING"  # not ours to run


async def test_install_without_background_jobs_names_what_is_missing(db: str) -> None:
    with pytest.raises(ConfigError, match=r'sources\.jobs: no Documenso "BackgroundJob" table'):
        await install(jobs_config(db))


async def test_uninstall_leaves_documenso_as_it_was(documenso_db: str) -> None:
    execute(documenso_db, ENVELOPE)
    source = {"kind": "documenso_documents", "url": "http://127.0.0.1:9/unused"}
    config = config_mod.from_mapping(
        raw_config(documenso_db, sources={"jobs": {"kind": "documenso_jobs"}, "documenso": source}),
        {},
    )
    await install(config)

    def relay_triggers() -> list[str]:
        with psycopg.connect(documenso_db) as conn:
            rows = conn.execute(
                "SELECT tgrelid::regclass::text FROM pg_trigger t JOIN pg_proc p "
                "ON p.oid = t.tgfoid WHERE p.pronamespace = 'relay'::regnamespace"
            ).fetchall()
            return sorted({r[0] for r in rows})

    assert relay_triggers() == [
        '"BackgroundJob"',
        '"Envelope"',
        '"Recipient"',
        "relay.documenso_changes",
        "relay.documenso_events",
    ]
    store = Store(config.database_url, config.sources)
    await store.open()
    try:
        await store.uninstall()
    finally:
        await store.close()
    assert relay_triggers() == []
    add_job(documenso_db, "after_uninstall")  # Documenso's own writes still work
    execute(documenso_db, """UPDATE "Envelope" SET "status" = 'PENDING'""")
    assert job(documenso_db, "after_uninstall")["state"] == "PENDING"
