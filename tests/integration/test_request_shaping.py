"""Request shaping through the whole pipeline (issue 9): a claimed row of a user's table becomes
the request its receiver expects. Method PUT, a body from a SQL expression evaluated in the
claim, headers fixed, from columns and from expressions, bearer auth from the environment and an
HMAC-SHA256 body signature; targets routed by a column's value (a value with no target is dead
with the reason), a form-encoded body and basic auth."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any
from urllib.parse import parse_qs

import orjson
from aiohttp import web

from tests import systems
from tests.integration.user_tables import (
    Gate,
    another_receiver,
    execute,
    table_config,
    table_source,
)
from tests.support import Received, Receiver, install, running
from tests.systems import header

OUTBOUND = """
CREATE TABLE outbound (
    id          serial PRIMARY KEY,
    channel     text NOT NULL,          -- 'email' or 'sms': one source each
    kind        text,                   -- which service an SMS job goes to
    email       text,
    subject     text,
    phone       text,
    message     text,
    event_type  text,
    status      text NOT NULL DEFAULT 'pending',
    last_error  text
);
"""
TOKEN = "api-token-0123"
SMS_PASSWORD = "sms pass:word"
SECRET = "shared-hmac-secret"
ENV = {"API_TOKEN": TOKEN, "SMS_PASSWORD": SMS_PASSWORD, "HOOK_SECRET": SECRET}


def sources(email_url: str, ocr_url: str, summary_url: str) -> dict[str, Any]:
    return {
        "email": table_source(
            "outbound",
            email_url,
            filter="channel = 'email'",
            method="PUT",
            payload_sql="jsonb_build_object('to', email, 'subject', subject)",
            headers={"X-Static": "fixed value"},
            header_columns={"X-Event-Type": "event_type"},
            header_sql={"Idempotency-Key": "'email-' || id"},
            auth={"bearer": {"env": "API_TOKEN"}},
            signing={
                "hmac_sha256": {"header": "X-Signature", "prefix": "sha256=", "encoding": "hex"}
            },
            secret={"env": "HOOK_SECRET"},
        ),
        "sms": table_source(
            "outbound",
            filter="channel = 'sms'",
            last_error="last_error",
            route={"column": "kind", "targets": {"ocr": ocr_url, "summary": summary_url}},
            payload_sql="jsonb_build_object('To', phone, 'Body', message, 'N', id)",
            format="form",
            auth={"basic": {"username": "AC1", "password": {"env": "SMS_PASSWORD"}}},
            signing="none",
        ),
    }


def ok(_: web.Request, __: int) -> web.StreamResponse:
    return web.Response(text="ok")


def form(request: Received) -> dict[str, list[str]]:
    return parse_qs(request.body.decode(), keep_blank_values=True, strict_parsing=True)


async def test_requests_are_shaped_signed_and_routed_as_configured(
    db: str, receiver: Receiver
) -> None:
    execute(db, OUTBOUND)
    await systems.watch(db, "outbound")
    email_gate = Gate(ok)
    receiver.behaviour = email_gate
    async with another_receiver() as summaries:
        base = f"http://{receiver.host}:{receiver.port}"
        config = table_config(
            db,
            sources(
                f"{base}/email", f"{base}/ocr", f"http://{summaries.host}:{summaries.port}/summary"
            ),
            env=ENV,
        )
        await install(config)
        async with running(config):
            inserted = await systems.rows(
                db,
                """
                INSERT INTO outbound (channel, kind, email, subject, phone, message, event_type)
                VALUES ('email', NULL, 'a@example.com', 'Hello', NULL, NULL, 'user.signup'),
                       ('sms', 'ocr', NULL, NULL, '+15550001', 'scan me', NULL),
                       ('sms', 'summary', NULL, NULL, '+15550002', 'sum & up', NULL),
                       ('sms', 'video', NULL, NULL, '+15550003', 'nowhere', NULL)
                RETURNING id
                """,
            )
            email, ocr, summary, video = (r["id"] for r in inserted)
            await receiver.wait_ids({f"email_{email}", f"sms_{ocr}"})
            await summaries.wait_ids({f"sms_{summary}"})
            final = await systems.wait_rows(
                db,
                "SELECT id, status, last_error FROM outbound ORDER BY id",
                None,
                lambda rs: all(r["status"] != "pending" for r in rs),
            )
    by_id = {r.id: r for r in receiver.received + summaries.received}
    assert len(receiver.received) + len(summaries.received) == len(by_id) == 3

    # PUT, the body from the expression, headers of every kind, bearer auth, the HMAC signature.
    sent = by_id[f"email_{email}"]
    assert email_gate.methods.count("PUT") == 1
    assert sent.path == "/email"
    assert orjson.loads(sent.body) == {"to": "a@example.com", "subject": "Hello"}
    assert header(sent, "Content-Type") == "application/json"
    assert header(sent, "X-Static") == "fixed value"
    assert header(sent, "X-Event-Type") == "user.signup"
    assert header(sent, "Idempotency-Key") == f"email-{email}"
    assert header(sent, "Authorization") == f"Bearer {TOKEN}"
    expected = "sha256=" + hmac.new(SECRET.encode(), sent.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(header(sent, "X-Signature") or "", expected)
    assert header(sent, "webhook-signature") is None  # one scheme only

    # Routed by the row's value; form-encoded; basic auth; unsigned.
    basic = "Basic " + base64.b64encode(f"AC1:{SMS_PASSWORD}".encode()).decode()
    for key, path, phone, message in (
        (ocr, "/ocr", "+15550001", "scan me"),
        (summary, "/summary", "+15550002", "sum & up"),
    ):
        sms = by_id[f"sms_{key}"]
        assert sms.path == path
        assert header(sms, "Content-Type") == "application/x-www-form-urlencoded"
        assert form(sms) == {"To": [phone], "Body": [message], "N": [str(key)]}
        assert header(sms, "Authorization") == basic
        assert header(sms, "X-Signature") is None and header(sms, "webhook-signature") is None
    assert email_gate.methods.count("POST") == 1  # the OCR job; the summary went elsewhere

    # A value with no target: dead at once, never sent, the reason written.
    rows = {r["id"]: r for r in final}
    assert {k: r["status"] for k, r in rows.items()} == {
        email: "done",
        ocr: "done",
        summary: "done",
        video: "dead",
    }
    reason = rows[video]["last_error"]
    assert reason is not None and "route column 'kind' value 'video' has no target" in reason
    assert f"sms_{video}" not in by_id
