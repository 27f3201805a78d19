"""Configuration: one TOML file plus environment overrides, validated once into frozen dataclasses.

Nothing else in relay reads the environment. Every error names the key that is wrong and says
what to do, and the CLI turns it into exit code 2.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from relay import guard, readers
from relay.readers import ConfigError as ConfigError
from relay.readers import duration, http_url
from relay.retry import RetryPolicy as RetryPolicy


class SourceKind(StrEnum):
    outbox = "outbox"
    table = "table"
    documenso_documents = "documenso_documents"
    documenso_jobs = "documenso_jobs"


class BodyFormat(StrEnum):
    raw = "raw"  # the payload as it is
    documenso = "documenso"  # {"event", "payload", "createdAt", "webhookEndpoint"}
    documenso_job = "documenso_job"  # execute-webhook jobs as webhooks; other jobs as jobs


@dataclass(frozen=True, slots=True)
class Source:
    """One watched table, and how relay claims, settles and delivers its rows."""

    name: str
    kind: SourceKind
    schema: str
    table: str
    key: str
    status: str
    pending: tuple[str, ...]  # statuses a row can be claimed from
    retry: str  # status a row waits in for its next attempt
    processing: str
    done: str
    dead: str
    attempts: str
    max_attempts: int  # used when the column is absent or NULL
    max_attempts_column: str | None
    due: str | None  # None: relay keeps claims and retry times in relay.leases
    last_error: str | None = None
    last_status: str | None = None
    done_at: str | None = None
    payload_column: str | None = None  # None: the whole row as JSON
    url: str | None = None
    url_column: str | None = None
    topic_column: str | None = None
    topics: Mapping[str, str] = field(default_factory=dict)
    # Sent as it is in `secret_header` (documenso_documents); never shown (repr=False).
    secret: str | None = field(default=None, repr=False)
    # Standard Webhooks secrets (`whsec_...`) to sign with, one signature each (rotation).
    signing_secrets: tuple[str, ...] = field(default=(), repr=False)
    secret_column: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    body: BodyFormat = BodyFormat.raw
    # Send the secret as it is in this header instead of signing (Documenso's X-Documenso-Secret).
    secret_header: str | None = None
    app_schema: str = "public"  # where a preset's application tables live
    # documenso_jobs: which "jobId"s to run, and when to step in for Documenso's own runner.
    job_ids: tuple[str, ...] = ()
    pending_after: float = 0.0
    stuck_after: float = 300.0

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    def target_for_topic(self, topic: str) -> str | None:
        """Exact topic first, then the longest `prefix.*` pattern, then `*`."""
        if topic in self.topics:
            return self.topics[topic]
        best: tuple[int, str] | None = None
        for pattern, url in self.topics.items():
            matches = pattern.endswith("*") and topic.startswith(pattern[:-1])
            if matches and (best is None or len(pattern) > best[0]):
                best = (len(pattern), url)
        return best[1] if best else None


@dataclass(frozen=True, slots=True)
class Config:
    # Kept out of repr: a database URL may hold its password.
    database_url: str = field(repr=False)
    listen_url: str = field(repr=False)  # the direct (non-PgBouncer) URL the listener uses
    worker_id: str
    sources: tuple[Source, ...]
    max_in_flight: int = 20
    batch_size: int = 50
    # Rows claimed ahead of a free delivery slot, so that claims stay whole batches under load.
    claim_ahead: int = 50
    sweep_interval: float = 30.0
    claim_timeout: float = 60.0
    shutdown_grace: float = 10.0
    # The listener probes its connection after this long without a notification; with the
    # probe's own bound, a silent connection is replaced within about twice this.
    heartbeat_interval: float = 5.0
    # The bound on each of relay's statements: the server cancels it after this long, and the
    # client gives up on a connection that has not answered shortly after.
    statement_timeout: float = 5.0
    http_timeout: float = 10.0
    max_response_bytes: int = 64 * 1024
    # A row whose payload is larger is settled dead without being loaded (measured in the claim).
    max_payload_bytes: int = 1048576
    user_agent: str = "relay/0.1"
    # What the outbound guard lets through besides public addresses.
    http_allow: guard.Allow = field(default_factory=guard.Allow)
    # How much of a failing response's body last_error keeps (0: none).
    error_body_chars: int = 200
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    health_host: str | None = "127.0.0.1"
    health_port: int = 8081
    health_remote: bool = False  # health.allow_remote: listening off loopback is meant
    notify_channel: str = "relay"
    # database.url goes through PgBouncer in transaction mode: no server-side prepared statements.
    pgbouncer: bool = False

    def claim_lifetime(self, source: Source) -> float:
        """How long a claim on this source's rows lasts before another worker may take it."""
        if source.kind is SourceKind.documenso_jobs:
            return source.stuck_after  # Documenso's own rule for a stuck job
        return self.claim_timeout

    def start_within(self, source: Source) -> float:
        """How long after its claim a row may still start its request: the request must end
        (http.timeout) with time to spare for its settle (5 s, or half the slack if less)."""
        return _start_within(self.claim_lifetime(source), self.http_timeout)


def _start_within(lifetime: float, http_timeout: float) -> float:
    slack = lifetime - http_timeout
    return slack - min(5.0, slack / 2)


# The outbox is relay's own table; as a source it is a fixed mapping onto relay.outbox.
OUTBOX_TABLE = ("relay", "outbox")
# Documenso document events are captured into a table of the same shape.
DOCUMENSO_EVENTS_TABLE = ("relay", "documenso_events")

log = logging.getLogger("relay.config")

# The least each duration may be: below these a loop spins or nothing can succeed.
MIN_SWEEP_INTERVAL = 1.0
MIN_HEARTBEAT = 0.5
MIN_CLAIM_TIMEOUT = 1.0
MIN_HTTP_TIMEOUT = 0.1
MIN_RETRY_BASE = 0.01
MIN_STATEMENT_TIMEOUT = 0.1

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

# Query parameters Prisma adds to a DATABASE_URL (Documenso's among them) that libpq rejects.
_PRISMA_PARAMS = {
    "pgbouncer",
    "schema",
    "connection_limit",
    "pool_timeout",
    "socket_timeout",
    "statement_cache_size",
    "sslaccept",
    "sslidentity",
    "sslpassword",
}


def libpq_url(url: str) -> tuple[str, bool]:
    """Drop Prisma-only parameters from a URL, so a Prisma app's DATABASE_URL works as it is;
    also say whether it asked for PgBouncer mode (`pgbouncer=true`). ValueError if it is not
    a connection string libpq accepts."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql") or not parts.query:
        return url, False
    params = parse_qsl(parts.query, keep_blank_values=True)
    pgbouncer = any(k == "pgbouncer" and v.lower() == "true" for k, v in params)
    kept = [(k, v) for k, v in params if k not in _PRISMA_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(kept))), pgbouncer


def _database_url(where: str, value: str) -> tuple[str, bool]:
    """`libpq_url`, with a text libpq cannot parse refused at load, naming the key. libpq's own
    message is left out: it may quote the part of the text where the password is."""
    try:
        url, pgbouncer = libpq_url(value)
        psycopg.conninfo.conninfo_to_dict(url)
    except (ValueError, psycopg.ProgrammingError):
        raise ConfigError(
            f"{where}: not a connection URL or string libpq accepts; write it as "
            f"postgresql://user:password@host:5432/dbname or 'host=... dbname=... user=...'"
        ) from None
    return url, pgbouncer


_TOP_KEYS = {"database", "relay", "http", "retry", "health", "sources"}
_SECTION_KEYS = {
    "database": {"url", "listen_url", "pgbouncer", "statement_timeout"},
    "relay": {
        "worker_id",
        "max_in_flight",
        "batch_size",
        "claim_ahead",
        "sweep_interval",
        "claim_timeout",
        "shutdown_grace",
        "heartbeat_interval",
        "channel",
        "max_payload_bytes",
    },
    "http": {"timeout", "max_response_bytes", "user_agent", "allow", "error_body_chars"},
    "retry": {"base", "factor", "max_delay", "jitter", "max_attempts"},
    "health": {"listen", "allow_remote"},
}
_COMMON_SOURCE_KEYS = {
    "kind",
    "url",
    "secret",
    "headers",
    "max_attempts",
}
_OUTBOX_KEYS = _COMMON_SOURCE_KEYS | {"topics"}
_DOCUMENSO_DOCUMENTS_KEYS = _COMMON_SOURCE_KEYS | {"schema"}
_DOCUMENSO_JOBS_KEYS = {
    "kind",
    "schema",
    "webhooks",
    "forward",
    "pending_after",
    "stuck_after",
    "headers",
    "fixed_credentials_for_row_urls",
}
EXECUTE_WEBHOOK = "internal.execute-webhook"
_TABLE_KEYS = _COMMON_SOURCE_KEYS | {
    "table",
    "key",
    "status",
    "pending",
    "retry",
    "processing",
    "done",
    "dead",
    "attempts",
    "max_attempts_column",
    "due",
    "last_error",
    "last_status",
    "done_at",
    "payload",
    "url_column",
    "secret_column",
    "fixed_credentials_for_row_urls",
}


# -- sources -------------------------------------------------------------------------------


def _event_table(
    name: str,
    data: Mapping[str, Any],
    max_attempts: int,
    *,
    kind: SourceKind,
    table: tuple[str, str],
    topics: dict[str, str],
    **extra: Any,
) -> Source:
    """A source on one of relay's own event tables (the outbox's shape)."""
    where = f"sources.{name}"
    return Source(
        name=name,
        kind=kind,
        schema=table[0],
        table=table[1],
        key="id",
        status="status",
        pending=("pending",),
        retry="pending",
        processing="processing",
        done="delivered",
        dead="dead",
        attempts="attempts",
        max_attempts=readers.integer(
            f"{where}.max_attempts", data.get("max_attempts", max_attempts)
        ),
        max_attempts_column="max_attempts",
        due="due_at",
        last_error="last_error",
        last_status="last_status",
        done_at="delivered_at",
        payload_column="payload",
        topic_column="topic",
        topics=topics,
        headers=readers.headers(f"{where}.headers", data.get("headers", {})),
        **extra,
    )


def _documenso_documents(name: str, data: Mapping[str, Any], max_attempts: int) -> Source:
    where = f"sources.{name}"
    readers.unknown(where, data, _DOCUMENSO_DOCUMENTS_KEYS)
    if "url" not in data:
        raise ConfigError(f"{where}.url: required: the endpoint Documenso's webhooks should reach")
    url = http_url(f"{where}.url", data["url"])
    return _event_table(
        name,
        data,
        max_attempts,
        kind=SourceKind.documenso_documents,
        table=DOCUMENSO_EVENTS_TABLE,
        topics={"*": url},
        body=BodyFormat.documenso,
        # Documenso's convention: the secret as it is, not a Standard Webhooks signature, so it
        # is not held to the whsec_ rule.
        secret=readers.secret_text(f"{where}.secret", data["secret"]) if "secret" in data else None,
        secret_header="X-Documenso-Secret",
        app_schema=readers.ident(f"{where}.schema", data.get("schema", "public")),
    )


def _documenso_jobs(name: str, data: Mapping[str, Any]) -> Source:
    where = f"sources.{name}"
    readers.unknown(where, data, _DOCUMENSO_JOBS_KEYS)
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
    forward = {j: http_url(f"{where}.forward.{j!r}", u) for j, u in forward_raw.items()}
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
    return Source(
        name=name,
        kind=SourceKind.documenso_jobs,
        schema=readers.ident(f"{where}.schema", data.get("schema", "public")),
        table="BackgroundJob",
        key="id",
        status="status",
        pending=("PENDING",),
        retry="PENDING",
        processing="PROCESSING",
        done="COMPLETED",
        dead="FAILED",
        attempts="retried",
        max_attempts=4,  # Documenso's default maxRetries (3) + 1; the column decides
        max_attempts_column="maxRetries",
        due="updatedAt",
        payload_column="payload",
        topic_column="jobId",
        topics=forward,
        headers=readers.headers(f"{where}.headers", data.get("headers", {})),
        body=BodyFormat.documenso_job,
        secret_header="X-Documenso-Secret",
        app_schema=readers.ident(f"{where}.schema", data.get("schema", "public")),
        job_ids=job_ids,
        pending_after=duration(f"{where}.pending_after", data.get("pending_after", 0)),
        stuck_after=duration(
            f"{where}.stuck_after", data.get("stuck_after", 300), minimum=MIN_CLAIM_TIMEOUT
        ),
    )


def _outbox(name: str, data: Mapping[str, Any], max_attempts: int) -> Source:
    where = f"sources.{name}"
    readers.unknown(where, data, _OUTBOX_KEYS)
    topics_raw = data.get("topics", {})
    if not isinstance(topics_raw, dict):
        raise ConfigError(f"{where}.topics: expected a table of topic = URL")
    topics = {t: http_url(f"{where}.topics.{t!r}", u) for t, u in topics_raw.items()}
    url = http_url(f"{where}.url", data["url"]) if "url" in data else None
    if url is not None:
        topics.setdefault("*", url)
    if not topics:
        raise ConfigError(
            f"{where}: an outbox needs somewhere to deliver: set url = '...' or a "
            f"[{where}.topics] table of topic = URL"
        )
    secrets = readers.signing_secrets(f"{where}.secret", data["secret"]) if "secret" in data else ()
    return _event_table(
        name,
        data,
        max_attempts,
        kind=SourceKind.outbox,
        table=OUTBOX_TABLE,
        topics=topics,
        signing_secrets=secrets,
    )


def _table(name: str, data: Mapping[str, Any], max_attempts: int) -> Source:
    where = f"sources.{name}"
    readers.unknown(where, data, _TABLE_KEYS)
    for required in ("table", "key", "status", "attempts"):
        if required not in data:
            raise ConfigError(f"{where}.{required}: required for a table source")
    schema, table = readers.table_name(f"{where}.table", data["table"])
    pending = readers.status_list(f"{where}.pending", data.get("pending", "pending"))
    has_url = "url" in data
    has_url_column = "url_column" in data
    if has_url == has_url_column:
        raise ConfigError(
            f"{where}: set exactly one of url (a fixed target) or url_column (the row's column "
            f"that holds the target URL)"
        )
    if "secret" in data and "secret_column" in data:
        raise ConfigError(f"{where}: set at most one of secret or secret_column")
    if has_url_column:
        readers.fixed_credentials(
            where, data, ("secret", "headers"), "the rows choose where it sends (url_column)"
        )
    max_attempts_value = data.get("max_attempts", max_attempts)
    column = data.get("max_attempts_column")
    source = Source(
        name=name,
        kind=SourceKind.table,
        schema=schema,
        table=table,
        key=readers.ident(f"{where}.key", data["key"]),
        status=readers.ident(f"{where}.status", data["status"]),
        pending=pending,
        retry=readers.string(f"{where}.retry", data.get("retry", pending[0])),
        processing=readers.string(f"{where}.processing", data.get("processing", "processing")),
        done=readers.string(f"{where}.done", data.get("done", "done")),
        dead=readers.string(f"{where}.dead", data.get("dead", "dead")),
        attempts=readers.ident(f"{where}.attempts", data["attempts"]),
        max_attempts=readers.integer(f"{where}.max_attempts", max_attempts_value),
        max_attempts_column=readers.opt_ident(f"{where}.max_attempts_column", column),
        due=readers.opt_ident(f"{where}.due", data.get("due")),
        last_error=readers.opt_ident(f"{where}.last_error", data.get("last_error")),
        last_status=readers.opt_ident(f"{where}.last_status", data.get("last_status")),
        done_at=readers.opt_ident(f"{where}.done_at", data.get("done_at")),
        payload_column=readers.opt_ident(f"{where}.payload", data.get("payload")),
        url=http_url(f"{where}.url", data["url"]) if has_url else None,
        url_column=readers.opt_ident(f"{where}.url_column", data.get("url_column")),
        signing_secrets=(
            readers.signing_secrets(f"{where}.secret", data["secret"]) if "secret" in data else ()
        ),
        secret_column=readers.opt_ident(f"{where}.secret_column", data.get("secret_column")),
        headers=readers.headers(f"{where}.headers", data.get("headers", {})),
    )
    # A row's status alone says where it is: if two of these were the same value, a delivered
    # row would look claimed (and be "rescued" and sent again), or a dead one delivered.
    states = {
        "processing": source.processing,
        "done": source.done,
        "dead": source.dead,
    }
    for label, value in states.items():
        if value in source.pending:
            raise ConfigError(f"{where}.{label}: {value!r} is also listed in {where}.pending")
    for i, (label, value) in enumerate(states.items()):
        for other, other_value in list(states.items())[i + 1 :]:
            if value == other_value:
                raise ConfigError(
                    f"{where}.{other}: {value!r} is also {where}.{label}; each state needs a "
                    f"status value of its own"
                )
    if source.retry not in source.pending:
        raise ConfigError(
            f"{where}.retry: {source.retry!r} must be one of {where}.pending {list(pending)}, "
            f"or a retried row would never be claimed again"
        )
    return source


def _source(name: str, data: Any, max_attempts: int) -> Source:
    where = f"sources.{name}"
    if not _NAME.match(name):
        raise ConfigError(
            f"{where}: source names are lower-case letters, digits and _ (at most 40), "
            f"starting with a letter"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    kind = data.get("kind")
    if kind == SourceKind.outbox:
        return _outbox(name, data, max_attempts)
    if kind == SourceKind.table:
        return _table(name, data, max_attempts)
    if kind == SourceKind.documenso_documents:
        return _documenso_documents(name, data, max_attempts)
    if kind == SourceKind.documenso_jobs:
        return _documenso_jobs(name, data)
    kinds = ", ".join(repr(k.value) for k in SourceKind)
    raise ConfigError(f"{where}.kind: expected one of {kinds}, got {kind!r}")


# -- the whole file ------------------------------------------------------------------------


def _section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a table ([{name}])")
    readers.unknown(name, value, _SECTION_KEYS[name])
    return value


def _health(value: Any, allow_remote: Any) -> tuple[str | None, int]:
    """The health endpoint's address. Loopback unless `health.allow_remote` says otherwise:
    /status shows what relay is doing, which is not for every host on the network."""
    if value in ("", False):
        return None, 0
    text = readers.string("health.listen", value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"health.listen: expected host:port like '127.0.0.1:8081' (or '[::1]:8081'; "
            f"'' turns it off), got {text!r}"
        )
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ip = guard.parse_ip(host)
    loopback = host == "localhost" if ip is None else guard.classify(ip) == "loopback"
    if not loopback and not readers.boolean("health.allow_remote", allow_remote):
        raise ConfigError(
            f"health.listen: {host!r} is not a loopback address, so the health endpoint would be "
            f"reachable from other hosts; set health.allow_remote = true to mean it, or listen "
            f"on 127.0.0.1"
        )
    return host, int(port)


def _allow(value: Any) -> guard.Allow:
    if not isinstance(value, list):
        raise ConfigError(
            "http.allow: expected a list of addresses, networks and host names, like "
            '["10.0.0.0/8", "192.168.1.20", "hooks.internal"]'
        )
    for i, entry in enumerate(value):
        text = readers.string(f"http.allow[{i}]", entry)
        try:
            guard.allow_entry(text)
        except ValueError as exc:
            raise ConfigError(f"http.allow[{i}]: {text!r}: {exc}") from None
    return guard.allow(value)


def _check_fixed_targets(source: Source, allowed: guard.Allow) -> None:
    """A fixed target the outbound guard would refuse whatever DNS says (an address, localhost)
    stops start-up here rather than killing every row it gets."""
    where = f"sources.{source.name}"
    targets = {f"{where}.url": source.url} if source.url is not None else {}
    prefix = "forward" if source.kind is SourceKind.documenso_jobs else "topics"
    for topic, url in source.topics.items():
        fixed = topic == "*" and source.kind is not SourceKind.documenso_jobs
        targets[f"{where}.url" if fixed else f"{where}.{prefix}.{topic!r}"] = url
    for key, url in targets.items():
        host = urlsplit(url).hostname or ""
        reason = guard.host_refusal(host, allowed)
        if reason is not None:
            raise ConfigError(f"{key}: {reason}")


def from_mapping(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """Build a Config from parsed TOML and the environment (DATABASE_URL, RELAY_LISTEN_URL)."""
    readers.unknown("", raw, _TOP_KEYS)
    database = _section(raw, "database")
    relay = _section(raw, "relay")
    http = _section(raw, "http")
    retry = _section(raw, "retry")
    health = _section(raw, "health")

    url = env.get("DATABASE_URL") or readers.value("database.url", database.get("url"), env)
    if not url:
        raise ConfigError(
            "database.url: no database to relay for; set DATABASE_URL or [database] url"
        )
    url, url_pgbouncer = _database_url("database.url", readers.string("database.url", url))
    listen_url = (
        env.get("RELAY_LISTEN_URL")
        or readers.value("database.listen_url", database.get("listen_url"), env)
        or url
    )
    listen_url, _ = _database_url(
        "database.listen_url", readers.string("database.listen_url", listen_url)
    )
    pgbouncer = readers.boolean("database.pgbouncer", database.get("pgbouncer", url_pgbouncer))

    statement_timeout = duration(
        "database.statement_timeout",
        database.get("statement_timeout", 5.0),
        minimum=MIN_STATEMENT_TIMEOUT,
    )

    max_attempts = readers.integer("retry.max_attempts", retry.get("max_attempts", 5))
    sources_raw = raw.get("sources", {})
    if not isinstance(sources_raw, dict) or not sources_raw:
        raise ConfigError(
            "sources: no sources configured; add a [sources.NAME] table with kind = 'outbox' "
            "or kind = 'table'"
        )
    sources = tuple(
        _source(n, readers.source_values(f"sources.{n}", d, env), max_attempts)
        for n, d in sources_raw.items()
    )
    for kind in (SourceKind.outbox, SourceKind.documenso_documents, SourceKind.documenso_jobs):
        same = [s.name for s in sources if s.kind is kind]
        if len(same) > 1:
            raise ConfigError(f"sources: only one {kind} source is allowed, got {same}")

    allowed = _allow(http.get("allow", []))
    for source in sources:
        _check_fixed_targets(source, allowed)
    host, port = _health(health.get("listen", "127.0.0.1:8081"), health.get("allow_remote", False))
    channel = readers.ident("relay.channel", relay.get("channel", "relay"))
    policy = RetryPolicy(
        base=duration("retry.base", retry.get("base", 1.0), minimum=MIN_RETRY_BASE),
        factor=readers.number("retry.factor", retry.get("factor", 2.0), minimum=1),
        max_delay=duration("retry.max_delay", retry.get("max_delay", 3600.0)),
        jitter=readers.fraction("retry.jitter", retry.get("jitter", 0.2)),
    )
    if policy.max_delay < policy.base:
        raise ConfigError(
            f"retry.max_delay ({policy.max_delay:g}s) must be at least retry.base "
            f"({policy.base:g}s): raise retry.max_delay or lower retry.base"
        )
    max_in_flight = readers.integer("relay.max_in_flight", relay.get("max_in_flight", 20))
    batch_size = readers.integer("relay.batch_size", relay.get("batch_size", 50))
    claim_timeout = duration(
        "relay.claim_timeout", relay.get("claim_timeout", 60.0), minimum=MIN_CLAIM_TIMEOUT
    )
    http_timeout = duration("http.timeout", http.get("timeout", 10.0), minimum=MIN_HTTP_TIMEOUT)
    # A claim must outlive the request it covers, or another relay (or Documenso's runner)
    # could take the row over while it is still being delivered.
    lifetimes = {"relay.claim_timeout": claim_timeout}
    for source in sources:
        if source.kind is SourceKind.documenso_jobs:
            lifetimes[f"sources.{source.name}.stuck_after"] = source.stuck_after
    for key, lifetime in lifetimes.items():
        if lifetime <= http_timeout:
            raise ConfigError(
                f"{key} ({lifetime:g}s) must be longer than http.timeout ({http_timeout:g}s): "
                f"raise {key} or lower http.timeout"
            )
    # Rows claimed ahead wait for a request slot. If every request hangs until http.timeout,
    # the last of them starts after claim_ahead / max_in_flight timeouts; the default keeps
    # that within the time a claimed row may still start (see Config.start_within), so a
    # hung receiver does not make relay claim rows only to hand them back.
    within = _start_within(min(lifetimes.values()), http_timeout)
    safe_ahead = int(max_in_flight * within / http_timeout)
    claim_ahead = readers.integer(
        "relay.claim_ahead", relay.get("claim_ahead", min(batch_size, safe_ahead)), minimum=0
    )
    if claim_ahead > safe_ahead:
        log.warning(
            "config.claim_ahead claim_ahead=%d max_in_flight=%d http_timeout=%gs safe=%d hint=%s",
            claim_ahead,
            max_in_flight,
            http_timeout,
            safe_ahead,
            "rows that wait for a hung receiver may reach the end of their claim and be handed "
            "back unsent; lower relay.claim_ahead to the safe figure or raise "
            "relay.claim_timeout",
        )
    return Config(
        database_url=url,
        listen_url=listen_url,
        worker_id=readers.string(
            "relay.worker_id", relay.get("worker_id", f"{socket.gethostname()}:{os.getpid()}")
        ),
        sources=sources,
        max_in_flight=max_in_flight,
        batch_size=batch_size,
        claim_ahead=claim_ahead,
        sweep_interval=duration(
            "relay.sweep_interval", relay.get("sweep_interval", 30.0), minimum=MIN_SWEEP_INTERVAL
        ),
        claim_timeout=claim_timeout,
        shutdown_grace=duration("relay.shutdown_grace", relay.get("shutdown_grace", 10.0)),
        heartbeat_interval=duration(
            "relay.heartbeat_interval",
            relay.get("heartbeat_interval", 5.0),
            minimum=MIN_HEARTBEAT,
        ),
        statement_timeout=statement_timeout,
        http_timeout=http_timeout,
        max_response_bytes=readers.integer(
            "http.max_response_bytes", http.get("max_response_bytes", 64 * 1024), minimum=0
        ),
        max_payload_bytes=readers.integer(
            "relay.max_payload_bytes", relay.get("max_payload_bytes", 1048576), minimum=1024
        ),
        user_agent=readers.string("http.user_agent", http.get("user_agent", "relay/0.1")),
        http_allow=allowed,
        error_body_chars=readers.integer(
            "http.error_body_chars", http.get("error_body_chars", 200), minimum=0
        ),
        retry=policy,
        health_host=host,
        health_port=port,
        health_remote=readers.boolean("health.allow_remote", health.get("allow_remote", False)),
        notify_channel=channel,
        pgbouncer=pgbouncer,
    )


def load(path: str | Path | None, env: Mapping[str, str]) -> Config:
    """Read the TOML file at `path` (or RELAY_CONFIG) and validate it."""
    chosen = path or env.get("RELAY_CONFIG")
    if not chosen:
        raise ConfigError(
            "no configuration file: pass --config PATH or set RELAY_CONFIG (see README)"
        )
    file = Path(chosen)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the configuration file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{file}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8"
        ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
    try:
        return from_mapping(raw, env)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
