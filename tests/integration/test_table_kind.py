"""A table source on a job table of the application's: filters splitting it between sources,
requests shaped from columns and expressions, answers written back, an attempt log, and a
retry policy of its own."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any
from urllib.parse import parse_qs

import psycopg
import pytest
from aiohttp import web

from relay import config as config_mod
from relay.db.store import Store
from tests import systems
from tests.support import Receiver, install, raw_config, refusal, running

SCHEMA = """
CREATE TABLE jobs (
    id             bigserial PRIMARY KEY,
    job_type       text NOT NULL,
    lane           text NOT NULL DEFAULT 'default',
    email          text,
    payload        jsonb NOT NULL DEFAULT '{}',
    status         text NOT NULL DEFAULT 'pending',
    result         jsonb,
    call_id        text,
    error_details  jsonb,
    worker_id      text,
    started_at     timestamptz,
    archived       boolean NOT NULL DEFAULT false
);
"""


@pytest.fixture
def jobs_db(db: str) -> str:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return db


def jobs_source(url: str, **overrides: Any) -> dict[str, Any]:
    source: dict[str, Any] = {
        "kind": "table",
        "table": "jobs",
        "key": "id",
        "status": "status",
        "done": "done",
        "dead": "failed",
        "url": url,
    }
    source.update(overrides)
    return source


async def add_jobs(db: str, *rows: dict[str, Any]) -> list[int]:
    ids = []
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        for row in rows:
            cols = ", ".join(row)
            vals = ", ".join(f"%({c})s" for c in row)
            cur = await conn.execute(
                f"INSERT INTO jobs ({cols}) VALUES ({vals}) RETURNING id",
                row,
            )
            found = await cur.fetchone()
            assert found is not None
            ids.append(found[0])
    return ids


async def wait_jobs(db: str, done: Any) -> dict[int, dict[str, Any]]:
    rows = await systems.wait_rows(db, "SELECT * FROM jobs ORDER BY id", None, done)
    return {r["id"]: r for r in rows}


def settled(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and all(r["status"] in ("done", "failed") for r in rows)


async def test_two_sources_split_one_table_by_their_filters(
    jobs_db: str, receiver: Receiver
) -> None:
    other = Receiver()
    await other.start()
    try:
        sources = {
            "ocr": jobs_source(
                receiver.url, filter="job_type = 'ocr' AND lane = 'default'", done="done"
            ),
            "mail": jobs_source(other.url, filter="job_type = 'mail'"),
        }
        config = config_mod.from_mapping(raw_config(jobs_db, sources=sources), {})
        await install(config)
        await systems.watch(jobs_db, "jobs")
        async with running(config) as relay:
            ocr, mail, gpu = await add_jobs(
                jobs_db,
                {"job_type": "ocr"},
                {"job_type": "mail"},
                {"job_type": "ocr", "lane": "gpu"},
            )
            await receiver.wait_count(1)
            await other.wait_count(1)
            rows = await wait_jobs(
                jobs_db, lambda rs: [r["status"] for r in rs] == ["done", "done", "pending"]
            )
            counts = {name: await relay.store.counts(name) for name in sources}
        assert [r.id for r in receiver.received] == [f"ocr_{ocr}"]
        assert [r.id for r in other.received] == [f"mail_{mail}"]
        # The gpu-lane job is no source's: never sent, left as the application wrote it.
        assert rows[gpu]["status"] == "pending"
        assert counts == {"ocr": {"done": 1}, "mail": {"done": 1}}
    finally:
        await other.stop()


async def test_requests_are_shaped_from_columns_and_expressions(
    jobs_db: str, receiver: Receiver
) -> None:
    source = jobs_source(
        receiver.url,
        method="PUT",
        payload_sql="jsonb_build_object('To', email, 'Body', payload->>'text', 'N', 3)",
        format="form",
        header_columns={"X-Job-Type": "job_type"},
        header_sql={"Idempotency-Key": "'job-' || id"},
        auth={"basic": {"username": "AC1", "password": "pa55"}},
        signing={"hmac_sha256": {"header": "X-Signature", "prefix": "sha256="}},
        secret="shh",
    )
    config = config_mod.from_mapping(raw_config(jobs_db, sources={"jobs": source}), {})
    await install(config)
    async with running(config):
        [job] = await add_jobs(
            jobs_db, {"job_type": "sms", "email": "a@b.test", "payload": '{"text": "hi"}'}
        )
        await receiver.wait_count(1)
    [request] = receiver.received
    assert parse_qs(request.body.decode()) == {"To": ["a@b.test"], "Body": ["hi"], "N": ["3"]}
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["content-type"] == "application/x-www-form-urlencoded"
    assert headers["x-job-type"] == "sms"
    assert headers["idempotency-key"] == f"job-{job}"
    assert headers["authorization"] == "Basic " + base64.b64encode(b"AC1:pa55").decode()
    digest = hmac.new(b"shh", request.body, hashlib.sha256).hexdigest()
    assert headers["x-signature"] == f"sha256={digest}"


async def test_answers_are_written_back_and_attempts_logged(
    jobs_db: str, receiver: Receiver
) -> None:
    async def answer(request: web.Request, nth: int) -> web.Response:
        kind = (await request.json())["job_type"]
        if kind == "bad":
            return web.json_response({"error": "no such template"}, status=422)
        return web.json_response({"sid": f"CA{nth}", "pages": 2})

    receiver.behaviour = answer
    source = jobs_source(
        receiver.url,
        on_claim={"worker_id": "attempt.worker", "started_at": "attempt.started_at"},
        on_success={"result": "response.json", "call_id": "response.json->>'sid'"},
        on_failure={
            "error_details": "jsonb_build_object('error', attempt.error, "
            "'status', response.status, 'attempt', attempt.number)"
        },
        on_dead={"archived": "true"},
        attempt_log={"table": "relay", "max_body_chars": 10, "keep_rows": 1},
    )
    config = config_mod.from_mapping(
        raw_config(jobs_db, relay={"worker_id": "w-1"}, sources={"jobs": source}), {}
    )
    await install(config)
    await systems.watch(jobs_db, "jobs")
    async with running(config) as relay:
        good, bad = await add_jobs(jobs_db, {"job_type": "ocr"}, {"job_type": "bad"})
        rows = await wait_jobs(jobs_db, settled)
        async with await psycopg.AsyncConnection.connect(jobs_db) as conn:
            cur = await conn.execute(
                "SELECT key, attempt, outcome, status, response_body FROM relay.attempts "
                "ORDER BY key"
            )
            logged = await cur.fetchall()
        # Retention (keep_rows = 1) runs at a sweep: the older attempt goes.
        await relay.sweeper.sweep()
        async with await psycopg.AsyncConnection.connect(jobs_db) as conn:
            cur = await conn.execute("SELECT key FROM relay.attempts")
            kept = await cur.fetchall()
    assert rows[good]["status"] == "done"
    assert rows[good]["result"]["pages"] == 2  # the answer's JSON, as JSON
    assert rows[good]["call_id"] == rows[good]["result"]["sid"]
    assert rows[good]["worker_id"] == "w-1" and rows[good]["started_at"] is not None
    assert not rows[good]["archived"] and rows[good]["error_details"] is None
    # A 422 is final by default: dead at its first attempt, the details written, archived.
    assert rows[bad]["status"] == "failed" and rows[bad]["archived"]
    assert rows[bad]["error_details"]["status"] == 422
    assert rows[bad]["error_details"]["attempt"] == 1
    assert len([r for r in receiver.received if r.json["job_type"] == "bad"]) == 1
    assert [(k, a, o, s) for k, a, o, s, _ in logged] == [
        (str(good), 1, "done", 200),
        (str(bad), 1, "dead", 422),
    ]
    assert all(len(body) <= 10 for *_, body in logged)  # max_body_chars
    assert len(kept) == 1


async def test_a_write_back_that_cannot_fit_its_column_stops_start_up_naming_it(
    jobs_db: str,
) -> None:
    source = jobs_source("http://127.0.0.1:9/", on_success={"started_at": "payload"})
    config = config_mod.from_mapping(raw_config(jobs_db, sources={"jobs": source}), {})
    await install_schema_only(config)
    message = await refusal(config)
    assert message.startswith(
        "sources.jobs.on_success.started_at: cannot be written to column 'started_at' "
        "(timestamp with time zone): cannot cast type jsonb to timestamp with time zone"
    ), message


async def install_schema_only(config: config_mod.Config) -> None:
    """relay's schema (leases, composite types), as `relay install` leaves it."""
    store = Store(config.database_url, [])
    await store.open()
    try:
        await store.install()
    finally:
        await store.close()
