"""`relay check` tells the truth about the database: triggers missing or stale, ordering
indexes and relay.endpoints missing, the database's encoding, mapped columns that cannot hold
what relay writes, status values the column would change; and what it lets through works (a
jsonb error column, a `%` in names and values)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web
from psycopg import sql

from relay import config as config_mod
from relay.config import Config, ConfigError
from relay.db.store import Store
from tests.conftest import Server
from tests.integration.documenso_migrations import documenso_execute
from tests.integration.documenso_schema import ENVELOPE
from tests.support import (
    Receiver,
    install,
    queue_source,
    raw_config,
    run_cli,
    running,
    write_config,
)


def execute(url: str, statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements)


async def problems(config: Config) -> dict[str, str]:
    store = Store(config.database_url, config.sources, channel=config.notify_channel)
    await store.open()
    try:
        await store.prepare()
        return await store.trigger_problems()
    finally:
        await store.close()


async def prepare(config: Config) -> None:
    store = Store(config.database_url, config.sources)
    await store.open()
    try:
        await store.prepare()
    finally:
        await store.close()


async def test_check_fails_naming_each_source_whose_triggers_are_missing(
    db: str, tmp_config: Path
) -> None:
    raw = raw_config(db)
    write_config(tmp_config, raw)
    code, output = await run_cli(tmp_config, "check")
    assert code == 1, output
    assert (
        "sources.deliveries: its trigger on public.webhook_delivery_queue is not installed; "
        "run `relay install`"
    ) in output
    assert "configuration OK" not in output
    assert (await run_cli(tmp_config, "install"))[0] == 0
    code, output = await run_cli(tmp_config, "check")
    assert (code, output.splitlines()[-1]) == (0, "configuration OK for sources: deliveries")


async def test_check_fails_naming_relay_endpoints_when_an_older_install_lacks_it(
    db: str, tmp_config: Path
) -> None:
    # A database installed by a relay older than relay.endpoints: a running relay only warns
    # (endpoint.not_recorded) and keeps disabled targets in memory.
    write_config(tmp_config, raw_config(db))
    assert (await run_cli(tmp_config, "install"))[0] == 0
    execute(db, "DROP TABLE relay.endpoints")
    code, output = await run_cli(tmp_config, "check")
    assert code == 1, output
    assert (
        "endpoints: relay's table relay.endpoints does not exist; run `relay install` (the "
        "table is new in this version; without it targets disabled by their answer and endpoint "
        "pauses are kept only in memory until the relay stops, and `relay enable` fails)"
    ) in output.splitlines()
    assert "configuration OK" not in output
    assert (await run_cli(tmp_config, "install"))[0] == 0
    code, output = await run_cli(tmp_config, "check")
    assert (code, output.splitlines()[-1]) == (0, "configuration OK for sources: deliveries")


@pytest.mark.parametrize("kind", ["table", "outbox"])
async def test_check_fails_naming_a_missing_ordering_index_and_its_statement(
    db: str, tmp_config: Path, kind: str
) -> None:
    # `relay run` starts without it (logging ordering.index_missing), and each claim then reads
    # the table; check says so, with the statement to run.
    source: dict[str, Any] = (
        {"kind": "outbox", "url": "http://127.0.0.1:9/hook"} if kind == "outbox" else queue_source()
    )
    source["ordering_key"] = "payload->>'doc'"
    write_config(tmp_config, raw_config(db, sources={"events": source}))
    assert (await run_cli(tmp_config, "install"))[0] == 0
    with psycopg.connect(db, autocommit=True) as conn:
        [(schema, name, definition)] = conn.execute(
            "SELECT schemaname::text, indexname::text, indexdef FROM pg_indexes "
            "WHERE indexname LIKE '%relay_order%'"
        ).fetchall()
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(schema, name)))
    code, output = await run_cli(tmp_config, "check")
    assert code == 1, output
    [line] = [line for line in output.splitlines() if line.startswith("sources.events:")]
    prefix = (
        f"sources.events: its ordering index {name} is missing, so each claim reads the table; "
        f"run `relay install`, or on a large busy table first run: "
    )
    assert line.startswith(prefix), output
    statement = line.removeprefix(prefix)
    assert statement.startswith(f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{name}" ON '), line
    assert "ordering.index_missing" not in output  # reported once, as a problem
    assert "configuration OK" not in output
    # Running the statement it names is all it takes, and makes the index install makes.
    execute(db, statement)
    with psycopg.connect(db) as conn:
        made = conn.execute(
            "SELECT schemaname::text, indexdef FROM pg_indexes WHERE indexname = %s", [name]
        ).fetchall()
    assert made == [(schema, definition)]
    code, output = await run_cli(tmp_config, "check")
    assert (code, output.splitlines()[-1]) == (0, "configuration OK for sources: events"), output


@pytest.mark.parametrize(
    "change",
    [
        {"relay": {"channel": "elsewhere"}},
        {"sources": {"deliveries": queue_source(pending=["pending"], retry="pending")}},
        # (The due column is not part of the wake-up: rows due later wake relay too, to set
        # its timer.)
        {"sources": {"deliveries": queue_source(filter="event_type <> 'test.ignored'")}},
    ],
    ids=["channel", "pending", "filter"],
)
async def test_triggers_installed_for_another_configuration_are_stale(
    db: str, change: dict[str, Any]
) -> None:
    await install(config_mod.from_mapping(raw_config(db), {}))
    assert await problems(config_mod.from_mapping(raw_config(db), {})) == {}
    changed = config_mod.from_mapping(raw_config(db, **change), {})
    assert await problems(changed) == {
        "deliveries": "its trigger on public.webhook_delivery_queue is stale: it was installed "
        "for another configuration or relay version"
    }
    await install(changed)
    assert await problems(changed) == {}


async def test_a_missing_documenso_document_trigger_is_reported(db: str) -> None:
    documenso_execute(db, ENVELOPE)
    source = {"kind": "documenso_documents", "url": "http://127.0.0.1:9/hook"}
    config = config_mod.from_mapping(raw_config(db, sources={"documenso": source}), {})
    await install(config)
    assert await problems(config) == {}
    documenso_execute(db, 'DROP TRIGGER relay_documenso_delete ON "Envelope"')
    assert await problems(config) == {
        "documenso": "one of its 2 triggers on public.Envelope is missing"
    }
    documenso_execute(db, 'DROP TRIGGER relay_documenso_change ON "Envelope"')
    assert await problems(config) == {
        "documenso": "its trigger on public.Envelope is not installed"
    }


@pytest.fixture
def ascii_db(server: Server) -> Iterator[str]:
    name = f"relay_test_ascii_{os.getpid()}"
    create = sql.SQL(
        "CREATE DATABASE {} TEMPLATE template0 ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'"
    )
    execute(server.admin_url, create.format(sql.Identifier(name)).as_string())
    try:
        yield server.url(name)
    finally:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        execute(server.admin_url, drop.as_string())


@pytest.mark.parametrize("command", ["install", "check"])
async def test_a_database_not_in_utf8_is_refused_with_the_reason(
    ascii_db: str, tmp_config: Path, command: str
) -> None:
    write_config(tmp_config, raw_config(ascii_db))
    code, output = await run_cli(tmp_config, command)
    assert code == 2, output
    assert "Traceback" not in output
    assert "database.url: database 'relay_test_ascii_" in output
    assert "is encoded SQL_ASCII; relay needs a UTF8 database" in output


JOBS_TABLE = """
CREATE TABLE jobs (
    id integer PRIMARY KEY,
    status text NOT NULL DEFAULT 'pending',
    attempts integer NOT NULL DEFAULT 0,
    due timestamptz,
    error {error_type},
    code {code_type},
    finished {finished_type}
)
"""


def jobs_source(url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "kind": "table",
        "table": "jobs",
        "key": "id",
        "status": "status",
        "attempts": "attempts",
        "due": "due",
        "last_error": "error",
        "last_status": "code",
        "done_at": "finished",
        "max_attempts": 1,
        "url": url,
        **overrides,
    }


def jobs_table(
    db: str, error_type: str = "text", code_type: str = "int", finished_type: str = "timestamptz"
) -> None:
    execute(
        db,
        JOBS_TABLE.format(error_type=error_type, code_type=code_type, finished_type=finished_type),
    )


async def deliver_jobs(db: str, receiver: Receiver, n: int) -> None:
    """Rows 1..n of the jobs table, each delivered once and settled."""
    config = config_mod.from_mapping(
        raw_config(db, sources={"jobs": jobs_source(receiver.url)}), {}
    )
    await install(config)
    async with running(config) as relay:
        execute(db, f"INSERT INTO jobs (id) SELECT generate_series(1, {n})")
        await receiver.wait_count(n)
    assert relay.settler.lost == 0


@pytest.mark.parametrize("error_type", ["jsonb", "json"])
async def test_a_json_error_column_holds_the_error_status_and_attempt(
    db: str, receiver: Receiver, error_type: str
) -> None:
    async def fail_odd(request: web.Request, _: int) -> web.Response:
        failing = request.headers["webhook-id"] == "jobs_1"
        return web.Response(status=503 if failing else 200, text="down" if failing else "ok")

    receiver.behaviour = fail_odd
    jobs_table(db, error_type=error_type)
    await deliver_jobs(db, receiver, 2)
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT id, status, error::jsonb, code, finished IS NOT NULL FROM jobs ORDER BY id"
        ).fetchall()
    assert rows == [
        (1, "dead", {"error": "HTTP 503: down", "status": 503, "attempt": 1}, 503, False),
        (2, "done", None, 200, True),
    ]
    assert len(receiver.received) == 2  # settled, so not sent again


@pytest.mark.parametrize(
    ("types", "message"),
    [
        (
            {"error_type": "integer"},
            "sources.jobs.last_error: column 'error' of public.jobs is integer; relay writes "
            "the error there: use text, varchar or char (cut to fit), or json or jsonb",
        ),
        (
            {"code_type": "jsonb"},
            "sources.jobs.last_status: column 'code' of public.jobs is jsonb; relay writes the "
            "HTTP status there: use an integer, numeric or text column",
        ),
        (
            {"finished_type": "text"},
            "sources.jobs.done_at: column 'finished' of public.jobs is text; relay writes the "
            "delivery time there: use a timestamp",
        ),
    ],
)
async def test_a_column_that_cannot_hold_what_relay_writes_is_refused(
    db: str, types: dict[str, str], message: str
) -> None:
    jobs_table(db, **types)
    source = jobs_source("http://127.0.0.1:9/hook")
    with pytest.raises(ConfigError) as refused:
        await prepare(config_mod.from_mapping(raw_config(db, sources={"jobs": source}), {}))
    assert message in str(refused.value)


async def test_a_short_error_column_is_cut_to_fit(db: str, receiver: Receiver) -> None:
    async def fail(_: web.Request, __: int) -> web.Response:
        return web.Response(status=500, text="x" * 200)

    receiver.behaviour = fail
    jobs_table(db, error_type="varchar(20)", code_type="smallint", finished_type="timestamp")
    await deliver_jobs(db, receiver, 1)
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT status, error, code FROM jobs").fetchone() == (
            "dead",
            "HTTP 500: xxxxxxxxxx",
            500,
        )


async def test_a_status_value_the_column_would_change_is_refused(db: str) -> None:
    execute(
        db,
        "CREATE TABLE short (id int PRIMARY KEY, status varchar(8) NOT NULL DEFAULT 'pending', "
        "attempts int NOT NULL DEFAULT 0, due timestamptz)",
    )
    source = {
        "kind": "table",
        "table": "short",
        "key": "id",
        "status": "status",
        "attempts": "attempts",
        "due": "due",
        "processing": "processing",
        "url": "http://127.0.0.1:9/hook",
    }
    with pytest.raises(ConfigError) as refused:
        await prepare(config_mod.from_mapping(raw_config(db, sources={"short": source}), {}))
    assert (
        "sources.short.processing: 'processing' cannot be stored as it is in column 'status' of "
        "public.short (character varying(8)): it would be stored as 'processi'"
    ) in str(refused.value)


async def test_a_percent_sign_in_status_values_and_column_names_settles(
    db: str, receiver: Receiver
) -> None:
    async def fail_first(_: web.Request, count: int) -> web.Response:
        return web.Response(status=500 if count == 1 else 200, text="100% down")

    receiver.behaviour = fail_first
    execute(
        db,
        """
        CREATE TABLE "per%cent" (
            "id%s" integer PRIMARY KEY,
            "st%(at)s" text NOT NULL DEFAULT '50%_pending',
            "tries%" integer NOT NULL DEFAULT 0,
            "due%d" timestamptz,
            "err%%" text
        )
        """,
    )
    source = {
        "kind": "table",
        "table": "per%cent",
        "key": "id%s",
        "status": "st%(at)s",
        "pending": ["50%_pending", "retry%s"],
        "retry": "retry%s",
        "processing": "%processing",
        "done": "done 100%",
        "dead": "dead%",
        "attempts": "tries%",
        "due": "due%d",
        "last_error": "err%%",
        "url": receiver.url,
    }
    config = config_mod.from_mapping(raw_config(db, sources={"per_cent": source}), {})
    await install(config)
    async with running(config) as relay:
        execute(db, """INSERT INTO "per%cent" ("id%s") VALUES (1)""")
        await receiver.wait_count(2)  # the first attempt failed: retried, then delivered
    assert relay.settler.lost == 0
    with psycopg.connect(db) as conn:
        row = conn.execute("""SELECT "st%(at)s", "tries%", "err%%" FROM "per%cent" """)
        assert row.fetchone() == ("done 100%", 2, None)
    assert await problems(config) == {}


PRISMA_MIGRATIONS = """
CREATE TABLE "_prisma_migrations" (
    "id" varchar(36) PRIMARY KEY, "checksum" varchar(64) NOT NULL, "finished_at" timestamptz,
    "migration_name" varchar(255) NOT NULL, "logs" text, "rolled_back_at" timestamptz,
    "started_at" timestamptz NOT NULL DEFAULT now(),
    "applied_steps_count" integer NOT NULL DEFAULT 0
);
INSERT INTO "_prisma_migrations" (id, checksum, finished_at, migration_name, rolled_back_at)
VALUES ('1', 'x', now(), '20260302223702_optimize_recipient_indexes', NULL),
       ('2', 'x', now(), '20260311000000_add_organisation_template_type', NULL),
       -- rolled back, and one still running: neither is applied
       ('3', 'x', now(), '20260408052212_add_set_null_for_audit_log_foreign_key', now()),
       ('4', 'x', NULL, '20260504000000_add_allow_personal_organisations_to_auth_portal', NULL);
"""


async def test_check_and_status_name_the_documenso_release_found(db: str, tmp_config: Path) -> None:
    from tests.integration.documenso_schema import JOBS, WEBHOOKS

    documenso_execute(db, JOBS + WEBHOOKS)
    write_config(tmp_config, raw_config(db, sources={"jobs": {"kind": "documenso_jobs"}}))
    assert (await run_cli(tmp_config, "install"))[0] == 0
    code, output = await run_cli(tmp_config, "check")
    assert code == 0, output
    assert "sources.jobs: Documenso release unknown: no _prisma_migrations table" in output
    documenso_execute(db, PRISMA_MIGRATIONS)
    found = (
        "sources.jobs: Documenso v2.8.1 "
        "(newest migration 20260311000000_add_organisation_template_type)"
    )
    for command in ("check", "status"):
        code, output = await run_cli(tmp_config, command)
        assert (code, found in output.splitlines()) == (0, True), output
