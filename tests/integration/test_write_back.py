"""Write-backs of a table source (issue 9): on_claim (worker id, start time), on_success (the
answer's JSON into jsonb, a field of it into text), on_failure (structured error details),
on_dead (a second column for the dead state), each cast to its column's type; and one that
cannot be cast refused at start-up and by `relay check`, naming its key."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from tests import systems
from tests.integration.user_tables import Gate, execute, table_config, table_source
from tests.support import Receiver, install, raw_config, refusal, run_cli, running, write_config

CALLS = """
CREATE TABLE calls (
    id               serial PRIMARY KEY,
    to_number        text NOT NULL,
    status           text NOT NULL DEFAULT 'queued',
    worker_id        text,
    started_at       timestamptz,
    job_result       jsonb,
    "externalCallId" text,
    error_details    jsonb,
    archived         boolean NOT NULL DEFAULT false
);
"""
WORKER = "worker-7"


def calls_source(url: str, **overrides: Any) -> dict[str, Any]:
    keys: dict[str, Any] = dict(
        pending="queued",
        done="completed",
        dead="failed",
        max_attempts=2,
        payload_sql="jsonb_build_object('to', to_number)",
        on_claim={"worker_id": "attempt.worker", "started_at": "now()"},
        on_success={"job_result": "response.json", "externalCallId": "response.json->>'sid'"},
        on_failure={
            "error_details": "jsonb_build_object('error', attempt.error, "
            "'status', response.status, 'attempt', attempt.number)"
        },
        on_dead={"archived": "true"},
    )
    return table_source("calls", url, **{**keys, **overrides})


def answer(request: web.Request, _: int) -> web.StreamResponse:
    if request.headers["webhook-id"].endswith("_1"):
        return web.json_response({"sid": "CA0001", "status": "queued"})
    return web.Response(status=500, text="carrier busy")


async def call(db: str, key: int) -> dict[str, Any]:
    [row] = await systems.rows(db, "SELECT * FROM calls WHERE id = %s", (key,))
    return row


async def test_write_backs_record_claim_success_failure_and_dead(
    db: str, receiver: Receiver
) -> None:
    execute(db, CALLS)
    await systems.watch(db, "calls")
    gate = Gate(answer, held={1, 2})  # each row's first two requests wait for the test
    receiver.behaviour = gate
    config = table_config(db, {"calls": calls_source(receiver.url)}, relay={"worker_id": WORKER})
    await install(config)
    async with running(config):
        execute(db, "INSERT INTO calls (to_number) VALUES ('+100'), ('+200')")
        await receiver.wait_count(2)
        # Both claimed and in flight: on_claim wrote who and when, the status is untouched.
        for key in (1, 2):
            row = await call(db, key)
            assert (row["status"], row["worker_id"]) == ("queued", WORKER)
            started: datetime = row["started_at"]
            assert started is not None
        gate.release(1)
        # The failing row's retry: its first failure is written, it is not dead yet.
        await receiver.wait_ids({"calls_2"})
        await receiver.wait_for(lambda rs: [r.id for r in rs].count("calls_2") == 2)
        failed_once = await call(db, 2)
        gate.release(2)
        await systems.wait_rows(
            db,
            "SELECT status FROM calls ORDER BY id",
            None,
            lambda rs: [r["status"] for r in rs] == ["completed", "failed"],
        )
    ok, dead = await call(db, 1), await call(db, 2)
    assert failed_once["error_details"] == {
        "error": "HTTP 500: carrier busy",
        "status": 500,
        "attempt": 1,
    }
    assert failed_once["archived"] is False
    assert ok["job_result"] == {"sid": "CA0001", "status": "queued"}
    assert ok["externalCallId"] == "CA0001"
    assert (ok["error_details"], ok["archived"]) == (None, False)
    assert dead["error_details"] == {"error": "HTTP 500: carrier busy", "status": 500, "attempt": 2}
    assert dead["archived"] is True
    assert (dead["job_result"], dead["externalCallId"]) == (None, None)
    assert dead["worker_id"] == WORKER and dead["started_at"] >= started


async def test_a_write_back_that_cannot_be_cast_to_its_column_is_refused_naming_it(
    db: str, tmp_config: Path
) -> None:
    execute(db, CALLS)
    source = calls_source(
        "http://127.0.0.1:9/",
        on_success={"job_result": "response.json", "started_at": "response.json"},
    )
    message = await refusal(table_config(db, {"calls": source}))
    assert message.startswith("sources.calls.on_success.started_at: "), message
    write_config(tmp_config, raw_config(db, sources={"calls": source}))
    code, output = await run_cli(tmp_config, "check")
    assert code == 2, output
    assert "sources.calls.on_success.started_at" in output
    assert "timestamp with time zone" in output


EVERY_FIELD = (
    "jsonb_build_object("
    "'response', jsonb_build_object('status', response.status, "
    "'headers', response.headers->'X-Call', 'json', response.json, 'body', response.body), "
    "'attempt', jsonb_build_object('number', attempt.number, 'error', attempt.error, "
    "'worker', attempt.worker, 'started_at', attempt.started_at, "
    "'finished_at', attempt.finished_at, 'next_at', attempt.next_at, "
    "'outcome', attempt.outcome, 'ms', attempt.ms), "
    "'request', jsonb_build_object('method', request.method, 'url', request.url, "
    "'headers', request.headers->'webhook-id', 'body', request.body))"
)


async def answer_with_header(request: web.Request, _: int) -> web.StreamResponse:
    if request.headers["webhook-id"].endswith("_1"):
        return web.json_response({"sid": "CA0001"}, headers={"X-Call": "c-1"})
    return web.Response(status=503, text="carrier busy", headers={"X-Call": "c-2"})


async def test_every_context_field_reaches_its_write_back(db: str, receiver: Receiver) -> None:
    # The settle computes only the fields its expressions read: each must still be there when
    # read, on success and on failure alike.
    execute(db, CALLS)
    await systems.watch(db, "calls")
    receiver.behaviour = answer_with_header
    source = calls_source(
        receiver.url,
        max_attempts=3,
        retry_policy={"schedule": ["1h"]},
        on_claim={},
        on_success={"job_result": EVERY_FIELD},
        on_failure={"error_details": EVERY_FIELD},
        on_dead={},
    )
    config = table_config(db, {"calls": source}, relay={"worker_id": WORKER})
    await install(config)
    async with running(config):
        execute(db, "INSERT INTO calls (to_number) VALUES ('+100'), ('+200')")
        await systems.wait_rows(
            db,
            "SELECT status, error_details IS NOT NULL AS failed FROM calls ORDER BY id",
            None,
            lambda rs: (
                [(r["status"], r["failed"]) for r in rs] == [("completed", False), ("queued", True)]
            ),
        )
    ok, failed = (await call(db, 1))["job_result"], (await call(db, 2))["error_details"]
    assert ok["response"] == {
        "status": 200,
        "headers": "c-1",
        "json": {"sid": "CA0001"},
        "body": '{"sid": "CA0001"}',
    }
    assert failed["response"] == {
        "status": 503,
        "headers": "c-2",
        "json": None,
        "body": "carrier busy",
    }
    for got, outcome, number in ((ok, "done", "+100"), (failed, "retry", "+200")):
        attempt = got["attempt"]
        assert (attempt["number"], attempt["worker"], attempt["outcome"]) == (1, WORKER, outcome)
        assert attempt["started_at"] <= attempt["finished_at"]
        assert attempt["ms"] >= 0
        assert got["request"]["method"] == "POST"
        assert got["request"]["url"] == receiver.url
        assert got["request"]["headers"] == f"calls_{1 if outcome == 'done' else 2}"
        assert got["request"]["body"] == f'{{"to": "{number}"}}'
    assert ok["attempt"]["error"] is None and ok["attempt"]["next_at"] is None
    assert failed["attempt"]["error"] == "HTTP 503: carrier busy"
    assert failed["attempt"]["next_at"] is not None
