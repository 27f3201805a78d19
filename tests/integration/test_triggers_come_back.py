"""relay's triggers come back by themselves: one dropped while relay runs (a migration that
drops and makes a table anew, Documenso's "Document" becoming "Envelope") is installed again at
the next sweep, and until it can be, readiness names the source and why. Every test here runs
with the periodic sweep an hour away and brings one sweep forward (sweep_now)."""

from __future__ import annotations

from typing import Any

import psycopg

from relay import config as config_mod
from relay.app import Relay
from tests.integration.documenso_migrations import documenso_execute
from tests.integration.documenso_schema import ENUMS, ENVELOPE, LEGACY_DOCUMENT
from tests.integration.test_health import get
from tests.support import (
    Receiver,
    insert_rows,
    install,
    make_config,
    queue_source,
    raw_config,
    running,
    serving,
)

NO_SWEEP = {"sweep_interval": 3600}


def execute(db: str, statements: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(statements)


def triggers(db: str, table: str) -> list[str]:
    with psycopg.connect(db, autocommit=True) as conn:
        cur = conn.execute(
            "SELECT tgname::text FROM pg_trigger WHERE NOT tgisinternal AND tgrelid = %s::regclass "
            "ORDER BY 1",
            (table,),
        )
        return [r[0] for r in cur.fetchall()]


async def sweep(relay: Relay) -> dict[str, Any]:
    """One sweep, brought forward and waited for; what relay then reports."""
    relay.sweeper.sweep_now()
    await relay.sweeper.quiet()
    return relay.status()


async def test_a_trigger_dropped_while_relay_runs_is_installed_again_at_the_next_sweep(
    db: str, receiver: Receiver
) -> None:
    config = make_config(db, relay=NO_SWEEP)
    await install(config)
    async with running(config) as relay:
        execute(db, "DROP TRIGGER relay_notify_deliveries_insert ON webhook_delivery_queue")
        assert (await sweep(relay))["untriggered"] == {}
        assert triggers(db, "webhook_delivery_queue") == [
            "relay_notify_deliveries_insert",
            "relay_notify_deliveries_update",
        ]
        # Woken by the trigger again, not by a sweep.
        await relay.claimers["deliveries"].idle.wait()
        await insert_rows(db, receiver.url, 1)
        await receiver.wait_count(1)


async def test_documenso_s_upgrade_to_envelopes_moves_the_trigger_to_the_new_table(
    db: str, receiver: Receiver
) -> None:
    documenso_execute(db, LEGACY_DOCUMENT)
    source = {"kind": "documenso_documents", "url": receiver.url, "secret": "s3cret"}
    config = config_mod.from_mapping(
        raw_config(db, relay=NO_SWEEP, sources={"documenso": source}), {}
    )
    await install(config)
    async with serving(config) as service:
        relay = service.relay
        # Migration 20250918070645_add_envelopes, in two steps: the legacy tables go...
        documenso_execute(db, 'DROP TABLE "Recipient", "DocumentMeta", "Document" CASCADE')
        await sweep(relay)
        # ... and while no document table is there, readiness says so.
        status, body, _ = await get(service.health_port, "/readyz")
        assert status == 503
        reason = body["untriggered"]["documenso"]  # type: ignore[index]
        assert "relay could not install it again" in reason
        assert "no Documenso document table" in reason
        # ... then the new ones come.
        documenso_execute(db, ENVELOPE[len(ENUMS) :])
        assert (await sweep(relay))["untriggered"] == {}
        assert (await get(service.health_port, "/readyz"))[0] == 200
        assert triggers(db, '"Envelope"') != []
        await relay.claimers["documenso"].idle.wait()
        documenso_execute(
            db,
            """
            INSERT INTO "DocumentMeta" ("id") VALUES ('meta_1');
            INSERT INTO "Envelope" ("id", "secondaryId", "type", "updatedAt", "title", "source",
                                    "internalVersion", "userId", "teamId", "documentMetaId")
            VALUES ('envelope_new', 'document_7', 'DOCUMENT', now(), 'After the upgrade',
                    'DOCUMENT', 2, 1, 7, 'meta_1');
            UPDATE "Envelope" SET "status" = 'PENDING' WHERE "id" = 'envelope_new';
            """,
        )
        await receiver.wait_count(1)
    body = receiver.received[0].json
    assert (body["event"], body["payload"]["id"]) == ("DOCUMENT_SENT", 7)


async def test_a_trigger_another_configuration_installed_is_left_to_relay_install(
    db: str,
) -> None:
    # As during a rolling upgrade: the other relays' trigger still wakes them; replacing it at
    # every sweep would have two versions undo each other's. `relay check` reports it.
    await install(make_config(db))
    installed = function_comment(db)
    config = make_config(db, relay=NO_SWEEP, sources={"deliveries": queue_source(filter="true")})
    async with running(config) as relay:
        assert (await sweep(relay))["untriggered"] == {}
    assert function_comment(db) == installed


def function_comment(db: str) -> str:
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(
            "SELECT obj_description('relay.notify_deliveries'::regproc, 'pg_proc')"
        ).fetchone()
        assert row is not None and row[0]
        return str(row[0])
