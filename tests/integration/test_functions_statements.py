"""kind = "functions" (issue 9): the user's own SQL claims and settles. Its statements are checked
at start-up without being run: one PostgreSQL does not accept, or a :parameter relay does not
have, stops relay naming the key (`relay check` exits 2). And a small job table worked through
its own claim, complete and fail statements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay import config as config_mod
from relay.config import ConfigError
from relay.db.store import Store
from tests import systems
from tests.integration.user_tables import execute, table_config
from tests.support import Receiver, raw_config, refusal, run_cli, running, write_config

JOBS = """
CREATE TABLE jobs (
    id         serial PRIMARY KEY,
    status     text NOT NULL DEFAULT 'queued',
    worker     text,
    tries      integer NOT NULL DEFAULT 0,
    payload    jsonb NOT NULL DEFAULT '{}',
    result     jsonb,
    error      jsonb
);
-- Called by the claim: if start-up ran it (rather than only planning it), it would show.
CREATE TABLE claim_calls (worker text);
CREATE FUNCTION claim_job(p_worker text) RETURNS SETOF jobs LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO claim_calls VALUES (p_worker);
    RETURN QUERY
    UPDATE jobs SET status = 'running', worker = p_worker, tries = tries + 1
    WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY id
                LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING *;
END $$;
"""


def jobs_source(url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "kind": "functions",
        "key": "id",
        "claim": "SELECT * FROM claim_job(:worker)",
        "complete": "UPDATE jobs SET status = 'done', result = :response_json "
        "WHERE id = :key AND worker = :worker",
        "fail": "UPDATE jobs SET status = CASE WHEN :final THEN 'failed' ELSE 'queued' END, "
        "error = :error_json WHERE id = :key AND worker = :worker",
        "attempt_column": "tries",
        "payload": "payload",
        "url": url,
        "wake": "jobs",
        **overrides,
    }


async def refused(db: str, source: dict[str, Any]) -> str:
    """The ConfigError that checking this source against the database raises."""
    return await refusal(table_config(db, {"jobs": source}))


@pytest.fixture
def jobs_db(db: str) -> str:
    execute(db, JOBS)
    return db


async def test_a_claim_statement_postgresql_does_not_accept_is_refused_naming_it(
    jobs_db: str, tmp_config: Path
) -> None:
    source = jobs_source("http://127.0.0.1:9/", claim="SELEC * FROM claim_job(:worker)")
    message = await refused(jobs_db, source)
    assert message.startswith("sources.jobs.claim: PostgreSQL does not accept it: "), message
    assert "SELEC" in message
    write_config(tmp_config, raw_config(jobs_db, sources={"jobs": source}))
    code, output = await run_cli(tmp_config, "check")
    assert code == 2, output
    assert "sources.jobs.claim: PostgreSQL does not accept it" in output
    assert await systems.rows(jobs_db, "SELECT * FROM claim_calls") == []


@pytest.mark.parametrize(
    ("key", "statement", "named"),
    [
        ("complete", "UPDATE jobs SET status = 'done' WHERE id = :key AND no_such = 1", "no_such"),
        ("fail", "SELECT no_such_function(:key)", "no_such_function"),
    ],
)
async def test_a_settle_statement_that_does_not_plan_is_refused_naming_it(
    jobs_db: str, key: str, statement: str, named: str
) -> None:
    message = await refused(jobs_db, jobs_source("http://127.0.0.1:9/", **{key: statement}))
    assert message.startswith(f"sources.jobs.{key}: PostgreSQL does not accept it: "), message
    assert named in message


@pytest.mark.parametrize(
    ("key", "statement", "unknown"),
    [
        ("claim", "SELECT * FROM claim_job(:worker) WHERE lane = :lane", ":lane"),
        ("complete", "SELECT 1 WHERE :key = :result", ":result"),
        ("heartbeat", "UPDATE jobs SET worker = :worker WHERE id = :key AND :error", ":error"),
    ],
)
async def test_an_unknown_parameter_is_refused_naming_it(
    key: str, statement: str, unknown: str
) -> None:
    raw = raw_config("postgresql://unused", sources={"jobs": jobs_source("http://x.test/")})
    raw["sources"]["jobs"][key] = statement
    with pytest.raises(ConfigError) as caught:
        config_mod.from_mapping(raw, {})
    message = str(caught.value)
    assert message.startswith(f"sources.jobs.{key}: unknown parameter {unknown};"), message


async def test_jobs_are_claimed_and_settled_by_the_users_statements(
    jobs_db: str, receiver: Receiver
) -> None:
    async def answer(request: web.Request, _: int) -> web.StreamResponse:
        job = await request.json()
        if job.get("bad"):
            return web.json_response({"error": "unreadable"}, status=422)
        return web.json_response({"pages": job["pages"]})

    receiver.behaviour = answer
    await systems.watch(jobs_db, "jobs")
    config = table_config(jobs_db, {"jobs": jobs_source(receiver.url)}, relay={"worker_id": "w1"})
    store = Store(config.database_url, config.sources)
    await store.open()
    try:
        await store.install()  # the wake-up trigger on `jobs`
    finally:
        await store.close()
    assert await systems.rows(jobs_db, "SELECT * FROM claim_calls") == []  # checked, not run
    async with running(config) as relay:
        sweeps = relay.sweeper.sweeps
        execute(
            jobs_db,
            "INSERT INTO jobs (payload) VALUES ('{\"pages\": 3}'), ('{\"bad\": true}'), "
            "('{\"pages\": 5}')",
        )
        found = await systems.wait_rows(
            jobs_db,
            "SELECT id, status, worker, tries, result, error FROM jobs ORDER BY id",
            None,
            lambda rs: all(r["status"] in ("done", "failed") for r in rs),
        )
        assert relay.sweeper.sweeps == sweeps  # woken by the insert on `jobs`
    assert found == [
        {
            "id": 1,
            "status": "done",
            "worker": "w1",
            "tries": 1,
            "result": {"pages": 3},
            "error": None,
        },
        {
            "id": 2,
            "status": "failed",
            "worker": "w1",
            "tries": 1,
            "result": None,
            "error": {"error": 'HTTP 422: {"error": "unreadable"}', "status": 422, "attempt": 1},
        },
        {
            "id": 3,
            "status": "done",
            "worker": "w1",
            "tries": 1,
            "result": {"pages": 5},
            "error": None,
        },
    ]
    assert len(receiver.received) == 3
    assert [r.headers["relay-attempt"] for r in receiver.received] == ["1", "1", "1"]
