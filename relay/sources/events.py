"""relay's own event tables (relay.outbox, relay.documenso_events): the same shape, claimed in
place because relay owns every column there. Shared by the outbox and the Documenso document
kinds; `sql/queries/events.sql` holds the statements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from relay import readers
from relay.db import catalog, sqltext
from relay.readers import ConfigError
from relay.sources.base import (
    OPERATIONS,
    WAKE_AHEAD,
    Compiled,
    DbContext,
    Ordering,
    OrderingIndex,
    Source,
    bounded_values,
    claim_versions,
    notify_trigger,
)

QUERIES = sqltext.load_queries(sqltext.sql_dir() / "queries" / "events.sql")
QUERY_NAMES = ("settle", "rescue", "next_due", *OPERATIONS)  # and the claim's versions

COMMON_KEYS = frozenset(
    {"kind", "url", "secret", "headers", "max_attempts", "ordering_key", "ordering_dead"}
)


@dataclass(frozen=True, slots=True)
class EventSpec:
    table: tuple[str, str]
    max_attempts: int
    # topic -> URL: exact topic first, then the longest `prefix.*` pattern, then `*`.
    topics: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    signing_secrets: tuple[str, ...] = field(default=(), repr=False)
    keys: tuple[bytes, ...] = field(default=(), repr=False)  # the secrets decoded, once
    secret: str | None = field(default=None, repr=False)  # sent as it is (Documenso)
    app_schema: str = "public"
    # Documenso: to the "Webhook" rows each event names (webhooks = true), or to the URL with
    # only these events.
    webhooks: bool = False
    events: tuple[str, ...] = ()
    ordering: Ordering | None = None

    def target_for_topic(self, topic: str) -> str | None:
        if topic in self.topics:
            return self.topics[topic]
        best: tuple[int, str] | None = None
        for pattern, url in self.topics.items():
            matches = pattern.endswith("*") and topic.startswith(pattern[:-1])
            if matches and (best is None or len(pattern) > best[0]):
                best = (len(pattern), url)
        return best[1] if best else None


def max_attempts(where: str, data: Mapping[str, Any], default: int) -> int:
    return readers.integer(f"{where}.max_attempts", data.get("max_attempts", default))


def table(source: Source) -> catalog.Table:
    spec: EventSpec = source.spec
    where = f"sources.{source.name} (relay's table {'.'.join(spec.table)})"
    return catalog.Table(where, *spec.table)


# The claim's URL and secret: none, the source's own (or, for Documenso's webhooks, the
# "Webhook" row the event names: documenso_documents passes its lookup).
NO_URL = sql.SQL("NULL::text AS url, NULL::text AS secret")


async def prepare(
    conn: psycopg.AsyncConnection[Any],
    source: Source,
    ctx: DbContext,
    url_secret: sql.Composable = NO_URL,
    skip_url: sql.Composable | None = None,
) -> Compiled:
    """`url_secret`: the claim's url and secret (over the claimed row `t`); `skip_url`: the
    same URL over a candidate row `c`, for the claim's `_skip` versions (claim_versions)."""
    spec: EventSpec = source.spec
    events = table(source)
    columns = await catalog.columns(conn, events)
    if not columns:
        raise ConfigError(
            f"sources.{source.name}: relay's table {events.qualified} does not exist; "
            f"run `relay install` first"
        )
    written = ["status", "attempts", "due_at", "last_error", "last_status", "delivered_at"]
    await catalog.check_privileges(
        conn,
        f"sources.{source.name}",
        [catalog.Need(spec.table[0], spec.table[1], list(columns), written)],
    )
    names: dict[str, sql.Composable] = {
        "table": events.ident,
        "key": sql.Identifier("id"),
        "status": sql.Identifier("status"),
        "due": sql.Identifier("due_at"),
        "attempts": sql.Identifier("attempts"),
        "now": sql.SQL("now()"),
        "pending": sql.Literal("pending"),
        "processing": sql.Literal("processing"),
        "retry": sql.Literal("pending"),
        "release": sql.Literal("pending"),
        "done": sql.Literal("delivered"),
        "dead": sql.Literal("dead"),
        "status_type": sql.SQL("text"),
        "key_type": sql.SQL("bigint"),
        "due_type": sql.SQL("timestamptz"),
        "returning_named": sql.SQL(
            "t.id AS key, t.due_at AS lease, t.attempts::int AS attempt, "
            "COALESCE(t.max_attempts, {})::int AS max_attempts, {}, "
            "t.topic::text AS topic, t.payload::text AS payload, NULL::text AS values, "
            "EXTRACT(EPOCH FROM t.created_at)::float8 AS since"
        ).format(sql.Literal(spec.max_attempts), url_secret),
        "bounded": bounded_values(ctx.max_payload_bytes),
        "extra_sets": sql.SQL(
            ", last_error = CASE s.outcome WHEN 'done' THEN NULL WHEN 'release' THEN t.last_error "
            "ELSE s.error END, "
            "last_status = CASE s.outcome WHEN 'release' THEN t.last_status "
            "ELSE s.http_status END, "
            "delivered_at = CASE s.outcome WHEN 'done' THEN now() ELSE t.delivered_at END"
        ),
    }
    names |= await _ordering_names(conn, source, events)
    notify = notify_trigger(
        source.name,
        events,
        sql.SQL("t.status = 'pending' AND (t.due_at IS NULL OR t.due_at <= now() + {})").format(
            WAKE_AHEAD
        ),
        ctx.channel,
        ("events", ctx.channel),
    )
    queries = {name: sqltext.fill(QUERIES[name], names) for name in QUERY_NAMES}
    # Rows routed by topic (their URL picked in relay) are passed over by topic while their
    # endpoint cannot take them; those whose URL the claim reads, by `skip_url`.
    skip: tuple[sql.Composable, str] | None = (sql.SQL("c.topic::text"), "topic")
    if url_secret is not NO_URL:
        skip = None if skip_url is None else (skip_url, "url")
    queries |= claim_versions(
        lambda parts: sqltext.fill(QUERIES["claim"], names | parts),
        "c",
        "id",
        names["key_type"],
        None if skip is None else skip[0],
    )
    index = None
    if spec.ordering is not None:
        name, statement = _ordering_index(spec)
        index = OrderingIndex(spec.table[0], name, statement.as_string(conn))
    return Compiled(
        queries=queries,
        notify=notify,
        skip_by=None if skip is None else skip[1],
        ordering_index=index,
    )


# Statuses of a row that holds back the later rows of its key (with ordering_dead = "hold",
# dead too).
UNFINISHED = ("pending", "processing")


async def _ordering_names(
    conn: psycopg.AsyncConnection[Any], source: Source, events: catalog.Table
) -> dict[str, sql.Composable]:
    """The claim's parts for ordering_key (none without; see Ordering.claim_parts), once the
    expression is checked."""
    spec: EventSpec = source.spec
    if spec.ordering is None:
        return {"ordering_from": sql.SQL(""), "head": sql.SQL("")}
    expr = spec.ordering.expr()
    await catalog.check_statement(
        conn,
        f"sources.{source.name}.ordering_key",
        sql.SQL("SELECT {} FROM {}").format(expr, events.ident),
        f"not a SQL expression over {events.qualified}'s columns (e.g. \"payload->>'order_id'\")",
    )
    return spec.ordering.claim_parts(
        *spec.table, "id", "status", spec.ordering.unfinished(UNFINISHED, "dead"), "c"
    )


def _ordering_index(spec: EventSpec) -> tuple[str, sql.Composed]:
    assert spec.ordering is not None
    return spec.ordering.index(*spec.table, "id", "status", (*UNFINISHED, "dead"))


async def install_ordering(conn: psycopg.AsyncConnection[Any], source: Source) -> None:
    """The index the claim's ordering condition looks earlier rows up by (Ordering.index)."""
    spec: EventSpec = source.spec
    if spec.ordering is not None:
        await conn.execute(_ordering_index(spec)[1])
