"""Documenso's events beyond status changes, and routing like Documenso's: with webhooks = true
each event goes to each of the document's team's enabled "Webhook" rows subscribed to it, with
that row's URL and secret, as Documenso's triggerWebhook picks them."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from relay import config as config_mod
from relay.config import ConfigError
from relay.sources.documenso_documents import EVENTS
from tests import systems
from tests.integration.documenso_migrations import as_documenso
from tests.integration.documenso_schema import WEBHOOKS
from tests.integration.test_documenso_documents import (
    COMPLETE,
    SEND,
    documenso_config,
    envelope_db,
    events,
    execute,
)
from tests.support import Receiver, install, raw_config, running

__all__ = ["envelope_db"]  # a fixture, used by name

DOCUMENT = "envelope_abcdefhiklmnorst"
EVERY_EVENT = list(EVENTS)


def recipient(db: str, email: str, sets: str) -> None:
    execute(db, f'UPDATE "Recipient" SET {sets} WHERE "email" = %(email)s', {"email": email})


def create_envelope(db: str, envelope: str, number: int, kind: str, source: str) -> None:
    """What create-envelope.ts / create-document-from-template.ts write in one transaction."""
    with psycopg.connect(as_documenso(db)) as conn, conn.transaction():
        params = {
            "id": envelope,
            "meta": f"meta_{envelope}",
            "secondary": f"{kind.lower()}_{number}",
        }
        conn.execute('INSERT INTO "DocumentMeta" ("id") VALUES (%(meta)s)', params)
        conn.execute(
            """INSERT INTO "Envelope" ("id", "secondaryId", "type", "updatedAt", "title",
                                       "source", "internalVersion", "userId", "teamId",
                                       "documentMetaId")
               VALUES (%(id)s, %(secondary)s, %(kind)s, now(), 'New', %(source)s, 2, 1, 7,
                       %(meta)s)""",
            {**params, "kind": kind, "source": source},
        )
        conn.execute(
            """INSERT INTO "Recipient" ("envelopeId", "email", "name", "token")
               VALUES (%(id)s, 'dee@example.com', 'Dee', %(token)s)""",
            {"id": envelope, "token": f"tok_{envelope}"},
        )


async def test_every_derivable_event_when_documenso_writes_what_it_writes(
    envelope_db: str,
) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused", events=EVERY_EVENT))
    execute(
        envelope_db,
        """INSERT INTO "Recipient" ("envelopeId", "email", "name", "token", "role")
           VALUES (%(id)s, 'cc@example.com', 'Cc', 'tok_cc', 'CC')""",
        {"id": DOCUMENT},
    )
    create_envelope(envelope_db, "envelope_new", 50, "DOCUMENT", "DOCUMENT")
    execute(envelope_db, SEND)
    recipient(envelope_db, "ann@example.com", """"readStatus" = 'OPENED'""")  # viewed-document.ts
    recipient(envelope_db, "ann@example.com", """"signingStatus" = 'SIGNED', "signedAt" = now()""")
    recipient(envelope_db, "bob@example.com", """"expirationNotifiedAt" = now()""")  # expiry job
    recipient(envelope_db, "cc@example.com", """"signingStatus" = 'SIGNED'""")  # the seal: nothing
    execute(envelope_db, COMPLETE)
    create_envelope(envelope_db, "envelope_used", 51, "DOCUMENT", "TEMPLATE")
    create_envelope(envelope_db, "envelope_tpl", 4, "TEMPLATE", "DOCUMENT")
    execute(envelope_db, """DELETE FROM "Envelope" WHERE "id" = 'envelope_tpl'""")
    recorded = events(envelope_db)
    assert [(topic, payload["id"]) for topic, payload in recorded] == [
        ("DOCUMENT_CREATED", 50),
        ("DOCUMENT_SENT", 42),
        ("DOCUMENT_OPENED", 42),
        ("DOCUMENT_RECIPIENT_COMPLETED", 42),
        ("DOCUMENT_SIGNED", 42),
        ("RECIPIENT_EXPIRED", 42),
        ("DOCUMENT_COMPLETED", 42),
        ("DOCUMENT_CREATED", 51),
        ("TEMPLATE_USED", 51),
        ("TEMPLATE_CREATED", 4),
        ("TEMPLATE_DELETED", 4),
    ]
    # Built at commit: the created document has the recipient inserted after it.
    assert [r["email"] for r in recorded[0][1]["recipients"]] == ["dee@example.com"]
    signed = recorded[4][1]["recipients"]
    assert [r["signingStatus"] for r in signed] == ["SIGNED", "NOT_SIGNED", "NOT_SIGNED"]
    # A template's recipients belong to the template number, as Documenso's mapper says.
    template = recorded[-1][1]
    assert (template["recipients"][0]["templateId"], template["recipients"][0]["documentId"]) == (
        4,
        None,
    )


async def test_with_one_url_only_the_configured_events_are_sent(envelope_db: str) -> None:
    await install(documenso_config(envelope_db, "http://127.0.0.1:9/unused"))
    create_envelope(envelope_db, "envelope_new", 50, "DOCUMENT", "DOCUMENT")
    execute(envelope_db, SEND)
    recipient(envelope_db, "ann@example.com", """"readStatus" = 'OPENED'""")
    assert [topic for topic, _ in events(envelope_db)] == ["DOCUMENT_SENT"]


@pytest.fixture
def webhooks_db(envelope_db: str, receiver: Receiver) -> str:
    execute(envelope_db, WEBHOOKS)
    base = receiver.url.rsplit("/", 1)[0]
    for hook, url, secret, enabled, team, triggers in [
        ("wh_all", f"{base}/all", "s7", True, 7, ["DOCUMENT_SENT", "DOCUMENT_OPENED"]),
        ("wh_sent", f"{base}/sent", None, True, 7, ["DOCUMENT_SENT"]),
        ("wh_off", f"{base}/off", "x", False, 7, ["DOCUMENT_SENT"]),
        ("wh_other_team", f"{base}/other", "x", True, 8, ["DOCUMENT_SENT"]),
        ("wh_gone", f"{base}/gone", "x", True, 7, ["DOCUMENT_SENT"]),
    ]:
        execute(
            envelope_db,
            """INSERT INTO "Webhook" ("id", "webhookUrl", "eventTriggers", "secret", "enabled",
                                      "userId", "teamId")
               VALUES (%(id)s, %(url)s, %(triggers)s::text[]::"WebhookTriggerEvents"[],
                       %(secret)s, %(enabled)s, 1, %(team)s)""",
            {
                "id": hook,
                "url": url,
                "triggers": triggers,
                "secret": secret,
                "enabled": enabled,
                "team": team,
            },
        )
    return envelope_db


def routed(db: str, **extra: Any) -> config_mod.Config:
    source = {"kind": "documenso_documents", "webhooks": True, "max_attempts": 2, **extra}
    return config_mod.from_mapping(raw_config(db, sources={"documenso": source}), {})


async def test_each_event_goes_to_the_team_s_subscribed_webhooks_with_their_secret(
    webhooks_db: str, receiver: Receiver
) -> None:
    config = routed(webhooks_db)
    await install(config)
    execute(webhooks_db, SEND)  # captured now, for the webhooks subscribed now
    # Deleted before its attempt: Documenso's job fails and ends FAILED, without a call.
    execute(webhooks_db, """DELETE FROM "Webhook" WHERE "id" = 'wh_gone'""")
    await systems.watch(webhooks_db, "relay.documenso_events")
    async with running(config):
        recipient(webhooks_db, "ann@example.com", """"readStatus" = 'OPENED'""")
        await receiver.wait_count(3)
        [gone] = await systems.wait_rows(
            webhooks_db,
            "SELECT status, last_error FROM relay.documenso_events WHERE webhook_id = 'wh_gone'",
            None,
            lambda rows: rows[0]["status"] == "dead",
        )
    assert "gone" in gone["last_error"]
    sent = sorted(
        (r.path, r.json["event"], r.headers["X-Documenso-Secret"]) for r in receiver.received
    )
    assert sent == [
        ("/all", "DOCUMENT_OPENED", "s7"),
        ("/all", "DOCUMENT_SENT", "s7"),
        ("/sent", "DOCUMENT_SENT", ""),
    ]
    for request in receiver.received:
        assert request.json["webhookEndpoint"].endswith(request.path)


def test_webhooks_and_one_url_are_one_or_the_other() -> None:
    def refusal(**source: Any) -> str:
        with pytest.raises(ConfigError) as caught:
            config_mod.from_mapping(
                raw_config(
                    "postgresql://u@h/db",
                    sources={"documenso": {"kind": "documenso_documents", **source}},
                ),
                {},
            )
        return str(caught.value)

    assert refusal(webhooks=True, url="https://b.test/").startswith(
        "sources.documenso.url: with webhooks = true"
    )
    assert "cannot be told from Documenso's database" in refusal(
        url="https://b.test/", events=["DOCUMENT_REMINDER_SENT"]
    )
    assert "'DOCUMENT_EXPLODED' is not a Documenso event" in refusal(
        url="https://b.test/", events=["DOCUMENT_EXPLODED"]
    )
