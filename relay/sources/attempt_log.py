"""An attempt log for a table source: one row per attempt, in a table of the user's (columns
mapped to SQL expressions over the row and the attempt) or in relay.attempts; bodies bounded,
old rows deleted in small batches by one relay at a time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from relay import readers
from relay.db import catalog, sqltext
from relay.readers import ConfigError

KEYS = {"table", "columns", "time_column", "max_body_chars", "keep", "keep_rows"}
CLEANUP_BATCH = 1000
# relay.attempts' columns, filled from the attempt.
_RELAY_COLUMNS = {
    "source": "{source}",
    "key": "r.relay_key::text",
    "attempt": "(r.attempt).number",
    "outcome": "(r.attempt).outcome",
    "status": "(r.response).status",
    "error": "(r.attempt).error",
    "url": "(r.request).url",
    "request_body": "(r.request).body",
    "response_headers": "(r.response).headers",
    "response_body": "(r.response).body",
    "ms": "(r.attempt).ms",
    "worker": "(r.attempt).worker",
    "at": "(r.attempt).finished_at",
}


@dataclass(frozen=True, slots=True)
class LogSpec:
    schema: str
    table: str
    columns: Mapping[str, str] = field(default_factory=dict)  # column -> SQL expression
    time_column: str | None = None
    max_body_chars: int = 2000
    keep: float | None = None  # seconds
    keep_rows: int | None = None

    @property
    def own(self) -> bool:
        return (self.schema, self.table) == ("relay", "attempts")


def parse(where: str, data: Any) -> LogSpec:
    if not isinstance(data, dict):
        raise ConfigError(f'{where}: expected a table, like {{ table = "relay" }}')
    readers.unknown(where, data, KEYS)
    if "table" not in data:
        raise ConfigError(
            f'{where}.table: required: "relay" for relay.attempts, or your table\'s name'
        )
    name = readers.string(f"{where}.table", data["table"])
    own = name in ("relay", "relay.attempts")
    schema, table = ("relay", "attempts") if own else readers.table_name(f"{where}.table", name)
    columns_raw = data.get("columns")
    if own and columns_raw is not None:
        raise ConfigError(
            f"{where}.columns: relay.attempts has its own columns; map columns only for a "
            f"table of yours"
        )
    if not own and not columns_raw:
        raise ConfigError(
            f"{where}.columns: required for a table of yours: column = SQL expression, like "
            f'{{ webhook_id = "id", status_code = "response.status", error = "attempt.error" }}'
        )
    columns = {}
    if isinstance(columns_raw, dict):
        for column, expr in columns_raw.items():
            readers.ident(f"{where}.columns.{column}", column)
            columns[column] = readers.string(f"{where}.columns.{column}", expr)
    elif columns_raw is not None:
        raise ConfigError(f"{where}.columns: expected a table of column = SQL expression")
    keep = data.get("keep")
    keep_rows = data.get("keep_rows")
    time_column = readers.opt_ident(f"{where}.time_column", data.get("time_column"))
    if own:
        time_column = "at"
    if (keep is not None or keep_rows is not None) and time_column is None:
        raise ConfigError(
            f"{where}.time_column: retention (keep, keep_rows) needs the column that holds each "
            f"attempt's time; name it"
        )
    return LogSpec(
        schema=schema,
        table=table,
        columns=columns,
        time_column=time_column,
        max_body_chars=readers.integer(
            f"{where}.max_body_chars", data.get("max_body_chars", 2000), minimum=0
        ),
        keep=None if keep is None else readers.duration(f"{where}.keep", keep, minimum=60.0),
        keep_rows=None
        if keep_rows is None
        else readers.integer(f"{where}.keep_rows", keep_rows, minimum=1),
    )


def _context(limit: int) -> sql.Composable:
    n = sql.Literal(limit)
    return sql.SQL(
        "o.key AS relay_key, o.outcome AS relay_outcome, o.error AS relay_error, "
        "o.http_status AS relay_status, "
        "ROW(o.http_status, o.response_headers, o.response_json, left(o.response_body, {n}))"
        "::relay.response AS response, "
        "ROW(o.attempt, o.error, o.worker, o.started_at, o.finished_at, "
        "CASE o.outcome WHEN 'retry' THEN now() + make_interval(secs => o.delay) END, "
        "o.outcome, o.ms)::relay.attempt AS attempt, "
        "ROW(o.method, o.url, o.request_headers, left(o.request_body, {n}))::relay.request "
        "AS request"
    ).format(n=n)


async def prepare(
    conn: psycopg.AsyncConnection[Any],
    where: str,
    spec: LogSpec,
    source_table: catalog.Table,
    key: str,
    source_name: str,
) -> dict[str, sqltext.Query]:
    """The `log` statement (one INSERT per settle batch) and, with retention, `cleanup`."""
    log_where = f"{where}.attempt_log"
    log_table = catalog.Table(log_where, spec.schema, spec.table)
    columns = await catalog.columns(conn, log_table)
    if not columns:
        hint = "run `relay install`" if spec.own else "create it or correct the name"
        raise ConfigError(f"{log_where}.table: table {log_table.qualified} does not exist; {hint}")
    mapped = _RELAY_COLUMNS if spec.own else spec.columns
    for column in mapped:
        if column not in columns:
            raise ConfigError(
                f"{log_where}.columns.{column}: column {column!r} does not exist in "
                f"{log_table.qualified}; its columns are: {', '.join(sorted(columns))}"
            )
    if spec.time_column is not None and spec.time_column not in columns:
        raise ConfigError(
            f"{log_where}.time_column: column {spec.time_column!r} does not exist in "
            f"{log_table.qualified}"
        )
    source_columns = await catalog.columns(conn, source_table)
    key_type = source_columns[key].sql_type

    def expr(text: str) -> sql.Composable:
        if text == "{source}":
            return sql.Literal(source_name)
        return sql.SQL("(") + sqltext.Catalog(sqltext.context_refs(text, "r")) + sql.SQL(")")

    targets = sql.SQL(", ").join(sql.Identifier(c) for c in mapped)
    values = sql.SQL(", ").join(
        sql.SQL("CAST({} AS {})").format(expr(e), columns[c].sql_type) for c, e in mapped.items()
    )
    insert = sql.SQL(
        "INSERT INTO {log} ({targets}) SELECT {values} "
        "FROM (SELECT {context} FROM json_to_recordset(%(batch)s::json) AS o("
        "key {key_type}, lease timestamptz, outcome text, delay float8, error text, "
        "http_status int4, attempt int4, method text, url text, request_headers jsonb, "
        "request_body text, response_headers jsonb, response_body text, response_json jsonb, "
        "started_at timestamptz, finished_at timestamptz, ms float8, worker text)) AS r "
        "LEFT JOIN {table} AS t ON t.{key} = r.relay_key"
    ).format(
        log=log_table.ident,
        targets=targets,
        values=values,
        context=_context(spec.max_body_chars),
        key_type=key_type,
        table=source_table.ident,
        key=sql.Identifier(key),
    )
    # PostgreSQL plans it now: a column mapped to an expression that does not fit stops
    # start-up naming the key.
    for column, text in mapped.items():
        probe = sql.SQL(
            "SELECT CAST({e} AS {ty}) FROM (SELECT {context} FROM json_to_recordset('[]'::json) "
            "AS o(key {key_type}, lease timestamptz, outcome text, delay float8, error text, "
            "http_status int4, attempt int4, method text, url text, request_headers jsonb, "
            "request_body text, response_headers jsonb, response_body text, response_json jsonb, "
            "started_at timestamptz, finished_at timestamptz, ms float8, worker text)) AS r "
            "LEFT JOIN {table} AS t ON t.{key} = r.relay_key"
        ).format(
            e=expr(text),
            ty=columns[column].sql_type,
            context=_context(spec.max_body_chars),
            key_type=key_type,
            table=source_table.ident,
            key=sql.Identifier(key),
        )
        await catalog.check_statement(
            conn,
            f"{log_where}.columns.{column}",
            probe,
            f"cannot be written to column {column!r} ({columns[column].type})",
        )
    await catalog.check_privileges(
        conn, log_where, [catalog.Need(spec.schema, spec.table, table_privileges=["INSERT"])]
    )
    queries: dict[str, sqltext.Query] = {"log": insert}
    if spec.time_column is not None and (spec.keep is not None or spec.keep_rows is not None):
        queries["cleanup"] = _cleanup(spec, log_table, source_name)
        await catalog.check_privileges(
            conn,
            log_where,
            [catalog.Need(spec.schema, spec.table, [spec.time_column], [], ["DELETE"])],
        )
    return queries


def _cleanup(spec: LogSpec, log_table: catalog.Table, source_name: str) -> sqltext.Query:
    """Old attempts deleted, a batch at a time, by whichever relay holds the table's lock
    (the others skip it: the next sweep comes soon enough)."""
    assert spec.time_column is not None
    time = sql.Identifier(spec.time_column)
    mine: sql.Composable = sql.SQL("TRUE")
    if spec.own:
        mine = sql.SQL("source = {}").format(sql.Literal(source_name))
    picks: list[sql.Composable] = []
    if spec.keep is not None:
        picks.append(
            sql.SQL(
                "SELECT ctid FROM {log} WHERE {mine} AND {time} < now() - {keep} LIMIT {n}"
            ).format(
                log=log_table.ident,
                mine=mine,
                time=time,
                keep=sqltext.seconds(spec.keep),
                n=sql.Literal(CLEANUP_BATCH),
            )
        )
    if spec.keep_rows is not None:
        picks.append(
            sql.SQL(
                "SELECT ctid FROM {log} WHERE {mine} ORDER BY {time} DESC OFFSET {keep} LIMIT {n}"
            ).format(
                log=log_table.ident,
                mine=mine,
                time=time,
                keep=sql.Literal(spec.keep_rows),
                n=sql.Literal(CLEANUP_BATCH),
            )
        )
    lock = sql.Literal(f"relay.attempt_log {log_table.qualified} {source_name if spec.own else ''}")
    return sql.SQL(
        "DELETE FROM {log} WHERE pg_try_advisory_xact_lock(hashtext({lock})) "
        "AND ctid = ANY(ARRAY({picks}))"
    ).format(
        log=log_table.ident,
        lock=lock,
        picks=sql.SQL(" UNION ALL ").join(sql.SQL("(") + p + sql.SQL(")") for p in picks),
    )
