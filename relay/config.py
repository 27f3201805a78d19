"""Configuration: one TOML file plus environment overrides, validated once into frozen dataclasses.

Nothing else in relay reads the environment. Every error names the key that is wrong and says
what to do, and the CLI turns it into exit code 2.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from relay import __version__, guard, logs, readers, sources
from relay import admin as admin_mod
from relay import endpoints as endpoints_mod
from relay import inbox as inbox_mod
from relay import jobs as jobs_mod
from relay import metrics as metrics_mod
from relay import retry as retry_policy
from relay.inbox import Inbox
from relay.jobs import Job
from relay.readers import ConfigError as ConfigError
from relay.readers import duration
from relay.retry import RetryPolicy as RetryPolicy
from relay.sources.base import Source


@dataclass(frozen=True, slots=True)
class Config:
    # Kept out of repr: a database URL may hold its password.
    database_url: str = field(repr=False)
    listen_url: str = field(repr=False)  # the direct (non-PgBouncer) URL the listener uses
    worker_id: str
    sources: tuple[Source, ...]
    max_in_flight: int = 40
    batch_size: int = 100
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
    user_agent: str = f"relay/{__version__}"
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
    jobs: tuple[Job, ...] = ()  # [jobs.NAME]: scheduled SQL
    inboxes: tuple[Inbox, ...] = ()  # [inbox.NAME]: POST endpoints into the database
    # [admin] tokens: name -> bearer token; empty: no admin API.
    admin_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    metrics: metrics_mod.Settings = field(default_factory=metrics_mod.Settings)  # [metrics]
    # [log] deliveries: a `delivery.succeeded` line per success at INFO rather than DEBUG.
    log_deliveries: bool = False
    # [endpoints]: per host and port, a request cap, a rate, the circuit breaker.
    endpoints: endpoints_mod.Settings = field(default_factory=endpoints_mod.Settings)

    def claim_lifetime(self, source: Source) -> float:
        """How long a claim on this source's rows lasts before another worker may take it
        (while a heartbeat does not extend it)."""
        return source.lifetime if source.lifetime is not None else self.claim_timeout

    def start_within(self, source: Source) -> float:
        """How long after its claim a row may still start its request: the request must end
        (http.timeout) with time to spare for its settle (5 s, or half the slack if less). A
        claim that heartbeats is extended while the row waits and runs, so it starts anyway."""
        if source.heartbeat:
            return math.inf
        return _start_within(self.claim_lifetime(source), self.http_timeout)


def _start_within(lifetime: float, http_timeout: float) -> float:
    slack = lifetime - http_timeout
    return slack - min(5.0, slack / 2)


log = logs.get("relay.config")

# The least each duration may be: below these a loop spins or nothing can succeed.
MIN_SWEEP_INTERVAL = 1.0
MIN_HEARTBEAT = 0.5
MIN_CLAIM_TIMEOUT = 1.0
MIN_HTTP_TIMEOUT = 0.1
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


_TOP_KEYS = {
    "database",
    "relay",
    "http",
    "retry",
    "health",
    "sources",
    "jobs",
    "inbox",
    "admin",
    "metrics",
    "log",
    "endpoints",
}
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
    "retry": set(retry_policy.KEYS),
    "health": {"listen", "allow_remote"},
    "log": {"deliveries"},
}
# -- sources ---------------------------------------------------------------------------------


def _source(name: str, data: Any, ctx: sources.ParseContext) -> Source:
    where = f"sources.{name}"
    if not _NAME.match(name):
        raise ConfigError(
            f"{where}: source names are lower-case letters, digits and _ (at most 40), "
            f"starting with a letter"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    kind = sources.KINDS.get(data.get("kind"))  # type: ignore[arg-type]
    if kind is None:
        kinds = ", ".join(repr(k) for k in sources.KINDS)
        raise ConfigError(f"{where}.kind: expected one of {kinds}, got {data.get('kind')!r}")
    return kind.parse(name, readers.source_values(where, data, ctx.env), ctx)


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
    host, port = readers.address(
        "health.listen", value, "'127.0.0.1:8081' (or '[::1]:8081'; '' turns it off)"
    )
    ip = guard.parse_ip(host)
    loopback = host == "localhost" if ip is None else guard.classify(ip) == "loopback"
    if not loopback and not readers.boolean("health.allow_remote", allow_remote):
        raise ConfigError(
            f"health.listen: {host!r} is not a loopback address, so the health endpoint would be "
            f"reachable from other hosts; set health.allow_remote = true to mean it, or listen "
            f"on 127.0.0.1"
        )
    return host, port


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
    for key, url in source.targets.items():
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
    log_table = _section(raw, "log")

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

    policy = retry_policy.parse("retry", retry, RetryPolicy())
    max_attempts = policy.limit(None)
    scheduled = jobs_mod.parse(raw.get("jobs"))
    inboxes = inbox_mod.parse(raw.get("inbox"), env)
    sources_raw = raw.get("sources", {})
    if not isinstance(sources_raw, dict) or not (sources_raw or scheduled or inboxes):
        raise ConfigError(
            "sources: no sources configured; add a [sources.NAME] table with kind = 'outbox' "
            "or kind = 'table' (or [jobs.NAME] or [inbox.NAME] tables alone)"
        )
    ctx = sources.ParseContext(env=env, max_attempts=max_attempts, retry=policy)
    configured = tuple(_source(n, d, ctx) for n, d in sources_raw.items())
    for kind in sources.KINDS.values():
        same = [s.name for s in configured if s.kind is kind]
        if kind.single and len(same) > 1:
            raise ConfigError(f"sources: only one {kind.name} source is allowed, got {same}")

    allowed = _allow(http.get("allow", []))
    for source in configured:
        _check_fixed_targets(source, allowed)
    host, port = _health(health.get("listen", "127.0.0.1:8081"), health.get("allow_remote", False))
    admin_tokens = admin_mod.parse(raw.get("admin"), env)
    if admin_tokens and host is None:
        raise ConfigError(
            "admin.tokens: the admin API is served on health.listen, which is off; set it"
        )
    for inbox in inboxes:
        if inbox.listen is None and host is None:
            raise ConfigError(
                f"inbox.{inbox.name}.listen: required while health.listen is off (the inbox is "
                f"mounted on that server otherwise)"
            )
    channel = readers.ident("relay.channel", relay.get("channel", "relay"))
    # Requests at once, over every endpoint; each endpoint takes at most half unless
    # [endpoints] says otherwise, so one that hangs leaves the other half to the rest.
    max_in_flight = readers.integer("relay.max_in_flight", relay.get("max_in_flight", 40))
    # 100: a claim of ~50 rows costs PostgreSQL ~15% less per row than one of ~30 (each claim
    # is planned anew), and claim_ahead follows it within its safe bound (below).
    batch_size = readers.integer("relay.batch_size", relay.get("batch_size", 100))
    claim_timeout = duration(
        "relay.claim_timeout", relay.get("claim_timeout", 60.0), minimum=MIN_CLAIM_TIMEOUT
    )
    http_timeout = duration("http.timeout", http.get("timeout", 10.0), minimum=MIN_HTTP_TIMEOUT)
    # A claim must outlive the request it covers, or another relay (or Documenso's runner)
    # could take the row over while it is still being delivered; unless relay extends the
    # claim while the request runs (a heartbeat), as it does for the kinds that can.
    lifetimes = {"relay.claim_timeout": claim_timeout}
    for source in configured:
        if source.lifetime is not None:
            lifetimes[f"sources.{source.name}.stuck_after"] = source.lifetime
    if all(s.heartbeat for s in configured if s.lifetime is None):
        lifetimes.pop("relay.claim_timeout")
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
    # (Rows of sources whose claims heartbeat may wait as long as it takes.)
    within = _start_within(min(lifetimes.values()), http_timeout) if lifetimes else math.inf
    safe_ahead = int(min(max_in_flight * within / http_timeout, 1e9))
    claim_ahead = readers.integer(
        "relay.claim_ahead", relay.get("claim_ahead", min(batch_size, safe_ahead)), minimum=0
    )
    if claim_ahead > safe_ahead:
        log.warning(
            "config.claim_ahead",
            claim_ahead=claim_ahead,
            max_in_flight=max_in_flight,
            http_timeout_s=http_timeout,
            safe=safe_ahead,
            hint="rows that wait for a hung receiver may reach the end of their claim and be "
            "handed back unsent; lower relay.claim_ahead to the safe figure or raise "
            "relay.claim_timeout",
        )
    return Config(
        database_url=url,
        listen_url=listen_url,
        worker_id=readers.string(
            "relay.worker_id", relay.get("worker_id", f"{socket.gethostname()}:{os.getpid()}")
        ),
        sources=configured,
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
        user_agent=readers.string(
            "http.user_agent", http.get("user_agent", f"relay/{__version__}")
        ),
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
        jobs=scheduled,
        inboxes=inboxes,
        admin_tokens=admin_tokens,
        metrics=metrics_mod.parse(raw.get("metrics"), (s.name for s in configured)),
        log_deliveries=readers.boolean("log.deliveries", log_table.get("deliveries", False)),
        endpoints=endpoints_mod.parse(raw.get("endpoints"), max_in_flight),
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
