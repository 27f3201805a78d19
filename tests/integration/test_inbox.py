"""Inboxes ([inbox.NAME]): a provider's callbacks taken into the database, validated, once, and
answered only after the commit. System 5's call-status callback is the example."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest

from relay import config as config_mod
from relay import signing
from relay.config import ConfigError
from tests import systems
from tests.support import install, raw_config, run_cli, serving, write_config

TABLES = """
CREATE TABLE reminders (
    id     integer PRIMARY KEY,
    status text NOT NULL DEFAULT 'processing'
);
CREATE TABLE call_logs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    call_id     text NOT NULL,
    reminder_id integer NOT NULL REFERENCES reminders (id),
    status      text NOT NULL,
    transcript  text
);
INSERT INTO reminders (id) VALUES (7), (8);
"""
# The handler system 5 had: a call-log row, and the reminder marked called or failed.
CALL_STATUS = """
WITH logged AS (
    INSERT INTO call_logs (call_id, reminder_id, status, transcript)
    VALUES (%(call_id)s, %(metadata.reminder_id)s, %(status)s, %(transcript)s)
    RETURNING reminder_id)
UPDATE reminders SET status = CASE WHEN %(status)s = 'completed' THEN 'called' ELSE 'failed' END
WHERE id = (SELECT reminder_id FROM logged)
"""
SECRET = "provider-shared-secret"
INBOX = {
    "path": "/webhooks/call-status",
    "key": "call_id",
    "required": {"call_id": "string", "status": "string", "metadata.reminder_id": "integer"},
    "header": "X-Provider-Secret",
    "secret": SECRET,
    "sql": CALL_STATUS,
    "max_bytes": 4096,
}


def inbox_config(db: str, **inbox: Any) -> config_mod.Config:
    raw = raw_config(db, inbox={"call_status": {**INBOX, **inbox}})
    del raw["sources"]
    return config_mod.from_mapping(raw, {})


def execute(db: str, statements: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(statements)


def callback(call_id: str = "call_1", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "call_id": call_id,
        "status": "completed",
        "metadata": {"reminder_id": 7},
        "transcript": "Hello, this is your reminder.",
    }
    return {**body, **changes}


async def post(
    port: int, body: Any, headers: dict[str, str] | None = None, path: str = INBOX["path"]
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {"Content-Type": "application/json", "X-Provider-Secret": SECRET, **(headers or {})}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}{path}", data=data, headers=sent) as response,
    ):
        text = await response.read()
        return response.status, orjson.loads(text) if text.startswith(b"{") else {}


async def test_a_callback_is_taken_once_and_answered_after_its_commit(db: str) -> None:
    execute(db, TABLES)
    config = inbox_config(db)
    await install(config)
    async with serving(config) as service:
        port = service.inbox_ports["call_status"]
        assert await post(port, callback()) == (200, {"accepted": True, "duplicate": False})
        # Answered after the commit: the rows are there when the answer is.
        reminder = await systems.rows(db, "SELECT status FROM reminders WHERE id = 7")
        assert reminder == [{"status": "called"}]
        # The provider sends it again: nothing runs again.
        assert await post(port, callback()) == (200, {"accepted": True, "duplicate": True})
        assert await post(port, callback("call_2", status="no-answer", metadata={"reminder_id": 8}))
    logs = await systems.rows(db, "SELECT call_id, reminder_id, status FROM call_logs ORDER BY id")
    assert logs == [
        {"call_id": "call_1", "reminder_id": 7, "status": "completed"},
        {"call_id": "call_2", "reminder_id": 8, "status": "no-answer"},
    ]
    assert await systems.rows(db, "SELECT status FROM reminders ORDER BY id") == [
        {"status": "called"},
        {"status": "failed"},
    ]


@pytest.mark.parametrize(
    ("body", "headers", "status", "reason"),
    [
        (callback(call_id=None), {}, 400, "call_id: required"),
        (callback(metadata={}), {}, 400, "metadata.reminder_id: required"),
        (callback(metadata={"reminder_id": "7"}), {}, 400, "expected integer, got string"),
        (callback(status=True), {}, 400, "status: expected string, got boolean"),
        (b"{not json", {}, 400, "the body is not JSON"),
        ([1, 2], {}, 400, "the body is not a JSON object"),
        (callback(), {"X-Provider-Secret": "wrong"}, 401, "X-Provider-Secret is missing or wrong"),
        (callback(transcript="x" * 5000), {}, 413, "larger than 4096 bytes"),
    ],
)
async def test_a_bad_callback_is_refused_with_its_reason_and_changes_nothing(
    db: str, body: Any, headers: dict[str, str], status: int, reason: str
) -> None:
    execute(db, TABLES)
    config = inbox_config(db)
    await install(config)
    async with serving(config) as service:
        got, answer = await post(service.inbox_ports["call_status"], body, headers)
    assert got == status
    assert reason in answer["error"]
    assert await systems.value(db, "SELECT count(*) FROM call_logs") == 0
    assert await systems.value(db, "SELECT count(*) FROM relay.inbox") == 0


async def test_the_same_callback_twice_at_once_runs_once(db: str) -> None:
    execute(db, TABLES)
    # Slow enough that the second arrives while the first is still in its transaction.
    slow = CALL_STATUS.replace("RETURNING reminder_id)", "RETURNING reminder_id, pg_sleep(0.3))")
    config = inbox_config(db, sql=slow)
    await install(config)
    async with serving(config) as service:
        port = service.inbox_ports["call_status"]
        answers = await asyncio.gather(post(port, callback()), post(port, callback()))
    assert sorted(a[1]["duplicate"] for a in answers) == [False, True]
    assert all(a[0] == 200 for a in answers)
    assert await systems.value(db, "SELECT count(*) FROM call_logs") == 1


async def test_a_statement_that_fails_answers_500_and_takes_nothing(db: str) -> None:
    execute(db, TABLES)
    config = inbox_config(db)
    await install(config)
    async with serving(config) as service:
        port = service.inbox_ports["call_status"]
        # No reminder 99: the call log's foreign key refuses it.
        unknown = callback(metadata={"reminder_id": 99})
        assert await post(port, unknown) == (500, {"error": "not accepted; see relay's log"})
        execute(db, "INSERT INTO reminders (id) VALUES (99)")
        # Its key was not taken: the provider's retry goes through.
        assert (await post(port, unknown))[1] == {"accepted": True, "duplicate": False}


async def test_standard_webhooks_signatures_and_the_body_kept_by_relay(db: str) -> None:
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    # An inbox without a statement: relay keeps each body in relay.inbox.
    config = config_mod.from_mapping(
        {
            **raw_config(db),
            "sources": {},
            "inbox": {
                "events": {
                    "signature": "standard-webhooks",
                    "secret": secret,
                    "key": "header:webhook-id",
                }
            },
        },
        {},
    )
    await install(config)
    body = orjson.dumps({"type": "invoice.paid", "id": 12})
    now = int(time.time())

    def signed(msg_id: str, at: int, key_secret: str = secret) -> dict[str, str]:
        key = signing.config_key(key_secret)
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(at),
            "webhook-signature": signing.sign(key, msg_id, at, body),
        }

    async with serving(config) as service:
        port = service.inbox_ports["events"]
        assert (await post(port, body, signed("msg_1", now), path="/inbox/events"))[0] == 200
        assert (await post(port, body, signed("msg_1", now), path="/inbox/events"))[1]["duplicate"]
        other = "whsec_" + "c2VjcmV0LXRoYXQtaXMtbm90LXRoZS1zYW1lLW9uZQ=="
        wrong = await post(port, body, signed("msg_2", now, other), path="/inbox/events")
        assert wrong == (401, {"error": "webhook-signature does not match"})
        stale = await post(port, body, signed("msg_3", now - 600), path="/inbox/events")
        assert stale[0] == 401 and "5 minutes" in stale[1]["error"]
    kept = await systems.rows(db, "SELECT inbox, key, body FROM relay.inbox")
    assert kept == [{"inbox": "events", "key": "msg_1", "body": {"type": "invoice.paid", "id": 12}}]


async def test_an_inbox_on_its_own_address_serves_nothing_else(db: str) -> None:
    execute(db, TABLES)
    config = inbox_config(db, listen="127.0.0.1:0")
    await install(config)
    async with serving(config) as service:
        port = service.inbox_ports["call_status"]
        assert port != service.health_port
        assert (await post(port, callback()))[0] == 200
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/status") as response:
                assert response.status == 404
            health = f"http://127.0.0.1:{service.health_port}{INBOX['path']}"
            async with session.post(health, data=b"{}") as response:
                assert response.status == 404


@pytest.mark.parametrize(
    ("inbox", "message"),
    [
        ({"key": None}, "inbox.call_status.key: required"),
        ({"secret": "s", "header": None}, "inbox.call_status.secret: say how it is checked"),
        ({"required": {"a": "text"}}, "inbox.call_status.required.a: 'text' is not a type"),
        ({"path": "/status"}, "inbox.call_status.path: expected a path of its own"),
        ({"signature": "hmac"}, 'inbox.call_status.signature: only "standard-webhooks"'),
        ({"listen": "nowhere"}, "inbox.call_status.listen: expected host:port"),
    ],
)
def test_an_inbox_configured_wrong_is_refused_naming_the_key(
    inbox: dict[str, Any], message: str
) -> None:
    data = {k: v for k, v in {**INBOX, **inbox}.items() if v is not None}
    raw = raw_config("postgresql://u@h/db", inbox={"call_status": data})
    with pytest.raises(ConfigError) as caught:
        config_mod.from_mapping(raw, {})
    assert str(caught.value).startswith(message), str(caught.value)


async def test_a_key_of_several_fields_tells_progress_callbacks_apart(db: str) -> None:
    execute(db, TABLES)
    # A provider that posts progress under one call id: the status is part of what repeats.
    config = inbox_config(db, key=["call_id", "status"])
    await install(config)
    async with serving(config) as service:
        port = service.inbox_ports["call_status"]
        ringing = callback(status="ringing")
        assert (await post(port, ringing))[1]["duplicate"] is False
        assert (await post(port, callback()))[1]["duplicate"] is False
        assert (await post(port, ringing))[1]["duplicate"] is True
    keys = await systems.rows(db, "SELECT key FROM relay.inbox ORDER BY received_at, key")
    assert [k["key"] for k in keys] == ['["call_1","ringing"]', '["call_1","completed"]']


async def test_an_inbox_statement_postgresql_refuses_stops_the_start_naming_it(
    db: str, tmp_config: Path
) -> None:
    execute(db, TABLES)
    raw = raw_config(db, inbox={"call_status": {**INBOX, "sql": "UPDATE nowhere SET x = 1"}})
    write_config(tmp_config, raw)
    code, output = await run_cli(tmp_config, "check")
    assert code == 2, output
    assert (
        'inbox.call_status.sql: PostgreSQL refuses it: relation "nowhere" does not exist' in output
    )


async def test_a_large_callback_arriving_in_many_pieces_is_read_whole(db: str) -> None:
    execute(db, TABLES)
    config = inbox_config(db, max_bytes=1_000_000)
    await install(config)
    long = callback(transcript="word " * 100_000)  # ~500 kB: many TCP segments
    async with serving(config) as service:
        assert await post(service.inbox_ports["call_status"], long) == (
            200,
            {"accepted": True, "duplicate": False},
        )
    assert await systems.value(db, "SELECT length(transcript) FROM call_logs") == 500_000
