"""kind = "documenso_documents": Documenso's document status events. A trigger on Documenso's
document table ("Envelope" from v1.13, "Document" before) captures each status change into
relay.documenso_events with the payload Documenso's own webhook carries; relay delivers it in
Documenso's webhook shape with the X-Documenso-Secret header."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql

from relay import logs, readers
from relay.db import catalog, sqltext
from relay.readers import ConfigError
from relay.sources import documenso_payload, documenso_release, events
from relay.sources.base import (
    PRIVATE_HEADERS,
    Claimed,
    Compiled,
    DbContext,
    Dead,
    Failed,
    ParseContext,
    Plain,
    Request,
    Source,
    parse_ordering,
)

log = logs.get("relay.sources.documenso_documents")

KEYS = events.COMMON_KEYS | {"schema", "webhooks", "events", "fixed_credentials_for_row_urls"}
# Documenso's WebhookTriggerEvents (v2.17.0), and those relay derives from the database.
EVENTS = (
    "DOCUMENT_CREATED",
    "DOCUMENT_SENT",
    "DOCUMENT_OPENED",
    "DOCUMENT_SIGNED",
    "DOCUMENT_RECIPIENT_COMPLETED",
    "DOCUMENT_COMPLETED",
    "DOCUMENT_REJECTED",
    "DOCUMENT_CANCELLED",
    "RECIPIENT_EXPIRED",
    "TEMPLATE_CREATED",
    "TEMPLATE_DELETED",
    "TEMPLATE_USED",
)
# Not derivable from the database (see README): a reminder (a manual resend fires it even when
# no email goes out) and a template update (any write to a template row looks the same).
NOT_DERIVED = ("DOCUMENT_REMINDER_SENT", "TEMPLATE_UPDATED")
# With one URL, what earlier relay versions sent: the status events.
DEFAULT_EVENTS = ("DOCUMENT_SENT", "DOCUMENT_COMPLETED", "DOCUMENT_REJECTED", "DOCUMENT_CANCELLED")
_SQL = sqltext.load_queries(sqltext.sql_dir() / "triggers" / "documenso_documents.sql")
SECRET_HEADER = "X-Documenso-Secret"


def documenso_body(event: str, payload: bytes, url: str, now: datetime) -> bytes:
    """Documenso's webhook envelope, keys in Documenso's order; createdAt is the send time."""
    created = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    return b"".join(
        (
            b'{"event":',
            orjson.dumps(event),
            b',"payload":',
            payload,
            b',"createdAt":',
            orjson.dumps(created),
            b',"webhookEndpoint":',
            orjson.dumps(url),
            b"}",
        )
    )


_PRIVATE = PRIVATE_HEADERS | {SECRET_HEADER.lower()}


@dataclass(frozen=True, slots=True)
class DocumensoTrigger:
    """The document-event triggers that fit this Documenso schema version."""

    table: str  # "Envelope" or "Document"
    install: sql.Composed
    fingerprint: str


# What differs between the two schema versions, as SQL on a document row (`d` in expressions,
# `t` in queries, `s` a relay.documenso_state row, `key` a document "id" as text).
_ENVELOPE = {
    "kind": 'd."type"::text',
    "is_document_t": "t.\"type\"::text = 'DOCUMENT'",
    # document_<n> or template_<n>
    "number": "substring(d.\"secondaryId\" FROM '_([0-9]+)$')::int",
    "recipient_key": "r->>'envelopeId'",
    "envelope_id": 'd."id"',
    "by_key": 't."id" = key',
    "by_number": "t.\"secondaryId\" = 'document_' || s.id",
    "recipient_of": 'r."envelopeId" = d."id"',
    "meta_of": 'm."id" = d."documentMetaId"',
}
_DOCUMENT = {
    "kind": "'DOCUMENT'",
    "is_document_t": "true",
    "number": 'd."id"',
    "recipient_key": "r->>'documentId'",
    "envelope_id": "NULL::text",
    "by_key": 't."id" = key::int',
    "by_number": 't."id" = s.id',
    "recipient_of": 'r."documentId" = d."id"',
    "meta_of": 'm."documentId" = d."id"',
}


async def documenso_trigger(conn: psycopg.AsyncConnection[Any], source: Source) -> DocumensoTrigger:
    """Detect Documenso's schema version and compose the matching document-event triggers."""
    spec: events.EventSpec = source.spec
    schema = spec.app_schema
    cur = await conn.execute(catalog.CATALOG["documenso_probe"], {"schema": schema})
    row = await cur.fetchone()
    assert row is not None
    envelope, document, recipient, meta, envelope_meta, document_meta, audit = row
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
    shape = _ENVELOPE if envelope else _DOCUMENT
    meta_expr: sql.Composable = sql.SQL("NULL::jsonb")
    if meta and (envelope_meta if envelope else document_meta):
        meta_expr = sql.SQL("(SELECT to_jsonb(m) FROM {} AS m WHERE {})").format(
            sql.Identifier(schema, "DocumentMeta"), sql.SQL(shape["meta_of"])
        )
    # A re-send and a document created as PENDING. Documenso's sendDocument writes an "Envelope"
    # of internalVersion 2 with a DOCUMENT_FIELDS_AUTO_INSERTED audit row, in the same
    # transaction, which no other write to a pending document does; it sends DOCUMENT_SENT for a
    # direct-template document that way too. Nothing tells an earlier version's re-send from an
    # edit that changed nothing, so there the document created as PENDING is the one sent.
    resend_check: sql.Composable = sql.SQL("false")
    sent_later: sql.Composable = sql.SQL("false")
    if envelope and audit:
        sent_later = sql.SQL('d."internalVersion" = 2')
        resend_check = sql.SQL(
            'd."internalVersion" = 2 AND EXISTS (SELECT 1 FROM {} AS a '
            'WHERE a."envelopeId" = d."id" AND a."type" = \'DOCUMENT_FIELDS_AUTO_INSERTED\' '
            "AND a.xmin = (pg_current_xact_id()::text::bigint % 4294967296)::text::xid)"
        ).format(sql.Identifier(schema, "DocumentAuditLog"))
    emit = _emit(source)
    made_from = sqltext.fingerprint(
        _SQL["common"], _SQL["shape"], schema, row, emit.as_string(conn)
    )
    # Sections lose their last `;` when loaded: one goes back between the two.
    install = sql.SQL(_SQL["common"] + ";\n").format() + sql.SQL(_SQL["shape"]).format(
        table=sql.Identifier(schema, table),
        recipient=sql.Identifier(schema, "Recipient"),
        meta=meta_expr,
        fingerprint=sql.Literal(made_from),
        resend_check=resend_check,
        sent_later=sent_later,
        emit=emit,
        **{k: sql.SQL(v) for k, v in shape.items() if k != "meta_of"},
    )
    return DocumensoTrigger(table, install, made_from)


def _emit(source: Source) -> sql.Composed:
    """The body of relay.documenso_emit(event, payload, team, owner) for this source."""
    spec: events.EventSpec = source.spec
    if not spec.webhooks:
        return sql.SQL(
            "IF event = ANY({}) THEN "
            "INSERT INTO relay.documenso_events (topic, payload) VALUES (event, payload); "
            "END IF;"
        ).format(sql.SQL("ARRAY[{}]::text[]").format(sqltext.literal_list(spec.events)))
    # Documenso's getAllWebhooksByEventTrigger: enabled, subscribed to the event, of the
    # document's team (before v1.12, a document without a team: its owner's own webhooks).
    # Read in its own block, so an unreadable "Webhook" costs the event, not Documenso's write.
    return sql.SQL(
        "BEGIN "
        'SELECT array_agg(w."id" ORDER BY w."createdAt", w."id") INTO hooks FROM {} AS w '
        'WHERE w."enabled" AND event = ANY(w."eventTriggers"::text[]) '
        'AND (w."teamId" = team '
        'OR (team IS NULL AND w."teamId" IS NULL AND w."userId" = owner)); '
        "EXCEPTION WHEN OTHERS THEN "
        "RAISE WARNING 'relay: % not sent: Documenso''s webhooks could not be read: %', "
        "event, SQLERRM; "
        "END; "
        "INSERT INTO relay.documenso_events (topic, payload, webhook_id) "
        "SELECT event, payload, h FROM unnest(hooks) AS h;"
    ).format(sql.Identifier(spec.app_schema, "Webhook"))


# A document's events one at a time, in order, per webhook (one receiver's slowness never
# holds back another's): the captured document's id, and the "Webhook" with webhooks = true.
DOCUMENT_ORDER = "coalesce(webhook_id, '') || ':' || (payload->>'id')"


class DocumensoDocuments(Plain):
    name = "documenso_documents"
    single = True

    def parse(self, name: str, data: Mapping[str, Any], ctx: ParseContext) -> Source:
        where = f"sources.{name}"
        readers.unknown(where, data, set(KEYS))
        webhooks = readers.boolean(f"{where}.webhooks", data.get("webhooks", False))
        if webhooks:
            for key in ("url", "secret", "events"):
                if key in data:
                    raise ConfigError(
                        f"{where}.{key}: with webhooks = true each event goes to the URL, with "
                        f'the secret, of each of Documenso\'s "Webhook" rows subscribed to it; '
                        f"remove {key}, or set webhooks = false to send to one URL"
                    )
            readers.fixed_credentials(
                where,
                data,
                ("headers",),
                "with webhooks = true, events go to the URL each Webhook row names",
            )
            url = None
        elif "url" not in data:
            raise ConfigError(
                f"{where}.url: required: the endpoint Documenso's webhooks should reach (or set "
                f'webhooks = true to send each event to Documenso\'s own "Webhook" rows)'
            )
        else:
            url = readers.http_url(f"{where}.url", data["url"])
        chosen = _events(f"{where}.events", data.get("events", list(DEFAULT_EVENTS)))
        spec = events.EventSpec(
            table=("relay", "documenso_events"),
            max_attempts=events.max_attempts(where, data, ctx.max_attempts),
            topics={} if url is None else {"*": url},
            webhooks=webhooks,
            events=chosen,
            headers=readers.headers(f"{where}.headers", data.get("headers", {})),
            # Documenso's convention: the secret as it is, not a Standard Webhooks signature,
            # so it is not held to the whsec_ rule.
            secret=(
                readers.secret_text(f"{where}.secret", data["secret"]) if "secret" in data else None
            ),
            app_schema=readers.ident(f"{where}.schema", data.get("schema", "public")),
            ordering=parse_ordering(where, data, DOCUMENT_ORDER),
        )
        return Source(
            name=name,
            kind=self,
            spec=spec,
            retry=ctx.retry,
            targets={} if url is None else {f"{where}.url": url},
            ordered=spec.ordering is not None,
        )

    async def prepare(
        self, conn: psycopg.AsyncConnection[Any], source: Source, ctx: DbContext
    ) -> Compiled:
        spec: events.EventSpec = source.spec
        url_secret: sql.Composable = events.NO_URL
        skip_url: sql.Composable | None = None
        if spec.webhooks:
            await _check_webhooks(conn, source)
            webhook = sql.Identifier(spec.app_schema, "Webhook")
            # Looked up at each attempt by id alone, as Documenso's handler does.
            url_secret = sql.SQL(
                '(SELECT w."webhookUrl" FROM {w} AS w WHERE w."id" = t.webhook_id) AS url, '
                '(SELECT COALESCE(w."secret", \'\') FROM {w} AS w WHERE w."id" = t.webhook_id) '
                "AS secret"
            ).format(w=webhook)
            skip_url = sql.SQL('(SELECT w."webhookUrl" FROM {w} AS w WHERE w."id" = c.webhook_id)')
            skip_url = skip_url.format(w=webhook)
        compiled = await events.prepare(conn, source, ctx, url_secret, skip_url)
        trigger = await documenso_trigger(conn, source)
        extra = (
            (
                spec.app_schema,
                trigger.table,
                "documenso_change",
                ("relay_documenso_change", "relay_documenso_delete"),
                trigger.fingerprint,
            ),
            (
                spec.app_schema,
                "Recipient",
                "documenso_recipient",
                ("relay_documenso_recipient",),
                trigger.fingerprint,
            ),
            (
                "relay",
                "documenso_changes",
                "documenso_commit",
                ("relay_documenso_commit",),
                trigger.fingerprint,
            ),
        )
        return replace(compiled, extra_triggers=extra)

    async def install(
        self, conn: psycopg.AsyncConnection[Any], source: Source, ctx: DbContext
    ) -> None:
        if source.spec.webhooks:
            await _check_webhooks(conn, source)
        trigger = await documenso_trigger(conn, source)
        # Its statuses are recorded at the first install; from then on every install, and
        # every reinstall after a migration dropped the trigger, sends what changed meanwhile.
        known = await catalog.table_exists(conn, "relay", "documenso_state")
        await conn.execute(trigger.install)
        await events.install_ordering(conn, source)  # (its table is made just above)
        cur = await conn.execute("SELECT relay.documenso_reconcile(%s)", [known])
        row = await cur.fetchone()
        assert row is not None
        spec: events.EventSpec = source.spec
        log.info(
            "install.documenso",
            source=source.name,
            schema=spec.app_schema,
            table=trigger.table,
            missed_events=row[0],
        )

    def request(self, source: Source, row: Claimed, now: datetime) -> Request | Dead | Failed:
        spec: events.EventSpec = source.spec
        if spec.webhooks:
            if row.url is None:
                # Documenso's handler looks the Webhook up with findUniqueOrThrow: the job
                # fails, is retried, then FAILED.
                return Failed('the "Webhook" this event was for is gone (deleted?)')
            url, secret = row.url, row.secret or ""
        else:
            url, secret = spec.topics["*"], spec.secret or ""
        try:
            payload = documenso_payload.body(row.payload or "null")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return Dead(
                f"its captured document could not be mapped to Documenso's payload: {exc!r}"
            )
        body = documenso_body(row.topic or "", payload, url, now)
        headers = {
            "Content-Type": "application/json",
            # relay's stable id, the same on every attempt, as on every source.
            "webhook-id": f"{source.name}_{row.key}",
            "webhook-timestamp": str(int(time.time())),
            "relay-attempt": str(row.attempt),
            **spec.headers,
            SECRET_HEADER: secret,
        }
        if row.topic is not None:
            headers["relay-topic"] = row.topic
        return Request(
            "POST",
            url,
            headers,
            body,
            f" of sources.{source.name}",
            keep_headers=spec.webhooks,
            private=_PRIVATE,
        )

    async def about(self, conn: psycopg.AsyncConnection[Any], source: Source) -> str | None:
        spec: events.EventSpec = source.spec
        return await documenso_release.release(conn, spec.app_schema)


def _events(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"{where}: expected a list of Documenso event names, e.g. {list(DEFAULT_EVENTS)}"
        )
    for name in value:
        if name in NOT_DERIVED:
            raise ConfigError(
                f"{where}: {name!r} cannot be told from Documenso's database, so relay cannot "
                f"send it; the events it can: {', '.join(EVENTS)}"
            )
        if name not in EVENTS:
            raise ConfigError(
                f"{where}: {name!r} is not a Documenso event; one of {', '.join(EVENTS)}"
            )
    return tuple(value)


async def _check_webhooks(conn: psycopg.AsyncConnection[Any], source: Source) -> None:
    spec: events.EventSpec = source.spec
    where = f"sources.{source.name}.webhooks"
    if not await catalog.table_exists(conn, spec.app_schema, "Webhook"):
        raise ConfigError(
            f'{where}: Documenso\'s "Webhook" table is missing from schema {spec.app_schema!r} '
            f"(webhooks arrived in Documenso v1.5); set url instead to send to one endpoint"
        )
    await catalog.check_privileges(
        conn,
        f"sources.{source.name}",
        [catalog.Need(spec.app_schema, "Webhook", ["id", "webhookUrl", "secret"])],
    )


KIND = DocumensoDocuments()
