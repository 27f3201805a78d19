"""The only module that runs SQL: check, install, claim, settle, sweep and report.

Queries live in `sql/queries/*.sql` as named queries. For each source they are compiled once
(identifiers and literals quoted by psycopg.sql) against the column types found in the database,
so the hot path only binds parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psycopg
import psycopg_pool
from psycopg import sql
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from relay import connections, logs
from relay.config import EXECUTE_WEBHOOK, Config, ConfigError, RetryPolicy, Source, SourceKind

log = logging.getLogger("relay.store")
T = TypeVar("T")

# -- SQL files ---------------------------------------------------------------------------------


def sql_dir() -> Path:
    """`relay/sql` in an installed wheel; the repository's `sql/` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):
        if (candidate / "triggers").is_dir():
            return candidate
    raise FileNotFoundError(f"relay's SQL files are missing: looked in {here / 'sql'}")


_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(path: Path) -> dict[str, str]:
    """Split a file of `-- name: x` sections into {name: sql}."""
    text = path.read_text()
    parts = _NAME_LINE.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        queries[name] = body.strip().rstrip(";")
    return queries


_SOURCE_QUERIES = load_queries(sql_dir() / "queries" / "source.sql")
_SOURCE_LEASED_QUERIES = load_queries(sql_dir() / "queries" / "source_leased.sql")
_CATALOG = load_queries(sql_dir() / "queries" / "catalog.sql")
_SCHEMA_SQL = (sql_dir() / "triggers" / "relay_schema.sql").read_text()
_NOTIFY_SQL = (sql_dir() / "triggers" / "notify.sql").read_text()
_UNINSTALL_SQL = (sql_dir() / "triggers" / "uninstall.sql").read_text()
_DOCUMENSO_DOCUMENTS = load_queries(sql_dir() / "triggers" / "documenso_documents.sql")
_DOCUMENSO_JOBS = load_queries(sql_dir() / "queries" / "documenso_jobs.sql")


# -- what the store hands out and takes back ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """A row this worker holds until `lease`; `lease` is also the token its settle must match."""

    key: Any
    lease: datetime
    attempt: int
    max_attempts: int
    url: str | None
    secret: str | None
    topic: str | None
    payload: str | None  # JSON text
    # Set when a value was too large to load (see MAX_FIELD_BYTES and relay.max_payload_bytes):
    # which and how large, e.g. "payload 20971520". The claim returns NULL in its place.
    oversize: str | None = None


class Outcome(StrEnum):
    done = "done"
    retry = "retry"
    dead = "dead"
    release = "release"  # not attempted (shutdown): back to claimable, attempt not counted


@dataclass(frozen=True, slots=True)
class Settlement:
    key: Any
    lease: datetime
    outcome: Outcome
    delay: float = 0.0
    error: str | None = None
    http_status: int | None = None
    call: WebhookCall | None = None  # Documenso's per-attempt record, written with the settle


def _json_default(value: Any) -> Any:
    """Keys orjson does not write itself, in PostgreSQL's text input form."""
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()  # bytea hex format
    return str(value)  # Decimal (numeric), and whatever else prints as its own input


def settle_batch_json(settlements: Iterable[Settlement]) -> str:
    """A settle batch as the JSON that the settle queries read with json_to_recordset.

    Leases are the claim's token and must round-trip exactly: orjson writes datetimes as
    RFC 3339 with microseconds and, for aware ones, their offset, so PostgreSQL reads back the
    same instant (timestamptz) or the same wall time (timestamp)."""
    return orjson.dumps(
        [
            {
                "key": s.key,
                "lease": s.lease,
                "outcome": s.outcome,
                "delay": s.delay,
                # PostgreSQL text cannot hold NUL; an error quoting a response might.
                "error": s.error.replace("\x00", "") if s.error else s.error,
                "http_status": s.http_status,
            }
            for s in settlements
        ],
        default=_json_default,
    ).decode()


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str  # format_type(), already quoted as SQL
    typtype: str  # 'e' for enums
    type_oid: int


Query = sql.SQL | sql.Composed  # a compiled query, composed or already rendered


@dataclass(frozen=True, slots=True)
class Compiled:
    claim: Query
    settle: Query
    rescue: Query
    next_due: Query
    counts: Query
    oldest_due: Query
    retry_dead: Query
    install: Query
    insert_trigger: str
    update_trigger: str
    record_calls: Query | None = None
    notify_function: str = ""  # in schema relay
    fingerprint: str = ""  # the installed function's comment when it is up to date


@dataclass(frozen=True, slots=True)
class WebhookCall:
    """One attempt of a Documenso webhook, recorded as Documenso records it."""

    status: str  # SUCCESS | FAILED
    url: str
    request: str  # JSON text of the body sent
    code: int  # 0: no HTTP answer
    headers: str | None  # JSON text
    body: str | None  # JSON text
    webhook_id: str
    event: str


RETRYABLE = (psycopg.OperationalError, psycopg_pool.PoolTimeout)
# How long a connection may stay silent while one source is checked or installed (a few dozen
# statements, each bounded by the server's statement_timeout as well).
SETUP_BOUND = 30.0
DEFAULT_RETRY = RetryPolicy()

# -- compiling a source's queries ----------------------------------------------------------------

_TIMESTAMP_TYPES = re.compile(r"^timestamp(\(\d\))? with(out)? time zone$")
_INTEGER_TYPES = {"integer", "bigint", "smallint"}
# Text that an explicit CAST fits into (it truncates varchar(n) and char(n) instead of failing).
_TEXT_TYPES = re.compile(r"^(text|character varying(\(\d+\))?|character(\(\d+\))?)$")
_JSON_TYPES = {"json", "jsonb"}
_NUMBER_TYPES = re.compile(r"^(integer|bigint|smallint|numeric(\(\d+(,\d+)?\))?)$")

# URLs, secrets and topics read by a claim are bounded too: a longer one is not loaded, and its
# row is settled dead with the reason.
MAX_FIELD_BYTES = 8192
_FIELD_LIMITS = {"url": MAX_FIELD_BYTES, "secret": MAX_FIELD_BYTES, "topic": MAX_FIELD_BYTES}
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024


def oversize_reason(source: str, oversize: str, config: Config) -> str:
    """Why a row the claim did not load is dead, and what to do about it."""
    return (
        f"too large to deliver ({oversize} bytes): a payload may have at most "
        f"relay.max_payload_bytes = {config.max_payload_bytes} bytes, a URL, secret or topic "
        f"{MAX_FIELD_BYTES}; shrink the row or raise relay.max_payload_bytes, then run "
        f"`relay retry-dead {source}`"
    )


class _Catalog(sql.SQL):
    """SQL text taken from the catalog (a type name, a constraint): quoted already but, unlike
    the query files' text, it may hold a `%` that a query with parameters must escape."""


def _type(column: Column) -> sql.SQL:
    return _Catalog(column.type)


def _check_columns(source: Source, columns: dict[str, Column]) -> None:
    where = f"sources.{source.name}"
    table = source.qualified_table
    mapped = {
        "key": source.key,
        "status": source.status,
        "attempts": source.attempts,
        "due": source.due,
        "max_attempts_column": source.max_attempts_column,
        "last_error": source.last_error,
        "last_status": source.last_status,
        "done_at": source.done_at,
        "payload": source.payload_column,
        "url_column": source.url_column,
        "secret_column": source.secret_column,
    }
    if source.kind is SourceKind.outbox:
        where = f"sources.{source.name} (the outbox, relay.outbox)"
    for key, column in mapped.items():
        if column is not None and column not in columns:
            raise ConfigError(
                f"{where}.{key}: column {column!r} does not exist in table {table}; "
                f"its columns are: {', '.join(sorted(columns))}"
            )

    def refuse(key: str, column: str, needs: str) -> ConfigError:
        return ConfigError(
            f"{where}.{key}: column {column!r} of {table} is {columns[column].type}; {needs}"
        )

    due_type = columns[source.due].type if source.due is not None else "timestamptz"
    if source.due is not None and not _TIMESTAMP_TYPES.match(due_type):
        raise refuse("due", source.due, "it must be a timestamp (with or without time zone)")
    for key, column in (
        ("attempts", source.attempts),
        ("max_attempts_column", source.max_attempts_column),
    ):
        if column is not None and columns[column].type not in _INTEGER_TYPES:
            raise refuse(key, column, "it must be an integer")
    for key, column in (("url_column", source.url_column), ("secret_column", source.secret_column)):
        if column is not None and columns[column].type not in ("text", "character varying"):
            raise refuse(key, column, "it must be text")
    # Columns a settle writes: each must hold what relay writes there, or every settle of the
    # source would be refused and every delivered row sent again at its claim's expiry.
    written: tuple[tuple[str, str | None, Callable[[str], bool], str], ...] = (
        (
            "last_error",
            source.last_error,
            lambda ty: bool(_TEXT_TYPES.match(ty)) or ty in _JSON_TYPES,
            "relay writes the error there: use text, varchar or char (cut to fit), or json or "
            "jsonb (an object {error, status, attempt})",
        ),
        (
            "last_status",
            source.last_status,
            lambda ty: bool(_NUMBER_TYPES.match(ty) or _TEXT_TYPES.match(ty)),
            "relay writes the HTTP status there: use an integer, numeric or text column",
        ),
        (
            "done_at",
            source.done_at,
            lambda ty: bool(_TIMESTAMP_TYPES.match(ty)),
            "relay writes the delivery time there: use a timestamp (with or without time zone)",
        ),
    )
    for key, column, fits, needs in written:
        if column is not None and not fits(columns[column].type):
            raise refuse(key, column, needs)


def _now(due_type: str) -> sql.Composable:
    # timestamp-without-time-zone columns hold UTC by convention (Prisma, Documenso); compare
    # and write them in UTC whatever the session's TimeZone is.
    if "without" in due_type:
        return sql.SQL("(now() AT TIME ZONE 'UTC')")
    return sql.SQL("now()")


def _text_or_null(column: str | None) -> sql.Composable:
    if column is None:
        return sql.SQL("NULL::text")
    return sql.SQL("t.{}::text").format(sql.Identifier(column))


def fingerprint(*parts: object) -> str:
    """What an installed function was made from, stored as its comment: `relay check` compares
    it with what `relay install` would install now, to find stale triggers."""
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:32]
    return f"relay install {digest}"


@dataclass(frozen=True, slots=True)
class _Notify:
    install: sql.Composed
    insert_trigger: str
    update_trigger: str
    function: str
    fingerprint: str


def _notify_install(source: Source, due_type: str, channel: str) -> _Notify:
    due_check: sql.Composable = sql.SQL("TRUE")  # no due column: any claimable status wakes
    if source.due is not None:
        due_check = sql.SQL("({due} IS NULL OR {due} <= {now})").format(
            due=sql.Identifier(source.due), now=_now(due_type)
        )
    insert_trigger = f"relay_notify_{source.name}_insert"
    update_trigger = f"relay_notify_{source.name}_update"
    made_from = fingerprint(
        _NOTIFY_SQL,
        source.name,
        source.schema,
        source.table,
        source.status,
        source.pending,
        source.due,
        "without" in due_type,
        channel,
    )
    function = f"notify_{source.name}"
    install = sql.SQL(_NOTIFY_SQL).format(
        fingerprint=sql.Literal(made_from),
        function=sql.Identifier("relay", function),
        table=sql.Identifier(source.schema, source.table),
        status=sql.Identifier(source.status),
        pending=sql.SQL(", ").join(sql.Literal(p) for p in source.pending),
        due_check=due_check,
        channel=sql.Literal(channel),
        source=sql.Literal(source.name),
        insert_trigger=sql.Identifier(insert_trigger),
        update_trigger=sql.Identifier(update_trigger),
    )
    return _Notify(install, insert_trigger, update_trigger, function, made_from)


def _fill(text: str, names: dict[str, sql.Composable]) -> sql.Composed:
    return sql.SQL(text).format(**{k: v for k, v in names.items() if "{" + k + "}" in text})


# Every query set (source.sql, a preset's own file) provides these names.
QUERY_NAMES = ("claim", "settle", "rescue", "next_due", "counts", "oldest_due", "retry_dead")


def _compile(
    source: Source,
    queries: dict[str, str],
    names: dict[str, sql.Composable],
    due_type: str,
    channel: str,
) -> Compiled:
    notify = _notify_install(source, due_type, channel)
    return Compiled(
        **{name: _fill(queries[name], names) for name in QUERY_NAMES},
        install=notify.install,
        insert_trigger=notify.insert_trigger,
        update_trigger=notify.update_trigger,
        notify_function=notify.function,
        fingerprint=notify.fingerprint,
    )


def _seconds(value: float) -> sql.Composable:
    return sql.SQL("make_interval(secs => {})").format(sql.Literal(float(value)))


def _bounded(limits: dict[str, int]) -> sql.Composable:
    """The claim's values (`c.url`, `c.payload`, ...), each NULL if its text is longer than its
    limit in bytes, then one more: which were, and how large ('payload 20971520', NULL if none).
    Measured in the claim statement, so relay never loads a value it will not send."""
    values = [
        sql.SQL("CASE WHEN octet_length(c.{v}) <= {n} THEN c.{v} END").format(
            v=sql.Identifier(name), n=sql.Literal(limit)
        )
        for name, limit in limits.items()
    ]
    checks = [
        sql.SQL(
            "CASE WHEN octet_length(c.{v}) > {n} THEN {name} || ' ' || octet_length(c.{v}) END"
        ).format(v=sql.Identifier(name), n=sql.Literal(limit), name=sql.Literal(name))
        for name, limit in limits.items()
    ]
    oversize = sql.SQL("NULLIF(concat_ws(', ', {}), '')").format(sql.SQL(", ").join(checks))
    return sql.SQL(", ").join([*values, oversize])


def compile_documenso_jobs(
    source: Source,
    columns: dict[str, Column],
    channel: str,
    retry: RetryPolicy,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Compiled:
    schema = source.app_schema
    backoff = sql.SQL(
        "make_interval(secs => LEAST({max}, "
        '{base} * power({factor}, GREATEST(c."retried" - 1, 0))))'
    ).format(
        max=sql.Literal(float(retry.max_delay)),
        base=sql.Literal(float(retry.base)),
        factor=sql.Literal(float(retry.factor)),
    )
    names: dict[str, sql.Composable] = {
        "table": sql.Identifier(schema, "BackgroundJob"),
        "webhook": sql.Identifier(schema, "Webhook"),
        "bounded": _bounded({**_FIELD_LIMITS, "payload": max_payload_bytes}),
        "call": sql.Identifier(schema, "WebhookCall"),
        "now": _now("timestamp(3) without time zone"),
        "job_ids": sql.SQL("ARRAY[{}]::text[]").format(
            sql.SQL(", ").join(sql.Literal(j) for j in source.job_ids)
        ),
        "pending_after": _seconds(source.pending_after),
        "stuck_after": _seconds(source.stuck_after),
        "backoff_c": backoff,
        "status_type": _type(columns[source.status]),
        "call_status_type": sql.Identifier(schema, "WebhookCallStatus"),
        "event_type": sql.Identifier(schema, "WebhookTriggerEvents"),
    }

    compiled = _compile(source, _DOCUMENSO_JOBS, names, "timestamp(3) without time zone", channel)
    return replace(compiled, record_calls=_fill(_DOCUMENSO_JOBS["record_calls"], names))


def compile_source(
    source: Source,
    columns: dict[str, Column],
    channel: str,
    retry: RetryPolicy = DEFAULT_RETRY,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Compiled:
    if source.kind is SourceKind.documenso_jobs:
        return compile_documenso_jobs(source, columns, channel, retry, max_payload_bytes)
    ident = sql.Identifier
    # Without a due column, claims and retry times live in relay.leases (timestamptz).
    due_type = columns[source.due].type if source.due is not None else "timestamptz"
    now = _now(due_type)
    max_attempts: sql.Composable = sql.Literal(source.max_attempts)
    if source.max_attempts_column is not None:
        max_attempts = sql.SQL("COALESCE(t.{}, {})::int").format(
            ident(source.max_attempts_column), sql.Literal(source.max_attempts)
        )
    payload: sql.Composable
    if source.payload_column is not None:
        payload = _text_or_null(source.payload_column)
    else:
        payload = sql.SQL("to_jsonb(t)::text")
    row_columns = {
        "key": sql.SQL("t.{}").format(ident(source.key)),
        "lease": sql.SQL("t.{}").format(ident(source.due)) if source.due else None,
        "attempt": sql.SQL("t.{}::int").format(ident(source.attempts)),
        "max_attempts": max_attempts,
        "url": _text_or_null(source.url_column),
        "secret": _text_or_null(source.secret_column),
        "topic": _text_or_null(source.topic_column),
        "payload": payload,
    }
    returning_named = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(e, ident(n)) for n, e in row_columns.items() if e is not None
    )
    extra: list[sql.Composable] = []
    if source.last_error is not None:
        error_type = columns[source.last_error]
        error: sql.Composable = sql.SQL("s.error")
        if error_type.type in _JSON_TYPES:
            error = sql.SQL(
                "jsonb_build_object('error', s.error, 'status', s.http_status, 'attempt', t.{})"
            ).format(ident(source.attempts))
        extra.append(
            sql.SQL(
                "{c} = CASE s.outcome WHEN 'done' THEN NULL WHEN 'release' THEN t.{c} "
                "ELSE CAST({error} AS {ty}) END"
            ).format(c=ident(source.last_error), error=error, ty=_type(error_type))
        )
    if source.last_status is not None:
        extra.append(
            sql.SQL(
                "{c} = CASE s.outcome WHEN 'release' THEN t.{c} "
                "ELSE CAST(s.http_status AS {ty}) END"
            ).format(c=ident(source.last_status), ty=_type(columns[source.last_status]))
        )
    if source.done_at is not None:
        extra.append(
            sql.SQL("{c} = CASE s.outcome WHEN 'done' THEN {now} ELSE t.{c} END").format(
                c=ident(source.done_at), now=_now(columns[source.done_at].type)
            )
        )
    extra_sets = sql.SQL("").join(sql.SQL(", ") + e for e in extra)
    names = {
        "table": sql.Identifier(source.schema, source.table),
        "key": ident(source.key),
        "status": ident(source.status),
        "due": ident(source.due) if source.due is not None else sql.SQL("NULL"),
        "attempts": ident(source.attempts),
        "now": now,
        "pending": sql.SQL(", ").join(sql.Literal(p) for p in source.pending),
        "processing": sql.Literal(source.processing),
        "retry": sql.Literal(source.retry),
        # A released row goes back as it came: never attempted (this was its first claim) to
        # the first pending status, otherwise to the retry status.
        "release": sql.SQL("CASE WHEN t.{a} <= 1 THEN {p} ELSE {r} END").format(
            a=ident(source.attempts), p=sql.Literal(source.pending[0]), r=sql.Literal(source.retry)
        ),
        "done": sql.Literal(source.done),
        "dead": sql.Literal(source.dead),
        "status_type": _type(columns[source.status]),
        "key_type": _type(columns[source.key]),
        "due_type": _Catalog(due_type),
        "returning_named": returning_named,
        "bounded": _bounded({**_FIELD_LIMITS, "payload": max_payload_bytes}),
        "source": sql.Literal(source.name),
        "extra_sets": extra_sets,
    }

    queries = _SOURCE_QUERIES if source.due is not None else _SOURCE_LEASED_QUERIES
    return _compile(source, queries, names, due_type, channel)


# -- the store ---------------------------------------------------------------------------------


def _check_encoding(conn: psycopg.AsyncConnection[Any]) -> None:
    """relay reads and writes UTF-8 text; in a SQL_ASCII database psycopg hands out bytes."""
    encoding = conn.info.parameter_status("server_encoding")
    if encoding != "UTF8":
        raise ConfigError(
            f"database.url: database {conn.info.dbname!r} is encoded {encoding}; relay needs a "
            f"UTF8 database (create one with ENCODING 'UTF8' and move the data there)"
        )


async def _role(conn: psycopg.AsyncConnection[Any]) -> str:
    cur = await conn.execute(_CATALOG["current_role"])
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def _check_schema(conn: psycopg.AsyncConnection[Any], where: str, schema: str) -> None:
    cur = await conn.execute(_CATALOG["schema_usage"], {"schema": schema})
    row = await cur.fetchone()
    if row is None:
        raise ConfigError(f"{where}: schema {schema!r} does not exist in the database")
    if not row[0]:
        role = await _role(conn)
        on = sql.SQL("SCHEMA {}").format(sql.Identifier(schema))
        raise ConfigError(
            f"{where}: role {role!r} has no USAGE on schema {schema!r}, so it cannot see the "
            f"tables there; as the schema's owner run: {_grant(conn, 'USAGE', None, on, role)}"
        )


def _grant(
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


async def _describe(conn: psycopg.AsyncConnection[Any], source: Source) -> dict[str, Column]:
    await _check_schema(conn, f"sources.{source.name}", source.schema)
    cur = await conn.execute(_CATALOG["columns"], {"schema": source.schema, "table": source.table})
    columns = {r[0]: Column(r[0], r[1], r[2], r[3]) for r in await cur.fetchall()}
    if not columns and source.kind is SourceKind.documenso_jobs:
        raise ConfigError(
            f'sources.{source.name}: no Documenso "BackgroundJob" table in schema '
            f"{source.schema!r}: Documenso keeps jobs in the database from v1.6 on. Is "
            f"database.url Documenso's database (set sources.{source.name}.schema if its tables "
            f"live elsewhere)?"
        )
    if source.kind is SourceKind.documenso_jobs and EXECUTE_WEBHOOK in source.job_ids:
        for table in ("Webhook", "WebhookCall"):
            cur = await conn.execute(
                _CATALOG["table_exists"], {"schema": source.schema, "table": table}
            )
            found = await cur.fetchone()
            if not found or not found[0]:
                raise ConfigError(
                    f'sources.{source.name}.webhooks: Documenso\'s "{table}" table is missing '
                    f"from schema {source.schema!r} (webhooks arrived in Documenso v1.5); set "
                    f"webhooks = false to run only forwarded jobs"
                )
    if not columns:
        if source.kind is not SourceKind.table:
            raise ConfigError(
                f"sources.{source.name}: relay's table {source.qualified_table} does not exist; "
                f"run `relay install` first"
            )
        raise ConfigError(
            f"sources.{source.name}.table: table {source.qualified_table} does not exist "
            f"in the database; create it or correct the name"
        )
    _check_columns(source, columns)
    status = columns[source.status]
    values = (
        *((f"pending[{i}]", v) for i, v in enumerate(source.pending)),
        ("processing", source.processing),
        ("done", source.done),
        ("dead", source.dead),
    )
    if status.typtype == "e":
        cur = await conn.execute(_CATALOG["enum_labels"], {"type_oid": status.type_oid})
        labels = {r[0] for r in await cur.fetchall()}
        for key, value in values:
            if value not in labels:
                raise ConfigError(
                    f"sources.{source.name}.{key}: {value!r} is not a value of enum "
                    f"{status.type}; its values are: {', '.join(sorted(labels))}"
                )
    else:
        await _check_status_type(conn, source, status, values)
    await _check_status_constraints(conn, source, status, values)
    return columns


async def _check_status_type(
    conn: psycopg.AsyncConnection[Any],
    source: Source,
    status: Column,
    values: Sequence[tuple[str, str]],
) -> None:
    """Each status value must come back unchanged from the column's type: a varchar(5) would
    cut 'processing' short, and a settle would then never find its row."""
    for key, value in values:
        query = sql.SQL("SELECT CAST({} AS {})::text").format(sql.Literal(value), _type(status))
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
                f"sources.{source.name}.{key}: {value!r} cannot be stored as it is in column "
                f"{source.status!r} of {source.qualified_table} ({status.type}): {reason}"
            )


# What each kind of source reads (SELECT) and writes (UPDATE) in its table; None: every column
# (a whole-row payload). Relay's bookkeeping tables are checked on top of these.
def _needed_columns(source: Source, columns: dict[str, Column]) -> tuple[list[str], list[str]]:
    if source.kind is SourceKind.documenso_jobs:
        jobs_read = ["id", "status", "retried", "maxRetries", "jobId", "submittedAt"]
        jobs_read += ["lastRetriedAt", "completedAt", "updatedAt", "payload"]
        return jobs_read, ["status", "retried", "lastRetriedAt", "completedAt", "updatedAt"]
    written = [source.status, source.attempts, source.due]
    written += [source.last_error, source.last_status, source.done_at]
    read = [*written, source.key, source.max_attempts_column, source.payload_column]
    read += [source.url_column, source.secret_column, source.topic_column]
    return _present(read if source.payload_column else columns), _present(written)


def _present(names: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(n for n in names if n is not None))


async def _check_privileges(
    conn: psycopg.AsyncConnection[Any], source: Source, columns: dict[str, Column]
) -> None:
    """The role relay runs as must be allowed every statement it will run for this source:
    claims and settles read and write the table, Documenso's jobs insert "WebhookCall" rows,
    and relay's own tables hold outbox rows and leases."""
    read, written = _needed_columns(source, columns)
    needs: list[tuple[str, str, list[str], list[str], list[str]]] = [
        (source.schema, source.table, read, written, [])
    ]
    if source.kind is SourceKind.documenso_jobs and EXECUTE_WEBHOOK in source.job_ids:
        needs.append((source.schema, "Webhook", ["id", "webhookUrl", "secret", "enabled"], [], []))
        needs.append((source.schema, "WebhookCall", [], [], ["INSERT"]))
    if source.due is None:
        needs.append(("relay", "leases", ["source", "key", "due"], ["due"], ["INSERT", "DELETE"]))
    role = await _role(conn)
    missing: list[str] = []
    for schema, table, select, update, table_privileges in needs:
        if schema != source.schema:
            await _check_schema(conn, f"sources.{source.name}", schema)
        cur = await conn.execute(_CATALOG["privileges"], {"schema": schema, "table": table})
        rows = await cur.fetchall()
        if not rows:
            continue  # a missing table is reported by _describe
        can_select = {r[0] for r in rows if r[1]}
        can_update = {r[0] for r in rows if r[2]}
        can = {"INSERT": rows[0][3], "DELETE": rows[0][4]}
        on = sql.Identifier(schema, table)
        if [c for c in select if c not in can_select]:
            missing.append(_grant(conn, "SELECT", None, on, role))
        if lacking := [c for c in update if c not in can_update]:
            missing.append(_grant(conn, "UPDATE", lacking, on, role))
        missing.extend(_grant(conn, p, None, on, role) for p in table_privileges if not can[p])
    if missing:
        raise ConfigError(
            f"sources.{source.name}: role {role!r} lacks privileges that relay's claims and "
            f"settles need; as the tables' owner run: {' '.join(missing)}"
        )


async def _check_status_constraints(
    conn: psycopg.AsyncConnection[Any],
    source: Source,
    status: Column,
    values: Sequence[tuple[str, str]],
) -> None:
    """Each configured status value must pass the table's CHECK constraints on that column.

    The constraints are copied onto a one-column temporary table and each value inserted there,
    in a transaction that is always rolled back: PostgreSQL itself judges the values.
    """
    cur = await conn.execute(
        _CATALOG["status_checks"],
        {"schema": source.schema, "table": source.table, "column": source.status},
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
                        probe, sql.Identifier(source.status), sql.SQL(status.type)
                    )
                )
        except psycopg.errors.InsufficientPrivilege:
            on = sql.SQL("DATABASE {}").format(sql.Identifier(conn.info.dbname))
            grant = _grant(conn, "TEMPORARY", None, on, await _role(conn))
            raise ConfigError(
                f"sources.{source.name}.status: relay checks its status values against the "
                f"CHECK constraints of {source.qualified_table} in a temporary table, and its "
                f"role may not create one; run: {grant}"
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
                    f"sources.{source.name}.{key}: {value!r} is not allowed in column "
                    f"{source.status!r} of {source.qualified_table} by its constraint {name} "
                    f"({definition}); use one of the values it allows"
                ) from None


@dataclass(frozen=True, slots=True)
class _DocumensoTrigger:
    """The document-event trigger that fits this Documenso schema version."""

    table: str  # "Envelope" or "Document"
    function: str  # its function in schema relay
    install: sql.Composed
    fingerprint: str


async def _documenso_trigger(
    conn: psycopg.AsyncConnection[Any], source: Source
) -> _DocumensoTrigger:
    """Detect Documenso's schema version and compose the matching document-event trigger."""
    schema = source.app_schema
    cur = await conn.execute(_CATALOG["documenso_probe"], {"schema": schema})
    row = await cur.fetchone()
    assert row is not None
    envelope, document, recipient, meta, envelope_meta, document_meta = row
    where = f"sources.{source.name}"
    if not envelope and not document:
        raise ConfigError(
            f'{where}: no Documenso document table in schema {schema!r}: neither "Envelope" '
            f'(Documenso v1.13 and later) nor "Document" (v1.12 and earlier) exists. Is '
            f"database.url Documenso's database (set {where}.schema if its tables live "
            f"elsewhere)?"
        )
    if not recipient:
        raise ConfigError(
            f'{where}: Documenso\'s "Recipient" table is missing from schema {schema!r}; '
            f"the document events need it for their recipients"
        )
    table = "Envelope" if envelope else "Document"
    meta_expr: sql.Composable = sql.SQL("NULL::jsonb")
    if meta and envelope and envelope_meta:
        meta_expr = sql.SQL(
            '(SELECT to_jsonb(m) FROM {} AS m WHERE m."id" = NEW."documentMetaId")'
        ).format(sql.Identifier(schema, "DocumentMeta"))
    elif meta and not envelope and document_meta:
        meta_expr = sql.SQL(
            '(SELECT to_jsonb(m) FROM {} AS m WHERE m."documentId" = NEW."id")'
        ).format(sql.Identifier(schema, "DocumentMeta"))
    section = "envelope" if envelope else "document"
    made_from = fingerprint(
        _DOCUMENSO_DOCUMENTS["common"], _DOCUMENSO_DOCUMENTS[section], schema, row
    )
    # Sections lose their last `;` when loaded: one goes back between the two.
    install = sql.SQL(_DOCUMENSO_DOCUMENTS["common"] + ";\n").format() + sql.SQL(
        _DOCUMENSO_DOCUMENTS[section]
    ).format(
        table=sql.Identifier(schema, table),
        recipient=sql.Identifier(schema, "Recipient"),
        meta=meta_expr,
        fingerprint=sql.Literal(made_from),
    )
    return _DocumensoTrigger(table, f"documenso_{section}_event", install, made_from)


async def _install_documenso_documents(conn: psycopg.AsyncConnection[Any], source: Source) -> None:
    trigger = await _documenso_trigger(conn, source)
    await conn.execute(trigger.install)
    log.info(
        "install.documenso source=%s schema=%s table=%s",
        source.name,
        source.app_schema,
        trigger.table,
    )


async def _trigger_problem(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    table: str,
    function: str,
    triggers: tuple[str, str],
    expected: str,
) -> str | None:
    """Why this trigger pair is not what `relay install` would install now, or None."""
    cur = await conn.execute(
        _CATALOG["installed_trigger"],
        {
            "schema": schema,
            "table": table,
            "function": function,
            "insert_trigger": triggers[0],
            "update_trigger": triggers[1],
        },
    )
    row = await cur.fetchone()
    assert row is not None
    count, installed = row
    if not count:
        return f"its trigger on {schema}.{table} is not installed"
    if count < 2 or installed != expected:
        return (
            f"its trigger on {schema}.{table} is stale: it was installed for another "
            f"configuration or relay version"
        )
    return None


def _render(query: sql.Composable, conn: psycopg.AsyncConnection[Any], escape: bool) -> str:
    """A composed query as SQL text. Where it will run with parameters, a `%` in a quoted name,
    a literal or catalog text is doubled, so that psycopg reads it as the character `%`, not as
    a placeholder (the query files' own `%(name)s` stay placeholders)."""
    if isinstance(query, sql.Composed):
        return "".join(_render(part, conn, escape) for part in query)
    text = query.as_string(conn)
    if escape and (not isinstance(query, sql.SQL) or isinstance(query, _Catalog)):
        return text.replace("%", "%%")
    return text


def _has_params(query: sql.Composable) -> bool:
    if isinstance(query, sql.Composed):
        return any(_has_params(part) for part in query)
    own_text = isinstance(query, sql.SQL) and not isinstance(query, _Catalog)
    return own_text and "%(" in query.as_string()


def _rendered(compiled: Compiled, conn: psycopg.AsyncConnection[Any]) -> Compiled:
    """The same queries rendered to SQL text once: psycopg would otherwise compose them again
    on every execute (about a tenth of relay's CPU on the hot path, measured)."""

    def text(query: Query) -> sql.SQL:
        return sql.SQL(_render(query, conn, _has_params(query)))

    return replace(
        compiled,
        claim=text(compiled.claim),
        settle=text(compiled.settle),
        rescue=text(compiled.rescue),
        next_due=text(compiled.next_due),
        counts=text(compiled.counts),
        oldest_due=text(compiled.oldest_due),
        retry_dead=text(compiled.retry_dead),
        record_calls=None if compiled.record_calls is None else text(compiled.record_calls),
    )


DEFAULT_STATEMENT_TIMEOUT = 5.0


class Store:
    """A connection pool and the compiled queries of every configured source.

    Every use of a pooled connection is bounded: the server cancels a statement that runs
    longer than `statement_timeout`, and a connection that has not answered shortly after that
    is severed (see relay.connections) and replaced, as are the pool's idle connections then.
    """

    def __init__(
        self,
        url: str,
        sources: Sequence[Source],
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        channel: str = "relay",
        max_size: int = 8,
        retry_for: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        pgbouncer: bool = False,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
    ) -> None:
        self.sources = {s.name: s for s in sources}
        self.max_payload_bytes = max_payload_bytes
        self.retry = retry
        self.channel = channel
        self.retry_for = retry_for
        self.pgbouncer = pgbouncer
        self.watchdog = connections.Watchdog(
            statement_timeout + connections.SLACK, on_silent=self.sever_idle
        )
        # Every connection the pool opened, to sever the idle ones when one went silent.
        self._conns: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()
        self._stopping = False
        self.pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            open=False,
            # Every query here is one statement, so autocommit makes each its own short
            # transaction without a BEGIN/COMMIT round trip. A PgBouncer in transaction mode
            # would refuse the startup `options` that carry statement_timeout: there the
            # client-side bound alone applies.
            kwargs={
                "autocommit": True,
                **connections.options(url, None if pgbouncer else statement_timeout),
            },
            configure=self._configure,
            name="relay",
            timeout=10.0,
        )
        self.compiled: dict[str, Compiled] = {}

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conns.add(conn)
        if self.pgbouncer:
            # PgBouncer in transaction mode may hand each statement to another server
            # connection, where a prepared statement does not exist.
            conn.prepare_threshold = None

    async def open(self) -> None:
        if self.pool.closed:
            await self.pool.open()
        await self.pool.wait(timeout=15.0)

    @property
    def interrupted(self) -> bool:
        return self._stopping

    async def close(self) -> None:
        # Interrupted, the database is not answering: the pool's attempts to connect are not
        # worth waiting for (each would take up to connect_timeout).
        await self.pool.close(timeout=1.0 if self._stopping else 5.0)

    @contextlib.asynccontextmanager
    async def _connection(
        self, bound: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection for one bounded use: one statement on the hot path (the
        watchdog's own bound), or at least `bound` seconds for a use of many statements."""
        async with self.pool.connection() as conn:
            with self.watchdog.watching(conn, max(bound or 0.0, self.watchdog.bound)):
                yield conn

    def sever_idle(self) -> None:
        """A connection went silent: the pool's idle ones probably share its fate (same path to
        the same server), so cut them now rather than let each be found out by a timeout."""
        for conn in list(self._conns):
            if conn not in self.watchdog.busy:
                connections.sever(conn)

    def interrupt(self) -> None:
        """Stopping: no more retries, and the statements still waiting on the database fail
        now (their rows keep their claims until expiry, as after a crash)."""
        self._stopping = True
        cut = self.watchdog.sever_busy()
        if cut:
            log.warning(
                "store.interrupted connections=%d next=%s", cut, "stopping without their answer"
            )

    def _retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, RETRYABLE) and not self._stopping

    async def _with_retries(self, action: Callable[[], Awaitable[T]]) -> T:
        """Run `action`, retrying on a lost connection (the pool replaces broken ones)."""
        try:
            # The common case costs one call, not a retry controller per query.
            return await action()
        except RETRYABLE:
            if self._stopping:
                raise
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(self._retryable),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(self.retry_for),
            reraise=True,
        ):
            with attempt:
                return await action()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- set-up ----------------------------------------------------------------------------

    async def prepare(self, names: Iterable[str] | None = None) -> None:
        """Check every source (or those named) against the database and compile its queries."""
        chosen = self.sources.values() if names is None else [self.sources[n] for n in names]
        # One connection per source: checking one takes a few dozen round trips, and the
        # watchdog bounds each use of a connection, not each statement.
        for source in chosen:
            async with self._connection(SETUP_BOUND) as conn:
                _check_encoding(conn)
                columns = await _describe(conn, source)
                await _check_privileges(conn, source, columns)
                compiled = compile_source(
                    source, columns, self.channel, self.retry, self.max_payload_bytes
                )
                self.compiled[source.name] = _rendered(compiled, conn)

    async def trigger_problems(self) -> dict[str, str]:
        """Sources whose triggers are missing or stale (not what `relay install` would install
        now), and why."""
        problems: dict[str, str] = {}
        for name, compiled in self.compiled.items():
            async with self._connection(SETUP_BOUND) as conn:
                source = self.sources[name]
                triggers = (compiled.insert_trigger, compiled.update_trigger)
                problem = await _trigger_problem(
                    conn,
                    source.schema,
                    source.table,
                    compiled.notify_function,
                    triggers,
                    compiled.fingerprint,
                )
                if problem is None and source.kind is SourceKind.documenso_documents:
                    documenso = await _documenso_trigger(conn, source)
                    problem = await _trigger_problem(
                        conn,
                        source.app_schema,
                        documenso.table,
                        documenso.function,
                        ("relay_documenso_created", "relay_documenso_status"),
                        documenso.fingerprint,
                    )
                if problem is not None:
                    problems[name] = problem
        return problems

    async def install(self) -> None:
        """relay's schema and every source's trigger, in one transaction; idempotent."""
        # One transaction for every source (all or nothing), so one bound for all of them.
        bound = SETUP_BOUND * max(1, len(self.sources))
        async with self._connection(bound) as conn, conn.transaction():
            _check_encoding(conn)
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('relay.install'))")
            await conn.execute(_SCHEMA_SQL)
            for source in self.sources.values():
                if source.kind is SourceKind.documenso_documents:
                    await _install_documenso_documents(conn, source)
                columns = await _describe(conn, source)
                compiled = compile_source(
                    source, columns, self.channel, self.retry, self.max_payload_bytes
                )
                self.compiled[source.name] = _rendered(compiled, conn)
                await conn.execute(compiled.install)

    async def uninstall(self) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('relay.install'))")
            await conn.execute(_UNINSTALL_SQL)

    # -- the hot path ----------------------------------------------------------------------

    async def claim(self, source: str, limit: int, lease_seconds: float) -> list[Claimed]:
        query = self.compiled[source].claim

        async def run() -> list[Claimed]:
            async with self._connection() as conn:
                cur = await conn.execute(query, {"limit": limit, "lease_seconds": lease_seconds})
                return [Claimed(*row) for row in await cur.fetchall()]

        return await self._with_retries(run)

    async def settle(self, source: str, settlements: Iterable[Settlement]) -> set[Any]:
        """Apply a batch of settlements; returns the keys that were still ours and were settled."""
        batch = list(settlements)
        params = {"batch": settle_batch_json(batch), "keys": [s.key for s in batch]}
        query = self.compiled[source].settle

        async def run() -> set[Any]:
            async with self._connection() as conn:
                cur = await conn.execute(query, params)
                return {row[0] for row in await cur.fetchall()}

        return await self._with_retries(run)

    async def record_calls(self, source: str, calls: Sequence[WebhookCall]) -> None:
        query = self.compiled[source].record_calls
        assert query is not None, f"source {source} records no webhook calls"
        params = {
            "statuses": [c.status for c in calls],
            "urls": [c.url for c in calls],
            "requests": [c.request for c in calls],
            "codes": [c.code for c in calls],
            "headers": [c.headers for c in calls],
            "bodies": [c.body for c in calls],
            "webhooks": [c.webhook_id for c in calls],
            "events": [c.event for c in calls],
        }

        async def run() -> None:
            async with self._connection() as conn:
                await conn.execute(query, params)

        await self._with_retries(run)

    async def _scalar(self, query: Query) -> Any:
        async def run() -> Any:
            async with self._connection() as conn:
                cur = await conn.execute(query)
                row = await cur.fetchone()
                return None if row is None else row[0]

        return await self._with_retries(run)

    async def _rowcount(self, query: Query) -> int:
        async def run() -> int:
            async with self._connection() as conn:
                cur = await conn.execute(query)
                return cur.rowcount

        return await self._with_retries(run)

    async def rescue(self, source: str) -> int:
        return await self._rowcount(self.compiled[source].rescue)

    async def next_due(self, source: str) -> float | None:
        value = await self._scalar(self.compiled[source].next_due)
        return None if value is None else float(value)

    # -- operations ------------------------------------------------------------------------

    async def counts(self, source: str) -> dict[str, int]:
        async with self._connection() as conn:
            cur = await conn.execute(self.compiled[source].counts)
            return {row[0]: int(row[1]) for row in await cur.fetchall()}

    async def oldest_due(self, source: str) -> float | None:
        value = await self._scalar(self.compiled[source].oldest_due)
        return None if value is None else float(value)

    async def retry_dead(self, source: str) -> int:
        return await self._rowcount(self.compiled[source].retry_dead)
