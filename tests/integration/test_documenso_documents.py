"""Documenso document status webhooks, on Documenso's real table shapes (current and legacy)."""

from __future__ import annotations

import re
from typing import Any

import orjson
import psycopg
import pytest
from aiohttp import web

from relay import config as config_mod
from relay.config import Config, ConfigError
from relay.sources import documenso_payload
from tests.integration.documenso_migrations import as_documenso, documenso_execute
from tests.integration.documenso_schema import ENVELOPE, LEGACY_DOCUMENT
from tests.support import Receiver, install, raw_config, running

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def documenso_config(db: str, url: str, **extra: Any) -> Config:
    source = {"kind": "documenso_documents", "url": url, "secret": "s3cret", **extra}
    return config_mod.from_mapping(raw_config(db, sources={"documenso": source}), {})


def execute(db: str, statements: str, params: dict[str, Any] | None = None) -> None:
    """Documenso's DDL and writes, as Documenso's role."""
    documenso_execute(db, statements, params)


def events(db: str) -> list[tuple[str, dict[str, Any]]]:
    """The events recorded, each with the payload relay will send for it."""
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT topic, payload::text FROM relay.documenso_events ORDER BY id")
        return [(r[0], orjson.loads(documenso_payload.body(r[1]))) for r in rows.fetchall()]


@pytest.fixture
def envelope_db(db: str) -> str:
    execute(db, ENVELOPE)
    # Inserted as Prisma does: ids and "updatedAt" supplied by the client.
    execute(
        db,
        """
        INSERT INTO "DocumentMeta" ("id", "subject") VALUES ('meta_1', 'Please sign');
        INSERT INTO "Envelope" ("id", "secondaryId", "type", "updatedAt", "title", "source",
                                "internalVersion", "userId", "teamId", "documentMetaId")
        VALUES ('envelope_abcdefhiklmnorst', 'document_42', 'DOCUMENT', now(), 'Contract',
                'DOCUMENT', 2, 1, 7, 'meta_1');
        INSERT INTO "Recipient" ("envelopeId", "email", "name", "token")
        VALUES ('envelope_abcdefhiklmnorst', 'ann@example.com', 'Ann', 'tok1'),
               ('envelope_abcdefhiklmnorst', 'bob@example.com', 'Bob', 'tok2');
        INSERT INTO "DocumentMeta" ("id") VALUES ('meta_2');
        INSERT INTO "Envelope" ("id", "secondaryId", "type", "updatedAt", "title", "source",
                                "internalVersion", "userId", "teamId", "documentMetaId")
        VALUES ('envelope_template0000000', 'template_3', 'TEMPLATE', now(), 'A template',
                'TEMPLATE', 2, 1, 7, 'meta_2');
        """,
    )
    return db


SEND = """UPDATE "Envelope" SET "status" = 'PENDING', "updatedAt" = now()
          WHERE "id" = 'envelope_abcdefhiklmnorst'"""
COMPLETE = """UPDATE "Envelope" SET "status" = 'COMPLETED', "completedAt" = now(),
              "updatedAt" = now() WHERE "id" = 'envelope_abcdefhiklmnorst'"""


async def test_draft_to_pending_to_completed_sends_documenso_webhooks(
    envelope_db: str, receiver: Receiver
) -> None:
    config = documenso_config(envelope_db, receiver.url)
    await install(config)
    async with running(config):
        execute(envelope_db, SEND)
        await receiver.wait_count(1)
        execute(envelope_db, COMPLETE)
        await receiver.wait_count(2)

    sent, completed = receiver.received
    for request in (sent, completed):
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["X-Documenso-Secret"] == "s3cret"
        assert "webhook-signature" not in request.headers  # Documenso sends no HMAC
        assert list(request.json) == ["event", "payload", "createdAt", "webhookEndpoint"]
        assert ISO_Z.match(request.json["createdAt"])
        assert request.json["webhookEndpoint"] == receiver.url
    assert sent.json["event"] == "DOCUMENT_SENT"
    assert completed.json["event"] == "DOCUMENT_COMPLETED"

    payload = completed.json["payload"]
    # v2.13's shape, in its order: the schema has "signatureLevel".
    assert list(payload) == V2_13_KEYS
    assert list(payload["documentMeta"]) == V2_13_META_KEYS
    assert list(payload["recipients"][0]) == V2_13_RECIPIENT_KEYS
    assert payload["id"] == 42
    assert payload["envelopeId"] == "envelope_abcdefhiklmnorst"
    assert payload["status"] == "COMPLETED"
    assert payload["title"] == "Contract"
    assert (payload["userId"], payload["teamId"]) == (1, 7)
    assert ISO_Z.match(payload["completedAt"]) and ISO_Z.match(payload["createdAt"])
    assert payload["deletedAt"] is None
    assert payload["documentMeta"]["subject"] == "Please sign"
    assert [r["email"] for r in payload["recipients"]] == ["ann@example.com", "bob@example.com"]
    assert payload["Recipient"] == payload["recipients"]
    first = payload["recipients"][0]
    assert (first["documentId"], first["envelopeId"], first["role"]) == (
        42,
        "envelope_abcdefhiklmnorst",
        "SIGNER",
    )
    assert first["signedAt"] is None
    assert sent.json["payload"]["status"] == "PENDING"


async def test_only_real_status_changes_of_documents_produce_events(envelope_db: str) -> None:
    config = documenso_config(envelope_db, "http://127.0.0.1:9/unused")
    await install(config)
    # Prisma bumps "updatedAt" on every update: not an event.
    execute(envelope_db, """UPDATE "Envelope" SET "updatedAt" = now(), "title" = 'Renamed'""")
    # A template's status change: not an event.
    execute(
        envelope_db,
        """UPDATE "Envelope" SET "status" = 'PENDING' WHERE "type" = 'TEMPLATE'""",
    )
    # Setting the status it already has: not an event.
    execute(envelope_db, """UPDATE "Envelope" SET "status" = 'DRAFT', "updatedAt" = now()""")
    assert events(envelope_db) == []
    execute(envelope_db, SEND)
    assert [topic for topic, _ in events(envelope_db)] == ["DOCUMENT_SENT"]


async def test_the_payload_is_captured_when_the_status_changes(envelope_db: str) -> None:
    config = documenso_config(envelope_db, "http://127.0.0.1:9/unused")
    await install(config)
    execute(envelope_db, SEND)
    execute(envelope_db, """UPDATE "Recipient" SET "email" = 'changed@example.com'""")
    ((topic, payload),) = events(envelope_db)
    assert topic == "DOCUMENT_SENT"
    assert payload["recipients"][0]["email"] == "ann@example.com"


async def test_events_committed_before_relay_started_are_delivered(
    envelope_db: str, receiver: Receiver
) -> None:
    config = documenso_config(envelope_db, receiver.url)
    await install(config)
    execute(envelope_db, SEND)
    execute(envelope_db, COMPLETE)
    async with running(config):
        await receiver.wait_count(2)
    assert [r.json["event"] for r in receiver.received] == ["DOCUMENT_SENT", "DOCUMENT_COMPLETED"]


async def test_rejected_and_cancelled_map_to_their_events(envelope_db: str) -> None:
    config = documenso_config(envelope_db, "http://127.0.0.1:9/unused")
    await install(config)
    execute(envelope_db, SEND)
    execute(
        envelope_db, """UPDATE "Envelope" SET "status" = 'REJECTED' WHERE "type" = 'DOCUMENT'"""
    )
    execute(
        envelope_db, """UPDATE "Envelope" SET "status" = 'CANCELLED' WHERE "type" = 'DOCUMENT'"""
    )
    assert [t for t, _ in events(envelope_db)] == [
        "DOCUMENT_SENT",
        "DOCUMENT_REJECTED",
        "DOCUMENT_CANCELLED",
    ]


async def test_legacy_document_schema(db: str, receiver: Receiver) -> None:
    execute(db, LEGACY_DOCUMENT)
    execute(
        db,
        """
        INSERT INTO "Document" ("userId", "title", "documentDataId", "source", "teamId")
        VALUES (3, 'Old contract', 'data_1', 'DOCUMENT', 5);
        INSERT INTO "DocumentMeta" ("id", "subject", "documentId") VALUES ('m1', 'Sign it', 1);
        INSERT INTO "Recipient" ("documentId", "email", "token") VALUES (1, 'cy@example.com', 't');
        """,
    )
    config = documenso_config(db, receiver.url)
    await install(config)
    async with running(config):
        execute(db, """UPDATE "Document" SET "status" = 'PENDING' WHERE "id" = 1""")
        await receiver.wait_count(1)
    body = receiver.received[0].json
    assert body["event"] == "DOCUMENT_SENT"
    payload = body["payload"]
    # Documenso v1.10 to v1.12's payload (its zod schema's order), not the Envelope one.
    assert list(payload) == LEGACY_KEYS
    assert (payload["id"], payload["documentDataId"]) == (1, "data_1")
    meta = payload["documentMeta"]
    assert list(meta) == LEGACY_META_KEYS
    assert (meta["subject"], meta["timezone"], meta["dateFormat"]) == (
        "Sign it",
        "Etc/UTC",
        "yyyy-MM-dd hh:mm a",
    )
    (recipient,) = payload["recipients"]
    assert list(recipient) == LEGACY_RECIPIENT_KEYS
    assert (recipient["email"], recipient["documentId"]) == ("cy@example.com", 1)


# From Documenso's webhook-payload.ts at v1.12.10 and v2.17.0 (docs/research/documenso-payloads.md).
LEGACY_KEYS = [
    "id",
    "externalId",
    "userId",
    "authOptions",
    "formValues",
    "visibility",
    "title",
    "status",
    "documentDataId",
    "createdAt",
    "updatedAt",
    "completedAt",
    "deletedAt",
    "teamId",
    "templateId",
    "source",
    "documentMeta",
    "recipients",
    "Recipient",
]
LEGACY_META_KEYS = [
    "id",
    "subject",
    "message",
    "timezone",
    "password",
    "dateFormat",
    "redirectUrl",
    "signingOrder",
    "typedSignatureEnabled",
    "language",
    "distributionMethod",
    "emailSettings",
]
LEGACY_RECIPIENT_KEYS = [
    "id",
    "documentId",
    "templateId",
    "email",
    "name",
    "token",
    "documentDeletedAt",
    "expired",
    "signedAt",
    "authOptions",
    "signingOrder",
    "rejectionReason",
    "role",
    "readStatus",
    "signingStatus",
    "sendStatus",
]
V2_13_KEYS = [
    "id",
    "envelopeId",
    "externalId",
    "userId",
    "authOptions",
    "formValues",
    "visibility",
    "title",
    "status",
    "createdAt",
    "updatedAt",
    "completedAt",
    "deletedAt",
    "teamId",
    "templateId",
    "source",
    "documentMeta",
    "recipients",
    "Recipient",
]
V2_13_META_KEYS = [
    "id",
    "subject",
    "message",
    "timezone",
    "dateFormat",
    "redirectUrl",
    "signingOrder",
    "allowDictateNextSigner",
    "typedSignatureEnabled",
    "uploadSignatureEnabled",
    "drawSignatureEnabled",
    "language",
    "distributionMethod",
    "emailSettings",
]
V2_13_RECIPIENT_KEYS = [
    "id",
    "envelopeId",
    "documentId",
    "templateId",
    "email",
    "name",
    "token",
    "documentDeletedAt",
    "expiresAt",
    "expirationNotifiedAt",
    "signedAt",
    "authOptions",
    "signingOrder",
    "rejectionReason",
    "role",
    "readStatus",
    "signingStatus",
    "sendStatus",
]


async def test_install_on_a_database_without_documenso_says_what_is_missing(db: str) -> None:
    config = documenso_config(db, "http://127.0.0.1:9/unused")
    with pytest.raises(
        ConfigError, match=r'sources\.documenso: no Documenso document table.*"Envelope"'
    ):
        await install(config)


async def test_documensos_own_prisma_database_url_works_as_it_is(
    envelope_db: str, receiver: Receiver
) -> None:
    info = psycopg.conninfo.conninfo_to_dict(envelope_db)
    prisma_url = (
        f"postgresql://{info['user']}@{info['host']}:{info['port']}/{info['dbname']}"
        f"?pgbouncer=true&schema=public&connection_limit=5"
    )
    config = documenso_config(prisma_url, receiver.url)
    assert config.pgbouncer
    await install(config)
    async with running(config) as relay:
        for _ in range(7):  # past psycopg's auto-prepare threshold
            execute(envelope_db, SEND)
            execute(envelope_db, """UPDATE "Envelope" SET "status" = 'DRAFT'""")
        await receiver.wait_count(7)
        # Through PgBouncer's transaction mode nothing may be prepared on the server.
        async with relay.store.pool.connection() as conn:
            assert conn.prepare_threshold is None
            cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
            assert await cur.fetchone() == (0,)
    assert {r.json["event"] for r in receiver.received} == {"DOCUMENT_SENT"}


async def test_sending_many_documents_in_one_transaction_takes_no_subtransaction_ids(
    envelope_db: str,
) -> None:
    # The event's INSERT sat in an EXCEPTION block: each row took a subtransaction id, and a
    # transaction changing more than 64 documents overflowed PostgreSQL's subtransaction cache,
    # which slows every other session while that transaction is open.
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    execute(
        envelope_db,
        """
        INSERT INTO "DocumentMeta" ("id") SELECT 'bulk_' || g FROM generate_series(1, 100) g;
        INSERT INTO "Envelope" ("id", "secondaryId", "type", "updatedAt", "title", "source",
                                "internalVersion", "userId", "teamId", "documentMetaId")
        SELECT 'bulk_' || g, 'document_' || (1000 + g), 'DOCUMENT', now(), 'Bulk', 'DOCUMENT',
               2, 1, 7, 'bulk_' || g
        FROM generate_series(1, 100) g;
        """,
    )
    with psycopg.connect(as_documenso(envelope_db)) as conn, conn.transaction():
        conn.execute(
            """UPDATE "Envelope" SET "status" = 'PENDING', "updatedAt" = now()
               WHERE "id" LIKE 'bulk_%'"""
        )
        # What relay does at commit, done now, so that it is counted too.
        conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        row = conn.execute(
            "SELECT s.subxact_count, s.subxact_overflowed "
            "FROM pg_stat_get_backend_idset() AS b(id), pg_stat_get_backend_subxact(b.id) AS s "
            "WHERE pg_stat_get_backend_pid(b.id) = pg_backend_pid()"
        ).fetchone()
    assert row == (0, False)
    assert len(events(envelope_db)) == 100


async def test_a_documents_events_arrive_in_order_when_the_first_fails(
    envelope_db: str, receiver: Receiver
) -> None:
    # The preset orders a document's events by default: DOCUMENT_COMPLETED waits for
    # DOCUMENT_SENT, which fails twice first.
    async def behaviour(request: web.Request, _: int) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        tries = sum(1 for r in receiver.received if r.json["event"] == "DOCUMENT_SENT")
        if body["event"] == "DOCUMENT_SENT" and tries <= 2:
            return web.Response(status=503, text="not yet")
        return web.Response(text="ok")

    receiver.behaviour = behaviour
    config = documenso_config(envelope_db, receiver.url)
    await install(config)
    with psycopg.connect(envelope_db) as conn:
        [(key,)] = conn.execute(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index "
            "WHERE indrelid = 'relay.documenso_events'::regclass "
            "AND pg_get_indexdef(indexrelid) LIKE '%relay_order%'"
        ).fetchall()
    assert "webhook_id" in key and "'id'" in key
    async with running(config):
        execute(envelope_db, SEND)
        execute(envelope_db, COMPLETE)
        await receiver.wait_count(4)
    assert [r.json["event"] for r in receiver.received] == [
        "DOCUMENT_SENT",
        "DOCUMENT_SENT",
        "DOCUMENT_SENT",
        "DOCUMENT_COMPLETED",
    ]
    with psycopg.connect(envelope_db) as conn:
        keys = conn.execute(
            "SELECT DISTINCT coalesce(webhook_id, '') || ':' || (payload->>'id') "
            "FROM relay.documenso_events"
        ).fetchall()
    assert len(keys) == 1 and keys[0][0] is not None  # one key, the document's
