"""System 2 of shared/MISSION.md, partner webhook delivery workers, replaced by relay:
examples/system2/relay.toml on the application's own tables (examples/system2/schema.sql), two
`relay run` processes sharing the queue, partners on loopback.

What the workers did and these tests hold relay to: each queued row POSTed to its url with the
payload as the body, X-Webhook-Event from event_type and an HMAC-SHA256 signature made with the
partner's secret, which is stored encrypted (two keys, one rotated in); status, attempt_count,
last_error, last_response_status, next_retry_at and delivered_at written back; one
webhook_delivery_log row per attempt; retries on the schedule, then dead_letter after the row's
max_attempts (at once for a final 4xx); a dead letter put back to pending by hand sent at once
with fresh attempts; get_webhook_queue_stats() and cleanup_delivered_webhooks() still right."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests import systems
from tests.conftest import Server
from tests.support import Received, Receiver
from tests.systems import header

SOURCE = "webhooks"  # [sources.webhooks] in examples/system2/relay.toml
SCHEDULE = [0.2, 0.4, 0.8, 1.0]  # the test's retry schedule, seconds

SECRET_A = "partner-a-signing-secret-0123456789"
SECRET_B = "partner-b-signing-secret-9876543210"


@pytest.fixture
def app_db(server: Server) -> Iterator[str]:
    with systems.application_database(server.admin_url, server.url, "system2") as url:
        yield url


def written(row: dict[str, Any]) -> tuple[str, int, int | None]:
    """What relay wrote back to a queue row: status, attempt_count, last_response_status."""
    return row["status"], row["attempt_count"], row["last_response_status"]


def signed_by(request: Received, secret: str) -> bool:
    """The partners' check: X-Webhook-Signature is sha256=<hex HMAC-SHA256(secret, body)>."""
    expected = "sha256=" + hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(header(request, "X-Webhook-Signature") or "", expected)


class Partners:
    """The partners' endpoints, by path: /partner-a answers 200; /partner-b 500, then 429, then
    200; /down 503 until `down_ok`; /gone 410 (final: no retry)."""

    def __init__(self) -> None:
        self.down_ok = False

    async def __call__(self, request: web.Request, count: int) -> web.StreamResponse:
        if request.path == "/partner-b" and count <= 2:
            return web.Response(status=500 if count == 1 else 429, text=f"busy {count}")
        if request.path == "/down" and not self.down_ok:
            return web.Response(status=503, text="maintenance")
        if request.path == "/gone":
            return web.Response(status=410, text="endpoint removed")
        return web.Response(status=200, text="received")


async def add_partner(
    db: str, name: str, endpoint: str, secret: str, events: list[str] | None = None
) -> int:
    return int(
        await systems.value(
            db,
            "INSERT INTO partner_webhooks (partner_name, endpoint, secret, event_types) "
            "VALUES (%s, %s, %s, %s) RETURNING id",
            (name, endpoint, secret, events or []),
        )
    )


async def queue_row(db: str, url: str, secret: str, event: str, **columns: Any) -> int:
    names = ["url", "secret", "event_type", "payload", *columns]
    values = [url, secret, event, orjson.dumps({"event": event, "n": 1}).decode()]
    values += list(columns.values())
    return int(
        await systems.value(
            db,
            f"INSERT INTO webhook_delivery_queue ({', '.join(names)}) "
            f"VALUES ({', '.join(['%s'] * len(names))}) RETURNING id",
            values,
        )
    )


KEYS = {"k1": systems.new_key(), "k2": systems.new_key()}  # PARTNER_KEY_1, PARTNER_KEY_2


def sealed(key_id: str, secret: str) -> str:
    """A partner's secret as the application stores it, under one of the configured keys."""
    return systems.encrypt_secret(key_id, KEYS[key_id], secret)


async def prepared(
    tmp_path: Path, db: str, relay: dict[str, Any], schedule: list[str]
) -> tuple[Path, dict[str, str]]:
    """examples/system2/relay.toml for this test, installed and checked (`check` types every
    write-back and attempt-log expression against its column); the environment relay needs."""
    config = tmp_path / "relay.toml"
    systems.example_config(
        config,
        "system2/relay.toml",
        db,
        relay=relay,
        http={"timeout": 5},
        retry={"jitter": 0.0},
        sources={SOURCE: {"retry_policy": {"schedule": schedule}}},
        # Every partner here is a path of the test's one receiver, so one endpoint (host and
        # port): its failing paths (/down, /partner-b's 500 and 429) could make the breaker
        # pause the healthy partners too, which on their own hosts they would not share.
        endpoints={"breaker": {"enabled": False}},
    )
    env = {f"PARTNER_KEY_{n}": systems.key_env(KEYS[f"k{n}"]) for n in (1, 2)}
    await systems.install(config, db, "webhook_delivery_queue", "webhook_delivery_log", env=env)
    return config, env


# -- the application's own SQL, without relay -------------------------------------------------


async def test_system2_schema_and_its_functions(app_db: str) -> None:
    key = systems.new_key()
    a = await add_partner(
        app_db, "a", "https://a.example.com/h", systems.encrypt_secret("k1", key, SECRET_A)
    )
    await add_partner(app_db, "b", "https://b.example.com/h", "x", ["order.created"])
    c = await add_partner(app_db, "c", "https://c.example.com/h", "x")
    await systems.rows(app_db, "UPDATE partner_webhooks SET is_active = false WHERE id = %s", (c,))

    # Fan-out: every active partner subscribed to the event (an empty list: all events).
    assert (
        await systems.value(app_db, "SELECT enqueue_webhook('order.created', '{\"id\": 7}')") == 2
    )
    assert await systems.value(app_db, "SELECT enqueue_webhook('user.deleted', '{\"id\": 8}')") == 1
    queued = await systems.rows(
        app_db,
        "SELECT q.partner_webhook_id, q.url, q.secret = p.secret AS same_secret, q.event_type, "
        "q.payload, q.status, q.attempt_count, q.max_attempts, q.next_retry_at "
        "FROM webhook_delivery_queue q JOIN partner_webhooks p ON p.id = q.partner_webhook_id "
        "ORDER BY q.id",
    )
    assert [(r["url"], r["event_type"], r["payload"]) for r in queued] == [
        ("https://a.example.com/h", "order.created", {"id": 7}),
        ("https://b.example.com/h", "order.created", {"id": 7}),
        ("https://a.example.com/h", "user.deleted", {"id": 8}),
    ]
    assert [r["partner_webhook_id"] for r in queued][::2] == [a, a]
    assert all(r["same_secret"] for r in queued)
    assert {
        (r["status"], r["attempt_count"], r["max_attempts"], r["next_retry_at"]) for r in queued
    } == {("pending", 0, 5, None)}
    [first, second, third] = [
        r["id"]
        for r in await systems.rows(app_db, "SELECT id FROM webhook_delivery_queue ORDER BY id")
    ]

    # What the old workers left behind: one delivered after 2 attempts (logged), one dead.
    await systems.rows(
        app_db,
        "UPDATE webhook_delivery_queue SET status = 'delivered', attempt_count = 2, "
        "delivered_at = now() - interval '10 days', created_at = now() - interval '11 days' "
        "WHERE id = %s",
        (first,),
    )
    await systems.rows(
        app_db,
        "UPDATE webhook_delivery_queue SET status = 'dead_letter', attempt_count = 5 WHERE id = %s",
        (second,),
    )
    await systems.rows(
        app_db,
        "INSERT INTO webhook_delivery_log (delivery_id, attempt_number, url, success, status_code) "
        "VALUES (%s, 1, 'https://a.example.com/h', false, 500), "
        "(%s, 2, 'https://a.example.com/h', true, 200)",
        (first, first),
    )
    stats = await systems.rows(app_db, "SELECT * FROM get_webhook_queue_stats()")
    created = await systems.rows(app_db, "SELECT id, created_at FROM webhook_delivery_queue")
    created_at = {r["id"]: r["created_at"] for r in created}
    assert [
        (s["status"], s["count"], s["oldest_created_at"], str(s["avg_attempts"])) for s in stats
    ] == [
        ("dead_letter", 1, created_at[second], "5.00"),
        ("delivered", 1, created_at[first], "2.00"),
        ("pending", 1, created_at[third], "0.00"),
    ]

    # Cleanup: delivered rows older than N days only, with their log rows.
    assert await systems.value(app_db, "SELECT cleanup_delivered_webhooks(30)") == 0
    assert await systems.value(app_db, "SELECT cleanup_delivered_webhooks(7)") == 1
    left = await systems.rows(app_db, "SELECT id FROM webhook_delivery_queue ORDER BY id")
    assert [r["id"] for r in left] == [second, third]
    assert await systems.value(app_db, "SELECT count(*) FROM webhook_delivery_log") == 0


# -- relay in its place ------------------------------------------------------------------------


async def test_system2_end_to_end(app_db: str, receiver: Receiver, tmp_path: Path) -> None:
    partners = Partners()
    receiver.behaviour = partners
    config, env = await prepared(
        tmp_path,
        app_db,
        relay={
            # The periodic sweep is far off: whatever is sent here is sent because relay was
            # woken (an insert, an update by hand) or its own retry timer came due.
            "sweep_interval": 30,
            "claim_timeout": 20,
            "shutdown_grace": 5,
            "batch_size": 10,
        },
        schedule=[f"{int(s * 1000)}ms" for s in SCHEDULE],
    )
    base = f"http://{receiver.host}:{receiver.port}"
    # Partner A's secret is under the older key, B's under the one rotated in: both configured.
    a = await add_partner(app_db, "a", f"{base}/partner-a", sealed("k1", SECRET_A))
    b = await add_partner(
        app_db,
        "b",
        f"{base}/partner-b",
        sealed("k2", SECRET_B),
        ["order.created"],
    )

    async with systems.relays(config, env, count=2) as procs:
        assert (
            await systems.value(app_db, "SELECT enqueue_webhook('order.created', '{\"order\": 1}')")
            == 2
        )
        for n in range(20):  # partner A only: B is subscribed to order.created alone
            await systems.value(
                app_db, "SELECT enqueue_webhook('ping', %s)", (orjson.dumps({"n": n}).decode(),)
            )
        down = await queue_row(
            app_db,
            f"{base}/down",
            sealed("k1", SECRET_A),
            "order.created",
            max_attempts=3,
        )
        gone = await queue_row(app_db, f"{base}/gone", sealed("k2", SECRET_B), "order.created")

        final = await systems.wait_rows(
            app_db,
            "SELECT * FROM webhook_delivery_queue ORDER BY id",
            None,
            lambda rs: all(r["status"] in ("delivered", "dead_letter") for r in rs),
        )
        by_id = {r["id"]: r for r in final}
        row_a = next(
            r for r in final if r["partner_webhook_id"] == a and r["event_type"] == "order.created"
        )
        row_b = next(r for r in final if r["partner_webhook_id"] == b)
        pings = [r for r in final if r["event_type"] == "ping"]
        assert len(pings) == 20

        # -- what was sent where ----------------------------------------------------------------
        def sent(row_id: int) -> list[Received]:
            return [r for r in receiver.received if r.id == f"{SOURCE}_{row_id}"]

        for row in final:
            requests = sent(row["id"])
            assert requests, f"row {row['id']} was never sent"
            secret = SECRET_B if row["url"].endswith(("/partner-b", "/gone")) else SECRET_A
            for n, request in enumerate(requests, start=1):
                assert request.path == row["url"].removeprefix(base)
                assert orjson.loads(request.body) == row["payload"]
                assert (header(request, "Content-Type") or "").startswith("application/json")
                assert header(request, "X-Webhook-Event") == row["event_type"]
                assert header(request, "X-Webhook-Delivery") == str(row["id"])
                assert header(request, "relay-attempt") == str(n)
                assert signed_by(request, secret), f"row {row['id']}: bad signature"
                # The secret never travels, in the clear or encrypted.
                seen = orjson.dumps({str(k): v for k, v in request.headers.items()})
                assert secret.encode() not in request.body + seen
                assert row["secret"].encode() not in request.body + orjson.dumps(
                    {str(k): v for k, v in request.headers.items()}
                )
        assert not signed_by(sent(row_a["id"])[0], SECRET_B)  # the check can fail

        # Two relays shared the queue: no attempt was made twice.
        attempts = Counter((r.id, header(r, "relay-attempt")) for r in receiver.received)
        assert max(attempts.values()) == 1, attempts

        # -- write-back -------------------------------------------------------------------------
        for row in [row_a, *pings]:
            assert (len(sent(row["id"])), *written(row)) == (1, "delivered", 1, 200)
            assert row["last_error"] is None and row["next_retry_at"] is None
            assert row["delivered_at"] is not None and row["delivered_at"] >= row["created_at"]
        # B: 500, then 429 (retried, not final), then delivered; the error of the last failure
        # cleared by the success.
        assert (len(sent(row_b["id"])), *written(row_b)) == (3, "delivered", 3, 200)
        assert row_b["last_error"] is None and row_b["next_retry_at"] is None
        assert row_b["delivered_at"] is not None
        # The retries waited the schedule.
        times = [r.at for r in sent(row_b["id"])]
        gaps = [t2 - t1 for t1, t2 in itertools.pairwise(times)]
        for gap, wanted in zip(gaps, SCHEDULE, strict=False):
            assert gap >= wanted - 0.05, (times, SCHEDULE)
        # /down: 503 three times (its max_attempts), then dead_letter.
        row_down = by_id[down]
        assert (len(sent(down)), *written(row_down)) == (3, "dead_letter", 3, 503)
        assert "503" in row_down["last_error"] and "maintenance" in row_down["last_error"]
        assert row_down["next_retry_at"] is None and row_down["delivered_at"] is None
        # /gone: 410 is final: dead_letter after one attempt.
        row_gone = by_id[gone]
        assert (len(sent(gone)), *written(row_gone)) == (1, "dead_letter", 1, 410)
        assert "410" in row_gone["last_error"]

        # -- the attempt log: one row per request ---------------------------------------------
        log = await systems.wait_rows(
            app_db,
            "SELECT * FROM webhook_delivery_log ORDER BY id",
            None,
            lambda rs: len(rs) >= len(receiver.received),
        )
        assert len(log) == len(receiver.received)
        for row in final:
            entries = [e for e in log if e["delivery_id"] == row["id"]]
            assert [e["attempt_number"] for e in entries] == list(
                range(1, len(sent(row["id"])) + 1)
            )
            assert {e["url"] for e in entries} == {row["url"]}
            assert all(e["duration_ms"] is not None and e["duration_ms"] >= 0 for e in entries)
            assert all(e["attempted_at"] >= row["created_at"] for e in entries)
        b_log = [e for e in log if e["delivery_id"] == row_b["id"]]
        assert [(e["success"], e["status_code"], e["response_body"]) for e in b_log] == [
            (False, 500, "busy 1"),
            (False, 429, "busy 2"),
            (True, 200, "received"),
        ]
        assert b_log[0]["error"] and "500" in b_log[0]["error"] and b_log[2]["error"] is None
        assert [(e["success"], e["status_code"]) for e in log if e["delivery_id"] == down] == [
            (False, 503)
        ] * 3

        # -- manual retry of a dead letter: sent at once, with fresh attempts -----------------
        partners.down_ok = True
        before = len(receiver.received)
        put_back = time.time()
        await systems.rows(
            app_db,
            "UPDATE webhook_delivery_queue SET status = 'pending' "
            "WHERE id = %s AND status = 'dead_letter'",
            (down,),
        )
        # Well within the claim timeout (20 s) and the sweep (30 s): woken by the update.
        await receiver.wait_for(lambda got: len(got) > before, timeout=10)
        again = receiver.received[before]
        assert again.id == f"{SOURCE}_{down}"
        assert header(again, "relay-attempt") == "1"
        assert again.at - put_back < 10
        [row_down] = await systems.wait_rows(
            app_db,
            "SELECT * FROM webhook_delivery_queue WHERE id = %s",
            (down,),
            lambda rs: rs[0]["status"] == "delivered",
        )
        assert written(row_down) == ("delivered", 1, 200) and row_down["last_error"] is None
        down_log = await systems.wait_rows(
            app_db,
            "SELECT attempt_number, success FROM webhook_delivery_log "
            "WHERE delivery_id = %s ORDER BY id",
            (down,),
            lambda rs: len(rs) >= 4,
        )
        assert [(e["attempt_number"], e["success"]) for e in down_log] == [
            (1, False),
            (2, False),
            (3, False),
            (1, True),
        ]

        await systems.stop(procs)
    for proc in procs:
        out = proc.output()
        assert "Traceback" not in out
        for secret in (SECRET_A, SECRET_B, env["PARTNER_KEY_1"], env["PARTNER_KEY_2"]):
            assert secret not in out

    # -- the application's functions afterwards -----------------------------------------------
    final = await systems.rows(app_db, "SELECT * FROM webhook_delivery_queue ORDER BY id")
    delivered = [r for r in final if r["status"] == "delivered"]
    assert len(delivered) == 23 and {r["id"] for r in final} - {r["id"] for r in delivered} == {
        gone
    }
    stats = await systems.rows(app_db, "SELECT * FROM get_webhook_queue_stats()")
    assert [
        (s["status"], s["count"], s["oldest_created_at"], str(s["avg_attempts"])) for s in stats
    ] == [
        ("dead_letter", 1, by_id[gone]["created_at"], "1.00"),
        (
            "delivered",
            23,
            min(r["created_at"] for r in delivered),
            f"{sum(r['attempt_count'] for r in delivered) / 23:.2f}",
        ),
    ]
    assert sum(r["attempt_count"] for r in delivered) == 21 + 3 + 1

    assert await systems.value(app_db, "SELECT cleanup_delivered_webhooks(7)") == 0
    await systems.rows(
        app_db,
        "UPDATE webhook_delivery_queue SET delivered_at = delivered_at - interval '8 days' "
        "WHERE id = %s",
        (row_a["id"],),
    )
    assert await systems.value(app_db, "SELECT cleanup_delivered_webhooks(7)") == 1
    assert await systems.value(app_db, "SELECT count(*) FROM webhook_delivery_queue") == 23
    assert (
        await systems.value(
            app_db,
            "SELECT count(*) FROM webhook_delivery_log WHERE delivery_id = %s",
            (row_a["id"],),
        )
        == 0
    )
    assert (
        await systems.value(app_db, "SELECT count(*) FROM webhook_delivery_log")
        == len(receiver.received) - 1
    )


async def test_system2_secret_under_a_key_relay_lacks_is_never_sent(
    app_db: str, receiver: Receiver, tmp_path: Path
) -> None:
    """A row encrypted under a key id the configuration does not list (k0, retired too early)
    is not sent, unsigned or otherwise, and its last_error says which key to add; the rows next
    to it go on. Neither the ciphertext nor any key shows in relay's output."""
    config, env = await prepared(
        tmp_path,
        app_db,
        relay={"sweep_interval": 1, "claim_timeout": 20, "shutdown_grace": 5},
        schedule=["100ms"],
    )
    base = f"http://{receiver.host}:{receiver.port}"
    k0 = systems.new_key()  # never configured
    orphan_secret = systems.encrypt_secret("k0", k0, SECRET_A)
    async with systems.relays(config, env) as procs:
        orphan = await queue_row(
            app_db, f"{base}/partner-a", orphan_secret, "order.created", max_attempts=2
        )
        fine = await queue_row(app_db, f"{base}/partner-a", sealed("k1", SECRET_A), "order.created")
        [row] = await systems.wait_rows(
            app_db,
            "SELECT * FROM webhook_delivery_queue WHERE id = %s",
            (orphan,),
            lambda rs: (
                rs[0]["last_error"] is not None and rs[0]["status"] in ("failed", "dead_letter")
            ),
        )
        await systems.wait_rows(
            app_db,
            "SELECT status FROM webhook_delivery_queue WHERE id = %s",
            (fine,),
            lambda rs: rs[0]["status"] == "delivered",
        )
        assert "'k0'" in row["last_error"] and "secret_encryption" in row["last_error"]
        assert orphan_secret not in row["last_error"]
        await systems.stop(procs)
    assert [r.id for r in receiver.received] == [f"{SOURCE}_{fine}"]
    assert signed_by(receiver.received[0], SECRET_A)
    out = procs[0].output()
    assert orphan_secret not in out and orphan_secret.rsplit(":", 1)[1] not in out
    for material in (*env.values(), SECRET_A):
        assert material not in out
