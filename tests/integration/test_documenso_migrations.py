"""Documenso's schema built from Documenso's own Prisma migrations (tests/fixtures/documenso),
replayed as Prisma Migrate does, as Documenso's non-superuser role: the v1.12.10 "Document" era,
and the upgrade to v2.17.0's "Envelope" era carrying the rows across."""

from __future__ import annotations

import hashlib

import psycopg
import pytest

from relay.sources import documenso_release
from tests.conftest import Server
from tests.integration.documenso_migrations import (
    applied_migrations,
    documenso_database,
    insert_legacy_documents,
    migrate,
    migration_sql,
    release_migrations,
)

OLD, NEW = "v1.12.10", "v2.17.0"


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {name for (name,) in rows.fetchall()}


def test_releases_are_cumulative_and_v1_12_10_is_a_prefix_of_v2_17_0() -> None:
    old, new = release_migrations(OLD), release_migrations(NEW)
    assert (len(old), len(new)) == (137, 163)
    assert new[: len(old)] == old  # so the upgrade applies only newer migrations, in order
    assert old[-1] == "20250917042725_remove_recipient_unique_email_constraints"
    assert "20250918070645_add_envelopes" in new[len(old) :]
    with pytest.raises(ValueError, match=r"v9\.9\.9"):
        release_migrations("v9.9.9")


async def test_replay_to_v1_12_10_as_documenso_role(server: Server, db: str) -> None:
    url = await documenso_database(server.admin_url, db, OLD)

    names = set(tables(url))
    assert {"Document", "Recipient", "DocumentMeta", "_prisma_migrations"} <= names
    assert "Envelope" not in names
    assert await applied_migrations(url) == list(release_migrations(OLD))
    assert await migrate(url, OLD) == []  # nothing left to apply

    with psycopg.connect(url) as conn:
        # Recorded as Prisma records them: the file's sha256, finished, one step.
        rows = conn.execute(
            "SELECT migration_name, checksum, applied_steps_count, finished_at IS NOT NULL, "
            'length(id) FROM "_prisma_migrations"'
        ).fetchall()
        for name, checksum, steps, finished, id_length in rows:
            assert checksum == hashlib.sha256(migration_sql(name)).hexdigest()
            assert (steps, finished, id_length) == (1, True, 36)
        # Everything the migrations made is Documenso's role's (the demo queue table comes with
        # the tests' template database), and that role is no superuser.
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace "
            "AND relname NOT LIKE 'webhook_delivery_queue%'"
        ).fetchall()
        assert owners == [("documenso",)]
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() == (False,)
        newest = conn.execute('SELECT max(migration_name) FROM "_prisma_migrations"').fetchone()
    # relay's own release detection agrees with the fixtures.
    assert newest is not None
    assert OLD in documenso_release.describe(newest[0])


async def test_upgrade_to_v2_17_0_carries_documents_into_envelopes(server: Server, db: str) -> None:
    url = await documenso_database(server.admin_url, db, OLD)
    ids = await insert_legacy_documents(url, 3)

    applied = await migrate(url, NEW)

    assert applied == list(release_migrations(NEW)[len(release_migrations(OLD)) :])
    names = tables(url)
    assert {"Envelope", "EnvelopeItem", "Recipient", "DocumentMeta"} <= names
    assert "Document" not in names and "Template" not in names
    with psycopg.connect(url) as conn:
        envelopes = conn.execute(
            'SELECT e."secondaryId", e."title", e."status"::text, e."type"::text, m."subject", '
            '(SELECT array_agg(r."email" ORDER BY r."email") FROM "Recipient" r '
            ' WHERE r."envelopeId" = e."id"), '
            '(SELECT array_agg(i."documentDataId") FROM "EnvelopeItem" i '
            ' WHERE i."envelopeId" = e."id") '
            'FROM "Envelope" e JOIN "DocumentMeta" m ON m."id" = e."documentMetaId" '
            'ORDER BY e."secondaryId"'
        ).fetchall()
    assert envelopes == [
        (
            f"document_{document_id}",
            f"Contract {n}",
            "PENDING",
            "DOCUMENT",
            f"Please sign contract {n}",
            [f"alice{n}@example.com", f"bob{n}@example.com"],
            [f"data_{n}"],
        )
        for n, document_id in enumerate(ids, start=1)
    ]
