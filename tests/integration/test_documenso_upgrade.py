"""Upgrading Documenso from v1.12.10 ("Document") to v2.17.0 ("Envelope") with relay running, on
the schema Documenso's own migrations make, every write made as Documenso's own role: no status
change is lost, each event has the payload of the Documenso that wrote it."""

from __future__ import annotations

import psycopg

from relay import config as config_mod
from tests.conftest import Server
from tests.integration.documenso_migrations import (
    documenso_database,
    insert_legacy_documents,
    migrate,
)
from tests.integration.test_triggers_come_back import NO_SWEEP, sweep
from tests.support import Receiver, install, raw_config, running


def documenso_writes(url: str, statement: str, number: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, {"n": number, "key": f"document_{number}"})


async def test_an_upgrade_to_envelopes_with_relay_running_loses_no_status_change(
    server: Server, db: str, receiver: Receiver
) -> None:
    documenso = await documenso_database(server.admin_url, db, "v1.12.10")
    first, second, third = await insert_legacy_documents(documenso, 3)  # all PENDING
    source = {"kind": "documenso_documents", "url": receiver.url, "secret": "s3cret"}
    config = config_mod.from_mapping(
        raw_config(db, relay=NO_SWEEP, sources={"documenso": source}), {}
    )
    await install(config)  # the documents already sent are history: nothing is sent for them
    async with running(config) as relay:
        documenso_writes(
            documenso,
            """UPDATE "Document" SET "status" = 'COMPLETED', "completedAt" = now(),
               "updatedAt" = now() WHERE "id" = %(n)s""",
            first,
        )
        await receiver.wait_count(1)
        # Migration 20250918070645_add_envelopes (v1.13.0) drops "Document" and relay's trigger
        # with it; Documenso goes on writing before relay's next sweep.
        await migrate(documenso, "v1.13.0")
        completed_meanwhile = """UPDATE "Envelope" SET "status" = 'COMPLETED',
            "completedAt" = now(), "updatedAt" = now() WHERE "secondaryId" = %(key)s"""
        documenso_writes(documenso, completed_meanwhile, second)
        await migrate(documenso, "v2.17.0")
        assert (await sweep(relay))["untriggered"] == {}
        await receiver.wait_count(2)
        documenso_writes(
            documenso,
            """UPDATE "Envelope" SET "status" = 'REJECTED', "completedAt" = now(),
               "updatedAt" = now() WHERE "secondaryId" = %(key)s""",
            third,
        )
        await receiver.wait_count(3)
    sent = [r.json for r in receiver.received]
    assert [(b["event"], b["payload"]["id"]) for b in sent] == [
        ("DOCUMENT_COMPLETED", first),
        ("DOCUMENT_COMPLETED", second),
        ("DOCUMENT_REJECTED", third),
    ]
    # v1.12's payload before the upgrade, v2.17's after it.
    before, after, last = (b["payload"] for b in sent)
    assert "envelopeId" not in before and before["documentDataId"] == "data_1"
    assert "password" in before["documentMeta"]
    for payload in (after, last):
        assert payload["envelopeId"].startswith("envelope_") and "documentDataId" not in payload
        assert "expiresAt" in payload["recipients"][0]
        assert payload["recipients"][0]["envelopeId"] == payload["envelopeId"]
    assert [r["email"] for r in after["recipients"]] == ["alice2@example.com", "bob2@example.com"]
