"""kind = "documenso_jobs": Documenso's "BackgroundJob" table, claimed and settled exactly as
Documenso's local job runner does, so relay and that runner never both run one job. Webhook jobs
go to the Webhook they name in Documenso's shape, with a "WebhookCall" row per attempt; other
jobs are forwarded to the URL configured for their jobId."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql

from relay import logs, readers
from relay.db import catalog, sqltext
from relay.readers import ConfigError
from relay.sources import documenso_release
from relay.sources.base import (
    OPERATIONS,
    PRIVATE_HEADERS,
    WAKE_AHEAD,
    Claimed,
    Compiled,
    DbContext,
    Dead,
    Failed,
    ParseContext,
    Plain,
    Request,
    Settlement,
    Source,
    bounded_values,
    notify_trigger,
)
from relay.sources.documenso_documents import SECRET_HEADER, documenso_body

log = logs.get("relay.sources.documenso_jobs")

EXECUTE_WEBHOOK = "internal.execute-webhook"
KEYS = frozenset(
    {
        "kind",
        "schema",
        "webhooks",
        "forward",
        "pending_after",
        "stuck_after",
        "headers",
        "fixed_credentials_for_row_urls",
    }
)
QUERIES = sqltext.load_queries(sqltext.sql_dir() / "queries" / "documenso_jobs.sql")
QUERY_NAMES = ("claim", "settle", "rescue", "next_due", *OPERATIONS)
MIN_STUCK_AFTER = 1.0
# Documenso's timestamp(3) columns hold UTC.
_NOW = sqltext.now("timestamp(3) without time zone")


_PRIVATE = PRIVATE_HEADERS | {SECRET_HEADER.lower()}


@dataclass(frozen=True, slots=True)
class JobsSpec:
    schema: str
    job_ids: tuple[str, ...]
    forward: Mapping[str, str]
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    pending_after: float = 0.0
    stuck_after: float = 300.0


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


def _json_text(body: bytes) -> str:
    """A response body as Documenso stores it: parsed JSON, or the raw text as a JSON string.

    PostgreSQL's jsonb refuses the NUL character (`\\u0000`); a body that has one is stored as
    its raw text without NULs instead, so one odd response cannot fail the settle it rides in."""
    try:
        text = orjson.dumps(orjson.loads(body)).decode()
        if "\\u0000" not in text:
            return text
    except orjson.JSONDecodeError:
        pass
    return orjson.dumps(body.decode("utf-8", "replace").replace("\x00", "")).decode()


class DocumensoJobs(Plain):
    name = "documenso_jobs"
    single = True

    def parse(self, name: str, data: Mapping[str, Any], ctx: ParseContext) -> Source:
        where = f"sources.{name}"
        readers.unknown(where, data, set(KEYS))
        webhooks = readers.boolean(f"{where}.webhooks", data.get("webhooks", True))
        if webhooks:
            readers.fixed_credentials(
                where,
                data,
                ("headers",),
                "with webhooks = true, jobs go to the URL each Webhook row names",
            )
        forward_raw = data.get("forward", {})
        if not isinstance(forward_raw, dict):
            raise ConfigError(f"{where}.forward: expected a table of jobId = URL")
        forward = {j: readers.http_url(f"{where}.forward.{j!r}", u) for j, u in forward_raw.items()}
        if EXECUTE_WEBHOOK in forward:
            raise ConfigError(
                f"{where}.forward: {EXECUTE_WEBHOOK!r} jobs go to the Webhook they name; "
                f"use webhooks = true instead of forwarding them"
            )
        job_ids = ((EXECUTE_WEBHOOK,) if webhooks else ()) + tuple(sorted(forward))
        if not job_ids:
            raise ConfigError(
                f"{where}: nothing to run: set webhooks = true or list jobs under [{where}.forward]"
            )
        stuck_after = readers.duration(
            f"{where}.stuck_after", data.get("stuck_after", 300), minimum=MIN_STUCK_AFTER
        )
        spec = JobsSpec(
            schema=readers.ident(f"{where}.schema", data.get("schema", "public")),
            job_ids=job_ids,
            forward=forward,
            headers=readers.headers(f"{where}.headers", data.get("headers", {})),
            pending_after=readers.duration(f"{where}.pending_after", data.get("pending_after", 0)),
            stuck_after=stuck_after,
        )
        return Source(
            name=name,
            kind=self,
            spec=spec,
            retry=ctx.retry,
            # Documenso's own rule for a stuck job is the claim's lifetime.
            lifetime=stuck_after,
            targets={f"{where}.forward.{j!r}": u for j, u in forward.items()},
            # "BackgroundJob" has no due column: a job handed back is PENDING at once.
            defers=False,
        )

    async def prepare(
        self, conn: psycopg.AsyncConnection[Any], source: Source, ctx: DbContext
    ) -> Compiled:
        spec: JobsSpec = source.spec
        where = f"sources.{source.name}"
        jobs = catalog.Table(where, spec.schema, "BackgroundJob")
        columns = await catalog.columns(conn, jobs)
        if not columns:
            raise ConfigError(
                f'{where}: no Documenso "BackgroundJob" table in schema {spec.schema!r}: '
                f"Documenso keeps jobs in the database from v1.6 on. Is database.url "
                f"Documenso's database (set {where}.schema if its tables live elsewhere)?"
            )
        webhooks = EXECUTE_WEBHOOK in spec.job_ids
        if webhooks:
            for name in ("Webhook", "WebhookCall"):
                if not await catalog.table_exists(conn, spec.schema, name):
                    raise ConfigError(
                        f'{where}.webhooks: Documenso\'s "{name}" table is missing from schema '
                        f"{spec.schema!r} (webhooks arrived in Documenso v1.5); set "
                        f"webhooks = false to run only forwarded jobs"
                    )
        read = ["id", "status", "retried", "maxRetries", "jobId", "submittedAt"]
        read += ["lastRetriedAt", "completedAt", "updatedAt", "payload"]
        catalog.check_mapped(jobs, columns, {c: c for c in read})
        status = columns["status"]
        await catalog.check_status_values(
            conn,
            jobs,
            status,
            [
                ("pending", "PENDING"),
                ("processing", "PROCESSING"),
                ("done", "COMPLETED"),
                ("dead", "FAILED"),
            ],
        )
        needs = [
            catalog.Need(
                spec.schema,
                "BackgroundJob",
                read,
                ["status", "retried", "lastRetriedAt", "completedAt", "updatedAt"],
            )
        ]
        if webhooks:
            needs.append(
                catalog.Need(spec.schema, "Webhook", ["id", "webhookUrl", "secret", "enabled"])
            )
            needs.append(catalog.Need(spec.schema, "WebhookCall", table_privileges=["INSERT"]))
        await catalog.check_privileges(conn, where, needs)
        policy = source.retry
        backoff = sql.SQL(
            "make_interval(secs => LEAST({max}, "
            '{base} * power({factor}, GREATEST(c."retried" - 1, 0))))'
        ).format(
            max=sql.Literal(float(policy.max_delay)),
            base=sql.Literal(float(policy.base)),
            factor=sql.Literal(float(policy.factor)),
        )
        # Attempts per job as the detected Documenso makes them: maxRetries + 1 (v2.2.7 on);
        # a webhook job's 3 runs of io.runTask up to v2.0.x. v2.1.0 to v2.2.6 retried a failing
        # webhook forever (Documenso's bug #2295); relay gives those v2.2.7's count.
        newest = await documenso_release.newest_migration(conn, spec.schema)
        max_attempts = sql.SQL('"maxRetries" + 1')
        if newest is not None and newest <= documenso_release.LAST_RUN_TASK:
            max_attempts = sql.SQL(
                """CASE WHEN "jobId" = 'internal.execute-webhook' THEN 3 """
                """ELSE "maxRetries" + 1 END"""
            )
        names: dict[str, sql.Composable] = {
            "max_attempts": max_attempts,
            "table": jobs.ident,
            "webhook": sql.Identifier(spec.schema, "Webhook"),
            "bounded": bounded_values(ctx.max_payload_bytes),
            "call": sql.Identifier(spec.schema, "WebhookCall"),
            "now": _NOW,
            "job_ids": sql.SQL("ARRAY[{}]::text[]").format(sqltext.literal_list(spec.job_ids)),
            "pending_after": sqltext.seconds(spec.pending_after),
            "stuck_after": sqltext.seconds(spec.stuck_after),
            "backoff_c": backoff,
            "status_type": status.sql_type,
            "call_status_type": sql.Identifier(spec.schema, "WebhookCallStatus"),
            "event_type": sql.Identifier(spec.schema, "WebhookTriggerEvents"),
        }
        queries = {name: sqltext.fill(QUERIES[name], names) for name in QUERY_NAMES}
        queries["log"] = sqltext.fill(QUERIES["record_calls"], names)
        notify = notify_trigger(
            source.name,
            jobs,
            sql.SQL(
                't."status" = \'PENDING\' AND (t."updatedAt" IS NULL OR t."updatedAt" <= {} + {})'
            ).format(_NOW, WAKE_AHEAD),
            ctx.channel,
            ("documenso_jobs", ctx.channel),
        )
        return Compiled(queries=queries, notify=notify)

    def request(self, source: Source, row: Claimed, now: datetime) -> Request | Dead | Failed:
        spec: JobsSpec = source.spec
        try:
            job = orjson.loads(row.payload or "null")
        except orjson.JSONDecodeError as exc:
            return Dead(f'job "payload" is not JSON: {exc}')
        headers = {
            "Content-Type": "application/json",
            # relay's stable id, the same on every attempt, as on every source.
            "webhook-id": f"{source.name}_{row.key}",
            "relay-attempt": str(row.attempt),
            **spec.headers,
        }
        if row.topic != EXECUTE_WEBHOOK:
            url = spec.forward.get(row.topic or "")
            if url is None:
                return Dead(f"no target for job {row.topic!r}")
            headers["X-Job-Id"] = str(row.key)
            if row.attempt > 1:
                headers["X-Job-Retry"] = "1"
            body = orjson.dumps({"name": row.topic, "payload": job})
            return Request("POST", url, headers, body, f" for job {row.topic!r}", private=_PRIVATE)
        if not isinstance(job, dict) or "event" not in job or "webhookId" not in job:
            return Dead('webhook job "payload" lacks "event" or "webhookId"')
        if row.url is None:
            # Documenso's handler looks the Webhook up with findUniqueOrThrow: the job fails
            # (and is retried, then FAILED) without a call or a "WebhookCall" row.
            return Failed(f'no "Webhook" {job["webhookId"]} (deleted?)')
        event = str(job["event"])
        body = documenso_body(event, orjson.dumps(job.get("data")), row.url, now)
        headers[SECRET_HEADER] = row.secret or ""
        return Request(
            "POST",
            row.url,
            headers,
            body,
            f' in "Webhook" {job["webhookId"]}',
            keep_headers=True,
            private=_PRIVATE,
        )

    def record(self, source: Source, row: Claimed, request: Request, result: Any) -> Any:
        """Documenso's "WebhookCall" for a webhook job's attempt."""
        if row.topic != EXECUTE_WEBHOOK:
            return None
        job = orjson.loads(row.payload or "null")
        headers = result.headers
        if result.http_status is None:
            # No answer (refused by relay's guard, or none came): as Documenso (v2.8.1 on)
            # records one, code 0, the error as the body and no headers.
            stored: str | None = orjson.dumps(result.error or "failed").decode()
            headers = {}
        elif not 300 <= result.http_status < 400:
            stored = _json_text(result.body)
        else:
            stored = None  # a redirect: nothing of it is kept
        return WebhookCall(
            status="SUCCESS" if result.ok else "FAILED",
            url=request.url,
            request=request.body.decode(),
            code=result.http_status or 0,
            # Names in lower case, as fetch's Headers give them to Documenso.
            headers=None
            if headers is None
            else orjson.dumps({k.lower(): v for k, v in headers.items()}).decode(),
            body=stored,
            webhook_id=str(job["webhookId"]),
            event=str(job["event"]),
        )

    def log_params(self, source: Source, records: list[Settlement]) -> dict[str, Any]:
        calls: list[WebhookCall] = [s.record for s in records]
        return {
            "statuses": [c.status for c in calls],
            "urls": [c.url for c in calls],
            "requests": [c.request for c in calls],
            "codes": [c.code for c in calls],
            "headers": [c.headers for c in calls],
            "bodies": [c.body for c in calls],
            "webhooks": [c.webhook_id for c in calls],
            "events": [c.event for c in calls],
        }

    async def about(self, conn: psycopg.AsyncConnection[Any], source: Source) -> str | None:
        spec: JobsSpec = source.spec
        return await documenso_release.release(conn, spec.schema)


KIND = DocumensoJobs()
