"""What every kind of source is to the pipeline: the interface a kind implements (`Kind`), the
values the pipeline passes around (`Source`, `Claimed`, `Settlement`, `Compiled`), and the pieces
several kinds share (the wake-up trigger, the claim's bounded values).

The listener, claimer, deliverer, settler and sweeper see only these; what a kind's rows look
like, how they are claimed and settled, how a row becomes a request and what an attempt writes
are the kind's own (one module each in relay.sources).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from psycopg import sql

from relay import logs, readers, request, secretbox
from relay.db import sqltext
from relay.readers import ConfigError
from relay.retry import RetryPolicy

if TYPE_CHECKING:
    import psycopg

    from relay.db.catalog import Column, Table

log = logs.get("relay.sources")

# URLs, secrets and topics read by a claim are bounded too: a longer one is not loaded, and its
# row is settled dead with the reason.
MAX_FIELD_BYTES = 8192
FIELD_LIMITS = {"url": MAX_FIELD_BYTES, "secret": MAX_FIELD_BYTES, "topic": MAX_FIELD_BYTES}
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ParseContext:
    """What a kind's config parser may use besides its own table."""

    env: Mapping[str, str]
    max_attempts: int  # [retry] max_attempts
    retry: RetryPolicy  # [retry]


@dataclass(frozen=True, slots=True)
class DbContext:
    """What a kind's statements are compiled with."""

    channel: str = "relay"
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES


@dataclass(frozen=True, slots=True)
class Source:
    """One configured source: what the pipeline needs of it, and the kind's own keys (`spec`)."""

    name: str
    kind: Kind = field(repr=False)
    spec: Any  # the kind's parsed keys (a frozen dataclass of its own)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Its own claim lifetime (Documenso's stuck-job rule); None: relay.claim_timeout.
    lifetime: float | None = None
    # Claims are extended while their request runs, so a claim may be shorter than http.timeout.
    heartbeat: bool = False
    # Fixed targets by the key that sets them, for the outbound guard's check at load.
    targets: Mapping[str, str] = field(default_factory=dict)
    # ordering_key: a row settled for good may let the next row of its key be claimed.
    ordered: bool = False
    # A row handed back with a delay waits it out (its settle gives it a due time), so a busy
    # or paused endpoint's rows can be deferred; otherwise they wait in relay (relay.endpoints).
    defers: bool = True

    @property
    def kind_name(self) -> str:
        return self.kind.name


@dataclass(frozen=True, slots=True)
class Claimed:
    """A row this worker holds; `lease` is the token its settle (and heartbeat) must match."""

    key: Any
    lease: datetime
    attempt: int
    max_attempts: int
    url: str | None
    secret: str | None
    topic: str | None
    payload: str | None  # JSON text (the body, for most kinds)
    values: str | None = None  # JSON text of the kind's other values (headers from columns, ...)
    # Set when a value was too large to load (see MAX_FIELD_BYTES and relay.max_payload_bytes):
    # which and how large, e.g. "payload 20971520". The claim returns NULL in its place.
    oversize: str | None = None
    # When the row was written (epoch seconds), where relay knows it: its own tables' created_at.
    since: float | None = None


@dataclass(frozen=True, slots=True)
class Ordering:
    """Rows with the same key (a SQL expression over the row) are delivered one at a time, in
    the table's key order: a row is claimed only once every earlier row of its key is settled
    for good (delivered; or dead, unless `hold_dead`)."""

    key: str
    hold_dead: bool = False

    def unfinished(self, waiting: tuple[str, ...], dead: str) -> tuple[str, ...]:
        """The statuses of a row that holds back the later rows of its key."""
        return waiting + ((dead,) if self.hold_dead else ())

    def expr(self) -> sql.Composable:
        return sql.SQL("(") + sqltext.Catalog(self.key) + sql.SQL(")")

    def claim_parts(
        self,
        schema: str,
        table: str,
        key: str,
        status: str,
        unfinished: tuple[str, ...],  # (`self.unfinished`: dead too with "hold")
        candidate: str,
        also: sql.Composable | None = None,
    ) -> dict[str, sql.Composable]:
        """The claim's parts, over the candidate row (alias `candidate`): its key, computed in a
        subquery of its own where the expression's column names are the candidate's
        (`ordering_from`); and that no earlier row (by the table's key) of that key is in an
        `unfinished` status (`head`), in a subquery where the names are the earlier row's, as
        they are in `also` (a source's filter). Only each key's head is a candidate, and not
        while it is in flight: a claimed row is waiting or processing, and holds its key."""
        return {
            "ordering_from": sql.SQL(" CROSS JOIN LATERAL (SELECT {} AS relay_key) AS o").format(
                self.expr()
            ),
            "head": sql.SQL(
                " AND NOT EXISTS (SELECT 1 FROM {table} AS e WHERE {expr} = o.relay_key "
                "AND e.{key} < {candidate}.{key} AND e.{status} IN ({unfinished}) AND {also})"
            ).format(
                table=sql.Identifier(schema, table),
                expr=self.expr(),
                key=sql.Identifier(key),
                candidate=sql.Identifier(candidate),
                status=sql.Identifier(status),
                unfinished=sqltext.literal_list(unfinished),
                also=also if also is not None else sql.SQL("TRUE"),
            ),
        }

    def index(
        self, schema: str, table: str, key: str, status: str, statuses: tuple[str, ...]
    ) -> tuple[str, sql.Composed]:
        """The index each claim looks a candidate's earlier rows up by (its name, and the
        statement `relay install` runs): a key's rows in the table's key order, only while
        they can hold the key back (`statuses`: waiting, claimed, dead), so that a claim costs
        one probe per candidate however long the backlog and the history."""
        digest = hashlib.sha256(repr((self.key, key, status, statuses)).encode()).hexdigest()
        name = f"{table[:40]}_relay_order_{digest[:10]}"
        statement = sql.SQL(
            "CREATE INDEX IF NOT EXISTS {name} ON {table} ({expr}, {key}) "
            "WHERE {status} IN ({statuses})"
        ).format(
            name=sql.Identifier(name),
            table=sql.Identifier(schema, table),
            expr=self.expr(),
            key=sql.Identifier(key),
            status=sql.Identifier(status),
            statuses=sqltext.literal_list(statuses),
        )
        return name, statement


@dataclass(frozen=True, slots=True)
class OrderingIndex:
    """The index a source's ordering condition looks earlier rows up by (Ordering.index), as
    its Compiled names it: the store looks for it (Store.missing_ordering_indexes); a running
    relay warns when it is missing (`warn_missing_index`), `relay check` fails."""

    schema: str
    name: str
    create: str  # the statement `relay install` runs


def warn_missing_index(source: str, index: OrderingIndex) -> None:
    log.warning(
        "ordering.index_missing",
        source=f"sources.{source}",
        index=index.name,
        create=index.create,
        hint="run `relay install`, or on a large busy table run the statement with CREATE "
        "INDEX CONCURRENTLY first; without it each claim reads the table",
    )


def parse_ordering(
    where: str, data: Mapping[str, Any], default: str | None = None
) -> Ordering | None:
    """`ordering_key` and `ordering_dead`; a preset's `default` key unless `ordering_key` is
    given ("" turns ordering off)."""
    dead = data.get("ordering_dead", "skip")
    if dead not in ("skip", "hold"):
        raise ConfigError(
            f"{where}.ordering_dead: expected 'skip' (a dead row no longer holds back the later "
            f"rows of its key) or 'hold' (they wait until it is retried), got {dead!r}"
        )
    if "ordering_key" not in data and default is None:
        if "ordering_dead" in data:
            raise ConfigError(f"{where}.ordering_dead: set {where}.ordering_key too")
        return None
    given = data.get("ordering_key", default)
    if isinstance(given, str) and not given.strip():
        return None  # "": none (a preset's default turned off)
    key = readers.string(f"{where}.ordering_key", given).strip()
    if ";" in key:
        raise ConfigError(
            f"{where}.ordering_key: expected a SQL expression over the row, like "
            f'"payload->>\'order_id\'" or "topic" ("" for none)'
        )
    return Ordering(key, hold_dead=dead == "hold")


ALL_OUTCOMES = frozenset({"done", "retry", "dead"})


class Outcome(StrEnum):
    done = "done"
    retry = "retry"
    dead = "dead"
    release = "release"  # not attempted (shutdown): back to claimable, attempt not counted


@dataclass(frozen=True, slots=True)
class Detail:
    """What one attempt sent and got, for write-backs and attempt logs (bounded already)."""

    method: str
    url: str
    request_headers: Mapping[str, str]
    request_body: str | None
    response_headers: Mapping[str, str] | None
    response_body: str | None
    response_json: str | None  # JSON text, or None if the answer was not JSON
    started_at: datetime
    finished_at: datetime
    ms: float
    worker: str


@dataclass(frozen=True, slots=True)
class Settlement:
    key: Any
    lease: datetime
    outcome: Outcome
    delay: float = 0.0
    error: str | None = None
    http_status: int | None = None
    attempt: int = 0
    detail: Detail | None = None  # when the kind's write-backs or attempt log need it
    record: Any = None  # a kind's own per-attempt record (Documenso's "WebhookCall")


PRIVATE_HEADERS = request.PRIVATE_HEADERS


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    origin: str  # where the URL came from, for the error of an invalid one
    keep_headers: bool = False  # the response's headers are recorded
    # Request headers never written to an attempt log or a write-back (lower case): credentials,
    # signatures, and whatever fixed header the configuration gives (often an API key).
    private: frozenset[str] = PRIVATE_HEADERS


@dataclass(frozen=True, slots=True)
class Dead:
    """No request can be made for this row: settled dead with the reason."""

    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """This attempt fails before any request (Documenso's job for a deleted "Webhook" throws
    before it calls anything): a failed attempt, retried as the source's retries say, with
    nothing recorded of it."""

    reason: str


@dataclass(frozen=True, slots=True)
class Notify:
    """A source's wake-up trigger."""

    install: sql.Composed
    schema: str
    table: str
    insert_trigger: str
    update_trigger: str
    function: str
    fingerprint: str


# The statements for operators (relay status, retry, dead, the admin API) every kind that keeps
# its rows' state compiles.
OPERATIONS = ("counts", "oldest_due", "retry_dead", "dead")


@dataclass(frozen=True, slots=True)
class Compiled:
    """A source's statements, checked against the database and rendered once.

    Every kind provides claim, rescue, next_due, counts, oldest_due and retry_dead. `settle`
    takes a batch of settlements as JSON; `settle_each`, instead, one statement per row (the
    functions kind: the user's own SQL). `heartbeat` extends the claims of rows in flight;
    `log` records attempts (an attempt log, Documenso's "WebhookCall")."""

    queries: Mapping[str, sqltext.Query]
    notify: Notify | None = None
    # Statements the settle batch's JSON must carry response and request details for.
    needs_detail: bool = False
    # The outcomes whose settlements must carry the attempt's details (Detail): those its
    # write-backs or attempt log read.
    detail_on: frozenset[str] = frozenset()
    settle_each: Mapping[str, sqltext.Query] | None = None  # outcome -> statement
    extra_triggers: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = ()
    # The claim may return fewer rows than asked while more are there (a user's function that
    # claims one job per call): it is run again until it returns none or the batch is full.
    repeat_claim: bool = False
    # The claimed row's field (`url`, or `topic` where the topic picks the URL) whose values
    # the claim's `_skip` versions pass over (claim_versions); None: no such versions.
    skip_by: str | None = None
    ordering_index: OrderingIndex | None = None

    def render(self, conn: psycopg.AsyncConnection[Any]) -> Compiled:
        def each(queries: Mapping[str, sqltext.Query]) -> dict[str, sqltext.Query]:
            return {name: sqltext.rendered(q, conn) for name, q in queries.items()}

        return Compiled(
            queries=each(self.queries),
            notify=self.notify,
            needs_detail=self.needs_detail,
            detail_on=self.detail_on,
            settle_each=None if self.settle_each is None else each(self.settle_each),
            extra_triggers=self.extra_triggers,
            repeat_claim=self.repeat_claim,
            skip_by=self.skip_by,
            ordering_index=self.ordering_index,
        )


class Kind(Protocol):
    """One kind of source. Implementations are module-level objects registered in
    relay.sources.KINDS."""

    name: str
    single: bool  # at most one source of this kind per configuration

    def parse(self, name: str, data: Mapping[str, Any], ctx: ParseContext) -> Source: ...

    async def prepare(
        self, conn: psycopg.AsyncConnection[Any], source: Source, ctx: DbContext
    ) -> Compiled:
        """Check the source against the database (ConfigError naming the key) and compile."""
        ...

    async def install(
        self, conn: psycopg.AsyncConnection[Any], source: Source, ctx: DbContext
    ) -> None:
        """Install what the kind needs besides relay's schema and its wake-up trigger."""
        ...

    def request(self, source: Source, row: Claimed, now: datetime) -> Request | Dead | Failed:
        """The request for a claimed row."""
        ...

    def record(self, source: Source, row: Claimed, request: Request, result: Any) -> Any:
        """The kind's own record of one attempt (written by its `log` statement), or None."""
        ...

    def log_params(self, source: Source, records: list[Settlement]) -> dict[str, Any]:
        """The parameters of the `log` statement for settlements that carry a record."""
        ...

    async def about(self, conn: psycopg.AsyncConnection[Any], source: Source) -> str | None:
        """What `relay check` and `relay status` say of the source besides its rows (the
        Documenso release found), or None."""
        ...


class Plain:
    """What most kinds do for the optional parts of `Kind`: nothing to install besides relay's
    schema and the wake-up trigger, and no attempt records of their own."""

    async def install(
        self, conn: psycopg.AsyncConnection[Any], source: Source, ctx: DbContext
    ) -> None:
        return None

    def record(self, source: Source, row: Claimed, request: Request, result: Any) -> Any:
        return None

    def log_params(self, source: Source, records: list[Settlement]) -> dict[str, Any]:
        raise AssertionError(f"kind {source.kind_name} records no attempts of its own")

    async def about(self, conn: psycopg.AsyncConnection[Any], source: Source) -> str | None:
        return None


# -- pieces several kinds share ------------------------------------------------------------------

_NOTIFY_SQL = (sqltext.sql_dir() / "triggers" / "notify.sql").read_text()

# A row that falls due this soon by the database's clock wakes relay all the same: the writer's
# clock may be ahead of the database's (an application server's "now" 20 ms ahead kept
# Documenso's jobs waiting for the sweep), or its time rounded up (a timestamp(3) column). The
# claim pass it wakes finds the row not due yet and sets its timer for it.
WAKE_AHEAD = sql.SQL("interval '5 seconds'")


def notify_trigger(
    source: str,
    table: Table,
    ready: sql.Composable,
    channel: str,
    made_from: tuple[object, ...],
    inserted: sql.Composable | None = None,
) -> Notify:
    """The statement-level trigger that sends `NOTIFY channel, 'source'` when a write left a
    row claimable (`ready`, over the transition table's rows as `t`; for an INSERT, `inserted`
    if given)."""
    insert_trigger = f"relay_notify_{source}_insert"
    update_trigger = f"relay_notify_{source}_update"
    # What it was made from, the wake-up condition included (its repr names every identifier
    # and literal in it).
    fingerprint = sqltext.fingerprint(
        _NOTIFY_SQL, source, table.schema, table.name, repr(ready), repr(inserted), *made_from
    )
    function = f"notify_{source}"
    install = sql.SQL(_NOTIFY_SQL).format(
        fingerprint=sql.Literal(fingerprint),
        function=sql.Identifier("relay", function),
        table=table.ident,
        ready=ready,
        inserted=ready if inserted is None else inserted,
        channel=sql.Literal(channel),
        source=sql.Literal(source),
        insert_trigger=sql.Identifier(insert_trigger),
        update_trigger=sql.Identifier(update_trigger),
    )
    return Notify(
        install, table.schema, table.name, insert_trigger, update_trigger, function, fingerprint
    )


def claim_versions(
    fill: Callable[[dict[str, sql.Composable]], sql.Composed],
    alias: str,
    key: str,
    key_type: sql.Composable,
    skip_value: sql.Composable | None,
) -> dict[str, sql.Composed]:
    """A key-ordered claim (its text filled in by `fill`, given `{after}` and `{skip}`) in
    the versions relay.claimer picks from (Store.claim):

    - `_after`: only rows whose key comes after the claim pass's cursor (an index condition
      on the claim's key order);
    - `_skip`: not the rows whose `skip_value` (the row's URL, or the topic that picks it, an
      expression over `alias`) has its MD5 digest in %(skip)s: those of endpoints that could
      not take them now (the deliverer's `skips`; digests, so that no URL's credentials reach
      PostgreSQL's log as a parameter). None: the kind's claim cannot tell a row's
      endpoint."""
    after = sql.SQL(" AND {}.{} > %(after)s::{}").format(
        sql.SQL(alias), sql.Identifier(key), key_type
    )
    none = sql.SQL("")
    versions = {"claim": none, "claim_after": after}
    if skip_value is not None:
        skip = sql.SQL(" AND NOT COALESCE(md5({}) = ANY(%(skip)s::text[]), false)").format(
            skip_value
        )
        versions |= {"claim_skip": none, "claim_after_skip": after}
    return {
        name: fill({"after": cursor, "skip": skip if name.endswith("_skip") else none})
        for name, cursor in versions.items()
    }


def bounded_values(max_payload_bytes: int) -> sql.Composable:
    """The claim's url, secret, topic, payload and values, each bounded (see sqltext.bounded)."""
    return sqltext.bounded({**FIELD_LIMITS, "payload": max_payload_bytes, "values": 65536})


def json_default(value: Any) -> Any:
    """Keys orjson does not write itself, in PostgreSQL's text input form."""
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()  # bytea hex format
    return str(value)  # Decimal (numeric), and whatever else prints as its own input


def dumps(value: Any) -> str:
    return orjson.dumps(value, default=json_default).decode()


def column_type(columns: Mapping[str, Column], name: str) -> sql.SQL:
    return columns[name].sql_type


# -- request shaping for the kinds whose rows are shaped by relay.request ------------------------


def shaped(
    shape: request.Shape,
    source: Source,
    row: Claimed,
    now: datetime,
    keyring: secretbox.Keyring | None,
    keep_headers: bool,
) -> Request | Dead:
    """The request relay.request builds from a claimed row's values: its url, route, body and
    secret come in the claim's own columns, the rest in its JSON `values`. A secret column
    encrypted at rest (secret_encryption) is decrypted here, for this request only."""
    secret = row.secret
    if keyring is not None and secret:
        try:
            secret = secretbox.decrypt(keyring, secret)
        except secretbox.SecretError as exc:
            return Dead(f"cannot decrypt the secret in column {shape.secret_column!r}: {exc}")
    values: dict[str, Any] = orjson.loads(row.values) if row.values else {}
    values[request.URL] = row.url
    values[request.ROUTE] = row.topic
    values[request.BODY] = row.payload
    values[request.SECRET] = secret
    built = request.build(
        shape,
        source=source.name,
        key=str(row.key),
        attempt=row.attempt,
        values=values,
        now=int(now.timestamp()),
    )
    if isinstance(built, request.Refused):
        return Dead(built.reason)
    return Request(
        built.method,
        built.url,
        built.headers,
        built.body,
        shape.origin,
        keep_headers,
        shape.private,
    )


def keyring(where: str, data: Mapping[str, Any], ctx: ParseContext) -> secretbox.Keyring | None:
    """A source's `secret_encryption` keys, for a secret column stored encrypted."""
    if "secret_encryption" not in data:
        return None
    if "secret_column" not in data:
        raise ConfigError(
            f"{where}.secret_encryption: decrypts the secret in each row, so set "
            f"{where}.secret_column (the column that holds it) too"
        )
    return secretbox.parse(f"{where}.secret_encryption", data["secret_encryption"], ctx.env)


def fixed_targets(shape: request.Shape) -> dict[str, str]:
    targets = {f"{shape.where}.url": shape.url} if shape.url is not None else {}
    if shape.route is not None:
        for value, url in shape.route.targets.items():
            targets[f"{shape.where}.route.targets.{value!r}"] = url
    return targets


def shape_columns(shape: request.Shape) -> dict[str, str]:
    """The row's columns the request reads, by the key that names each."""
    out: dict[str, str] = {}
    if shape.url_column is not None:
        out["url_column"] = shape.url_column
    if shape.route is not None:
        out["route.column"] = shape.route.column
    if shape.payload is not None:
        out["payload"] = shape.payload
    if shape.secret_column is not None:
        out["secret_column"] = shape.secret_column
    for name, column in shape.header_columns.items():
        out[f"header_columns.{name}"] = column
    return out


def shape_expressions(shape: request.Shape) -> dict[str, str]:
    """The SQL expressions the claim evaluates, by the key that names each."""
    out: dict[str, str] = {}
    if shape.payload_sql is not None:
        out["payload_sql"] = shape.payload_sql
    for name, expression in shape.header_sql.items():
        out[f"header_sql.{name}"] = expression
    return out


def value_text(value: request.Value | None) -> sql.Composable:
    """A value the request needs, as text, over the row `t` (a column, a SQL expression of the
    user's, or the whole row as JSON)."""
    if value is None:
        return sql.SQL("NULL::text")
    if value.kind is request.ValueKind.column:
        return sql.SQL("t.{}::text").format(sql.Identifier(value.text))
    if value.kind is request.ValueKind.sql:
        return sql.SQL("((") + sqltext.Catalog(value.text) + sql.SQL("))::text")
    return sql.SQL("to_jsonb(t)::text")


def claim_values(shape: request.Shape) -> dict[str, sql.Composable]:
    """The claim's url, secret, topic (the route's value), payload (the body) and values (the
    other values as one JSON object of text, NULL if none), over the row `t`."""
    fetched = shape.values()
    others = {
        name: value
        for name, value in fetched.items()
        if name not in (request.URL, request.ROUTE, request.SECRET, request.BODY)
    }
    values: sql.Composable = sql.SQL("NULL::text")
    if others:
        pairs = sql.SQL(", ").join(
            sql.SQL("{}, {}").format(sql.Literal(name), value_text(value))
            for name, value in others.items()
        )
        values = sql.SQL("json_build_object({})::text").format(pairs)
    return {
        "url": value_text(fetched.get(request.URL)),
        "secret": value_text(fetched.get(request.SECRET)),
        "topic": value_text(fetched.get(request.ROUTE)),
        "payload": value_text(fetched.get(request.BODY)),
        "values": values,
    }
