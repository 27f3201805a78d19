"""kind = "table": a user's table taken as it is (a webhook queue, a job queue, an email queue).

relay keeps its claims, their expiry and its attempt count in relay.leases, so every column of
the user's table keeps what the application meant: the due column is only read, a processing
status and an attempts column are written only where the mapping names them. A filter splits a
table between sources; the request is shaped from columns and SQL expressions evaluated in the
claim (relay.request); write-backs and an attempt log record what each attempt came to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from relay import readers, request, retry, secretbox
from relay.db import catalog, sqltext
from relay.db.batch import settle_batch_json
from relay.readers import ConfigError
from relay.sources import attempt_log
from relay.sources.base import (
    ALL_OUTCOMES,
    OPERATIONS,
    Claimed,
    Compiled,
    DbContext,
    Dead,
    Failed,
    Notify,
    Ordering,
    OrderingIndex,
    ParseContext,
    Plain,
    Request,
    Settlement,
    Source,
    bounded_values,
    claim_values,
    claim_versions,
    fixed_targets,
    keyring,
    notify_trigger,
    parse_ordering,
    shape_columns,
    shape_expressions,
    shaped,
)

QUERIES = sqltext.load_queries(sqltext.sql_dir() / "queries" / "table.sql")
QUERY_NAMES = ("settle", "heartbeat", "rescue", "next_due", *OPERATIONS)
# Claims kept in the row (lease_column): these and the claim have versions of their own, no
# heartbeat.
IN_PLACE = ("settle", "rescue", "next_due")
IN_PLACE_NAMES = OPERATIONS
WRITE_BACKS = ("on_claim", "on_success", "on_failure", "on_dead")

KEYS = (
    frozenset(
        {
            "kind",
            "table",
            "key",
            "status",
            "pending",
            "retry",
            "processing",
            "done",
            "dead",
            "attempts",
            "max_attempts",
            "max_attempts_column",
            "due",
            "filter",
            "heartbeat",
            "lease_column",
            "last_error",
            "last_status",
            "done_at",
            "ordering_key",
            "ordering_dead",
            "secret_encryption",
            "retry_policy",
            "attempt_log",
            *WRITE_BACKS,
        }
    )
    | request.KEYS
)

# The context a write-back expression reads besides the row, in the settle (`r`) and the
# claim (`l`): composite values, so their names never clash with the user's columns. Each
# field: its value in the settle, over the batch row `o`, and the batch column it needs beyond
# the basic ones (what the deliverer sends only as `Detail`). The settle computes only the
# fields the expressions read (NULL for the others): every field for every row cost the
# settle a third more time (bench).
_CONTEXT_FIELDS: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "response": (
        ("status", "o.http_status", None),
        ("headers", "o.response_headers", "response_headers jsonb"),
        ("json", "o.response_json", "response_json jsonb"),
        ("body", "o.response_body", "response_body text"),
    ),
    "attempt": (
        ("number", "o.attempt", None),
        ("error", "o.error", None),
        ("worker", "o.worker", "worker text"),
        ("started_at", "o.started_at", "started_at timestamptz"),
        ("finished_at", "o.finished_at", "finished_at timestamptz"),
        (
            "next_at",
            "CASE o.outcome WHEN 'retry' THEN now() + make_interval(secs => o.delay) END",
            None,
        ),
        ("outcome", "o.outcome", None),
        ("ms", "o.ms", "ms float8"),
    ),
    "request": (
        ("method", "o.method", "method text"),
        ("url", "o.url", "url text"),
        ("headers", "o.request_headers", "request_headers jsonb"),
        ("body", "o.request_body", "request_body text"),
    ),
}
_SETTLE_BASIC = (
    ", o.error AS relay_error, o.http_status AS relay_status, o.attempt AS relay_attempt"
)


@dataclass(frozen=True, slots=True)
class SettleContext:
    """What a source's settle computes for its write-backs: the select list over `o`, the
    batch's extra columns, and whether the deliverer must send `Detail` for them."""

    select: sql.Composable
    columns: sql.Composable
    needs_detail: bool


def settle_context(used: frozenset[tuple[str, str]]) -> SettleContext:
    select = [_SETTLE_BASIC]
    columns: list[str] = []
    for name, fields in _CONTEXT_FIELDS.items():
        if not any(value == name for value, _ in used):
            continue
        values = []
        for field_name, expr, column in fields:
            if (name, field_name) in used:
                values.append(expr)
                if column is not None:
                    columns.append(column)
            else:
                values.append("NULL")
        select.append(f", ROW({', '.join(values)})::relay.{name} AS {name}")
    return SettleContext(
        select=sql.SQL("".join(select)),
        columns=sql.SQL("".join(", " + c for c in columns)),
        needs_detail=bool(columns),
    )


def _used_fields(expressions: Iterable[str]) -> frozenset[tuple[str, str]]:
    return frozenset(f for text in expressions for f in sqltext.context_fields(text))


# For `relay check`: the same names, NULL, to plan a write-back expression against.
_CHECK_CONTEXT = sql.SQL(
    "(SELECT NULL::text AS relay_outcome, NULL::text AS relay_error, NULL::int AS relay_status, "
    "NULL::int AS relay_attempt, "
    "NULL::relay.response AS response, NULL::relay.attempt AS attempt, "
    "NULL::relay.request AS request)"
)
_CLAIM_CHECK_CONTEXT = sql.SQL(
    "(SELECT NULL::text AS relay_key, now() AS relay_token, 1 AS relay_attempts, "
    "NULL::relay.attempt AS attempt)"
)


@dataclass(frozen=True, slots=True)
class TableSpec:
    schema: str
    table: str
    key: str
    status: str
    pending: tuple[str, ...]
    retry: str
    processing: str | None
    done: str
    dead: str
    max_attempts: int
    max_attempts_column: str | None = None
    attempts: str | None = None
    due: str | None = None
    filter: str | None = None
    heartbeat: str | None = None
    # Claims kept in the row: relay's own timestamptz column (sql/queries/table.sql).
    lease_column: str | None = None
    last_error: str | None = None
    last_status: str | None = None
    done_at: str | None = None
    # column -> SQL expression, per moment
    write_backs: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    log: attempt_log.LogSpec | None = None
    ordering: Ordering | None = None
    # What the settle's write-backs read of relay's context values (response, attempt,
    # request): the settle computes only these.
    context: frozenset[tuple[str, str]] = frozenset()
    # The response's headers are recorded: an attempt log or a write-back reads them.
    keep_headers: bool = False
    shape: request.Shape = field(default=None)  # type: ignore[assignment]
    keyring: secretbox.Keyring | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"


def _assignments(where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where}: expected a table of column = SQL expression, like "
            f'{{ job_result = "response.json" }}'
        )
    return {
        readers.ident(f"{where}.{column}", column): readers.string(f"{where}.{column}", expr)
        for column, expr in value.items()
    }


def _states(where: str, spec: TableSpec) -> None:
    """A row's status alone says where it is: two states with one value would make a delivered
    row look claimable (and be sent again), or a dead one delivered."""
    states = {"done": spec.done, "dead": spec.dead}
    if spec.processing is not None:
        states = {"processing": spec.processing, **states}
    for label, value in states.items():
        if value in spec.pending:
            raise ConfigError(f"{where}.{label}: {value!r} is also listed in {where}.pending")
    labels = list(states.items())
    for i, (label, value) in enumerate(labels):
        for other, other_value in labels[i + 1 :]:
            if value == other_value:
                raise ConfigError(
                    f"{where}.{other}: {value!r} is also {where}.{label}; each state needs a "
                    f"status value of its own"
                )
    if spec.retry not in spec.pending:
        raise ConfigError(
            f"{where}.retry: {spec.retry!r} must be one of {where}.pending {list(spec.pending)}, "
            f"or a retried row would never be claimed again"
        )


def _in_place(where: str, spec: TableSpec) -> None:
    """Claims kept in the row need the row to say it is claimed, and to count its attempts."""
    for key, value in (("processing", spec.processing), ("attempts", spec.attempts)):
        if value is None:
            raise ConfigError(
                f"{where}.lease_column: claims kept in the row need {where}.{key} too (the "
                f"row's {'status while it is claimed' if key == 'processing' else 'attempt count'}"
                f"); map it, or leave lease_column out to keep claims in relay.leases"
            )
    if spec.heartbeat is not None:
        raise ConfigError(
            f"{where}.heartbeat: a claim kept in the row (lease_column) is not extended while "
            f"its request runs, so there is no heartbeat to write; remove heartbeat, or "
            f"lease_column to keep claims in relay.leases (they heartbeat)"
        )
    others = {"due": spec.due, "done_at": spec.done_at, "attempts": spec.attempts}
    others |= {f"{m}.{c}": c for m, a in spec.write_backs.items() for c in a}
    for key, column in others.items():
        if column == spec.lease_column:
            raise ConfigError(
                f"{where}.{key}: {column!r} is also {where}.lease_column, which relay owns; give "
                f"relay a column of its own"
            )


class Table(Plain):
    name = "table"
    single = False

    async def install(
        self, conn: psycopg.AsyncConnection[Any], source: Source, ctx: DbContext
    ) -> None:
        spec: TableSpec = source.spec
        if spec.ordering is not None:
            # On a large busy table, run it with CREATE INDEX CONCURRENTLY before (README).
            await conn.execute(_ordering_index(spec)[1])

    def parse(self, name: str, data: Mapping[str, Any], ctx: ParseContext) -> Source:
        where = f"sources.{name}"
        readers.unknown(where, data, set(KEYS))
        for required in ("table", "key", "status"):
            if required not in data:
                raise ConfigError(f"{where}.{required}: required for a table source")
        schema, table = readers.table_name(f"{where}.table", data["table"])
        pending = readers.status_list(f"{where}.pending", data.get("pending", "pending"))
        shape = request.parse(where, data, ctx.env)
        write_backs = {
            moment: _assignments(f"{where}.{moment}", data[moment])
            for moment in WRITE_BACKS
            if moment in data
        }

        def column(key: str) -> str | None:
            return readers.opt_ident(f"{where}.{key}", data.get(key))

        processing = data.get("processing")
        context = _used_fields(
            e for m, a in write_backs.items() if m != "on_claim" for e in a.values()
        )
        policy = ctx.retry
        if "retry_policy" in data:
            policy = retry.parse(f"{where}.retry_policy", data["retry_policy"], policy)
        spec = TableSpec(
            schema=schema,
            table=table,
            key=readers.ident(f"{where}.key", data["key"]),
            status=readers.ident(f"{where}.status", data["status"]),
            pending=pending,
            retry=readers.string(f"{where}.retry", data.get("retry", pending[0])),
            processing=None
            if processing is None
            else readers.string(f"{where}.processing", processing),
            done=readers.string(f"{where}.done", data.get("done", "done")),
            dead=readers.string(f"{where}.dead", data.get("dead", "dead")),
            max_attempts=readers.integer(
                f"{where}.max_attempts",
                data.get(
                    "max_attempts", policy.limit(None) if policy.max_attempts else ctx.max_attempts
                ),
            ),
            max_attempts_column=column("max_attempts_column"),
            attempts=column("attempts"),
            due=column("due"),
            filter=None
            if data.get("filter") is None
            else readers.string(f"{where}.filter", data["filter"]),
            heartbeat=column("heartbeat"),
            lease_column=column("lease_column"),
            ordering=parse_ordering(where, data),
            last_error=column("last_error"),
            last_status=column("last_status"),
            done_at=column("done_at"),
            write_backs=write_backs,
            log=attempt_log.parse(f"{where}.attempt_log", data.get("attempt_log"))
            if "attempt_log" in data
            else None,
            context=context,
            keep_headers="attempt_log" in data or ("response", "headers") in context,
            shape=shape,
            keyring=keyring(where, data, ctx),
        )
        _states(where, spec)
        if spec.lease_column is not None:
            _in_place(where, spec)
        return Source(
            name=name,
            kind=self,
            spec=spec,
            retry=policy,
            # Claims in relay.leases are extended while their requests run; a claim kept in
            # the row is its own token, and lasts claim_timeout (as relay.outbox's do).
            heartbeat=spec.lease_column is None,
            targets=fixed_targets(shape),
            ordered=spec.ordering is not None,
        )

    # -- the database side ----------------------------------------------------------------

    async def prepare(
        self, conn: psycopg.AsyncConnection[Any], source: Source, ctx: DbContext
    ) -> Compiled:
        spec: TableSpec = source.spec
        where = f"sources.{source.name}"
        table = catalog.Table(where, spec.schema, spec.table)
        columns = await catalog.columns(conn, table)
        if not columns:
            raise ConfigError(
                f"{where}.table: table {spec.qualified} does not exist in the database; create "
                f"it or correct the name"
            )
        _check_columns(table, spec, columns)
        status = columns[spec.status]
        values = [(f"pending[{i}]", v) for i, v in enumerate(spec.pending)]
        values += [("done", spec.done), ("dead", spec.dead), ("retry", spec.retry)]
        if spec.processing is not None:
            values.append(("processing", spec.processing))
        await catalog.check_status_values(conn, table, status, values)
        await catalog.check_privileges(conn, where, _needs(spec, columns))
        compiled = _compile(source, spec, columns, ctx)
        await _check_expressions(conn, source, spec, columns, compiled)
        if spec.ordering is not None:
            name, statement = _ordering_index(spec)
            index = OrderingIndex(spec.schema, name, statement.as_string(conn))
            compiled = replace(compiled, ordering_index=index)
        if spec.log is not None:
            log_compiled = await attempt_log.prepare(
                conn, where, spec.log, table, spec.key, source.name
            )
            compiled = replace(
                compiled,
                queries={**compiled.queries, **log_compiled},
                needs_detail=True,
                detail_on=ALL_OUTCOMES,
            )
        return compiled

    # -- the request --------------------------------------------------------------------------

    def request(self, source: Source, row: Claimed, now: datetime) -> Request | Dead | Failed:
        spec: TableSpec = source.spec
        return shaped(
            spec.shape,
            source,
            row,
            now,
            spec.keyring,
            keep_headers=spec.keep_headers,
        )

    def record(self, source: Source, row: Claimed, request: Request, result: Any) -> Any:
        spec: TableSpec = source.spec
        return True if spec.log is not None else None

    def log_params(self, source: Source, records: list[Settlement]) -> dict[str, Any]:
        return {"batch": settle_batch_json(records, detail=True)}


KIND = Table()


# -- compiling -----------------------------------------------------------------------------------


def _check_columns(
    table: catalog.Table, spec: TableSpec, columns: dict[str, catalog.Column]
) -> None:
    mapped = {
        "key": spec.key,
        "status": spec.status,
        "attempts": spec.attempts,
        "due": spec.due,
        "max_attempts_column": spec.max_attempts_column,
        "heartbeat": spec.heartbeat,
        "lease_column": spec.lease_column,
        "last_error": spec.last_error,
        "last_status": spec.last_status,
        "done_at": spec.done_at,
        **shape_columns(spec.shape),
    }
    for moment, assignments in spec.write_backs.items():
        mapped.update({f"{moment}.{c}": c for c in assignments})
    catalog.check_mapped(table, columns, mapped)

    def refuse(key: str, column: str, needs: str) -> ConfigError:
        return ConfigError(
            f"{table.where}.{key}: column {column!r} of {table.qualified} is "
            f"{columns[column].type}; {needs}"
        )

    for key, column in (("due", spec.due), ("heartbeat", spec.heartbeat)):
        if column is not None and not catalog.TIMESTAMP_TYPES.match(columns[column].type):
            raise refuse(key, column, "it must be a timestamp (with or without time zone)")
    if spec.lease_column is not None and columns[spec.lease_column].type != (
        "timestamp with time zone"
    ):
        # The claim's expiry is its token, compared exactly: a timestamp without time zone
        # would shift with the session's zone, a rounded one would never match.
        raise refuse(
            "lease_column",
            spec.lease_column,
            "relay keeps its claims' expiry there: use timestamptz (at full precision)",
        )
    if spec.done_at is not None and not catalog.TIMESTAMP_TYPES.match(columns[spec.done_at].type):
        raise refuse(
            "done_at",
            spec.done_at,
            "relay writes the delivery time there: use a timestamp (with or without time zone)",
        )
    for key, column in (
        ("attempts", spec.attempts),
        ("max_attempts_column", spec.max_attempts_column),
    ):
        if column is not None and columns[column].type not in catalog.INTEGER_TYPES:
            raise refuse(key, column, "it must be an integer")
    if spec.last_error is not None:
        ty = columns[spec.last_error].type
        if not (catalog.TEXT_TYPES.match(ty) or ty in catalog.JSON_TYPES):
            raise refuse(
                "last_error",
                spec.last_error,
                "relay writes the error there: use text, varchar or char (cut to fit), or json "
                "or jsonb (an object {error, status, attempt})",
            )
    if spec.last_status is not None:
        ty = columns[spec.last_status].type
        if not (catalog.NUMBER_TYPES.match(ty) or catalog.TEXT_TYPES.match(ty)):
            raise refuse(
                "last_status",
                spec.last_status,
                "relay writes the HTTP status there: use an integer, numeric or text column",
            )


def _now_for(column: catalog.Column) -> sql.Composable:
    return sqltext.now(column.type)


def _expr(text: str, context: str | None = None) -> sql.Composable:
    """A user's SQL expression, in parentheses; a `%` in it is a `%` (no parameters). In a
    write-back, its `response.x`, `attempt.x`, `request.x` read relay's context values, the
    columns of the relation `context` (`r` in the settle, `l` in the claim)."""
    if context is not None:
        text = sqltext.context_refs(text, context)
    return sql.SQL("(") + sqltext.Catalog(text) + sql.SQL(")")


def _cast(expr: sql.Composable, column: catalog.Column) -> sql.Composable:
    return sql.SQL("CAST({} AS {})").format(expr, column.sql_type)


def _compile(
    source: Source, spec: TableSpec, columns: dict[str, catalog.Column], ctx: DbContext
) -> Compiled:
    ident = sql.Identifier
    status = columns[spec.status]
    filter_sql: sql.Composable = sql.SQL("TRUE") if spec.filter is None else _expr(spec.filter)
    waiting = sql.SQL("t.{} IN ({}) AND {}").format(
        ident(spec.status), sqltext.literal_list(spec.pending), filter_sql
    )
    ready: sql.Composable = waiting
    next_scheduled: sql.Composable = sql.SQL("NULL::timestamptz")
    oldest: sql.Composable = sql.SQL("NULL::float8")
    if spec.due is not None:
        due = columns[spec.due]
        now = _now_for(due)
        ready = sql.SQL("{} AND (t.{d} IS NULL OR t.{d} <= {now})").format(
            waiting, d=ident(spec.due), now=now
        )
        as_tz = sql.SQL(" AT TIME ZONE 'UTC'") if "without" in due.type else sql.SQL("")
        next_scheduled = sql.SQL(
            "(SELECT min(t.{d}){tz} FROM {table} AS t WHERE {waiting} AND t.{d} > {now})"
        ).format(
            d=ident(spec.due),
            tz=as_tz,
            table=ident(spec.schema, spec.table),
            waiting=waiting,
            now=now,
        )
        oldest = sql.SQL(
            "EXTRACT(EPOCH FROM ({now} - min(COALESCE(t.{d}, {now}))))::float8 "
            "FROM {table} AS t WHERE {ready}"
        ).format(now=now, d=ident(spec.due), table=ident(spec.schema, spec.table), ready=ready)
    max_attempts: sql.Composable = sql.Literal(spec.max_attempts)
    if spec.max_attempts_column is not None:
        max_attempts = sql.SQL("COALESCE(t.{}, {})::int").format(
            ident(spec.max_attempts_column), sql.Literal(spec.max_attempts)
        )

    fetched = claim_values(spec.shape)
    returning = sql.SQL(
        "t.{key} AS key, l.relay_token AS lease, l.relay_attempts AS attempt, "
        "{max} AS max_attempts, {url} AS url, {secret} AS secret, {route} AS topic, "
        "{payload} AS payload, {values} AS values"
    ).format(
        key=ident(spec.key),
        max=max_attempts,
        url=fetched["url"],
        secret=fetched["secret"],
        route=fetched["topic"],
        payload=fetched["payload"],
        values=fetched["values"],
    )

    # The claim's writes to the user's row.
    claim_sets: list[sql.Composable] = []
    if spec.processing is not None:
        claim_sets.append(
            sql.SQL("{} = CAST({} AS {})").format(
                ident(spec.status), sql.Literal(spec.processing), status.sql_type
            )
        )
    if spec.attempts is not None:
        claim_sets.append(sql.SQL("{} = l.relay_attempts").format(ident(spec.attempts)))
    if spec.heartbeat is not None:
        claim_sets.append(
            sql.SQL("{} = {}").format(ident(spec.heartbeat), _now_for(columns[spec.heartbeat]))
        )
    if spec.lease_column is not None:
        claim_sets.append(sql.SQL("{} = l.relay_token").format(ident(spec.lease_column)))
    for column, assigned in spec.write_backs.get("on_claim", {}).items():
        claim_sets.append(
            sql.SQL("{} = {}").format(ident(column), _cast(_expr(assigned, "l"), columns[column]))
        )

    # The settle's writes to the user's row.
    release: sql.Composable = sql.SQL("t.{}").format(ident(spec.status))
    if spec.processing is not None:
        release = sql.Literal(spec.pending[0])
    if spec.lease_column is not None and spec.attempts is not None:  # (both: _in_place)
        # A handed-back row tried before waits in the retry status, where its next claim
        # counts on from its attempts (from another pending status it would start again at 1).
        release = sql.SQL("CASE WHEN t.{} > 1 THEN {} ELSE {} END").format(
            ident(spec.attempts), sql.Literal(spec.retry), release
        )
    if spec.processing is not None or spec.lease_column is not None:
        # A row handed back with a delay (its endpoint busy or paused: relay.endpoints) waits
        # it out in the retry status, the one status whose claims look at the lease (see
        # `_unleased`): in another pending status it would be claimable again at once.
        release = sql.SQL("CASE WHEN r.relay_delay > 0 THEN {} ELSE {} END").format(
            sql.Literal(spec.retry), release
        )
    settle_sets: list[sql.Composable] = [
        sql.SQL(
            "{s} = CAST(CASE r.relay_outcome WHEN 'done' THEN {done} WHEN 'retry' THEN {retry} "
            "WHEN 'dead' THEN {dead} ELSE {release} END AS {ty})"
        ).format(
            s=ident(spec.status),
            done=sql.Literal(spec.done),
            retry=sql.Literal(spec.retry),
            dead=sql.Literal(spec.dead),
            release=release,
            ty=status.sql_type,
        )
    ]
    if spec.attempts is not None:
        settle_sets.append(
            sql.SQL(
                "{a} = CASE r.relay_outcome WHEN 'release' THEN GREATEST(t.{a} - 1, 0) "
                "ELSE t.{a} END"
            ).format(a=ident(spec.attempts))
        )
    if spec.last_error is not None:
        col = columns[spec.last_error]
        error: sql.Composable = sql.SQL("r.relay_error")
        if col.type in catalog.JSON_TYPES:
            error = sql.SQL(
                "jsonb_build_object('error', r.relay_error, 'status', r.relay_status, "
                "'attempt', r.relay_attempt)"
            )
        settle_sets.append(
            sql.SQL(
                "{c} = CASE r.relay_outcome WHEN 'done' THEN NULL WHEN 'release' THEN t.{c} "
                "ELSE CAST({error} AS {ty}) END"
            ).format(c=ident(spec.last_error), error=error, ty=col.sql_type)
        )
    if spec.last_status is not None:
        settle_sets.append(
            sql.SQL(
                "{c} = CASE r.relay_outcome WHEN 'release' THEN t.{c} "
                "ELSE CAST(r.relay_status AS {ty}) END"
            ).format(c=ident(spec.last_status), ty=columns[spec.last_status].sql_type)
        )
    if spec.done_at is not None:
        settle_sets.append(
            sql.SQL("{c} = CASE r.relay_outcome WHEN 'done' THEN {now} ELSE t.{c} END").format(
                c=ident(spec.done_at), now=_now_for(columns[spec.done_at])
            )
        )
    settle_sets.extend(_settle_write_backs(spec, columns))

    settle_ctx = settle_context(spec.context)
    on_claim = _used_fields(spec.write_backs.get("on_claim", {}).values())
    claim_attempt = (
        "ROW(leased.relay_attempts, NULL, %(worker)s::text, now(), NULL, NULL, NULL, NULL)"
        if any(value == "attempt" for value, _ in on_claim)
        else "NULL"
    )
    live = [*spec.pending] + ([spec.processing] if spec.processing is not None else [])
    names: dict[str, sql.Composable] = {
        "table": ident(spec.schema, spec.table),
        "key": ident(spec.key),
        "key_type": columns[spec.key].sql_type,
        "status": ident(spec.status),
        "status_type": status.sql_type,
        "source": sql.Literal(source.name),
        "pending": sqltext.literal_list(spec.pending),
        "processing": sql.Literal(spec.processing) if spec.processing else sql.SQL("NULL"),
        "retry": sql.Literal(spec.retry),
        "dead": sql.Literal(spec.dead),
        "ready": ready,
        "waiting": waiting,
        # No claim holds the row and no retry waits (unless the application moved the row).
        "unleased": _unleased(source, spec),
        "filtered": filter_sql,
        "returning": returning,
        "claim_sets": sql.SQL(", ").join(claim_sets) if claim_sets else sql.SQL(""),
        "bounded": bounded_values(ctx.max_payload_bytes),
        "settle_sets": sql.SQL(", ").join(settle_sets),
        "live": sql.SQL("t.{} IN ({})").format(ident(spec.status), sqltext.literal_list(live)),
        "context": settle_ctx.select,
        "context_columns": settle_ctx.columns,
        "claim_attempt": sql.SQL(claim_attempt),
        "next_scheduled": next_scheduled,
        "oldest_due": oldest,
        **_ordering(spec, filter_sql),
        # The dead rows' last error, HTTP status and attempts, where the mapping keeps them.
        "dead_columns": sql.SQL(", ").join(
            sql.SQL("t.{}::{}").format(ident(column), sql.SQL(kind))
            if column is not None
            else sql.SQL("NULL::{}").format(sql.SQL(kind))
            for column, kind in (
                (spec.last_error, "text"),
                (spec.last_status, "int4"),
                (spec.attempts, "int4"),
                (None, "timestamptz"),
            )
        ),
        "retry_dead_sets": sql.SQL(", ").join(
            [
                sql.SQL("{} = CAST({} AS {})").format(
                    ident(spec.status), sql.Literal(spec.pending[0]), status.sql_type
                ),
                *(
                    [sql.SQL("{} = 0").format(ident(spec.attempts))]
                    if spec.attempts is not None
                    else []
                ),
                *(
                    [sql.SQL("{} = NULL").format(ident(spec.lease_column))]
                    if spec.lease_column is not None
                    else []
                ),
            ]
        ),
    }

    def claims(fill: Callable[[dict[str, sql.Composable]], sql.Composed]) -> dict[str, Any]:
        # The rows of a URL whose endpoint cannot take them now are passed over by it.
        return claim_versions(fill, "t", spec.key, names["key_type"], fetched["url"])

    if spec.lease_column is not None:
        assert spec.attempts is not None  # (_in_place)
        names["lease_column"] = ident(spec.lease_column)
        names["attempts"] = ident(spec.attempts)
        queries = {n: sqltext.fill(QUERIES[n], names) for n in IN_PLACE_NAMES}
        queries |= {n: sqltext.fill(QUERIES[f"{n}_in_place"], names) for n in IN_PLACE}
        queries |= claims(lambda parts: sqltext.fill(QUERIES["claim_in_place"], names | parts))
        return Compiled(
            queries=queries,
            notify=_notify(source, spec, names, ctx),
            needs_detail=settle_ctx.needs_detail,
            detail_on=_detail_on(spec, settle_ctx),
            skip_by="url",
        )
    claim = QUERIES["claim_update" if claim_sets else "claim"]
    queries = {n: sqltext.fill(QUERIES[n], names) for n in QUERY_NAMES}

    def claim_with(parts: dict[str, sql.Composable]) -> sql.Composed:
        pick = sqltext.fill(QUERIES["pick_and_lease"], names | parts)
        return sqltext.fill(claim, names | {"pick_and_lease": pick})

    queries |= claims(claim_with)
    if spec.heartbeat is not None:
        queries["heartbeat_column"] = sqltext.fill(
            QUERIES["heartbeat_column"],
            {
                **names,
                "heartbeat": ident(spec.heartbeat),
                "heartbeat_now": _now_for(columns[spec.heartbeat]),
            },
        )
    return Compiled(
        queries=queries,
        notify=_notify(source, spec, names, ctx),
        needs_detail=settle_ctx.needs_detail,
        detail_on=_detail_on(spec, settle_ctx),
        skip_by="url",
    )


def _ordering_index(spec: TableSpec) -> tuple[str, sql.Composed]:
    """On the user's table, made by `relay install` (see Ordering.index)."""
    assert spec.ordering is not None
    statuses = (*spec.pending, *((spec.processing,) if spec.processing else ()), spec.dead)
    return spec.ordering.index(spec.schema, spec.table, spec.key, spec.status, statuses)


def _ordering(spec: TableSpec, filter_sql: sql.Composable) -> dict[str, sql.Composable]:
    """The claim's parts for ordering_key (none without; see Ordering.claim_parts): a key's
    rows hold it back while waiting, claimed (a claimed row stays waiting, or is processing),
    and dead with ordering_dead = "hold"; only this source's rows count (its filter)."""
    if spec.ordering is None:
        return {"ordering_from": sql.SQL(""), "head": sql.SQL("")}
    waiting = (*spec.pending, *((spec.processing,) if spec.processing else ()))
    unfinished = spec.ordering.unfinished(waiting, spec.dead)
    return spec.ordering.claim_parts(
        spec.schema, spec.table, spec.key, spec.status, unfinished, "t", filter_sql
    )


def _unleased(source: Source, spec: TableSpec) -> sql.Composable:
    """No claim holds the row and no retry waits (unless the application moved the row out of
    the retry status): what the claim asks of a candidate row, and the wake-up trigger of a
    row a write left waiting."""
    status, retry = sql.Identifier(spec.status), sql.Literal(spec.retry)
    if spec.lease_column is not None:
        # Kept in the row: the lease column says when a retry falls due.
        return sql.SQL("(t.{s} <> {retry} OR t.{c} IS NULL OR t.{c} <= now())").format(
            s=status, retry=retry, c=sql.Identifier(spec.lease_column)
        )
    # One primary-key lookup per candidate row: written as NOT EXISTS, the planner (trusting
    # statistics in which every lease is already due) scanned all of relay.leases per claim,
    # 207 ms with 30,000 retries waiting (bench).
    lookup = sql.SQL(
        "NOT COALESCE((SELECT x.due > now() AND (x.token IS NOT NULL OR x.status IS NULL "
        "OR x.status = t.{status}::text) FROM relay.leases AS x "
        "WHERE x.source = {source} AND x.key = t.{key}::text), false)"
    ).format(source=sql.Literal(source.name), key=sql.Identifier(spec.key), status=status)
    if spec.processing is None:
        return lookup  # a claimed row keeps its status: only its lease tells
    # A claimed row is in processing, not waiting, so a waiting row's lease can only be a
    # retry's, in the retry status: rows in another status are not looked up (one index probe
    # less per candidate). A lease that holds such a row anyway (the application moved a
    # claimed row back to pending) is found by the claim's insert of the lease, which then
    # leaves the row alone.
    return sql.SQL("(t.{s} <> {retry} OR {lookup})").format(s=status, retry=retry, lookup=lookup)


def _notify(
    source: Source, spec: TableSpec, names: dict[str, sql.Composable], ctx: DbContext
) -> Notify:
    return notify_trigger(
        source.name,
        catalog.Table(f"sources.{source.name}", spec.schema, spec.table),
        # A row its write left waiting (its status and the filter; due now or later: the claim
        # pass it wakes sets the timer to a later one) and not waiting out a claim or a retry:
        # so relay's own settles, which write the status, wake nobody.
        sql.SQL("{} AND {}").format(names["waiting"], names["unleased"]),
        ctx.channel,
        ("table", spec.status, spec.pending, ctx.channel),
        # An inserted row holds no lease (one left by a deleted row of the same key at worst
        # wakes relay for nothing): no lookup on the application's insert.
        inserted=names["waiting"],
    )


def _detail_on(spec: TableSpec, settle_ctx: SettleContext) -> frozenset[str]:
    moments = {"on_success": {"done"}, "on_failure": {"retry", "dead"}, "on_dead": {"dead"}}
    return frozenset(
        o for m in spec.write_backs for o in moments.get(m, ()) if settle_ctx.needs_detail
    )


def _settle_write_backs(
    spec: TableSpec, columns: dict[str, catalog.Column]
) -> list[sql.Composable]:
    """on_success applies when the attempt succeeded; on_failure to every failed attempt (a
    retry or the last one); on_dead, after it, when the row is dead. One CASE per column."""
    moments = {
        "on_success": ("done",),
        "on_failure": ("retry", "dead"),
        "on_dead": ("dead",),
    }
    by_column: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for moment in ("on_dead", "on_failure", "on_success"):  # first WHEN wins: dead first
        for column, expr in spec.write_backs.get(moment, {}).items():
            by_column.setdefault(column, []).append((moments[moment], expr))
    out: list[sql.Composable] = []
    for column, cases in by_column.items():
        whens = sql.SQL(" ").join(
            sql.SQL("WHEN r.relay_outcome IN ({}) THEN {}").format(
                sqltext.literal_list(outcomes), _cast(_expr(expr, "r"), columns[column])
            )
            for outcomes, expr in cases
        )
        out.append(
            sql.SQL("{c} = CASE {whens} ELSE t.{c} END").format(
                c=sql.Identifier(column), whens=whens
            )
        )
    return out


async def _check_expressions(
    conn: psycopg.AsyncConnection[Any],
    source: Source,
    spec: TableSpec,
    columns: dict[str, catalog.Column],
    compiled: Compiled,
) -> None:
    """PostgreSQL plans each of the user's expressions where it will run: a filter, a value the
    claim reads, a write-back cast to its column's type. One that does not fit stops start-up
    naming its key (exit 2), instead of failing every claim or settle."""
    where = f"sources.{source.name}"
    table = sql.Identifier(spec.schema, spec.table)
    if spec.ordering is not None:
        await catalog.check_statement(
            conn,
            f"{where}.ordering_key",
            sql.SQL("SELECT {} FROM {} AS t").format(spec.ordering.expr(), table),
            "not a SQL expression over the table's columns",
        )
    if spec.filter is not None:
        await catalog.check_statement(
            conn,
            f"{where}.filter",
            # As the claim uses it: no CAST, which would take a text column for a boolean.
            sql.SQL("SELECT 1 FROM {} AS t WHERE {}").format(table, _expr(spec.filter)),
            "not a boolean SQL expression over the table's columns",
        )
    for key, value in shape_expressions(spec.shape).items():
        await catalog.check_statement(
            conn,
            f"{where}.{key}",
            sql.SQL("SELECT ({})::text FROM {} AS t").format(_expr(value), table),
            "not a SQL expression over the table's columns",
        )
    for moment, assignments in spec.write_backs.items():
        context = _CLAIM_CHECK_CONTEXT if moment == "on_claim" else _CHECK_CONTEXT
        name = "l" if moment == "on_claim" else "r"
        for column, expr in assignments.items():
            await catalog.check_statement(
                conn,
                f"{where}.{moment}.{column}",
                sql.SQL("UPDATE {} AS t SET {} = {} FROM {} AS {} WHERE FALSE").format(
                    table,
                    sql.Identifier(column),
                    _cast(_expr(expr, name), columns[column]),
                    context,
                    sql.SQL(name),
                ),
                f"cannot be written to column {column!r} ({columns[column].type})",
            )
    # The whole statements, too: what a key alone cannot show (an ambiguous name) shows here.
    params: dict[str, dict[str, Any]] = {
        "claim": {"limit": 1, "lease_seconds": 1.0, "worker": "relay-check"},
        "claim_after_skip": {
            "limit": 1,
            "lease_seconds": 1.0,
            "worker": "relay-check",
            "after": None,
            "skip": ["https://relay-check.invalid/"],
        },
        "settle": {"batch": "[]", "keys": []},
    }
    for name, values in params.items():
        await catalog.check_statement(
            conn,
            where,
            sqltext.rendered(compiled.queries[name], conn),
            f"relay's {name} statement does not plan",
            values,
        )


def _needs(spec: TableSpec, columns: dict[str, catalog.Column]) -> list[catalog.Need]:
    written = [spec.status, spec.attempts, spec.heartbeat, spec.last_error, spec.last_status]
    written += [spec.done_at, spec.lease_column, *(c for a in spec.write_backs.values() for c in a)]
    # Expressions (a body, a filter, write-backs) may read any column.
    table = catalog.Need(spec.schema, spec.table, list(columns), _present(written))
    if spec.lease_column is not None:
        return [table]
    return [
        table,
        catalog.Need(
            "relay",
            "leases",
            ["source", "key", "due", "token", "attempts", "status"],
            ["due", "token", "attempts", "status"],
            ["INSERT", "DELETE"],
        ),
    ]


def _present(names: list[str | None]) -> list[str]:
    return list(dict.fromkeys(n for n in names if n is not None))
