"""Which Documenso release a database holds, as precisely as the database tells: Prisma's
`_prisma_migrations` names every migration applied, and the newest one names the releases that
ship it (relay.sources.documenso_versions). Shown by `relay check` and `relay status`."""

from __future__ import annotations

import bisect
from typing import Any

import psycopg
from psycopg import sql

from relay.db import catalog
from relay.sources.documenso_versions import RELEASES

_MIGRATIONS = [migration for migration, _, _ in RELEASES]


def describe(newest: str | None) -> str:
    """The releases whose newest migration is `newest` (None: none applied)."""
    if newest is None:
        return "Documenso: no migration applied (_prisma_migrations is empty)"
    i = bisect.bisect_right(_MIGRATIONS, newest) - 1
    if i < 0:
        return f"Documenso older than {RELEASES[0][1]} (newest migration {newest})"
    migration, first, last = RELEASES[i]
    releases = first if first == last else f"{first} to {last}"
    if migration == newest:
        return f"Documenso {releases} (newest migration {newest})"
    if i == len(RELEASES) - 1:
        return (
            f"Documenso newer than {last} (newest migration {newest}, which this relay does "
            f"not know: check its release notes for Documenso)"
        )
    return (
        f"Documenso {releases} with migrations of its own (newest migration {newest} is no "
        f"release's)"
    )


# The newest migration of the last releases whose webhook jobs ran their call in io.runTask,
# which gives up after 3 runs whatever "maxRetries" says (v1.10.0 to v2.0.x; v2.1.0 ships the
# same newest migration as v2.0.11).
LAST_RUN_TASK = "20251112224336_add_database_indexes"


async def newest_migration(conn: psycopg.AsyncConnection[Any], schema: str) -> str | None:
    """The newest migration applied; None if none is, or there is no _prisma_migrations."""
    if not await catalog.table_exists(conn, schema, "_prisma_migrations"):
        return None
    cur = await conn.execute(
        sql.SQL(
            "SELECT max(migration_name) FROM {} "
            "WHERE finished_at IS NOT NULL AND rolled_back_at IS NULL"
        ).format(sql.Identifier(schema, "_prisma_migrations"))
    )
    row = await cur.fetchone()
    return None if row is None else row[0]


async def release(conn: psycopg.AsyncConnection[Any], schema: str) -> str:
    if not await catalog.table_exists(conn, schema, "_prisma_migrations"):
        return f"Documenso release unknown: no _prisma_migrations table in schema {schema!r}"
    return describe(await newest_migration(conn, schema))
