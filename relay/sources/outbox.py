"""kind = "outbox": relay's own table of events (relay.outbox, written by relay.publish() and by
triggers on domain tables), delivered to the URL configured for each topic, signed with
Standard Webhooks."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
import psycopg

from relay import readers, signing
from relay.readers import ConfigError
from relay.sources import events
from relay.sources.base import (
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

KEYS = events.COMMON_KEYS | {"topics"}


def headers(source: Source, row: Claimed, body: bytes, keys: tuple[bytes, ...]) -> dict[str, str]:
    """Standard Webhooks headers: the id is the same on every attempt of a row, so receivers
    can drop duplicates."""
    spec: events.EventSpec = source.spec
    msg_id = f"{source.name}_{row.key}"
    timestamp = int(time.time())
    out = {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "relay-attempt": str(row.attempt),
        **spec.headers,
    }
    if row.topic is not None:
        out["relay-topic"] = row.topic
    if keys:
        out["webhook-signature"] = signing.signatures(keys, msg_id, timestamp, body)
    return out


def json_body(source: Source, row: Claimed) -> bytes | Dead:
    body = (row.payload if row.payload is not None else "null").encode()
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return Dead(f"payload is not valid JSON ({exc}); store JSON text there")
    return body


class Outbox(Plain):
    name = "outbox"
    single = True

    def parse(self, name: str, data: Mapping[str, Any], ctx: ParseContext) -> Source:
        where = f"sources.{name}"
        readers.unknown(where, data, set(KEYS))
        topics_raw = data.get("topics", {})
        if not isinstance(topics_raw, dict):
            raise ConfigError(f"{where}.topics: expected a table of topic = URL")
        topics = {t: readers.http_url(f"{where}.topics.{t!r}", u) for t, u in topics_raw.items()}
        targets = {f"{where}.topics.{t!r}": u for t, u in topics.items() if t != "*"}
        if "url" in data:
            url = readers.http_url(f"{where}.url", data["url"])
            topics.setdefault("*", url)
        if "*" in topics:
            targets[f"{where}.url" if "url" in data else f"{where}.topics.'*'"] = topics["*"]
        if not topics:
            raise ConfigError(
                f"{where}: an outbox needs somewhere to deliver: set url = '...' or a "
                f"[{where}.topics] table of topic = URL"
            )
        secrets = (
            readers.signing_secrets(f"{where}.secret", data["secret"]) if "secret" in data else ()
        )
        spec = events.EventSpec(
            table=("relay", "outbox"),
            max_attempts=events.max_attempts(where, data, ctx.max_attempts),
            topics=topics,
            headers=readers.headers(f"{where}.headers", data.get("headers", {})),
            signing_secrets=secrets,
            keys=tuple(signing.config_key(s) for s in secrets),
            ordering=parse_ordering(where, data),
        )
        return Source(
            name=name,
            kind=self,
            spec=spec,
            retry=ctx.retry,
            targets=targets,
            ordered=spec.ordering is not None,
        )

    async def install(
        self, conn: psycopg.AsyncConnection[Any], source: Source, ctx: DbContext
    ) -> None:
        await events.install_ordering(conn, source)

    async def prepare(
        self, conn: psycopg.AsyncConnection[Any], source: Source, ctx: DbContext
    ) -> Compiled:
        return await events.prepare(conn, source, ctx)

    def request(self, source: Source, row: Claimed, now: datetime) -> Request | Dead | Failed:
        spec: events.EventSpec = source.spec
        url = spec.target_for_topic(row.topic or "")
        if url is None:
            return Dead(
                f"no target for topic {row.topic!r}: add it (or '*') under "
                f"[sources.{source.name}.topics], then `relay retry-dead {source.name}`"
            )
        body = json_body(source, row)
        if isinstance(body, Dead):
            return body
        return Request(
            "POST", url, headers(source, row, body, spec.keys), body, f" of sources.{source.name}"
        )


KIND = Outbox()
