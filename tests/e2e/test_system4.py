"""System 4 of shared/MISSION.md, the background workers of an e-commerce app, replaced by relay:
examples/system4/relay.toml on the application's own tables (examples/system4/schema.sql),
`relay run` processes, a merchant's webhook endpoints and a fake email API on loopback.

What the workers did and these tests hold relay to: webhook events delivered, a failing one
retried with exponential backoff (1, 2, 4, 8, 16 minutes capped at 60; here in fractions of a
second) with next_retry_at written back as now + the wait, archived (status and flag) after 5
attempts; emails POSTed to the email API as {"from", "to", "subject", "html"} with the API key
and an Idempotency-Key that is the row's id on every attempt, at most 3 attempts, a scheduled
email not sent before its send_at; expired inventory reservations released on schedule by
exactly one of two relays, each run's {processed, succeeded, failed} recorded; maintenance
(list what failed, retry it, run the sweeper now) behind a bearer secret, by the admin API and
the CLI."""

from __future__ import annotations

import itertools
import re
import signal
import socket
import tomllib
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from aiohttp import web

from relay import config as config_mod
from relay import retry
from relay.retry import Dead, Retry
from tests import systems
from tests.conftest import Server
from tests.support import Received, Receiver, RelayProcess, admin_request, run_cli
from tests.systems import header

WEBHOOKS, EMAILS = "webhooks", "emails"  # [sources.NAME] in examples/system4/relay.toml
JOB = "release_reservations"  # [jobs.NAME]
API_KEY = "email-api-key-0123456789abcdef"  # EMAIL_API_KEY
TOKEN = "maintenance-secret-0123456789abcdef"  # MAINTENANCE_TOKEN
ENV = {"EMAIL_API_KEY": API_KEY, "MAINTENANCE_TOKEN": TOKEN}
# The test's webhook backoff: the example's 1m doubling capped at 60m, in seconds: 0.2 doubling
# capped at 0.8, so the waits between the 5 attempts are 0.2, 0.4, 0.8 and (capped) 0.8.
WEBHOOK_BACKOFF = {"base": "200ms", "max_delay": "800ms"}
WEBHOOK_WAITS = [0.2, 0.4, 0.8, 0.8]
EMAIL_WAIT = 0.2  # the test's email retry schedule
HEALTH = re.compile(r"health\.listening host=\S+ port=(\d+)")
SLACK = 0.01  # seconds: the receiver's clock and the database's are this machine's one clock


@pytest.fixture
def app_db(server: Server) -> Iterator[str]:
    with systems.application_database(server.admin_url, server.url, "system4") as url:
        yield url


async def prepared(tmp_path: Path, db: str, email_api: str, **over: Any) -> Path:
    """examples/system4/relay.toml for this test (short waits, the email API on loopback, `over`
    laid on top), installed and checked; the application's tables and relay.job_runs watched."""
    config = tmp_path / "relay.toml"
    systems.example_config(
        config,
        "system4/relay.toml",
        db,
        **systems.merge(
            {
                "relay": {"sweep_interval": 30, "claim_timeout": 20, "shutdown_grace": 5},
                "http": {"timeout": 5},
                "sources": {
                    WEBHOOKS: {"retry_policy": WEBHOOK_BACKOFF},
                    EMAILS: {
                        "url": email_api,
                        "retry_policy": {"schedule": [f"{int(EMAIL_WAIT * 1000)}ms"]},
                    },
                },
            },
            over,
        ),
    )
    await systems.install(
        config,
        db,
        "webhook_events",
        "email_queue",
        "inventory_reservations",
        "relay.job_runs",
        env=ENV,
    )
    return config


async def health_port(proc: RelayProcess) -> int:
    await proc.wait_line("health.listening")
    [port] = [int(m[1]) for line in proc.lines if (m := HEALTH.search(line))]
    return port


async def admin(
    port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN
) -> tuple[int, Any]:
    """A maintenance request to relay's admin API, with the bearer secret unless None."""
    return await admin_request(port, method, path, token, body)


def worker_of(proc: RelayProcess) -> str:
    """relay.worker_id of a `relay run` process: by default host:pid."""
    assert proc.proc is not None
    return f"{socket.gethostname()}:{proc.proc.pid}"


# -- the example's own values, not the test's -------------------------------------------------


def test_system4_example_says_what_the_workers_did() -> None:
    """The tests below shorten every wait; the example itself keeps the app's: webhooks wait
    1, 2, 4, 8, 16 minutes (doubling, capped at 60) and stop at 5 attempts; emails at 3, not
    before send_at; the sweeper every 5 minutes; the maintenance secret from the environment."""
    config = config_mod.load(systems.EXAMPLES / "system4" / "relay.toml", ENV)
    sources = {s.name: s for s in config.sources}

    webhooks = sources[WEBHOOKS]
    policy = webhooks.retry
    minutes = [retry.delay(policy, n, rand) / 60 for n in range(1, 9) for rand in (0.0, 0.999)]
    assert minutes[::2] == minutes[1::2]  # no jitter: the app's schedule was exact
    assert minutes[::2] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert policy.cap == 3600  # a Retry-After cannot make it wait longer either
    assert webhooks.spec.max_attempts == 5
    assert retry.decide(policy, 4, webhooks.spec.max_attempts, 500, None, 0.5) == Retry(480)
    assert isinstance(retry.decide(policy, 5, webhooks.spec.max_attempts, 500, None, 0.5), Dead)
    assert (webhooks.spec.retry, webhooks.spec.dead) == ("failed", "archived")
    assert webhooks.spec.write_backs["on_dead"]["archived"] == "true"
    assert webhooks.spec.write_backs["on_failure"]["next_retry_at"] == "attempt.next_at"
    assert webhooks.spec.due == "next_retry_at"

    emails = sources[EMAILS]
    assert emails.spec.max_attempts == 3
    assert isinstance(retry.decide(emails.retry, 3, emails.spec.max_attempts, 500, None, 0), Dead)
    assert isinstance(retry.decide(emails.retry, 2, emails.spec.max_attempts, 500, None, 0), Retry)
    assert emails.spec.due == "send_at"
    assert dict(emails.spec.shape.header_sql) == {"Idempotency-Key": "id::text"}
    assert emails.spec.shape.authorization == f"Bearer {API_KEY}"

    [job] = config.jobs
    assert (job.name, job.every, job.cron, job.describe()) == (JOB, 300, None, "every 5m")
    assert dict(config.admin_tokens) == {"maintenance": TOKEN}
    assert config.health_host == "127.0.0.1"  # the maintenance endpoints stay on loopback


# -- the application's own SQL, without relay -------------------------------------------------


async def test_system4_release_statement_as_the_sweeper_ran_it(app_db: str) -> None:
    """The job's statement, run by hand: expired reservations back to stock, one a checkout
    holds counted as failed (and released by a later run), the rest left alone."""
    example = tomllib.loads((systems.EXAMPLES / "system4" / "relay.toml").read_text())
    statement = example["jobs"][JOB]["sql"]
    product = await systems.value(
        app_db, "INSERT INTO products (sku, stock) VALUES ('mug', 10) RETURNING id"
    )

    async def reserve(cart: str, quantity: int, ttl: str) -> int:
        return int(
            await systems.value(
                app_db,
                "SELECT reserve_stock(%s, %s, %s, %s::interval)",
                (product, cart, quantity, ttl),
            )
        )

    expired, held, live = (
        await reserve("c1", 2, "-1 minute"),
        await reserve("c2", 3, "-1 second"),
        await reserve("c3", 4, "1 hour"),
    )
    assert (
        await systems.value(app_db, "SELECT reserve_stock(%s, 'c4', 2, '1h')", (product,)) is None
    )
    assert await systems.value(app_db, "SELECT reserved FROM products") == 9

    async with await psycopg.AsyncConnection.connect(app_db) as checkout:
        await checkout.execute(
            "SELECT * FROM inventory_reservations WHERE id = %s FOR UPDATE", (held,)
        )
        [first] = await systems.rows(app_db, statement)
        await checkout.rollback()
    assert first == {"processed": 2, "succeeded": 1, "failed": 1}
    [second] = await systems.rows(app_db, statement)
    assert second == {"processed": 1, "succeeded": 1, "failed": 0}
    [third] = await systems.rows(app_db, statement)
    assert third == {"processed": 0, "succeeded": 0, "failed": 0}
    rows = await systems.rows(app_db, "SELECT id, status FROM inventory_reservations ORDER BY id")
    assert [(r["id"], r["status"]) for r in rows] == [
        (expired, "released"),
        (held, "released"),
        (live, "active"),
    ]
    assert await systems.value(app_db, "SELECT reserved FROM products") == 4


# -- relay in its place: webhooks, emails, maintenance ----------------------------------------


class Merchants:
    """The merchants' webhook endpoints, by path: /ok answers 200; /flaky 500, then 200; /down
    500 until `down_ok`."""

    def __init__(self) -> None:
        self.down_ok = False

    async def __call__(self, request: web.Request, count: int) -> web.StreamResponse:
        if request.path == "/flaky" and count == 1:
            return web.Response(status=500, text="deploying")
        if request.path == "/down" and not self.down_ok:
            return web.Response(status=500, text="database is down")
        return web.Response(status=200, text="ok")


class EmailApi:
    """The email provider: checks the API key and the body's shape as the real one does, answers
    {"id": ...}; for flaky@ 500 to the first two attempts, for down@ 503 until `down_ok`."""

    def __init__(self) -> None:
        self.down_ok = False

    async def __call__(self, request: web.Request, count: int) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response({"error": "bad API key"}, status=401)
        key = request.headers.get("Idempotency-Key")
        email = orjson.loads(await request.read())
        if (
            not key
            or not isinstance(email, dict)
            or set(email) != {"from", "to", "subject", "html"}
        ):
            return web.json_response({"error": "invalid email"}, status=422)
        if email["to"] == "flaky@example.com" and count <= 2:
            return web.json_response({"error": "try again"}, status=500)
        if email["to"] == "down@example.com" and not self.down_ok:
            return web.json_response({"error": "sending paused"}, status=503)
        return web.json_response({"id": f"msg_{key}"})


async def add_webhook(db: str, url: str, event: str, payload: dict[str, Any]) -> int:
    return int(
        await systems.value(
            db,
            "INSERT INTO webhook_events (url, event_type, payload) VALUES (%s, %s, %s) "
            "RETURNING id",
            (url, event, orjson.dumps(payload).decode()),
        )
    )


async def add_email(db: str, to: str, subject: str, send_at: str = "now()") -> int:
    return int(
        await systems.value(
            db,
            "INSERT INTO email_queue (from_address, to_address, subject, html_body, send_at) "
            f"VALUES ('shop@example.com', %s, %s, %s, {send_at}) RETURNING id",
            (to, subject, f"<p>{subject}</p>"),
        )
    )


async def history_of_webhooks(db: str) -> None:
    """Record every update of webhook_events (status, retry_count, next_retry_at, archived)
    with the updating transaction's now(): what relay wrote, at each claim and settle."""
    await systems.rows(
        db,
        """
        CREATE TABLE test_webhook_history (
            n bigserial PRIMARY KEY, id bigint, status text, retry_count int,
            next_retry_at timestamptz, archived boolean, at timestamptz);
        CREATE FUNCTION test_webhook_history() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO test_webhook_history (id, status, retry_count, next_retry_at, archived, at)
            VALUES (NEW.id, NEW.status, NEW.retry_count, NEW.next_retry_at, NEW.archived, now());
            RETURN NULL;
        END $$;
        CREATE TRIGGER test_webhook_history AFTER UPDATE ON webhook_events
            FOR EACH ROW EXECUTE FUNCTION test_webhook_history();
        """,
    )


async def test_system4_webhooks_emails_and_maintenance(
    app_db: str, receiver: Receiver, tmp_path: Path
) -> None:
    """One `relay run`: webhooks delivered, retried on the backoff with next_retry_at written
    as now() + the wait, archived after 5 attempts; emails in the API's shape with a stable
    Idempotency-Key, 3 attempts at most, a scheduled one sent at its send_at (not before);
    then maintenance: the admin API refuses requests without the secret, lists the archived
    event and retries it; the CLI lists the failed email and retries it."""
    merchants = Merchants()
    receiver.behaviour = merchants
    api = EmailApi()
    provider = Receiver(behaviour=api)
    await provider.start()
    try:
        config = await prepared(tmp_path, app_db, f"http://127.0.0.1:{provider.port}/v1/emails")
        await history_of_webhooks(app_db)
        base = f"http://{receiver.host}:{receiver.port}"
        async with systems.relays(config, ENV) as procs:
            [proc] = procs
            port = await health_port(proc)
            ok = await add_webhook(app_db, f"{base}/ok", "order.created", {"order": 1})
            flaky = await add_webhook(app_db, f"{base}/flaky", "order.paid", {"order": 1})
            down = await add_webhook(app_db, f"{base}/down", "order.shipped", {"order": 2})
            e_ok = await add_email(app_db, "alice@example.com", "Your order")
            e_flaky = await add_email(app_db, "flaky@example.com", "Your receipt")
            e_down = await add_email(app_db, "down@example.com", "Shipped")
            e_later = await add_email(
                app_db, "bob@example.com", "Still thinking?", "now() + interval '2 seconds'"
            )
            e_far = await add_email(
                app_db, "carol@example.com", "Next week", "now() + interval '1 day'"
            )

            hooks = await systems.wait_rows(
                app_db,
                "SELECT * FROM webhook_events ORDER BY id",
                None,
                lambda rs: [r["status"] for r in rs] == ["delivered", "delivered", "archived"],
            )
            emails = await systems.wait_rows(
                app_db,
                "SELECT * FROM email_queue ORDER BY id",
                None,
                lambda rs: (
                    [r["status"] for r in rs] == ["sent", "sent", "failed", "sent", "pending"]
                ),
            )
            hook = {r["id"]: r for r in hooks}
            email = {r["id"]: r for r in emails}

            def to_hook(row_id: int) -> list[Received]:
                return [r for r in receiver.received if r.id == f"{WEBHOOKS}_{row_id}"]

            def to_api(row_id: int) -> list[Received]:
                return [r for r in provider.received if r.id == f"{EMAILS}_{row_id}"]

            # -- webhooks: delivered as they are, with the event type ------------------------
            for row in hooks:
                for n, request in enumerate(to_hook(row["id"]), start=1):
                    assert request.path == row["url"].removeprefix(base)
                    assert orjson.loads(request.body) == row["payload"]
                    assert header(request, "X-Webhook-Event") == row["event_type"]
                    assert header(request, "relay-attempt") == str(n)
            assert len(to_hook(ok)) == 1
            assert (hook[ok]["retry_count"], hook[ok]["archived"]) == (1, False)
            assert hook[ok]["delivered_at"] is not None and hook[ok]["next_retry_at"] is None
            # /flaky: a 500, then delivered at the first retry; the error cleared.
            assert len(to_hook(flaky)) == 2
            assert (hook[flaky]["retry_count"], hook[flaky]["last_response_status"]) == (2, 200)
            assert hook[flaky]["last_error"] is None and hook[flaky]["next_retry_at"] is None
            # /down: 5 attempts, then archived: status and flag.
            down_requests = to_hook(down)
            assert len(down_requests) == 5
            assert (hook[down]["retry_count"], hook[down]["archived"]) == (5, True)
            assert hook[down]["last_response_status"] == 500
            assert "database is down" in hook[down]["last_error"]
            assert hook[down]["next_retry_at"] is None and hook[down]["delivered_at"] is None

            # What relay wrote to /down's row, claim by claim and settle by settle: after each
            # failed attempt, next_retry_at = now() + the backoff; no attempt before it.
            history = await systems.rows(
                app_db, "SELECT * FROM test_webhook_history WHERE id = %s ORDER BY n", (down,)
            )
            assert [(h["status"], h["retry_count"]) for h in history] == [
                *itertools.chain.from_iterable(
                    [("processing", n), ("failed", n)] for n in range(1, 5)
                ),
                ("processing", 5),
                ("archived", 5),
            ]
            assert [h["archived"] for h in history] == [False] * 9 + [True]
            failed = [h for h in history if h["status"] == "failed"]
            assert [h["next_retry_at"] - h["at"] for h in failed] == [
                timedelta(seconds=s) for s in WEBHOOK_WAITS
            ]
            for before, after, wait in zip(failed, down_requests[1:], WEBHOOK_WAITS, strict=True):
                assert after.at >= before["next_retry_at"].timestamp() - SLACK, (before, after.at)
                assert after.at - before["at"].timestamp() >= wait - SLACK
            gaps = [b.at - a.at for a, b in itertools.pairwise(down_requests)]
            assert all(g >= w - SLACK for g, w in zip(gaps, WEBHOOK_WAITS, strict=True)), gaps

            # -- emails: the API's shape, one Idempotency-Key per email ----------------------
            for row in emails:
                for n, request in enumerate(to_api(row["id"]), start=1):
                    assert request.path == "/v1/emails"
                    assert header(request, "Authorization") == f"Bearer {API_KEY}"
                    assert (header(request, "Content-Type") or "").startswith("application/json")
                    assert request.json == {
                        "from": "shop@example.com",
                        "to": row["to_address"],
                        "subject": row["subject"],
                        "html": f"<p>{row['subject']}</p>",
                    }
                    assert header(request, "Idempotency-Key") == str(row["id"])
                    assert header(request, "relay-attempt") == str(n)
            assert [len(to_api(i)) for i in (e_ok, e_flaky, e_down, e_later, e_far)] == [
                1,
                3,
                3,
                1,
                0,
            ]
            # Retries of one email are the same request: same key, same body.
            for row_id in (e_flaky, e_down):
                assert len({(header(r, "Idempotency-Key"), r.body) for r in to_api(row_id)}) == 1
            for row_id in (e_ok, e_flaky, e_later):
                row = email[row_id]
                assert row["provider_message_id"] == f"msg_{row_id}"
                assert row["sent_at"] is not None and row["last_error"] is None
            assert email[e_flaky]["attempts"] == 3
            # At most 3 attempts: the third 503 made it failed.
            assert email[e_down]["attempts"] == 3 and "503" in email[e_down]["last_error"]
            assert "sending paused" in email[e_down]["last_error"]
            assert email[e_down]["sent_at"] is None
            # Scheduled: not sent before send_at, and sent when it came (relay's timer, not the
            # 30 s sweep); the one due tomorrow not at all.
            [later] = to_api(e_later)
            send_at = email[e_later]["send_at"].timestamp()
            assert send_at - SLACK <= later.at < send_at + 5
            assert later.at > to_api(e_ok)[0].at + 1
            assert email[e_far]["attempts"] == 0

            # -- maintenance: the admin API, behind the bearer secret ------------------------
            dead_path = f"/admin/sources/{WEBHOOKS}/dead"
            assert (await admin(port, "GET", dead_path, token=None))[0] == 401
            assert (await admin(port, "GET", dead_path, token="not-the-secret-0123456789"))[
                0
            ] == 401
            assert (await admin(port, "GET", "/admin/jobs", token=None))[0] == 401
            status, dead = await admin(port, "GET", dead_path)
            assert status == 200
            assert [(d["key"], d["attempts"], d["http_status"]) for d in dead["rows"]] == [
                (str(down), 5, 500)
            ]
            assert "database is down" in dead["rows"][0]["error"] and dead["next"] is None

            merchants.down_ok = True
            retry_path = f"/admin/sources/{WEBHOOKS}/retry"
            assert (await admin(port, "POST", retry_path, {"keys": [down]}, token=None))[0] == 401
            assert (
                await systems.value(
                    app_db, "SELECT status FROM webhook_events WHERE id = %s", (down,)
                )
            ) == "archived"
            assert await admin(port, "POST", retry_path, {"keys": [down, ok]}) == (
                200,
                {"retried": 1},
            )
            [revived] = await systems.wait_rows(
                app_db,
                "SELECT * FROM webhook_events WHERE id = %s",
                (down,),
                lambda rs: rs[0]["status"] == "delivered",
            )
            assert (revived["retry_count"], revived["archived"]) == (1, False)
            assert revived["next_retry_at"] is None and revived["last_error"] is None
            assert header(to_hook(down)[-1], "relay-attempt") == "1"
            assert len(to_hook(down)) == 6 and len(to_hook(ok)) == 1
            status, listed = await admin(port, "GET", "/admin/sources")
            assert status == 200
            assert listed[WEBHOOKS]["counts"] == {"delivered": 3}
            assert listed[EMAILS]["counts"] == {"failed": 1, "pending": 1, "sent": 3}
            assert (await admin(port, "GET", dead_path))[1]["rows"] == []

            # -- maintenance: the same by the CLI, for the email that failed ----------------
            code, out = await run_cli(config, "dead", EMAILS, env=ENV)
            assert code == 0, out
            [line] = [x for x in out.splitlines() if x.startswith(f"{e_down} ")]
            assert "attempts=3" in line and "503" in line
            api.down_ok = True
            code, out = await run_cli(config, "retry", EMAILS, str(e_down), env=ENV)
            assert code == 0 and "1 of 1 keys" in out, out
            [resent] = await systems.wait_rows(
                app_db,
                "SELECT * FROM email_queue WHERE id = %s",
                (e_down,),
                lambda rs: rs[0]["status"] == "sent",
            )
            assert resent["provider_message_id"] == f"msg_{e_down}"
            down_emails = to_api(e_down)
            assert len(down_emails) == 4 and header(down_emails[-1], "relay-attempt") == "1"
            # The retry by hand is the same email to the API: same key, same body.
            assert len({(header(r, "Idempotency-Key"), r.body) for r in down_emails}) == 1

            await systems.stop(procs)
        out = proc.output()
        assert "Traceback" not in out
        assert "admin.retry who=maintenance source=webhooks keys=2" in out
        for secret in (API_KEY, TOKEN):
            assert secret not in out
        # Nothing was sent twice but what was retried.
        counts = Counter((r.id, header(r, "relay-attempt")) for r in receiver.received)
        assert counts[(f"{WEBHOOKS}_{down}", "1")] == 2 and sum(counts.values()) == 9
    finally:
        await provider.stop()


# -- relay in its place: the reservation sweeper, two relays ----------------------------------


async def history_of_reservations(db: str) -> None:
    """Record every status change of a reservation, with the transaction that made it."""
    await systems.rows(
        db,
        """
        CREATE TABLE test_reservation_history (
            n bigserial PRIMARY KEY, id bigint, old text, new text, tx bigint, at timestamptz);
        CREATE FUNCTION test_reservation_history() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO test_reservation_history (id, old, new, tx, at)
            VALUES (NEW.id, OLD.status, NEW.status, txid_current(), now());
            RETURN NULL;
        END $$;
        CREATE TRIGGER test_reservation_history AFTER UPDATE ON inventory_reservations
            FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
            EXECUTE FUNCTION test_reservation_history();
        """,
    )


def job_ran(proc: RelayProcess) -> int:
    """How many occurrences of the job this relay says it ran."""
    return sum(f"job.ran job={JOB} " in line for line in proc.lines)


async def test_system4_reservations_released_once_by_one_of_two_relays(
    app_db: str, receiver: Receiver, tmp_path: Path
) -> None:
    """Two `relay run`s, the job every second: every expired reservation released once, not
    before it expired, one held by a checkout counted failed until it is let go; one row of
    relay.job_runs per occurrence, each run by one relay, both relays running some; then the
    sweeper run now, by the admin API (behind the secret) and by `relay jobs --run`."""
    config = await prepared(
        tmp_path,
        app_db,
        f"http://{receiver.host}:{receiver.port}/v1/emails",
        jobs={JOB: {"every": "1s"}},  # the example's 5m, in seconds
    )
    await history_of_reservations(app_db)
    mug, hat = [
        await systems.value(
            app_db, "INSERT INTO products (sku, stock) VALUES (%s, 10) RETURNING id", (sku,)
        )
        for sku in ("mug", "hat")
    ]

    async def reserve(product: int, quantity: int, ttl: str) -> int:
        return int(
            await systems.value(
                app_db,
                "SELECT reserve_stock(%s, 'cart', %s, %s::interval)",
                (product, quantity, ttl),
            )
        )

    expired = [await reserve(mug, 2, "-1 minute"), await reserve(hat, 1, "-5 seconds")]
    held = await reserve(mug, 1, "-1 minute")  # a checkout holds it: not released meanwhile
    soon = await reserve(mug, 3, "2 seconds")  # expires while relay runs
    live = await reserve(hat, 2, "1 day")
    released = [*expired, held, soon]

    checkout = await psycopg.AsyncConnection.connect(app_db)
    try:
        await checkout.execute(
            "SELECT * FROM inventory_reservations WHERE id = %s FOR UPDATE", (held,)
        )
        async with systems.relays(config, ENV, count=2) as procs:
            workers = {worker_of(p): p for p in procs}
            runs_sql = "SELECT * FROM relay.job_runs WHERE job = %s ORDER BY scheduled_for"
            # The first runs release what expired, and count the held one as failed.
            await systems.wait_rows(
                app_db,
                "SELECT status FROM inventory_reservations WHERE id = ANY(%s)",
                (expired,),
                lambda rs: {r["status"] for r in rs} == {"released"},
            )
            await systems.wait_rows(
                app_db, runs_sql, (JOB,), lambda rs: any(r["failed"] for r in rs)
            )
            status = await systems.value(
                app_db, "SELECT status FROM inventory_reservations WHERE id = %s", (held,)
            )
            assert status == "active"
            await checkout.rollback()  # the checkout let it go
            await systems.wait_rows(
                app_db,
                "SELECT status FROM inventory_reservations WHERE id = ANY(%s)",
                (released,),
                lambda rs: {r["status"] for r in rs} == {"released"},
            )

            # Both relays run the job: stop the one that ran the latest occurrence, and the
            # other runs the next ones.
            runs = await systems.rows(app_db, runs_sql, (JOB,))
            last = runs[-1]
            first_out = workers[last["worker"]]
            assert first_out.proc is not None
            first_out.proc.send_signal(signal.SIGTERM)
            assert await first_out.wait_exit() == 0, first_out.output()
            [other] = set(workers) - {last["worker"]}
            runs = await systems.wait_rows(
                app_db,
                runs_sql,
                (JOB,),
                lambda rs: any(
                    r["worker"] == other and r["scheduled_for"] > last["scheduled_for"] for r in rs
                ),
            )
            assert {r["worker"] for r in runs} == set(workers)

            # Maintenance: run the sweeper now, behind the bearer secret.
            [survivor] = [p for p in procs if p is not first_out]
            port = await health_port(survivor)
            path = f"/admin/jobs/{JOB}/run"
            assert (await admin(port, "POST", path, token=None))[0] == 401
            status, now_run = await admin(port, "POST", path)
            assert status == 200, now_run
            assert (now_run["worker"], now_run["error"]) == (other, None)
            assert (now_run["processed"], now_run["succeeded"], now_run["failed"]) == (0, 0, 0)
            status, listed = await admin(port, "GET", "/admin/jobs")
            assert status == 200 and listed[JOB]["schedule"] == "every 1s"
            await systems.stop([survivor])

        # -- what the two relays did -------------------------------------------------------
        runs = await systems.rows(app_db, runs_sql, (JOB,))
        by_admin = datetime.fromisoformat(now_run["scheduled_for"])
        scheduled = [r for r in runs if r["scheduled_for"] != by_admin]
        assert len(scheduled) == len(runs) - 1
        # One row per occurrence (the whole seconds, every = 1s), each by one of the two: as
        # many as the relays said they ran, between them.
        assert all(r["scheduled_for"].timestamp() % 1 == 0 for r in scheduled)
        assert len({r["scheduled_for"] for r in scheduled}) == len(scheduled)
        assert {r["worker"] for r in scheduled} == set(workers)
        assert sum(job_ran(p) for p in procs) == len(scheduled)
        for worker, proc in workers.items():
            assert job_ran(proc) == sum(r["worker"] == worker for r in scheduled)
        assert all(r["error"] is None for r in runs)
        # Each run's {processed, succeeded, failed}: every release counted once, the held
        # reservation counted failed while it was held.
        assert all(r["processed"] == r["succeeded"] + r["failed"] for r in runs)
        assert sum(r["succeeded"] for r in runs) == len(released)
        assert sum(r["failed"] for r in runs) >= 1
        assert all(r["failed"] <= 1 for r in runs)

        # Each expired reservation released once, in one run, not before it expired.
        history = await systems.rows(app_db, "SELECT * FROM test_reservation_history ORDER BY n")
        assert sorted(h["id"] for h in history) == sorted(released)
        assert {(h["old"], h["new"]) for h in history} == {("active", "released")}
        rows = await systems.rows(app_db, "SELECT * FROM inventory_reservations ORDER BY id")
        for row in rows:
            if row["id"] == live:
                assert (row["status"], row["released_at"]) == ("active", None)
            else:
                assert row["status"] == "released" and row["released_at"] >= row["expires_at"]
        reserved = await systems.rows(app_db, "SELECT sku, reserved FROM products ORDER BY sku")
        assert [(p["sku"], p["reserved"]) for p in reserved] == [("hat", 2), ("mug", 0)]
        for proc in procs:
            assert "Traceback" not in proc.output() and "job.failed" not in proc.output()

        # The CLI's verbs for the same: run it now, and the last run by any relay.
        code, out = await run_cli(config, "jobs", "--run", JOB, env=ENV)
        assert code == 0 and "processed=0 succeeded=0 failed=0" in out, out
        code, out = await run_cli(config, "jobs", env=ENV)
        assert code == 0 and f"jobs.{JOB}: every 1s" in out and "last run" in out, out
        assert len(await systems.rows(app_db, runs_sql, (JOB,))) == len(runs) + 1
    finally:
        await checkout.close()
