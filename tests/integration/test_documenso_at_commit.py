"""Documenso's document events are decided when Documenso's transaction commits, from the
document as the transaction leaves it; deletes send what Documenso's delete-document.ts sends; a
status change made while relay's trigger was missing is sent when it comes back; and no trigger
of relay's names a Documenso column, so Prisma's migrations may alter any of them."""

from __future__ import annotations

import psycopg
import pytest

from relay import config as config_mod
from tests.integration.documenso_migrations import as_documenso
from tests.integration.documenso_schema import LEGACY_DOCUMENT
from tests.integration.test_documenso_documents import (
    COMPLETE,
    SEND,
    documenso_config,
    envelope_db,
    events,
    execute,
)
from tests.integration.test_triggers_come_back import NO_SWEEP, sweep
from tests.support import Receiver, install, raw_config, running

__all__ = ["envelope_db"]  # a fixture, used by name

DOCUMENT = "envelope_abcdefhiklmnorst"

# What Prisma Migrate generates when an enum loses a value, after the data step a developer adds
# to move the rows that hold it. Before relay's triggers named no column, the ALTER COLUMN ...
# TYPE failed: "cannot alter type of a column used in a trigger definition".
ENUM_MIGRATION = """
UPDATE "Envelope" SET "status" = 'COMPLETED', "updatedAt" = now() WHERE "status" = 'REJECTED';
CREATE TYPE "DocumentStatus_new" AS ENUM ('DRAFT', 'PENDING', 'COMPLETED', 'CANCELLED');
ALTER TABLE "Envelope" ALTER COLUMN "status" DROP DEFAULT;
ALTER TABLE "Envelope" ALTER COLUMN "status" TYPE "DocumentStatus_new"
    USING ("status"::text::"DocumentStatus_new");
ALTER TYPE "DocumentStatus" RENAME TO "DocumentStatus_old";
ALTER TYPE "DocumentStatus_new" RENAME TO "DocumentStatus";
DROP TYPE "DocumentStatus_old";
ALTER TABLE "Envelope" ALTER COLUMN "status" SET DEFAULT 'DRAFT';
"""


def topics(db: str) -> list[str]:
    return [topic for topic, _ in events(db)]


async def test_a_prisma_enum_migration_runs_with_relay_installed(envelope_db: str) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    execute(envelope_db, SEND)
    execute(
        envelope_db,
        """UPDATE "Envelope" SET "status" = 'REJECTED' WHERE "id" = %(id)s""",
        {"id": DOCUMENT},
    )
    # One transaction, as Prisma Migrate runs a migration file.
    with psycopg.connect(as_documenso(envelope_db)) as conn, conn.transaction():
        conn.execute(ENUM_MIGRATION)
    execute(
        envelope_db,
        """UPDATE "Envelope" SET "status" = 'CANCELLED' WHERE "id" = %(id)s""",
        {"id": DOCUMENT},
    )
    assert topics(envelope_db) == [
        "DOCUMENT_SENT",
        "DOCUMENT_REJECTED",
        "DOCUMENT_COMPLETED",  # the migration's own data step, sent like any other write
        "DOCUMENT_CANCELLED",
    ]


def relay_dependencies_on_documenso_columns(db: str) -> list[str]:
    with psycopg.connect(db) as conn:
        cur = conn.execute(
            """SELECT t.tgname::text FROM pg_depend AS dep
               JOIN pg_trigger AS t ON dep.classid = 'pg_trigger'::regclass AND dep.objid = t.oid
               WHERE dep.refobjsubid > 0 AND t.tgname LIKE 'relay%'"""
        )
        return [r[0] for r in cur.fetchall()]


@pytest.mark.parametrize("shape", ["envelope", "legacy"])
async def test_no_trigger_of_relays_depends_on_a_documenso_column(
    db: str, envelope_db: str, shape: str
) -> None:
    if shape == "legacy":
        execute(db, 'DROP TABLE "Recipient", "Envelope", "DocumentMeta" CASCADE; ' + _TYPES)
        execute(db, LEGACY_DOCUMENT)
    await install(documenso_config(db, "http://127.0.0.1:9/unused"))
    assert relay_dependencies_on_documenso_columns(db) == []


_TYPES = """DROP TYPE "DocumentStatus", "DocumentSource", "DocumentVisibility", "RecipientRole",
    "ReadStatus", "SigningStatus", "SendStatus", "DocumentSigningOrder",
    "DocumentDistributionMethod", "EnvelopeType";"""


def create_from_direct_template(db: str, internal_version: int, others: str) -> None:
    """What Documenso's create-document-from-direct-template.ts writes, in one transaction: the
    document as PENDING first, its recipients (the direct one already SIGNED) after it."""
    params = {
        "version": internal_version,
        "role": "CC" if others == "cc" else "SIGNER",
        "signing": "SIGNED" if others == "cc" else "NOT_SIGNED",
    }
    with psycopg.connect(as_documenso(db)) as conn, conn.transaction():
        conn.execute("""INSERT INTO "DocumentMeta" ("id") VALUES ('meta_9')""")
        conn.execute(
            """INSERT INTO "Envelope" ("id", "secondaryId", "type", "status", "updatedAt",
                                       "title", "source", "internalVersion", "userId", "teamId",
                                       "documentMetaId")
               VALUES ('envelope_direct', 'document_9', 'DOCUMENT', 'PENDING', now(), 'Direct',
                       'TEMPLATE_DIRECT_LINK', %(version)s, 1, 7, 'meta_9')""",
            params,
        )
        conn.execute(
            """INSERT INTO "Recipient" ("envelopeId", "email", "name", "token", "role",
                                        "signingStatus")
               VALUES ('envelope_direct', 'other@example.com', 'Other', 'tok8', %(role)s,
                       %(signing)s),
                      ('envelope_direct', 'cy@example.com', 'Cy', 'tok9', 'SIGNER', 'SIGNED')""",
            params,
        )
        conn.execute(
            """UPDATE "DocumentMeta" SET "subject" = 'Signed by link' WHERE "id" = 'meta_9'"""
        )


def send_document(db: str, envelope: str) -> None:
    """send-document.ts on a PENDING "Envelope" of internalVersion 2: the audit row of the
    fields it auto-inserted (always written, even for none) and the status written again."""
    with psycopg.connect(as_documenso(db)) as conn, conn.transaction():
        conn.execute(
            """INSERT INTO "DocumentAuditLog" ("id", "type", "data", "envelopeId")
               VALUES (gen_random_uuid()::text, 'DOCUMENT_FIELDS_AUTO_INSERTED', '{}', %(id)s)""",
            {"id": envelope},
        )
        conn.execute(
            """UPDATE "Envelope" SET "status" = 'PENDING', "updatedAt" = now()
               WHERE "id" = %(id)s""",
            {"id": envelope},
        )


async def test_the_payload_is_the_document_as_its_transaction_commits(envelope_db: str) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    # internalVersion 1: no audit row tells Documenso's send that follows from an edit, so the
    # document created as PENDING is the one sent, with someone left to sign.
    create_from_direct_template(envelope_db, 1, others="signer")
    ((topic, payload),) = events(envelope_db)
    assert topic == "DOCUMENT_SENT"
    assert [r["email"] for r in payload["recipients"]] == ["other@example.com", "cy@example.com"]
    assert payload["documentMeta"]["subject"] == "Signed by link"


async def test_a_direct_template_document_nobody_is_left_to_sign_sends_no_document_sent(
    envelope_db: str,
) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    create_from_direct_template(envelope_db, 1, others="cc")
    assert events(envelope_db) == []


async def test_a_direct_template_document_is_sent_by_the_send_that_follows_it(
    envelope_db: str,
) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    create_from_direct_template(envelope_db, 2, others="signer")
    assert events(envelope_db) == []
    send_document(envelope_db, "envelope_direct")
    ((topic, payload),) = events(envelope_db)
    assert (topic, payload["id"]) == ("DOCUMENT_SENT", 9)


async def test_several_changes_in_one_transaction_make_one_event_of_the_last_state(
    envelope_db: str,
) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    with psycopg.connect(as_documenso(envelope_db)) as conn, conn.transaction():
        conn.execute(SEND)
        conn.execute(COMPLETE)
    ((topic, payload),) = events(envelope_db)
    assert (topic, payload["status"]) == ("DOCUMENT_COMPLETED", "COMPLETED")
    # And a change undone before the commit sends nothing.
    with psycopg.connect(as_documenso(envelope_db)) as conn, conn.transaction():
        conn.execute("""UPDATE "Envelope" SET "status" = 'REJECTED' WHERE "id" = %s""", [DOCUMENT])
        conn.execute("""UPDATE "Envelope" SET "status" = 'COMPLETED' WHERE "id" = %s""", [DOCUMENT])
    assert topics(envelope_db) == ["DOCUMENT_COMPLETED"]


async def test_sending_a_pending_document_again_sends_document_sent_again(
    envelope_db: str,
) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    send_document(envelope_db, DOCUMENT)  # DRAFT -> PENDING, with its audit row: one event
    send_document(envelope_db, DOCUMENT)  # PENDING again: Documenso sends it again
    # An edit that keeps every value (update-envelope.ts always writes authOptions) changes
    # nothing but "updatedAt" too, without the audit row: not a send.
    execute(
        envelope_db,
        """UPDATE "Envelope" SET "authOptions" = "authOptions", "updatedAt" = now()
           WHERE "id" = %(id)s""",
        {"id": DOCUMENT},
    )
    assert topics(envelope_db) == ["DOCUMENT_SENT", "DOCUMENT_SENT"]


async def test_sealing_a_completed_document_again_sends_document_completed_again(
    envelope_db: str,
) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    execute(envelope_db, COMPLETE)
    # An admin's reseal (or the seal sweep) runs the seal job again: a new completedAt.
    execute(
        envelope_db,
        """UPDATE "Envelope" SET "completedAt" = now() + interval '1 second',
           "updatedAt" = now() WHERE "id" = %(id)s""",
        {"id": DOCUMENT},
    )
    # Any other write to a completed document sends nothing.
    execute(
        envelope_db,
        """UPDATE "Envelope" SET "title" = 'Renamed', "updatedAt" = now() WHERE "id" = %(id)s""",
        {"id": DOCUMENT},
    )
    assert topics(envelope_db) == ["DOCUMENT_COMPLETED", "DOCUMENT_COMPLETED"]


async def test_cancelling_sends_the_document_as_it_was_read_before(envelope_db: str) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    execute(envelope_db, SEND)
    execute(
        envelope_db,
        """UPDATE "Envelope" SET "updatedAt" = '2026-01-02 03:04:05.678' WHERE "id" = %(id)s""",
        {"id": DOCUMENT},
    )
    execute(
        envelope_db,
        """UPDATE "Envelope" SET "status" = 'CANCELLED', "completedAt" = now(),
           "updatedAt" = now() WHERE "id" = %(id)s""",
        {"id": DOCUMENT},
    )
    (_, (topic, payload)) = events(envelope_db)
    assert (topic, payload["status"]) == ("DOCUMENT_CANCELLED", "CANCELLED")
    # cancel-document.ts maps the envelope it read before its update.
    assert payload["updatedAt"] == "2026-01-02T03:04:05.678Z"
    assert payload["completedAt"] is not None


async def test_deleting_a_pending_document_sends_document_cancelled_as_it_was(
    envelope_db: str,
) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    execute(envelope_db, SEND)
    execute(envelope_db, """DELETE FROM "Envelope" WHERE "id" = %(id)s""", {"id": DOCUMENT})
    (_, (topic, payload)) = events(envelope_db)
    assert (topic, payload["status"], payload["id"]) == ("DOCUMENT_CANCELLED", "PENDING", 42)
    assert [r["name"] for r in payload["recipients"]] == ["Ann", "Bob"]


async def test_deleting_a_completed_document_softly_sends_document_cancelled(
    envelope_db: str,
) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    execute(envelope_db, COMPLETE)
    execute(
        envelope_db,
        """UPDATE "Envelope" SET "deletedAt" = now(), "updatedAt" = now() WHERE "id" = %(id)s""",
        {"id": DOCUMENT},
    )
    (_, (topic, payload)) = events(envelope_db)
    assert (topic, payload["status"]) == ("DOCUMENT_CANCELLED", "COMPLETED")
    assert payload["deletedAt"] is not None


async def test_deleting_a_draft_sends_document_cancelled_deleting_with_the_team_nothing(
    envelope_db: str,
) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    execute(
        envelope_db,
        """
        CREATE TABLE "Team" ("id" integer PRIMARY KEY);
        INSERT INTO "Team" VALUES (7);
        ALTER TABLE "Envelope" ADD FOREIGN KEY ("teamId") REFERENCES "Team" ON DELETE CASCADE;
        INSERT INTO "DocumentMeta" ("id") VALUES ('meta_d');
        INSERT INTO "Envelope" ("id", "secondaryId", "type", "updatedAt", "title", "source",
                                "internalVersion", "userId", "teamId", "documentMetaId")
        VALUES ('envelope_draft', 'document_43', 'DOCUMENT', now(), 'Draft', 'DOCUMENT', 2, 1, 7,
                'meta_d');
        """,
    )
    execute(envelope_db, """DELETE FROM "Envelope" WHERE "id" = 'envelope_draft'""")
    execute(envelope_db, SEND)
    # Deleted with its team (a cascade, as orphan-envelopes.ts and FK cascades do): nothing.
    execute(envelope_db, """DELETE FROM "Team" WHERE "id" = 7""")
    assert [(t, p["id"], p["status"]) for t, p in events(envelope_db)] == [
        ("DOCUMENT_CANCELLED", 43, "DRAFT"),
        ("DOCUMENT_SENT", 42, "PENDING"),
    ]


async def test_a_status_change_made_while_the_trigger_was_missing_is_sent_when_it_returns(
    envelope_db: str, receiver: Receiver
) -> None:
    execute(envelope_db, SEND)  # before relay was installed: history, not sent
    source = {"kind": "documenso_documents", "url": receiver.url, "secret": "s3cret"}
    config = config_mod.from_mapping(
        raw_config(envelope_db, relay=NO_SWEEP, sources={"documenso": source}), {}
    )
    await install(config)
    assert events(envelope_db) == []
    async with running(config) as relay:
        # A migration that drops the trigger with its table (here: only the trigger), while
        # Documenso goes on.
        execute(envelope_db, 'DROP TRIGGER relay_documenso_change ON "Envelope"')
        execute(envelope_db, COMPLETE)
        await sweep(relay)
        await receiver.wait_count(1)
    body = receiver.received[0].json
    assert (body["event"], body["payload"]["status"]) == ("DOCUMENT_COMPLETED", "COMPLETED")
    assert [r["email"] for r in body["payload"]["recipients"]] == [
        "ann@example.com",
        "bob@example.com",
    ]
    # Sent once: the next install finds nothing missed.
    await install(config)
    assert topics(envelope_db) == ["DOCUMENT_COMPLETED"]


async def test_a_recipient_write_commits_even_when_relay_s_event_table_is_gone(
    envelope_db: str,
) -> None:
    # The recipient trigger checks only relay's table of changes; the events are written at
    # commit. Without their table, the commit itself must still succeed.
    await install(
        documenso_config(envelope_db, "http://127.0.0.1:9/unused", events=["DOCUMENT_OPENED"])
    )
    with psycopg.connect(envelope_db, autocommit=True) as conn:
        conn.execute("DROP TABLE relay.documenso_events")
    notices: list[str] = []
    with psycopg.connect(as_documenso(envelope_db), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("""UPDATE "Recipient" SET "readStatus" = 'OPENED' WHERE "name" = 'Ann'""")
        (status,) = (
            conn.execute(
                """SELECT "readStatus"::text FROM "Recipient" WHERE "name" = 'Ann'"""
            ).fetchone()
            or ()
        )
    assert status == "OPENED"
    assert any("relay.documenso_events" in n for n in notices), notices
