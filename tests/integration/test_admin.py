"""The admin API (off unless [admin] has tokens) and the CLI's verbs for the same work: list
sources and their dead rows, retry chosen ones, run a job now, each action logged with who."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from relay import config as config_mod
from relay.config import ConfigError
from tests import systems
from tests.support import admin_request, install, raw_config, run_cli, serving, write_config

TOKEN = "ops-token-0123456789abcdef"
DEAD = """
INSERT INTO webhook_delivery_queue (url, status, attempt_count, last_error, last_response_status)
VALUES ('http://127.0.0.1:9/a', 'dead_letter', 5, 'HTTP 500 from 127.0.0.1: boom', 500),
       ('http://127.0.0.1:9/b', 'dead_letter', 5, 'connection refused', NULL),
       ('http://127.0.0.1:9/c', 'dead_letter', 5, 'HTTP 410', 410),
       ('http://127.0.0.1:9/d', 'delivered', 1, NULL, 200);
"""
JOB = {"every": "1h", "sql": "SELECT 3 AS processed, 3 AS succeeded, 0 AS failed"}


def admin_raw(db: str, **extra: Any) -> dict[str, Any]:
    return raw_config(
        db,
        admin={"tokens": {"ops": TOKEN}},
        jobs={"nightly": JOB},
        relay={"sweep_interval": 3600},
        **extra,
    )


def execute(db: str, statements: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(statements)


async def call(
    port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN
) -> tuple[int, Any]:
    return await admin_request(port, method, path, token, body)


async def statuses(db: str) -> dict[int, str]:
    """Each row's status, by id."""
    rows = await systems.rows(db, "SELECT id, status FROM webhook_delivery_queue ORDER BY id")
    return {r["id"]: r["status"] for r in rows}


async def test_the_admin_api_lists_dead_rows_and_retries_chosen_ones(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    execute(db, DEAD)
    config = config_mod.from_mapping(admin_raw(db), {})
    await install(config)
    caplog.set_level(logging.INFO, "relay.admin")
    async with serving(config) as service:
        port = service.health_port
        assert port is not None
        assert (await call(port, "GET", "/admin/sources", token=None))[0] == 401
        assert (await call(port, "GET", "/admin/sources", token="x" * 26))[0] == 401
        status, sources = await call(port, "GET", "/admin/sources")
        assert status == 200
        assert sources["deliveries"]["counts"] == {"dead_letter": 3, "delivered": 1}
        status, page = await call(port, "GET", "/admin/sources/deliveries/dead?limit=2")
        assert status == 200
        assert [(r["key"], r["http_status"], r["attempts"]) for r in page["rows"]] == [
            ("1", 500, 5),
            ("2", None, 5),
        ]
        assert page["rows"][0]["error"] == "HTTP 500 from 127.0.0.1: boom"
        status, rest = await call(
            port, "GET", f"/admin/sources/deliveries/dead?after={page['next']}"
        )
        assert ([r["key"] for r in rest["rows"]], rest["next"]) == (["3"], None)
        # Row 4 is delivered, not dead: not retried.
        retried = await call(port, "POST", "/admin/sources/deliveries/retry", {"keys": [1, 4]})
        assert retried == (200, {"retried": 1})
        # Row 1 is claimable again (the running relay may be at it already); 2 and 3 not.
        assert [s == "dead_letter" for s in (await statuses(db)).values()] == [
            False,
            True,
            True,
            False,
        ]
        assert (await call(port, "POST", "/admin/sources/deliveries/retry", {}))[0] == 400
        assert await call(port, "POST", "/admin/sources/deliveries/retry", {"all": True}) == (
            200,
            {"retried": 2},
        )
        assert (await call(port, "GET", "/admin/sources/nowhere/dead"))[0] == 404
    assert "admin.retry who=ops source=deliveries keys=2 since=- retried=1" in caplog.text


async def test_depths_are_counted_once_for_every_look_within_a_few_seconds_and_after_a_retry(
    db: str,
) -> None:
    execute(db, DEAD)
    config = config_mod.from_mapping(admin_raw(db), {})
    await install(config)
    async with serving(config) as service:
        port = service.health_port
        assert port is not None
        _, first = await call(port, "GET", "/admin/sources")
        assert first["deliveries"]["counts"] == {"dead_letter": 3, "delivered": 1}
        # A dead row more: the dashboards' looks within DEPTHS_FRESH share one count...
        execute(db, "INSERT INTO webhook_delivery_queue (url, status) VALUES ('x', 'dead_letter')")
        assert (await call(port, "GET", "/admin/sources"))[1] == first
        _, overview = await call(port, "GET", "/admin/overview")
        assert overview["sources"] == first
        # ...and a retry, which changes them, has the next look count again.
        await call(port, "POST", "/admin/sources/deliveries/retry", {"keys": [999]})
        _, after = await call(port, "GET", "/admin/sources")
        assert after["deliveries"]["counts"] == {"dead_letter": 4, "delivered": 1}


async def test_the_admin_api_runs_a_job_now_and_shows_it(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_mod.from_mapping(admin_raw(db), {})
    await install(config)
    caplog.set_level(logging.INFO, "relay.admin")
    async with serving(config) as service:
        port = service.health_port
        assert port is not None
        await service.relay.scheduler.wait_runs(1)  # the start's occurrence
        status, run = await call(port, "POST", "/admin/jobs/nightly/run")
        assert status == 200
        assert (run["processed"], run["error"]) == (3, None)
        status, jobs = await call(port, "GET", "/admin/jobs")
        assert jobs["nightly"]["schedule"] == "every 1h"
        assert jobs["nightly"]["last"]["scheduled_for"] == run["scheduled_for"]
        assert (await call(port, "POST", "/admin/jobs/nope/run"))[0] == 404
    assert await systems.value(db, "SELECT count(*) FROM relay.job_runs") == 2
    assert "admin.run_job who=ops job=nightly ran=true" in caplog.text


async def test_without_tokens_there_is_no_admin_api(db: str) -> None:
    config = config_mod.from_mapping(raw_config(db), {})
    await install(config)
    async with serving(config) as service:
        assert service.health_port is not None
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{service.health_port}/admin/sources"
            async with session.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                assert response.status == 404


async def test_the_cli_lists_dead_rows_retries_them_and_runs_jobs(
    db: str, tmp_config: Path
) -> None:
    execute(db, DEAD)
    write_config(tmp_config, admin_raw(db))
    assert (await run_cli(tmp_config, "install"))[0] == 0
    code, output = await run_cli(tmp_config, "dead", "deliveries", "--limit", "2")
    assert code == 0, output
    lines = output.strip().splitlines()
    assert lines[0].startswith("1  attempts=5 http_status=500") and "error=HTTP 500" in lines[0]
    assert lines[-1] == "more: relay dead deliveries --after 2"
    code, output = await run_cli(tmp_config, "retry", "deliveries", "2", "4")
    assert code == 0, output
    assert "deliveries: 1 of 2 keys were dead rows, made claimable again" in output
    code, output = await run_cli(tmp_config, "retry", "deliveries", "--all")
    assert "deliveries: 2 dead rows made claimable again" in output
    assert await statuses(db) == {1: "pending", 2: "pending", 3: "pending", 4: "delivered"}
    code, output = await run_cli(tmp_config, "retry", "deliveries")
    assert code == 2 and "give the keys, or --all, or --since" in output
    code, output = await run_cli(tmp_config, "jobs", "--run", "nightly")
    assert code == 0, output
    assert "jobs.nightly: ran in" in output and "processed=3 succeeded=3 failed=0" in output
    code, output = await run_cli(tmp_config, "jobs")
    assert "jobs.nightly: every 1h; next " in output and "last run" in output
    code, output = await run_cli(tmp_config, "--help")
    for verb in ("dead", "retry", "jobs"):
        assert f"    {verb}" in output


def test_an_admin_token_too_short_is_refused() -> None:
    raw = raw_config("postgresql://u@h/db", admin={"tokens": {"ops": "short"}})
    with pytest.raises(ConfigError, match=r"admin.tokens.ops: at least 16 characters"):
        config_mod.from_mapping(raw, {})


async def test_the_token_counts_only_as_a_bearer_token(db: str) -> None:
    config = config_mod.from_mapping(admin_raw(db), {})
    await install(config)
    async with serving(config) as service, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{service.health_port}/admin/sources"
        for value in (TOKEN, f"Basic {TOKEN}", f"bearer{TOKEN}"):
            async with session.get(url, headers={"Authorization": value}) as response:
                assert response.status == 401, value
