"""kind = "functions": the user's own SQL claims and settles (a job system that already has
`claim_next_job(worker, ...)`, `complete_job(id, worker, result)`, `update_job_heartbeat(id,
worker)`). relay runs the claim statement until it returns no row or the batch is full, shapes a
request from the columns it returned, and calls the complete, fail and heartbeat statements with
named parameters (:key, :worker, :response_json, :error_json, ...). Whether a failed job is
retried is the fail statement's choice; :final says whether relay's retry policy would stop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from relay import readers, request, retry, secretbox
from relay.db import catalog, sqltext
from relay.readers import ConfigError
from relay.sources.base import (
    ALL_OUTCOMES,
    Claimed,
    Compiled,
    DbContext,
    Dead,
    Failed,
    ParseContext,
    Plain,
    Request,
    Source,
    bounded_values,
    claim_values,
    fixed_targets,
    keyring,
    notify_trigger,
    shaped,
)

CLAIM_PARAMS = frozenset({"worker", "limit"})
SETTLE_PARAMS = frozenset(
    {
        "key",
        "worker",
        "attempt",
        "status",
        "response_json",
        "response_body",
        "response_headers",
        "error",
        "error_json",
        "final",
        "retry_in",
        "outcome",
    }
)
HEARTBEAT_PARAMS = frozenset({"key", "worker"})
STATEMENTS = ("claim", "complete", "fail", "heartbeat", "release", "rescue", "retry_dead")
KEYS = (
    frozenset(
        {
            "kind",
            "key",
            "attempt_column",
            "attempt_sql",
            "max_attempts",
            "max_attempts_column",
            "wake",
            "wake_when",
            "retry_policy",
            "secret_encryption",
            *STATEMENTS,
        }
    )
    | request.KEYS
)


@dataclass(frozen=True, slots=True)
class FunctionsSpec:
    claim: str  # with %(worker)s / %(limit)s
    complete: str
    fail: str
    key: str
    max_attempts: int
    heartbeat: str | None = None
    release: str | None = None
    rescue: str | None = None
    retry_dead: str | None = None
    attempt_column: str | None = None
    attempt_sql: str | None = None  # e.g. "retry_count + 1", over the claim's columns
    max_attempts_column: str | None = None
    wake: tuple[str, str] | None = None
    wake_when: str | None = None
    shape: request.Shape = field(default=None)  # type: ignore[assignment]
    keyring: secretbox.Keyring | None = None


def _statement(where: str, data: Mapping[str, Any], key: str, allowed: frozenset[str]) -> str:
    """A user's statement with its `:name` parameters as psycopg's; one that takes no
    parameters (rescue, retry_dead) runs without any, so its `%` stays as written."""
    text = readers.string(f"{where}.{key}", data[key]).strip().rstrip(";").strip()
    if not allowed:
        return text
    try:
        converted, _ = sqltext.named_params(text, allowed)
    except ValueError as exc:
        raise ConfigError(f"{where}.{key}: {exc}") from None
    return converted


class Functions(Plain):
    name = "functions"
    single = False

    def parse(self, name: str, data: Mapping[str, Any], ctx: ParseContext) -> Source:
        where = f"sources.{name}"
        readers.unknown(where, data, set(KEYS))
        for required in ("claim", "complete", "fail", "key"):
            if required not in data:
                raise ConfigError(
                    f"{where}.{required}: required for a functions source (see README, "
                    f'"kind = functions")'
                )

        def optional(key: str, allowed: frozenset[str]) -> str | None:
            return _statement(where, data, key, allowed) if key in data else None

        wake = None
        if "wake" in data:
            wake = readers.table_name(f"{where}.wake", data["wake"])
        elif "wake_when" in data:
            raise ConfigError(f"{where}.wake_when: set {where}.wake (the table to watch) too")
        policy = ctx.retry
        if "retry_policy" in data:
            policy = retry.parse(f"{where}.retry_policy", data["retry_policy"], policy)
        spec = FunctionsSpec(
            claim=_statement(where, data, "claim", CLAIM_PARAMS),
            complete=_statement(where, data, "complete", SETTLE_PARAMS),
            fail=_statement(where, data, "fail", SETTLE_PARAMS),
            heartbeat=optional("heartbeat", HEARTBEAT_PARAMS),
            release=optional("release", SETTLE_PARAMS),
            rescue=optional("rescue", frozenset()),
            retry_dead=optional("retry_dead", frozenset()),
            key=readers.ident(f"{where}.key", data["key"]),
            max_attempts=readers.integer(
                f"{where}.max_attempts",
                data.get(
                    "max_attempts", policy.limit(None) if policy.max_attempts else ctx.max_attempts
                ),
            ),
            attempt_column=readers.opt_ident(f"{where}.attempt_column", data.get("attempt_column")),
            attempt_sql=None
            if data.get("attempt_sql") is None
            else readers.string(f"{where}.attempt_sql", data["attempt_sql"]),
            max_attempts_column=readers.opt_ident(
                f"{where}.max_attempts_column", data.get("max_attempts_column")
            ),
            wake=wake,
            wake_when=None
            if data.get("wake_when") is None
            else readers.string(f"{where}.wake_when", data["wake_when"]),
            shape=request.parse(where, data, ctx.env),
            keyring=keyring(where, data, ctx),
        )
        return Source(
            name=name,
            kind=self,
            spec=spec,
            retry=policy,
            heartbeat=spec.heartbeat is not None,
            targets=fixed_targets(spec.shape),
            # A row handed back waits only if the release statement schedules it.
            defers=spec.release is not None and "%(retry_in)s" in spec.release,
        )

    async def prepare(
        self, conn: psycopg.AsyncConnection[Any], source: Source, ctx: DbContext
    ) -> Compiled:
        spec: FunctionsSpec = source.spec
        where = f"sources.{source.name}"
        claim = _claim(spec, ctx)
        # PostgreSQL plans each statement now (EXPLAIN runs nothing, so a claim function is
        # not called): one that does not fit stops start-up naming its key.
        probe = {
            "worker": "relay-check",
            "limit": 1,
            "key": None,
            "attempt": 1,
            "status": 200,
            "response_json": None,
            "response_body": None,
            "response_headers": None,
            "error": None,
            "error_json": None,
            "final": False,
            "retry_in": 0.0,
            "outcome": "done",
        }
        for key in STATEMENTS:
            text = claim if key == "claim" else getattr(spec, key)
            if text is None:
                continue
            statement = text if isinstance(text, sql.Composed) else sql.SQL(text)
            try:
                async with conn.transaction(force_rollback=True):
                    # rescue and retry_dead take no parameters (their `%` is as written).
                    params = None if key in ("rescue", "retry_dead") else probe
                    await conn.execute(sql.SQL("EXPLAIN ") + statement, params)
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:
                raise ConfigError(
                    f"{where}.{key}: PostgreSQL does not accept it: {exc.diag.message_primary}"
                ) from None
        queries: dict[str, sqltext.Query] = {
            "claim": claim,
            "rescue": sql.SQL(spec.rescue or "SELECT 1 WHERE FALSE"),
            "next_due": sql.SQL("SELECT NULL::float8"),
            "counts": sql.SQL("SELECT NULL::text, 0::bigint WHERE FALSE"),
            "oldest_due": sql.SQL("SELECT NULL::float8"),
            "retry_dead": sql.SQL(spec.retry_dead or "SELECT 1 WHERE FALSE"),
        }
        if spec.heartbeat is not None:
            queries["heartbeat"] = sql.SQL(spec.heartbeat)
        each: dict[str, sqltext.Query] = {
            "done": sql.SQL(spec.complete),
            "retry": sql.SQL(spec.fail),
            "dead": sql.SQL(spec.fail),
        }
        if spec.release is not None:
            each["release"] = sql.SQL(spec.release)
        notify = None
        if spec.wake is not None:
            table = catalog.Table(f"{where}.wake", *spec.wake)
            if not await catalog.columns(conn, table):
                raise ConfigError(
                    f"{where}.wake: table {table.qualified} does not exist; name the table whose "
                    f"writes make work for this source"
                )
            when: sql.Composable = sql.SQL("TRUE")
            if spec.wake_when is not None:
                when = sql.SQL("(") + sqltext.Catalog(spec.wake_when) + sql.SQL(")")
                await catalog.check_statement(
                    conn,
                    f"{where}.wake_when",
                    sql.SQL("SELECT 1 FROM {} AS t WHERE {}").format(table.ident, when),
                    "not a boolean SQL expression over the table's columns",
                )
            notify = notify_trigger(
                source.name, table, when, ctx.channel, ("functions", spec.wake_when, ctx.channel)
            )
        return Compiled(
            queries=queries,
            notify=notify,
            needs_detail=True,
            detail_on=ALL_OUTCOMES,
            settle_each=each,
            repeat_claim=True,
        )

    def request(self, source: Source, row: Claimed, now: datetime) -> Request | Dead | Failed:
        spec: FunctionsSpec = source.spec
        return shaped(spec.shape, source, row, now, spec.keyring, keep_headers=True)


def _claim(spec: FunctionsSpec, ctx: DbContext) -> sql.Composed:
    """The user's claim, read through the columns relay needs. It may be any statement that
    returns rows (a SELECT of a function, an UPDATE ... RETURNING), so it runs in a WITH."""
    ident = sql.Identifier
    fetched = claim_values(spec.shape)
    attempt: sql.Composable = sql.SQL("1")
    if spec.attempt_column:
        attempt = sql.SQL("COALESCE(t.{}::int, 1)").format(ident(spec.attempt_column))
    elif spec.attempt_sql:
        attempt = sql.SQL("COALESCE((") + sqltext.Catalog(spec.attempt_sql) + sql.SQL(")::int, 1)")
    max_attempts: sql.Composable = sql.Literal(spec.max_attempts)
    if spec.max_attempts_column:
        max_attempts = sql.SQL("COALESCE(t.{}::int, {})").format(
            ident(spec.max_attempts_column), sql.Literal(spec.max_attempts)
        )
    return (
        sql.SQL("WITH claimed AS (\n")
        + sql.SQL(spec.claim)  # its parameters converted and its `%` doubled already
        + sql.SQL(
            "\n), c AS (SELECT t.{key} AS key, now() AS lease, {attempt} AS attempt, "
            "{max} AS max_attempts, {url} AS url, {secret} AS secret, {topic} AS topic, "
            "{payload} AS payload, {values} AS values FROM claimed AS t) "
            "SELECT c.key, c.lease, c.attempt, c.max_attempts, {bounded} FROM c"
        ).format(
            key=ident(spec.key),
            attempt=attempt,
            max=max_attempts,
            bounded=bounded_values(ctx.max_payload_bytes),
            **fetched,
        )
    )


KIND = Functions()
