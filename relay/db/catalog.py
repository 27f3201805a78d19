"""What relay asks the database about itself: encoding, roles, schemas, a table's columns,
privileges, status values against types and CHECK constraints, installed triggers, and whether
a user's SQL expression fits a column. Every problem is a ConfigError naming the key."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from relay import logs
from relay.db import sqltext
from relay.readers import ConfigError

CATALOG = sqltext.load_queries(sqltext.sql_dir() / "queries" / "catalog.sql")

TIMESTAMP_TYPES = re.compile(r"^timestamp(\(\d\))? with(out)? time zone$")
INTEGER_TYPES = {"integer", "bigint", "smallint"}
# Text that an explicit CAST fits into (it truncates varchar(n) and char(n) instead of failing).
TEXT_TYPES = re.compile(r"^(text|character varying(\(\d+\))?|character(\(\d+\))?)$")
JSON_TYPES = {"json", "jsonb"}
NUMBER_TYPES = re.compile(r"^(integer|bigint|smallint|numeric(\(\d+(,\d+)?\))?)$")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str  # format_type(), already quoted as SQL
    typtype: str  # 'e' for enums
    type_oid: int

    @property
    def sql_type(self) -> sql.SQL:
        return sqltext.Catalog(self.type)


def check_encoding(conn: psycopg.AsyncConnection[Any]) -> None:
    """relay reads and writes UTF-8 text; in a SQL_ASCII database psycopg hands out bytes."""
    encoding = conn.info.parameter_status("server_encoding")
    if encoding != "UTF8":
        raise ConfigError(
            f"database.url: database {conn.info.dbname!r} is encoded {encoding}; relay needs a "
            f"UTF8 database (create one with ENCODING 'UTF8' and move the data there)"
        )


async def role(conn: psycopg.AsyncConnection[Any]) -> str:
    cur = await conn.execute(CATALOG["current_role"])
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def check_schema(conn: psycopg.AsyncConnection[Any], where: str, schema: str) -> None:
    cur = await conn.execute(CATALOG["schema_usage"], {"schema": schema})
    row = await cur.fetchone()
    if row is None:
        raise ConfigError(f"{where}: schema {schema!r} does not exist in the database")
    if not row[0]:
        who = await role(conn)
        on = sql.SQL("SCHEMA {}").format(sql.Identifier(schema))
        raise ConfigError(
            f"{where}: role {who!r} has no USAGE on schema {schema!r}, so it cannot see the "
            f"tables there; as the schema's owner run: {grant(conn, 'USAGE', None, on, who)}"
        )


def grant(
    conn: psycopg.AsyncConnection[Any],
    privilege: str,
    columns: Sequence[str] | None,
    on: sql.Composable,
    role: str,
) -> str:
    cols: sql.Composable = sql.SQL("")
    if columns:
        cols = sql.SQL(" ({})").format(sql.SQL(", ").join(map(sql.Identifier, columns)))
    return (
        sql.SQL("GRANT {privilege}{cols} ON {on} TO {role};")
        .format(privilege=sql.SQL(privilege), cols=cols, on=on, role=sql.Identifier(role))
        .as_string(conn)
    )


@dataclass(frozen=True, slots=True)
class Table:
    """A table a source reads or writes, and where its keys are (`sources.NAME`)."""

    where: str
    schema: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


async def columns(conn: psycopg.AsyncConnection[Any], table: Table) -> dict[str, Column]:
    """The table's columns; empty if it does not exist."""
    await check_schema(conn, table.where, table.schema)
    cur = await conn.execute(CATALOG["columns"], {"schema": table.schema, "table": table.name})
    return {r[0]: Column(r[0], r[1], r[2], r[3]) for r in await cur.fetchall()}


def check_mapped(table: Table, cols: dict[str, Column], mapped: dict[str, str | None]) -> None:
    """Each mapped key names a column the table has."""
    for key, column in mapped.items():
        if column is not None and column not in cols:
            raise ConfigError(
                f"{table.where}.{key}: column {column!r} does not exist in table "
                f"{table.qualified}; its columns are: {', '.join(sorted(cols))}"
            )


async def check_status_values(
    conn: psycopg.AsyncConnection[Any],
    table: Table,
    status: Column,
    values: Sequence[tuple[str, str]],
) -> None:
    """Each status value relay writes or looks for must be a value of the column's enum, come
    back unchanged from its type, and pass its CHECK constraints; `values` are (key, value)."""
    if status.typtype == "e":
        cur = await conn.execute(CATALOG["enum_labels"], {"type_oid": status.type_oid})
        labels = {r[0] for r in await cur.fetchall()}
        for key, value in values:
            if value not in labels:
                raise ConfigError(
                    f"{table.where}.{key}: {value!r} is not a value of enum "
                    f"{status.type}; its values are: {', '.join(sorted(labels))}"
                )
    else:
        await check_status_type(conn, table, status, values)
    await check_status_constraints(conn, table, status, values)


async def check_status_type(
    conn: psycopg.AsyncConnection[Any],
    table: Table,
    status: Column,
    values: Sequence[tuple[str, str]],
) -> None:
    """Each status value must come back unchanged from the column's type: a varchar(5) would
    cut 'processing' short, and a settle would then never find its row."""
    for key, value in values:
        query = sql.SQL("SELECT CAST({} AS {})::text").format(sql.Literal(value), status.sql_type)
        try:
            async with conn.transaction():
                cur = await conn.execute(query)
                row = await cur.fetchone()
        except psycopg.errors.DataError as exc:
            row = None
            reason = logs.first_line(exc)
        else:
            reason = f"it would be stored as {row[0]!r}" if row else ""
        if row is None or row[0] != value:
            raise ConfigError(
                f"{table.where}.{key}: {value!r} cannot be stored as it is in column "
                f"{status.name!r} of {table.qualified} ({status.type}): {reason}"
            )


async def check_status_constraints(
    conn: psycopg.AsyncConnection[Any],
    table: Table,
    status: Column,
    values: Sequence[tuple[str, str]],
) -> None:
    """Each configured status value must pass the table's CHECK constraints on that column.

    The constraints are copied onto a one-column temporary table and each value inserted there,
    in a transaction that is always rolled back: PostgreSQL itself judges the values.
    """
    cur = await conn.execute(
        CATALOG["status_checks"],
        {"schema": table.schema, "table": table.name, "column": status.name},
    )
    checks = await cur.fetchall()
    if not checks:
        return
    probe = sql.Identifier("relay_status_probe")
    async with conn.transaction(force_rollback=True):
        try:
            async with conn.transaction():
                await conn.execute(
                    sql.SQL("CREATE TEMP TABLE {} ({} {}) ON COMMIT DROP").format(
                        probe, sql.Identifier(status.name), sql.SQL(status.type)
                    )
                )
        except psycopg.errors.InsufficientPrivilege:
            on = sql.SQL("DATABASE {}").format(sql.Identifier(conn.info.dbname))
            grant_sql = grant(conn, "TEMPORARY", None, on, await role(conn))
            raise ConfigError(
                f"{table.where}.status: relay checks its status values against the "
                f"CHECK constraints of {table.qualified} in a temporary table, and its "
                f"role may not create one; run: {grant_sql}"
            ) from None
        for name, definition in checks:
            # The definition comes from pg_get_constraintdef(), i.e. from the catalog itself.
            await conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    probe, sql.Identifier(name), sql.SQL(definition)
                )
            )
        for key, value in values:
            try:
                async with conn.transaction():
                    await conn.execute(
                        sql.SQL("INSERT INTO {} VALUES ({})").format(probe, sql.Literal(value))
                    )
            except psycopg.errors.CheckViolation as exc:
                name = exc.diag.constraint_name or "?"
                definition = dict(checks).get(name, "")
                raise ConfigError(
                    f"{table.where}.{key}: {value!r} is not allowed in column "
                    f"{status.name!r} of {table.qualified} by its constraint {name} "
                    f"({definition}); use one of the values it allows"
                ) from None


@dataclass(frozen=True, slots=True)
class Need:
    """What one of a source's statements needs on one table."""

    schema: str
    table: str
    select: Sequence[str] = ()
    update: Sequence[str] = ()
    table_privileges: Sequence[str] = ()  # INSERT, DELETE


async def check_privileges(
    conn: psycopg.AsyncConnection[Any],
    where: str,
    needs: Sequence[Need],
    what: str = "relay's claims and settles need",
) -> None:
    """The role relay runs as must be allowed every statement it will run for a source (or for
    `what` else needs them)."""
    who = await role(conn)
    for schema in dict.fromkeys(need.schema for need in needs):
        await check_schema(conn, where, schema)
    missing: list[str] = []
    for need in needs:
        cur = await conn.execute(
            CATALOG["privileges"], {"schema": need.schema, "table": need.table}
        )
        rows = await cur.fetchall()
        if not rows:
            continue  # a missing table is reported where it is described
        can_select = {r[0] for r in rows if r[1]}
        can_update = {r[0] for r in rows if r[2]}
        can = {"INSERT": rows[0][3], "DELETE": rows[0][4]}
        on = sql.Identifier(need.schema, need.table)
        if [c for c in need.select if c not in can_select]:
            missing.append(grant(conn, "SELECT", None, on, who))
        if lacking := [c for c in need.update if c not in can_update]:
            missing.append(grant(conn, "UPDATE", lacking, on, who))
        missing.extend(grant(conn, p, None, on, who) for p in need.table_privileges if not can[p])
    if missing:
        raise ConfigError(
            f"{where}: role {who!r} lacks privileges that {what}; as the tables' owner "
            f"run: {' '.join(missing)}"
        )


# What relay.endpoint_states runs on relay.endpoints (Store.disabled_targets and
# Store.record_endpoint: the disabled, disable, pause, resume and resume_all queries of
# sql/queries/endpoints.sql): the columns it reads or matches on (a pause's ON CONFLICT DO
# UPDATE needs SELECT on those it sets, too), those it sets, and the rows it adds and removes.
ENDPOINTS = Need(
    "relay",
    "endpoints",
    select=("state", "target", "source", "worker", "reason", "since", "until"),
    update=("reason", "until"),
    table_privileges=("INSERT", "DELETE"),
)
ENDPOINTS_MISSING = (
    "endpoints: relay's table relay.endpoints does not exist; run `relay install` (the table "
    "is new in this version; without it targets disabled by their answer and endpoint pauses "
    "are kept only in memory until the relay stops, and `relay enable` fails)"
)


async def endpoints_problem(conn: psycopg.AsyncConnection[Any]) -> str | None:
    """Why relay cannot keep its disabled targets and endpoint pauses in relay.endpoints, or
    None. A running relay only warns then (relay.endpoint_states); `relay check` fails."""
    cur = await conn.execute(CATALOG["schema_usage"], {"schema": "relay"})
    usage = await cur.fetchone()
    try:
        if usage is not None and not usage[0]:
            await check_schema(conn, "endpoints", "relay")  # names the GRANT USAGE
        if usage is None or not await table_exists(conn, "relay", "endpoints"):
            return ENDPOINTS_MISSING
        await check_privileges(
            conn,
            "endpoints",
            [ENDPOINTS],
            "relay needs to keep disabled targets and endpoint pauses in relay.endpoints",
        )
    except ConfigError as exc:
        return str(exc)
    return None


async def check_statement(
    conn: psycopg.AsyncConnection[Any],
    key: str,
    statement: sqltext.Query,
    what: str,
    params: dict[str, Any] | None = None,
) -> None:
    """PostgreSQL parses and plans `statement` (EXPLAIN, nothing runs): a user's SQL that does
    not fit (an unknown column, a type that cannot be cast) stops start-up naming `key`."""
    try:
        async with conn.transaction(force_rollback=True):
            await conn.execute(sql.SQL("EXPLAIN ") + statement, params)
    except psycopg.Error as exc:
        if isinstance(exc, psycopg.OperationalError):
            raise
        raise ConfigError(f"{key}: {what}: {logs.first_line(exc)}") from None


async def table_exists(conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> bool:
    cur = await conn.execute(CATALOG["table_exists"], {"schema": schema, "table": table})
    row = await cur.fetchone()
    return bool(row and row[0])


async def trigger_problem(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    table: str,
    function: str,
    triggers: tuple[str, ...],
    expected: str,
) -> str | None:
    """Why these triggers (all calling `function`) are not what `relay install` would install
    now, or None."""
    cur = await conn.execute(
        CATALOG["installed_trigger"],
        {"schema": schema, "table": table, "function": function, "triggers": list(triggers)},
    )
    row = await cur.fetchone()
    assert row is not None
    count, installed = row
    if not count:
        return f"its trigger on {schema}.{table} is not installed"
    if count < len(triggers):
        return f"one of its {len(triggers)} triggers on {schema}.{table} is missing"
    if installed != expected:
        return f"its trigger on {schema}.{table} {STALE}"
    return None


# Installed, but not as this relay would install it: by another configuration or another relay
# version (during a rolling upgrade, the other relays' own), so not replaced behind their back.
STALE = "is stale: it was installed for another configuration or relay version"
