"""System 5 of shared/MISSION.md, a reminder caller, replaced by relay: examples/system5/relay.toml
on the application's own Prisma tables (examples/system5/schema.sql), `relay run` as a process,
the voice provider on loopback.

What the caller did and these tests hold relay to: a 'scheduled' reminder whose "scheduledAt"
(timestamp(3), UTC, as a Prisma client writes it; the database's TimeZone is not UTC here) has
come is called at once, one due later not before its time; the call is placed with a POST to the
voice API (bearer key, an idempotency key, the reminder in the body); the provider's call id is
written back to "externalCallId" and the status becomes 'processing'; a "CallLog" row records
the call placed (or refused: the reminder is then 'failed'); the provider's call-status callback
to /webhooks/call-status writes a "CallLog" row and marks the reminder 'called' or 'failed', is
answered 400 with the reason when it lacks a required field, 401 with a wrong secret, and taken
once however often (and however concurrently) it comes; a health endpoint; logfmt logs."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest
from aiohttp import web

from tests import systems
from tests.conftest import Server
from tests.support import Received, Receiver, RelayProcess
from tests.systems import header

SOURCE = "calls"  # [sources.calls] in examples/system5/relay.toml
INBOX = "/webhooks/call-status"  # [inbox.call_status]'s path
API_KEY = "voice-api-key-0123456789abcdef"
PROVIDER_SECRET = "provider-callback-secret-9876543210"
ENV = {"VOICE_API_KEY": API_KEY, "PROVIDER_SECRET": PROVIDER_SECRET}
REFUSED_NUMBER = "+15550000000"  # the provider answers 400 for it
CALLBACK_URL = "https://reminders.example.com/webhooks/call-status"  # in the example's body
HEALTH = re.compile(r"health\.listening host=\S+ port=(\d+)")
INBOX_LISTENING = re.compile(r"inbox\.listening host=\S+ port=(\d+)")


@pytest.fixture
def app_db(server: Server) -> Iterator[str]:
    with systems.application_database(server.admin_url, server.url, "system5") as url:
        # A server whose TimeZone is not UTC (initdb takes the machine's): "scheduledAt" still
        # holds UTC, as Prisma writes it, and must be read so.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET timezone TO %L', "
                "current_database(), 'Asia/Tokyo'); END $$"
            )
        yield url


def utc_now() -> datetime:
    """Now as a Prisma client writes a DateTime to timestamp(3): UTC, milliseconds, no zone."""
    now = datetime.now(UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def epoch(stamp: datetime) -> float:
    """A timestamp(3) column's value (UTC) as time.time() counts."""
    return stamp.replace(tzinfo=UTC).timestamp()


def call_id(reminder: int) -> str:
    return f"CA{reminder:08d}"


class VoiceProvider:
    """The voice API: POST /v1/calls answers 201 {"call_id", "status": "queued"}, or 400 for
    REFUSED_NUMBER. `before_answer`, if set, runs before the answer (a provider whose callback
    comes before its answer does)."""

    def __init__(self) -> None:
        self.before_answer: Any = None

    async def __call__(self, request: web.Request, count: int) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if request.path != "/v1/calls":
            return web.json_response({"error": "not found"}, status=404)
        if body["to"] == REFUSED_NUMBER:
            return web.json_response({"error": "invalid phone number"}, status=400)
        reminder = body["metadata"]["reminder_id"]
        if self.before_answer is not None:
            await self.before_answer(reminder)
        return web.json_response({"call_id": call_id(reminder), "status": "queued"}, status=201)


async def add_reminder(db: str, phone: str, message: str, scheduled_at: datetime) -> int:
    """A reminder as the application's Prisma client creates one: every DateTime in UTC."""
    now = utc_now()
    return int(
        await systems.value(
            db,
            'INSERT INTO "Reminder" ("phoneNumber", "message", "scheduledAt", "createdAt", '
            '"updatedAt") VALUES (%s, %s, %s, %s, %s) RETURNING "id"',
            (phone, message, scheduled_at, now, now),
        )
    )


async def reminders(db: str, ids: list[int]) -> dict[int, dict[str, Any]]:
    found = await systems.rows(
        db, 'SELECT * FROM "Reminder" WHERE "id" = ANY(%s) ORDER BY "id"', (ids,)
    )
    return {r["id"]: r for r in found}


async def snapshot(db: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Everything a callback may write: the reminders, the call log, relay's inbox keys."""
    return (
        await systems.rows(db, 'SELECT * FROM "Reminder" ORDER BY "id"'),
        await systems.rows(db, 'SELECT * FROM "CallLog" ORDER BY "id"'),
        await systems.value(db, "SELECT count(*) FROM relay.inbox"),
    )


def callback(reminder: int, status: str = "completed", **changes: Any) -> dict[str, Any]:
    """The provider's call-status callback for a reminder's call."""
    body: dict[str, Any] = {
        "call_id": call_id(reminder),
        "status": status,
        "metadata": {"reminder_id": reminder},
        "transcript": f"Hello, this is your reminder {reminder}.",
    }
    return {**body, **changes}


async def post(
    port: int, body: Any, secret: str | None = PROVIDER_SECRET, path: str = INBOX
) -> tuple[int, dict[str, Any]]:
    """POST as the provider does; the answer's status and JSON body."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Provider-Secret"] = secret
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}{path}", data=data, headers=headers) as response,
    ):
        text = await response.read()
        return response.status, orjson.loads(text) if text.startswith(b"{") else {}


async def get(port: int, path: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as r,
    ):
        return r.status


def port(proc: RelayProcess, pattern: re.Pattern[str]) -> int:
    [found] = [int(m[1]) for line in proc.lines if (m := pattern.search(line))]
    return found


async def prepared(tmp_path: Path, db: str, receiver: Receiver) -> Path:
    """examples/system5/relay.toml for this test (the provider on loopback, the inbox on a free
    loopback port), installed and checked: `check` types every write-back and call-log
    expression against its column."""
    config = tmp_path / "relay.toml"
    systems.example_config(
        config,
        "system5/relay.toml",
        db,
        relay={
            # The periodic sweep is far off: a reminder called within the test was called
            # because relay was woken (an insert) or its timer for a due time came.
            "sweep_interval": 30,
            "claim_timeout": 20,
            "shutdown_grace": 5,
        },
        http={"timeout": 5},
        retry={"jitter": 0.0},
        sources={
            SOURCE: {
                "url": f"http://{receiver.host}:{receiver.port}/v1/calls",
                "retry_policy": {"schedule": ["200ms"]},
            }
        },
        inbox={"call_status": {"listen": "127.0.0.1:0"}},
    )
    await systems.install(config, db, "Reminder", "CallLog", env=ENV)
    return config


def check_call(request: Received, reminder: dict[str, Any]) -> None:
    """The voice API request that placed this reminder's call."""
    assert request.path == "/v1/calls"
    assert request.json == {
        "to": reminder["phoneNumber"],
        "message": reminder["message"],
        "metadata": {"reminder_id": reminder["id"]},
        "status_callback": CALLBACK_URL,
    }
    assert header(request, "Authorization") == f"Bearer {API_KEY}"
    assert header(request, "Idempotency-Key") == f"reminder-{reminder['id']}"
    assert (header(request, "Content-Type") or "").startswith("application/json")
    assert header(request, "webhook-signature") is None  # signing = "none"


# -- relay in the caller's place ---------------------------------------------------------------


async def test_system5_end_to_end(app_db: str, receiver: Receiver, tmp_path: Path) -> None:
    receiver.behaviour = VoiceProvider()
    assert await systems.value(app_db, "SHOW timezone") == "Asia/Tokyo"
    config = await prepared(tmp_path, app_db, receiver)

    def sent(reminder: int) -> list[Received]:
        return [r for r in receiver.received if r.id == f"{SOURCE}_{reminder}"]

    # Due while nothing was calling: called when relay starts.
    missed = await add_reminder(
        app_db, "+15551230001", "Dentist at 3pm", utc_now() - timedelta(minutes=10)
    )
    async with systems.relays(config, ENV) as procs:
        [proc] = procs
        await receiver.wait_ids({f"{SOURCE}_{missed}"}, timeout=10)

        # -- a due reminder is called at once; one due later, not before its time ---------------
        inserted = time.time()
        due = await add_reminder(
            app_db, "+15551230002", "Take your medicine", utc_now() - timedelta(seconds=30)
        )
        refused = await add_reminder(
            app_db, REFUSED_NUMBER, "Call the bank", utc_now() - timedelta(seconds=5)
        )
        # Well within the sweep (30 s): woken by the insert.
        await receiver.wait_ids({f"{SOURCE}_{due}", f"{SOURCE}_{refused}"}, timeout=10)
        assert sent(due)[0].at - inserted < 5
        when = utc_now() + timedelta(seconds=1.5)
        later = await add_reminder(app_db, "+15551230003", "Pick up the kids", when)
        await receiver.wait_ids({f"{SOURCE}_{later}"}, timeout=10)
        # Not a millisecond early (relay reads "scheduledAt" as UTC, whatever the server's
        # TimeZone), and by its own timer, not the sweep.
        assert epoch(when) <= sent(later)[0].at < epoch(when) + 5

        # -- what was sent: one POST per reminder, the refused one not retried ----------------
        ids = [missed, due, refused, later]
        rows = await systems.wait_rows(
            app_db,
            'SELECT * FROM "Reminder" WHERE "id" = ANY(%s) ORDER BY "id"',
            (ids,),
            lambda rs: all(r["status"] != "scheduled" for r in rs),
        )
        by_id = {r["id"]: r for r in rows}
        for reminder in ids:
            assert len(sent(reminder)) == 1, [r.id for r in receiver.received]
            check_call(sent(reminder)[0], by_id[reminder])
        assert len(receiver.received) == 4

        # -- written back: 'processing' with the provider's call id; the refused one 'failed' --
        finished = utc_now()
        for reminder in (missed, due, later):
            row = by_id[reminder]
            assert (row["status"], row["externalCallId"]) == ("processing", call_id(reminder))
        row = by_id[refused]
        assert (row["status"], row["externalCallId"]) == ("failed", None)
        for row in rows:
            # The due column only read; "updatedAt" written in UTC (Tokyo time is 9 h ahead).
            assert row["createdAt"] <= row["updatedAt"] <= finished
            assert finished - row["updatedAt"] < timedelta(seconds=30)
        assert by_id[later]["scheduledAt"] == when

        # -- one "CallLog" row per call placed, or refused -------------------------------------
        log = await systems.wait_rows(
            app_db,
            'SELECT * FROM "CallLog" ORDER BY "id"',
            None,
            lambda rs: len(rs) >= len(ids),
        )
        assert len(log) == len(ids)
        placed = {e["reminderId"]: e for e in log}
        for reminder in (missed, due, later):
            entry = placed[reminder]
            assert (
                entry["event"],
                entry["callId"],
                entry["status"],
                entry["httpStatus"],
                entry["error"],
                entry["transcript"],
            ) == ("call.placed", call_id(reminder), "queued", 201, None, None)
        entry = placed[refused]
        assert (entry["event"], entry["callId"], entry["status"], entry["httpStatus"]) == (
            "call.failed",
            None,
            "dead",
            400,
        )
        assert "400" in entry["error"] and "invalid phone number" in entry["error"]
        for entry in log:
            assert timedelta(0) <= finished - entry["createdAt"] < timedelta(seconds=30)

        # -- the provider's callbacks, on the inbox's own address -------------------------------
        inbox_port = port(proc, INBOX_LISTENING)
        health_port = port(proc, HEALTH)
        assert inbox_port != health_port

        # Completed: 'called', and a "CallLog" row, committed before the answer.
        assert await post(inbox_port, callback(due)) == (
            200,
            {"accepted": True, "duplicate": False},
        )
        [row] = (await reminders(app_db, [due])).values()
        assert (row["status"], row["externalCallId"]) == ("called", call_id(due))
        assert row["updatedAt"] > by_id[due]["updatedAt"]
        [entry] = await systems.rows(
            app_db,
            'SELECT * FROM "CallLog" WHERE "reminderId" = %s AND "event" = %s',
            (due, "call.status"),
        )
        assert (entry["callId"], entry["status"], entry["transcript"]) == (
            call_id(due),
            "completed",
            f"Hello, this is your reminder {due}.",
        )

        # The same callback again, or again with another status: already done, nothing changes.
        before = await snapshot(app_db)
        assert await post(inbox_port, callback(due)) == (200, {"accepted": True, "duplicate": True})
        assert await post(inbox_port, callback(due, "failed")) == (
            200,
            {"accepted": True, "duplicate": True},
        )
        assert await snapshot(app_db) == before

        # Refused callbacks, each with its reason, and nothing written.
        bad: list[tuple[Any, str | None, int, str]] = [
            (callback(later, metadata={}), PROVIDER_SECRET, 400, "metadata.reminder_id: required"),
            (
                {k: v for k, v in callback(later).items() if k != "metadata"},
                PROVIDER_SECRET,
                400,
                "metadata.reminder_id: required",
            ),
            (callback(later, call_id=None), PROVIDER_SECRET, 400, "call_id: required"),
            (
                {k: v for k, v in callback(later).items() if k != "status"},
                PROVIDER_SECRET,
                400,
                "status: required",
            ),
            (
                callback(later, metadata={"reminder_id": str(later)}),
                PROVIDER_SECRET,
                400,
                "metadata.reminder_id: expected integer, got string",
            ),
            (b"{not json", PROVIDER_SECRET, 400, "the body is not JSON"),
            (callback(later, "no-answer"), "wrong-secret", 401, "X-Provider-Secret"),
            (callback(later, "no-answer"), None, 401, "X-Provider-Secret"),
        ]
        for body, secret, status, reason in bad:
            got, answer = await post(inbox_port, body, secret)
            assert (got, reason in answer.get("error", "")) == (status, True), (body, answer)
        assert await snapshot(app_db) == before

        # The refusals took nothing: the provider's real callback for that call goes through.
        # Any final status other than 'completed' fails the reminder.
        assert await post(inbox_port, callback(later, "no-answer", transcript=None)) == (
            200,
            {"accepted": True, "duplicate": False},
        )
        [row] = (await reminders(app_db, [later])).values()
        assert row["status"] == "failed"

        # The same callback four times at once: taken once, every one answered 200.
        answers = await asyncio.gather(*(post(inbox_port, callback(missed)) for _ in range(4)))
        assert [a[0] for a in answers] == [200] * 4
        assert sorted(a[1]["duplicate"] for a in answers) == [False, True, True, True]
        [row] = (await reminders(app_db, [missed])).values()
        assert row["status"] == "called"

        status_log = await systems.rows(
            app_db,
            'SELECT "reminderId", "callId", "status", "transcript" FROM "CallLog" '
            'WHERE "event" = \'call.status\' ORDER BY "id"',
        )
        assert status_log == [
            {
                "reminderId": due,
                "callId": call_id(due),
                "status": "completed",
                "transcript": f"Hello, this is your reminder {due}.",
            },
            {
                "reminderId": later,
                "callId": call_id(later),
                "status": "no-answer",
                "transcript": None,
            },
            {
                "reminderId": missed,
                "callId": call_id(missed),
                "status": "completed",
                "transcript": f"Hello, this is your reminder {missed}.",
            },
        ]

        # -- the health endpoints, on loopback, apart from what faces the provider -------------
        assert await get(health_port, "/healthz") == 200
        assert await get(health_port, "/readyz") == 200
        assert await get(inbox_port, "/healthz") == 404
        assert (await post(health_port, callback(due)))[0] in (404, 405)

        await systems.stop(procs)

    # -- structured logs: a logfmt line per event, no secret in them ----------------------------
    out = proc.output()
    assert "Traceback" not in out
    for secret in (API_KEY, PROVIDER_SECRET):
        assert secret not in out
    lines = out.splitlines()
    assert any(
        "inbox.refused inbox=call_status status=400" in line and "metadata.reminder_id" in line
        for line in lines
    )
    assert any("inbox.refused inbox=call_status status=401" in line for line in lines)
    assert any(f"delivery.dead source={SOURCE} key={refused}" in line for line in lines)
    # Nothing was left for the provider: the calls were placed once each.
    assert len(receiver.received) == 4


async def test_system5_a_callback_that_beats_the_providers_answer(
    app_db: str, receiver: Receiver, tmp_path: Path
) -> None:
    """The provider may post a call's callback before relay has written its answer (the reminder
    is then still 'scheduled', claimed by relay): the callback's outcome stands, the call id is
    the callback's, and relay's late write of the answer changes nothing of it."""
    provider = VoiceProvider()
    receiver.behaviour = provider
    config = await prepared(tmp_path, app_db, receiver)
    answered: list[tuple[int, dict[str, Any]]] = []

    async with systems.relays(config, ENV) as procs:
        inbox_port = port(procs[0], INBOX_LISTENING)

        async def call_back_first(reminder: int) -> None:
            [row] = (await reminders(app_db, [reminder])).values()
            assert row["status"] == "scheduled"  # relay's claim is in relay.leases
            answered.append(await post(inbox_port, callback(reminder, "busy")))

        provider.before_answer = call_back_first
        reminder = await add_reminder(
            app_db, "+15551230004", "Renew the passport", utc_now() - timedelta(seconds=1)
        )
        log = await systems.wait_rows(
            app_db,
            'SELECT "event", "callId", "status", "httpStatus" FROM "CallLog" '
            'WHERE "reminderId" = %s ORDER BY "id"',
            (reminder,),
            lambda rs: len(rs) >= 2,
        )
        assert answered == [(200, {"accepted": True, "duplicate": False})]
        assert log == [
            {
                "event": "call.status",
                "callId": call_id(reminder),
                "status": "busy",
                "httpStatus": None,
            },
            {
                "event": "call.placed",
                "callId": call_id(reminder),
                "status": "queued",
                "httpStatus": 201,
            },
        ]
        [row] = (await reminders(app_db, [reminder])).values()
        assert (row["status"], row["externalCallId"]) == ("failed", call_id(reminder))
        await systems.stop(procs)
    assert len(receiver.received) == 1
    assert "Traceback" not in procs[0].output()
