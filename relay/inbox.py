"""Inboxes (`[inbox.NAME]`): POST endpoints on relay's HTTP server that take a provider's
callbacks into the database, validated, once.

A request is checked in this order, each failure answered with its reason and nothing written:
its size (413), its credentials (401: a Standard Webhooks signature, or a shared secret in a
header), its JSON and the fields the inbox requires with their types (400). Then, in one
transaction, its key (from a field or a header) is recorded in relay.inbox; a key already there
answers 200 as a duplicate and runs nothing. Otherwise the inbox's statement runs with the
request's fields as named parameters (or, without a statement, the body is kept in
relay.inbox), and only after the commit does the sender get its 200. Concurrent duplicates wait
for the first's commit on relay.inbox's primary key, then find it there."""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
import psycopg_pool
from aiohttp import web
from psycopg.types.json import Jsonb

from relay import logs, readers, signing
from relay.readers import ConfigError

log = logs.get("relay.inbox")

KEYS = frozenset(
    {"path", "listen", "required", "max_bytes", "secret", "signature", "header", "key", "sql"}
)
TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}
DEFAULT_MAX_BYTES = 1024 * 1024
SIGNATURE_TOLERANCE = 300  # seconds: Standard Webhooks' replay window
_PARAM = re.compile(r"%\(([^)]+)\)s")


@dataclass(frozen=True, slots=True)
class Inbox:
    name: str
    path: str
    listen: tuple[str, int] | None  # its own address; None: relay's HTTP server (health.listen)
    required: Mapping[str, str]  # dotted field path -> type name
    max_bytes: int
    key: tuple[str, ...]  # dotted field paths, or "header:<Name>"; several make one key
    statement: str | None  # None: keep the body in relay.inbox
    params: tuple[str, ...]  # the statement's %(name)s
    signing_keys: tuple[bytes, ...] = field(default=(), repr=False)  # Standard Webhooks
    header: str | None = None  # a shared secret's header
    secret: str | None = field(default=None, repr=False)


def parse(raw: Any, env: Mapping[str, str]) -> tuple[Inbox, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError("inbox: expected tables [inbox.NAME] with key and sql")
    inboxes = tuple(_inbox(n, readers.source_values(f"inbox.{n}", d, env)) for n, d in raw.items())
    paths = [(i.listen, i.path) for i in inboxes]
    for inbox in inboxes:
        if paths.count((inbox.listen, inbox.path)) > 1:
            raise ConfigError(f"inbox.{inbox.name}.path: {inbox.path!r} is another inbox's too")
    return inboxes


def _inbox(name: str, data: Any) -> Inbox:
    where = f"inbox.{name}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table with key and sql")
    readers.ident(where, name)
    readers.unknown(where, data, set(KEYS))
    path = readers.string(f"{where}.path", data.get("path", f"/inbox/{name}"))
    if not path.startswith("/") or path in ("/livez", "/healthz", "/readyz", "/status", "/metrics"):
        raise ConfigError(f"{where}.path: expected a path of its own like '/webhooks/{name}'")
    listen = None
    if "listen" in data:
        listen = readers.address(f"{where}.listen", data["listen"], "'0.0.0.0:8090'")
    required_raw = data.get("required", {})
    if not isinstance(required_raw, dict):
        raise ConfigError(f'{where}.required: expected a table of field = "type"')
    for path_, kind in required_raw.items():
        if kind not in TYPES:
            raise ConfigError(
                f"{where}.required.{path_}: {kind!r} is not a type; one of {', '.join(TYPES)}"
            )
    if "key" not in data:
        raise ConfigError(
            f'{where}.key: required: the field (e.g. "call_id") or header (e.g. '
            f'"header:webhook-id") whose value makes a request the same as an earlier one'
        )
    raw_key = data["key"] if isinstance(data["key"], list) else [data["key"]]
    key = tuple(readers.string(f"{where}.key", part) for part in raw_key)
    if not key:
        raise ConfigError(f"{where}.key: expected a field, a header, or a list of them")
    statement = data.get("sql")
    if statement is not None and (not isinstance(statement, str) or not statement.strip()):
        raise ConfigError(f"{where}.sql: expected a statement, with the fields as %(name)s")
    keys: tuple[bytes, ...] = ()
    header = secret = None
    signature = data.get("signature")
    if signature is not None:
        if signature != "standard-webhooks":
            raise ConfigError(f'{where}.signature: only "standard-webhooks" is known')
        if "secret" not in data:
            raise ConfigError(f"{where}.secret: required with signature (whsec_...)")
        secrets = data["secret"] if isinstance(data["secret"], list) else [data["secret"]]
        keys = tuple(signing.config_key(readers.secret_text(f"{where}.secret", s)) for s in secrets)
    elif "header" in data:
        header = readers.string(f"{where}.header", data["header"])
        if "secret" not in data:
            raise ConfigError(f"{where}.secret: required with header")
        secret = readers.secret_text(f"{where}.secret", data["secret"])
    elif "secret" in data:
        raise ConfigError(
            f'{where}.secret: say how it is checked: signature = "standard-webhooks", or '
            f'header = "X-..." for a shared secret sent as it is'
        )
    return Inbox(
        name=name,
        path=path,
        listen=listen,
        required=dict(required_raw),
        max_bytes=readers.integer(f"{where}.max_bytes", data.get("max_bytes", DEFAULT_MAX_BYTES)),
        key=key,
        statement=statement,
        params=tuple(dict.fromkeys(_PARAM.findall(statement or ""))),
        signing_keys=keys,
        header=header,
        secret=secret,
    )


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def lookup(body: Any, dotted: str) -> tuple[bool, Any]:
    value = body
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def check(inbox: Inbox, headers: Mapping[str, str], raw: bytes) -> tuple[str, dict[str, Any]]:
    """The request's key and the statement's parameters; Refused if it may not come in."""
    _authenticate(inbox, headers, raw)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Refused(400, f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Refused(400, "the body is not a JSON object")
    for dotted, kind in inbox.required.items():
        found, value = lookup(body, dotted)
        if not found or value is None:
            raise Refused(400, f"{dotted}: required")
        # JSON's true is not an integer, whatever Python says.
        if not isinstance(value, TYPES[kind]) or (kind != "boolean" and isinstance(value, bool)):
            raise Refused(400, f"{dotted}: expected {kind}, got {_json_type(value)}")
    parts = []
    for part in inbox.key:
        if part.startswith("header:"):
            value = headers.get(part.removeprefix("header:"))
        else:
            found, value = lookup(body, part)
            value = None if not found or isinstance(value, dict | list) else value
        if value is None or value == "":
            raise Refused(400, f"{part}: required (it tells a repeated request from a new one)")
        parts.append(str(value))
    # One part as it is; several as a JSON array, so no two lists of parts make one key.
    key = parts[0] if len(parts) == 1 else orjson.dumps(parts).decode()
    params: dict[str, Any] = {}
    for name in inbox.params:
        if name == "body":
            params[name] = Jsonb(body)
        elif name == "key":
            params[name] = key
        else:
            _, value = lookup(body, name)
            params[name] = Jsonb(value) if isinstance(value, dict | list) else value
    return key, params | {"_body": Jsonb(body)}


async def _read(request: web.Request, limit: int) -> bytes:
    """The whole body, however many pieces it arrives in; Refused (413) as soon as it is
    longer than `limit`, without reading the rest."""
    if request.content_length is not None and request.content_length > limit:
        raise Refused(413, f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _authenticate(inbox: Inbox, headers: Mapping[str, str], raw: bytes) -> None:
    if inbox.signing_keys:
        msg_id = headers.get("webhook-id", "")
        stamp = headers.get("webhook-timestamp", "")
        signature = headers.get("webhook-signature", "")
        if not (msg_id and stamp.isdigit() and signature):
            raise Refused(401, "webhook-id, webhook-timestamp and webhook-signature are required")
        if abs(time.time() - int(stamp)) > SIGNATURE_TOLERANCE:
            raise Refused(401, "webhook-timestamp is more than 5 minutes away from now")
        if not any(
            signing.verify(k, msg_id, int(stamp), raw, signature) for k in inbox.signing_keys
        ):
            raise Refused(401, "webhook-signature does not match")
    elif inbox.header is not None:
        given = headers.get(inbox.header, "")
        assert inbox.secret is not None
        if not hmac.compare_digest(given.encode(), inbox.secret.encode()):
            raise Refused(401, f"{inbox.header} is missing or wrong")


def _json_type(value: Any) -> str:
    for name, kinds in TYPES.items():
        if isinstance(value, kinds) and not (name != "boolean" and isinstance(value, bool)):
            return name
    return "null"


def _answer(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


Accept = Callable[[Inbox, str, dict[str, Any]], Any]  # an awaitable: True if new


def handler(inbox: Inbox, accept: Callable[[], Accept]) -> Callable[[web.Request], Any]:
    """The inbox's aiohttp handler; `accept()` gives the current relay's Store.accept (a reload
    may replace it)."""

    async def handle(request: web.Request) -> web.Response:
        try:
            raw = await _read(request, inbox.max_bytes)
            key, params = check(inbox, request.headers, raw)
        except Refused as refused:
            log.info(
                "inbox.refused",
                inbox=inbox.name,
                status=refused.status,
                reason=refused.reason,
            )
            return _answer(refused.status, {"error": refused.reason})
        try:
            new = await accept()(inbox, key, params)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            log.warning(
                "inbox.unavailable",
                inbox=inbox.name,
                key=key,
                error=logs.first_line(exc),
            )
            response = _answer(503, {"error": "the database is not available; send it again"})
            response.headers["Retry-After"] = "5"
            return response
        except psycopg.Error as exc:
            # The statement refused it (a constraint, a RAISE): the sender should try again
            # later, and the reason is for the operator, not the sender.
            log.warning("inbox.failed", inbox=inbox.name, key=key, error=logs.first_line(exc))
            return _answer(500, {"error": "not accepted; see relay's log"})
        log.info(
            "inbox.accepted",
            inbox=inbox.name,
            key=key,
            duplicate="no" if new else "yes",
        )
        return _answer(200, {"accepted": True, "duplicate": not new})

    return handle
