"""Scheduled jobs ([jobs.NAME]): a user's SQL run at each occurrence by exactly one of the relays
sharing the database, each run recorded (relay.job_runs), failures recorded and tried again at
the next occurrence, a missed occurrence after downtime run once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay import config as config_mod
from relay.config import ConfigError
from relay.db.store import Store
from relay.jobs import Job
from tests import systems
from tests.support import install, raw_config, run_cli, running, write_config

RESERVATIONS = """
CREATE TABLE inventory_reservations (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sku         text NOT NULL,
    expires_at  timestamptz NOT NULL,
    released_at timestamptz
);
INSERT INTO inventory_reservations (sku, expires_at)
VALUES ('a', now() - interval '1 minute'), ('b', now() - interval '1 second'),
       ('c', now() + interval '1 hour');
"""
# System 4's job: release what expired, report {processed, succeeded, failed}.
RELEASE = """
WITH released AS (
    UPDATE inventory_reservations SET released_at = now()
    WHERE expires_at <= now() AND released_at IS NULL
    RETURNING id)
SELECT count(*) AS processed, count(*) AS succeeded, 0 AS failed FROM released
"""


def execute(db: str, statements: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(statements)


def jobs_config(db: str, jobs: dict[str, Any], **relay: Any) -> config_mod.Config:
    raw = raw_config(db, jobs=jobs, relay=relay)
    del raw["sources"]  # scheduled SQL alone is a configuration too
    return config_mod.from_mapping(raw, {})


async def job_runs(db: str) -> list[dict[str, Any]]:
    return await systems.rows(db, "SELECT * FROM relay.job_runs ORDER BY job, scheduled_for")


async def test_a_job_runs_at_start_and_records_what_its_statement_returned(db: str) -> None:
    execute(db, RESERVATIONS)
    config = jobs_config(db, {"release": {"every": "1h", "sql": RELEASE}})
    await install(config)
    async with running(config) as relay:
        await relay.scheduler.wait_runs(1)
        status = relay.status()["jobs"]["release"]
    (run,) = await job_runs(db)
    assert (run["processed"], run["succeeded"], run["failed"], run["error"]) == (2, 2, 0, None)
    assert run["worker"] == config.worker_id
    # The occurrence is the hour's, the same for every relay.
    assert run["scheduled_for"].timestamp() % 3600 == 0
    released = await systems.rows(
        db, "SELECT sku FROM inventory_reservations WHERE released_at IS NOT NULL ORDER BY sku"
    )
    assert [r["sku"] for r in released] == ["a", "b"]
    assert status["schedule"] == "every 1h"
    assert status["last"]["processed"] == 2
    assert datetime.fromisoformat(status["next"]) > datetime.now(UTC)


async def test_two_relays_due_for_the_same_occurrence_run_it_once(db: str) -> None:
    execute(db, "CREATE TABLE ticks (at timestamptz NOT NULL DEFAULT clock_timestamp())")
    config = jobs_config(db, {"tick": {"every": "1h", "sql": "SELECT 1"}})
    await install(config)
    # Slow enough that both relays are inside it at once.
    job = Job("tick", "INSERT INTO ticks DEFAULT VALUES; SELECT pg_sleep(0.3)", 3600.0, None, 5.0)
    occurrence = job.latest(datetime.now(UTC))
    stores = [Store(db, (), worker=f"relay-{i}") for i in range(2)]
    for store in stores:
        await store.open()
    try:
        runs = await asyncio.gather(*(s.run_job(job, occurrence) for s in stores))
        again = await stores[0].run_job(job, occurrence)
    finally:
        for store in stores:
            await store.close()
    assert sorted(r is None for r in runs) == [False, True]
    assert again is None  # recorded: not run again
    assert await systems.value(db, "SELECT count(*) FROM ticks") == 1
    assert len(await job_runs(db)) == 1


async def test_after_downtime_a_missed_job_runs_once_not_once_per_occurrence(db: str) -> None:
    execute(db, "CREATE TABLE ticks (at timestamptz NOT NULL DEFAULT clock_timestamp())")
    config = jobs_config(db, {"tick": {"every": "1h", "sql": "INSERT INTO ticks DEFAULT VALUES"}})
    await install(config)
    latest = config.jobs[0].latest(datetime.now(UTC))
    # The last run was three occurrences ago; relay was down since.
    execute(
        db,
        f"""INSERT INTO relay.job_runs (job, scheduled_for, started_at, duration_ms, worker)
            VALUES ('tick', '{(latest - timedelta(hours=3)).isoformat()}', now(), 1, 'old')""",
    )
    async with running(config) as relay:
        await relay.scheduler.wait_runs(1)
    runs = await job_runs(db)
    assert [r["scheduled_for"] for r in runs] == [latest - timedelta(hours=3), latest]
    assert runs[1]["rows_affected"] == 1
    assert await systems.value(db, "SELECT count(*) FROM ticks") == 1


async def test_a_failing_job_is_recorded_and_tried_at_the_next_occurrence(db: str) -> None:
    config = jobs_config(
        db,
        {
            "broken": {"every": "1s", "sql": "SELECT 1 / 0"},
            "slow": {"every": "1h", "sql": "SELECT pg_sleep(5)", "timeout": "0.2s"},
        },
    )
    await install(config)
    async with running(config) as relay:
        await relay.scheduler.wait_runs(3)
        assert relay.failing() == {}
    runs = await job_runs(db)
    broken = [r for r in runs if r["job"] == "broken"]
    assert len(broken) >= 2
    assert all("division by zero" in r["error"] for r in broken)
    # One occurrence each: the next one's, not the same one again.
    assert len({r["scheduled_for"] for r in broken}) == len(broken)
    (slow,) = [r for r in runs if r["job"] == "slow"]
    assert "statement timeout" in slow["error"]
    assert slow["duration_ms"] < 5000


async def test_a_function_returning_json_counts_and_a_cron_schedule(db: str) -> None:
    execute(
        db,
        """CREATE FUNCTION nightly() RETURNS jsonb LANGUAGE sql AS
           $$ SELECT '{"processed": 5, "succeeded": 4, "failed": 1}'::jsonb $$""",
    )
    config = jobs_config(db, {"nightly": {"cron": "* * * * *", "sql": "SELECT nightly()"}})
    await install(config)
    async with running(config) as relay:
        await relay.scheduler.wait_runs(1)
    (run,) = await job_runs(db)
    assert (run["processed"], run["succeeded"], run["failed"]) == (5, 4, 1)
    assert run["scheduled_for"].second == 0  # the minute's occurrence, in UTC


async def test_relay_status_shows_each_job_s_last_run(db: str, tmp_config: Path) -> None:
    execute(db, RESERVATIONS)
    raw = raw_config(db, jobs={"release": {"every": "5m", "sql": RELEASE}})
    config = write_config(tmp_config, raw)
    assert (await run_cli(tmp_config, "install"))[0] == 0
    code, output = await run_cli(tmp_config, "status")
    assert code == 0, output
    assert "jobs.release: every 5m; next " in output and "not run yet" in output
    async with running(config) as relay:
        await relay.scheduler.wait_runs(1)
    code, output = await run_cli(tmp_config, "status")
    line = next(line for line in output.splitlines() if line.startswith("jobs.release"))
    assert "rows=1 processed=2 succeeded=2 failed=0" in line, line
    assert f"by {config.worker_id}" in line


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"every": "1m", "cron": "* * * * *", "sql": "SELECT 1"}, "jobs.j: set one of every"),
        ({"cron": "every day", "sql": "SELECT 1"}, "jobs.j.cron: 'every day' is not a cron"),
        ({"every": "1m"}, "jobs.j.sql: required"),
        ({"every": "0.1s", "sql": "SELECT 1"}, "jobs.j.every"),
        ({"every": "1m", "sql": "SELECT 1", "when": "now"}, "jobs.j.when: unknown key"),
    ],
)
def test_a_job_configured_wrong_is_refused_naming_the_key(
    job: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        jobs_config("postgresql://u@h/db", {"j": job})
    assert str(caught.value).startswith(message), str(caught.value)


async def test_jobs_without_relay_s_table_say_to_run_relay_install(
    db: str, tmp_config: Path
) -> None:
    raw = raw_config(db, jobs={"release": {"every": "5m", "sql": "SELECT 1"}})
    write_config(tmp_config, raw)
    execute(db, "DROP TABLE IF EXISTS relay.job_runs")
    code, output = await run_cli(tmp_config, "check")
    assert code != 0
    assert "jobs: relay's table relay.job_runs does not exist; run `relay install`" in output


async def test_a_job_without_a_schedule_runs_only_when_asked(db: str, tmp_config: Path) -> None:
    execute(db, "CREATE TABLE ticks (at timestamptz NOT NULL DEFAULT clock_timestamp())")
    jobs = {"vacuum_now": {"sql": "INSERT INTO ticks DEFAULT VALUES"}}
    raw = raw_config(db, jobs=jobs)
    config = write_config(tmp_config, raw)
    await install(config)
    async with running(config) as relay:
        assert relay.status()["jobs"]["vacuum_now"] == {
            "schedule": "on demand",
            "next": None,
            "last": None,
        }
    assert await systems.value(db, "SELECT count(*) FROM ticks") == 0
    code, output = await run_cli(tmp_config, "jobs", "--run", "vacuum_now")
    assert code == 0, output
    assert "jobs.vacuum_now: ran in" in output and "rows=1" in output
    code, output = await run_cli(tmp_config, "jobs")
    assert "jobs.vacuum_now: on demand; last run" in output
