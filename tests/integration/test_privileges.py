"""Three roles, as a deployment has them: the role that installs (here the test's superuser),
the role relay runs as, and the application's role. The application writes with only the
privileges it has on its own tables (plus EXECUTE on relay.publish), for every kind of source;
relay runs with exactly the grants the README lists; neither can do more than that."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from relay import config as config_mod
from relay.config import ConfigError
from relay.db.store import Store
from tests.integration.documenso_schema import ENVELOPE, JOBS, WEBHOOKS
from tests.support import (
    Receiver,
    install,
    queue_source,
    raw_config,
    run_cli,
    running,
    write_config,
)

_roles = itertools.count()

# What the README's "Roles and grants" section tells the DBA to run for the role relay runs as.
RUNNER_GRANTS = """
GRANT USAGE ON SCHEMA relay TO {role};
GRANT SELECT, UPDATE ON relay.outbox, relay.documenso_events TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON relay.leases TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON relay.endpoints TO {role};
GRANT SELECT, UPDATE ON public.webhook_delivery_queue TO {role};
GRANT SELECT, UPDATE ON public."BackgroundJob" TO {role};
GRANT SELECT ON public."Webhook" TO {role};
GRANT INSERT ON public."WebhookCall" TO {role};
"""

# The application's own privileges on its own tables, and the one on relay.
APP_GRANTS = """
GRANT SELECT, INSERT, UPDATE ON public.webhook_delivery_queue TO {role};
GRANT USAGE ON SEQUENCE public.webhook_delivery_queue_id_seq TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON public."Envelope", public."Recipient",
    public."DocumentMeta", public."BackgroundJob", public."Webhook", public."WebhookCall"
    TO {role};
GRANT USAGE ON SCHEMA relay TO {role};
GRANT EXECUTE ON FUNCTION relay.publish(text, jsonb, timestamptz) TO {role};
"""


def execute(url: str, statements: str | sql.Composable, params: Any = None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements, params)


def as_role(url: str, role: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["user"] = role
    info.pop("password", None)
    return psycopg.conninfo.make_conninfo(**info)


def grant(url: str, template: str, role: str) -> None:
    execute(url, sql.SQL(template).format(role=sql.Identifier(role)))


@pytest.fixture
def roles(db: str) -> Iterator[tuple[str, str]]:
    """Two login roles with no privileges yet: (relay's, the application's)."""
    names = [f"relay_test_{kind}_{os.getpid()}_{next(_roles)}" for kind in ("runner", "app")]
    for name in names:
        execute(db, sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    try:
        yield names[0], names[1]
    finally:
        for name in names:
            execute(db, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            execute(db, sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture
def app_db(db: str, receiver: Receiver) -> str:
    """Documenso's tables next to the demo queue, with one Documenso webhook to the receiver."""
    execute(db, ENVELOPE + JOBS + WEBHOOKS)
    execute(
        db,
        """
        INSERT INTO "DocumentMeta" ("id") VALUES ('meta_1');
        INSERT INTO "Envelope" ("id", "secondaryId", "type", "updatedAt", "title", "source",
                                "internalVersion", "userId", "teamId", "documentMetaId")
        VALUES ('envelope_1', 'document_1', 'DOCUMENT', now(), 'Contract', 'DOCUMENT', 2, 1, 1,
                'meta_1');
        """,
    )
    execute(
        db,
        """INSERT INTO "Webhook" ("id", "webhookUrl", "secret", "userId", "teamId")
           VALUES ('wh_1', %(url)s, 'hook-secret', 1, 1)""",
        {"url": receiver.url},
    )
    return db


def every_kind(url: str, receiver: Receiver) -> config_mod.Config:
    sources = {
        "deliveries": queue_source(),
        "events": {"kind": "outbox", "url": receiver.url},
        "documenso": {"kind": "documenso_documents", "url": receiver.url},
        "jobs": {"kind": "documenso_jobs"},
    }
    return config_mod.from_mapping(raw_config(url, sources=sources), {})


async def test_the_application_role_writes_every_kind_of_source_and_relay_delivers_it(
    app_db: str, receiver: Receiver, roles: tuple[str, str]
) -> None:
    runner, app = roles
    await install(every_kind(app_db, receiver))  # as the installer
    grant(app_db, RUNNER_GRANTS, runner)
    grant(app_db, APP_GRANTS, app)
    app_url = as_role(app_db, app)
    async with running(every_kind(as_role(app_db, runner), receiver)):
        execute(
            app_url,
            "INSERT INTO webhook_delivery_queue (url, status, next_retry_at) "
            "VALUES (%(url)s, 'pending', NULL), (%(url)s, 'failed', now() + interval '1 hour')",
            {"url": receiver.url},
        )
        await receiver.wait_ids({"deliveries_1"})
        execute(app_url, "UPDATE webhook_delivery_queue SET next_retry_at = now() WHERE id = 2")
        await receiver.wait_ids({"deliveries_2"})
        execute(app_url, "SELECT relay.publish('order.created', '{\"id\": 7}')")
        await receiver.wait_ids({"events_1"})
        execute(app_url, """UPDATE "Envelope" SET "status" = 'PENDING', "updatedAt" = now()""")
        await receiver.wait_ids({"documenso_1"})
        execute(
            app_url,
            """
            INSERT INTO "BackgroundJob" ("id", "jobId", "name", "version", "updatedAt", "payload")
            VALUES ('job_1', 'internal.execute-webhook', 'Execute Webhook', '1.0.0',
                    now() AT TIME ZONE 'UTC',
                    '{"event": "DOCUMENT_SENT", "webhookId": "wh_1", "data": {}}')
            """,
        )
        await receiver.wait_ids({"jobs_job_1"})
    by_id = {r.id: r for r in receiver.received}
    assert by_id["events_1"].json == {"id": 7}
    assert by_id["documenso_1"].json["event"] == "DOCUMENT_SENT"
    with psycopg.connect(app_db) as conn:
        states = conn.execute(
            "SELECT (SELECT array_agg(status ORDER BY id) FROM webhook_delivery_queue),"
            " (SELECT status FROM relay.outbox), (SELECT status FROM relay.documenso_events),"
            """ (SELECT status::text FROM "BackgroundJob"), (SELECT count(*) FROM "WebhookCall")"""
        ).fetchone()
    assert states == (["delivered", "delivered"], "delivered", "delivered", "COMPLETED", 1)


async def test_the_application_role_cannot_read_or_shape_relays_rows(
    db: str, roles: tuple[str, str]
) -> None:
    _, app = roles
    grant(db, "GRANT USAGE ON SCHEMA relay TO {role}", app)
    grant(db, "GRANT EXECUTE ON FUNCTION relay.publish(text, jsonb, timestamptz) TO {role}", app)
    app_url = as_role(db, app)
    execute(db, "SELECT relay.publish('someone.elses', '{\"secret\": 1}')")
    with psycopg.connect(app_url, autocommit=True) as conn:
        (mine,) = conn.execute("SELECT relay.publish('order.created', '{}', NULL)").fetchone() or ()
        for forbidden in (
            "SELECT * FROM relay.outbox",
            "UPDATE relay.outbox SET status = 'delivered'",
            "INSERT INTO relay.outbox (topic, status, max_attempts) VALUES ('x', 'dead', 1000)",
            "DELETE FROM relay.outbox",
            "SELECT * FROM relay.leases",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="topic"):
            conn.execute("SELECT relay.publish('', '{}')")
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT topic, status, attempts, max_attempts, due_at <= now() FROM relay.outbox "
            "ORDER BY id"
        ).fetchall()
    assert mine == 2
    assert rows == [
        ("someone.elses", "pending", 0, None, True),
        ("order.created", "pending", 0, None, True),  # a NULL deliver_at means now
    ]


async def test_by_default_nobody_but_the_installer_may_publish(
    db: str, roles: tuple[str, str]
) -> None:
    _, app = roles
    grant(db, "GRANT USAGE ON SCHEMA relay TO {role}", app)
    await install(config_mod.from_mapping(raw_config(db), {}))
    with (
        psycopg.connect(as_role(db, app), autocommit=True) as conn,
        pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="permission denied for function publish"
        ),
    ):
        conn.execute("SELECT relay.publish('order.created')")


async def test_documenso_writes_succeed_even_when_relays_table_is_gone(
    app_db: str, receiver: Receiver, roles: tuple[str, str]
) -> None:
    _, app = roles
    await install(every_kind(app_db, receiver))
    grant(app_db, APP_GRANTS, app)
    execute(app_db, "DROP TABLE relay.documenso_events")
    notices: list[str] = []
    with psycopg.connect(as_role(app_db, app), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("""UPDATE "Envelope" SET "status" = 'PENDING', "updatedAt" = now()""")
        conn.execute("""UPDATE "Envelope" SET "status" = 'COMPLETED', "updatedAt" = now()""")
        (status,) = conn.execute('SELECT "status"::text FROM "Envelope"').fetchone() or ()
    assert status == "COMPLETED"
    assert len(notices) == 2 and all("not recorded" in n for n in notices), notices
    assert "relay.documenso_events" in notices[0]


async def test_relay_functions_run_as_their_owner_with_a_pinned_search_path(
    app_db: str, receiver: Receiver
) -> None:
    await install(every_kind(app_db, receiver))
    with psycopg.connect(app_db) as conn:
        functions = conn.execute(
            "SELECT p.oid::regprocedure::text, p.prosecdef, p.proconfig, "
            "       has_function_privilege('public', p.oid, 'EXECUTE') "
            "FROM pg_proc AS p WHERE p.pronamespace = 'relay'::regnamespace ORDER BY 1"
        ).fetchall()
    assert len(functions) >= 8, functions
    for name, definer, config, public in functions:
        assert definer, name
        assert config == ["search_path=pg_catalog, pg_temp"], name
        assert not public, name


async def test_check_names_each_missing_privilege_and_the_grant_that_gives_it(
    db: str, roles: tuple[str, str]
) -> None:
    runner, _ = roles
    sources = {
        "deliveries": queue_source(),
        "events": {"kind": "outbox", "url": "http://127.0.0.1:9/hook"},
    }
    await install(config_mod.from_mapping(raw_config(db, sources=sources), {}))
    runner_config = config_mod.from_mapping(raw_config(as_role(db, runner), sources=sources), {})
    grant(
        db,
        "GRANT SELECT (status), UPDATE (status) ON public.webhook_delivery_queue TO {role}",
        runner,
    )
    messages: list[str] = []
    for _ in range(5):
        store = Store(runner_config.database_url, runner_config.sources)
        await store.open()
        try:
            await store.prepare()
            break
        except ConfigError as exc:
            messages.append(str(exc))
            # Doing what the message says is all it takes.
            execute(db, str(exc).split(" run: ")[1])
        finally:
            await store.close()
    else:
        pytest.fail(f"still refused after running every GRANT it named: {messages}")
    quoted = f'"{runner}"'
    # A table source's claims live in relay.leases: its schema comes first, then every grant
    # the claims and settles need, on the user's table and on relay's.
    assert messages == [
        f"sources.deliveries: role {runner!r} has no USAGE on schema 'relay', so it cannot see "
        f'the tables there; as the schema\'s owner run: GRANT USAGE ON SCHEMA "relay" TO '
        f"{quoted};",
        f"sources.deliveries: role {runner!r} lacks privileges that relay's claims and settles "
        f"need; as the tables' owner run: "
        f'GRANT SELECT ON "public"."webhook_delivery_queue" TO {quoted}; '
        f'GRANT UPDATE ("attempt_count", "last_error", "last_response_status", "delivered_at", '
        f'"next_retry_at") ON "public"."webhook_delivery_queue" TO {quoted}; '
        f'GRANT SELECT ON "relay"."leases" TO {quoted}; '
        f'GRANT UPDATE ("due", "token", "attempts", "status") ON "relay"."leases" TO {quoted}; '
        f'GRANT INSERT ON "relay"."leases" TO {quoted}; '
        f'GRANT DELETE ON "relay"."leases" TO {quoted};',
        f"sources.events: role {runner!r} lacks privileges that relay's claims and settles "
        f'need; as the tables\' owner run: GRANT SELECT ON "relay"."outbox" TO {quoted}; '
        f'GRANT UPDATE ("status", "attempts", "due_at", "last_error", "last_status", '
        f'"delivered_at") ON "relay"."outbox" TO {quoted};',
    ]


async def test_check_names_the_temporary_privilege_its_status_probe_needs(
    db: str, roles: tuple[str, str]
) -> None:
    # On a database where TEMP is revoked from PUBLIC, check and start-up failed with a bare
    # "permission denied to create temporary tables" (exit 1, no key, no fix).
    runner, _ = roles
    config = config_mod.from_mapping(raw_config(db), {})
    await install(config)
    dbname = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
    execute(
        db, sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(dbname))
    )
    grant(db, "GRANT SELECT, UPDATE ON public.webhook_delivery_queue TO {role}", runner)
    grant(db, "GRANT USAGE ON SCHEMA relay TO {role}", runner)
    grant(db, "GRANT SELECT, INSERT, UPDATE, DELETE ON relay.leases TO {role}", runner)
    runner_config = config_mod.from_mapping(raw_config(as_role(db, runner)), {})
    store = Store(runner_config.database_url, runner_config.sources)
    await store.open()
    try:
        with pytest.raises(ConfigError) as info:
            await store.prepare()
        message = str(info.value)
        assert message.startswith("sources.deliveries.status: relay checks its status values")
        execute(db, message.split(" run: ")[1])
        await store.prepare()  # doing what it says is enough
    finally:
        await store.close()


async def test_check_names_the_grants_relay_endpoints_needs(
    db: str, roles: tuple[str, str], tmp_config: Path
) -> None:
    # Without them a running relay only warns (endpoint.not_recorded): a target one relay
    # disabled is not skipped by the others, and `relay enable` and `relay status` fail.
    runner, _ = roles
    await install(config_mod.from_mapping(raw_config(db), {}))
    grant(db, "GRANT USAGE ON SCHEMA relay TO {role}", runner)
    grant(db, "GRANT SELECT, UPDATE ON public.webhook_delivery_queue TO {role}", runner)
    grant(db, "GRANT SELECT, INSERT, UPDATE, DELETE ON relay.leases TO {role}", runner)
    runner_url = as_role(db, runner)
    write_config(tmp_config, raw_config(runner_url))
    code, output = await run_cli(tmp_config, "check")
    assert code == 1, output
    quoted = f'"{runner}"'
    [line] = [line for line in output.splitlines() if line.startswith("endpoints:")]
    assert line == (
        f"endpoints: role {runner!r} lacks privileges that relay needs to keep disabled "
        f"targets and endpoint pauses in relay.endpoints; as the tables' owner run: "
        f'GRANT SELECT ON "relay"."endpoints" TO {quoted}; '
        f'GRANT UPDATE ("reason", "until") ON "relay"."endpoints" TO {quoted}; '
        f'GRANT INSERT ON "relay"."endpoints" TO {quoted}; '
        f'GRANT DELETE ON "relay"."endpoints" TO {quoted};'
    )
    assert "configuration OK" not in output
    # A pause's ON CONFLICT DO UPDATE needs SELECT on the columns it sets (until) too.
    grant(
        db,
        "GRANT SELECT (state, target, source, worker, reason, since), UPDATE (reason, until), "
        "INSERT, DELETE ON relay.endpoints TO {role}",
        runner,
    )
    code, output = await run_cli(tmp_config, "check")
    assert code == 1, output
    [line] = [line for line in output.splitlines() if line.startswith("endpoints:")]
    assert line.endswith(f' run: GRANT SELECT ON "relay"."endpoints" TO {quoted};'), line
    # Doing what it says is all it takes: every statement relay.endpoint_states runs succeeds.
    execute(db, line.split(" run: ")[1])
    store = Store(runner_url, [])
    await store.open()
    try:
        await store.record_endpoint(
            "disabled", {"source": "deliveries", "target": "http://a.example/", "reason": "410"}
        )
        for _ in range(2):  # the second pause updates the first
            await store.record_endpoint(
                "paused", {"endpoint": "a.example:80", "reason": "down", "resumes_in_s": 5.0}
            )
        await store.record_endpoint("resumed", {"endpoint": "a.example:80"})
        await store.record_endpoint("stopped", {})
        assert [row[:3] for row in await store.disabled_targets(10)] == [
            ("deliveries", "http://a.example/", "410")
        ]
    finally:
        await store.close()
    code, output = await run_cli(tmp_config, "check")
    assert (code, output.splitlines()[-1]) == (0, "configuration OK for sources: deliveries")
