"""Request shaping: how a claimed row becomes an HTTP request. Pure: no I/O, `now` and the
signing keys are arguments.

A source's table holds the keys in `KEYS`; `parse` reads them into a `Shape`. The claim fetches
what `Shape.values()` names (columns and SQL expressions over the row, each under a stable
name) and `build` turns those values into a `Request`, or a `Refused` whose reason names the
column or expression and says what to do: a bad row is settled alone with that reason.

    method = "POST"                             POST (default), PUT, PATCH; GET, DELETE: no body
    url = "https://..."                         one target: fixed,
    url_column = "url"                            from a column,
    [route] column = "job_type"                   or chosen by a column's value
            targets = { ocr = "https://...", "*" = "https://..." }
    payload = "payload" | payload_sql = "..."   the body: a column, an expression, or the row
    format = "json" | "form"
    headers = { "X-Static" = "v", "X-Token" = { env = "TOKEN" } }
    header_columns = { "X-Event-Type" = "event_type" }
    header_sql = { "Idempotency-Key" = "'email-' || id" }
    auth = { bearer = ... } | { basic = { username = ..., password = ... } }
    signing = "standard-webhooks" | "none" | { hmac_sha256 = { header, prefix, encoding } }
    secret = "whsec_..." | [...] ; secret_column = "secret"

Every request carries `webhook-id` = "{source}_{key}", the same on every attempt of a row so
receivers can drop duplicates, and `relay-attempt`.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlencode

import orjson

from relay import readers, signing
from relay.readers import ConfigError

KEYS: frozenset[str] = frozenset(
    {
        "method",
        "url",
        "url_column",
        "route",
        "payload",
        "payload_sql",
        "format",
        "headers",
        "header_columns",
        "header_sql",
        "auth",
        "signing",
        "secret",
        "secret_column",
        "fixed_credentials_for_row_urls",
    }
)

# The names `Shape.values()` gives what the claim fetches; the store uses them as JSON keys.
URL = "url"
ROUTE = "route"
BODY = "body"
SECRET = "secret"
HEADER = "h:"  # + the header's name as configured
# Request headers never written to an attempt log or a write-back (lower case): credentials and
# signatures; a shaped request adds its own (see Shape.private).
PRIVATE_HEADERS = frozenset({"authorization", "cookie", "webhook-signature"})

METHODS = ("POST", "PUT", "PATCH", "GET", "DELETE")
# GET and DELETE send no body: many servers and proxies drop or refuse one.
BODYLESS = frozenset({"GET", "DELETE"})
WILDCARD = "*"

JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"

# RFC 9110 field-name: a token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Headers relay writes itself, and framing headers the HTTP client owns.
_RESERVED = frozenset(
    {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "relay-attempt",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
    }
)
_CONTROL = ("\r", "\n", "\x00")


class Format(StrEnum):
    json = "json"
    form = "form"


class Scheme(StrEnum):
    standard_webhooks = "standard-webhooks"
    none = "none"
    hmac_sha256 = "hmac_sha256"


class Encoding(StrEnum):
    hex = "hex"
    base64 = "base64"


_Choice = TypeVar("_Choice", Format, Encoding)


class ValueKind(StrEnum):
    column = "column"  # a column of the row (of the claim's result, for `functions`)
    sql = "sql"  # a SQL expression over the row, evaluated in the claim
    row = "row"  # the whole row as a JSON object


@dataclass(frozen=True, slots=True)
class Value:
    """One value the claim must fetch. Select it as text, `(expr)::text` (the whole row as
    `to_jsonb(row)::text`), so that it arrives as a str or None; `build` also takes JSON
    values (a dict for the whole row, numbers, booleans) as they are."""

    kind: ValueKind
    text: str = ""  # the column's name or the expression; "" for the row

    def describe(self) -> str:
        if self.kind is ValueKind.column:
            return f"column {self.text!r}"
        if self.kind is ValueKind.sql:
            return f"expression {self.text!r}"
        return "the whole row"


@dataclass(frozen=True, slots=True)
class Signing:
    scheme: Scheme = Scheme.standard_webhooks
    header: str = ""  # hmac_sha256 only
    prefix: str = ""
    encoding: Encoding = Encoding.hex


@dataclass(frozen=True, slots=True)
class Route:
    column: str
    # value -> URL; "*" for any other value (or NULL). URLs may hold tokens: not in repr.
    targets: Mapping[str, str] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Shape:
    where: str  # "sources.NAME", for messages
    method: str = "POST"
    url: str | None = field(default=None, repr=False)
    url_column: str | None = None
    route: Route | None = None
    payload: str | None = None
    payload_sql: str | None = None
    format: Format = Format.json
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    header_columns: Mapping[str, str] = field(default_factory=dict)
    header_sql: Mapping[str, str] = field(default_factory=dict)
    authorization: str | None = field(default=None, repr=False)  # the header's whole value
    signing: Signing = field(default_factory=Signing)
    # The configured secrets as HMAC keys (decoded once); a row's secret_column wins.
    keys: tuple[bytes, ...] = field(default=(), repr=False)
    secret_column: str | None = None
    # "Content-Type" sent with the body, unless a fixed header sets it (then None).
    content_type: str | None = JSON_TYPE
    # Worked out once from the fields above (a request is shaped per row): where the URL
    # comes from, for the error of an invalid one, and the headers an attempt log must not
    # keep: the fixed ones and those from columns and expressions (any may be a credential).
    origin: str = field(init=False, default="", repr=False, compare=False)
    private: frozenset[str] = field(init=False, default=PRIVATE_HEADERS, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.url_column is not None:
            origin = f" in column {self.url_column!r}"
        elif self.route is not None:
            origin = f" for column {self.route.column!r} in {self.where}.route"
        else:
            origin = f" of {self.where}"
        names = {n.lower() for n in (*self.headers, *self.header_columns, *self.header_sql)}
        if self.signing.scheme is Scheme.hmac_sha256:
            names.add(self.signing.header.lower())
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "private", PRIVATE_HEADERS | names)

    @property
    def sends_body(self) -> bool:
        return self.method not in BODYLESS

    def values(self) -> dict[str, Value]:
        """What the claim must fetch for `build`, by the name `build` reads it under."""
        out: dict[str, Value] = {}
        if self.url_column is not None:
            out[URL] = Value(ValueKind.column, self.url_column)
        if self.route is not None:
            out[ROUTE] = Value(ValueKind.column, self.route.column)
        body = self.body_value()
        if body is not None:
            out[BODY] = body
        if self.secret_column is not None:
            out[SECRET] = Value(ValueKind.column, self.secret_column)
        for name, column in self.header_columns.items():
            out[HEADER + name] = Value(ValueKind.column, column)
        for name, expression in self.header_sql.items():
            out[HEADER + name] = Value(ValueKind.sql, expression)
        return out

    def body_value(self) -> Value | None:
        if not self.sends_body:
            return None
        if self.payload is not None:
            return Value(ValueKind.column, self.payload)
        if self.payload_sql is not None:
            return Value(ValueKind.sql, self.payload_sql)
        return Value(ValueKind.row)


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    url: str = field(repr=False)  # may hold a token in its query string
    headers: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Refused:
    """A row that cannot become a request; the reason names the column or expression and says
    what to do. It never quotes a secret or the body."""

    reason: str


# -- parse ------------------------------------------------------------------------------------


def parse(where: str, data: Mapping[str, Any], env: Mapping[str, str]) -> Shape:
    """The request-shaping keys of a source's table (`where` = "sources.NAME"); the table's
    other keys are left to its kind. Fixed values may be `{ env = "NAME" }` or
    `{ file = "/path" }`."""
    method = _method(where, data)
    sends_body = method not in BODYLESS
    url, url_column, route = _target(where, data, env)
    if url_column is not None:
        readers.fixed_credentials(
            where,
            data,
            ("secret", "headers", "auth"),
            "the rows choose where it sends (url_column)",
        )
    payload, payload_sql, fmt = _body(where, data, method, sends_body)
    scheme = _signing(where, data.get("signing", Scheme.standard_webhooks.value))
    authorization = _auth(where, data.get("auth"), env)
    fixed = _fixed_headers(where, data.get("headers", {}), env)
    header_columns = _header_map(where, "header_columns", data.get("header_columns", {}))
    header_sql = _header_map(where, "header_sql", data.get("header_sql", {}))
    _distinct_headers(where, fixed, header_columns, header_sql, scheme, authorization)
    keys, secret_column = _secrets(where, data, scheme, env)
    # A fixed Content-Type replaces relay's; one from a row replaces it where not NULL (build).
    if not sends_body or any(name.lower() == "content-type" for name in fixed):
        content_type = None
    else:
        content_type = FORM_TYPE if fmt is Format.form else JSON_TYPE
    return Shape(
        where=where,
        method=method,
        url=url,
        url_column=url_column,
        route=route,
        payload=payload,
        payload_sql=payload_sql,
        format=fmt,
        headers=fixed,
        header_columns=header_columns,
        header_sql=header_sql,
        authorization=authorization,
        signing=scheme,
        keys=keys,
        secret_column=secret_column,
        content_type=content_type,
    )


def _method(where: str, data: Mapping[str, Any]) -> str:
    raw = data.get("method", "POST")
    method = raw.upper() if isinstance(raw, str) else raw
    if method not in METHODS:
        raise ConfigError(f"{where}.method: expected one of {', '.join(METHODS)}, got {raw!r}")
    assert isinstance(method, str)
    return method


def _target(
    where: str, data: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[str | None, str | None, Route | None]:
    given = [key for key in ("url", "url_column", "route") if key in data]
    if len(given) != 1:
        also = f" (got {' and '.join(given)})" if given else ""
        raise ConfigError(
            f"{where}: set exactly one of url (a fixed target), url_column (the row's column "
            f"that holds the target URL) or [{where}.route] (a column whose value picks the "
            f"target){also}"
        )
    if "url" in data:
        key = f"{where}.url"
        return readers.http_url(key, readers.value(key, data["url"], env)), None, None
    if "url_column" in data:
        return None, readers.ident(f"{where}.url_column", data["url_column"]), None
    key = f"{where}.route"
    route = data["route"]
    if not isinstance(route, dict):
        raise ConfigError(
            f'{key}: expected a table: {{ column = "job_type", targets = {{ ocr = '
            f'"https://...", "*" = "https://..." }} }}'
        )
    readers.unknown(key, route, {"column", "targets"})
    if "column" not in route:
        raise ConfigError(f"{key}.column: required: the column whose value picks the target")
    if "targets" not in route:
        raise ConfigError(
            f'{key}.targets: required: a table of value = URL, with "*" for any other value'
        )
    column = readers.ident(f"{key}.column", route["column"])
    targets = route["targets"]
    if not isinstance(targets, dict) or not targets:
        raise ConfigError(
            f'{key}.targets: expected a table of value = URL, with "*" for any other value'
        )
    urls = {}
    for v, u in targets.items():
        target = f"{key}.targets.{v!r}"
        urls[str(v)] = readers.http_url(target, readers.value(target, u, env))
    return None, None, Route(column, urls)


def _body(
    where: str, data: Mapping[str, Any], method: str, sends_body: bool
) -> tuple[str | None, str | None, Format]:
    if not sends_body:
        for key in ("payload", "payload_sql", "format"):
            if key in data:
                raise ConfigError(
                    f"{where}.{key}: method = {method!r} sends no body; remove {key}, or use "
                    f"POST, PUT or PATCH"
                )
        return None, None, Format.json
    if "payload" in data and "payload_sql" in data:
        raise ConfigError(
            f"{where}: set at most one of payload (the column that is the body) or payload_sql "
            f"(a SQL expression over the row); with neither, the body is the whole row"
        )
    payload = readers.opt_ident(f"{where}.payload", data.get("payload"))
    payload_sql = None
    if "payload_sql" in data:
        payload_sql = _expression(f"{where}.payload_sql", data["payload_sql"])
    fmt = _choice(
        f"{where}.format",
        Format,
        data.get("format", Format.json.value),
        "'json' or 'form' (application/x-www-form-urlencoded)",
    )
    return payload, payload_sql, fmt


def _choice(where: str, kind: type[_Choice], raw: Any, expected: str) -> _Choice:
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{where}: expected {expected}, got {raw!r}") from None


def _expression(where: str, value: Any) -> str:
    text = readers.string(where, value)
    if "\x00" in text:
        raise ConfigError(f"{where}: a SQL expression cannot hold NUL")
    return text


def _signing(where: str, raw: Any) -> Signing:
    key = f"{where}.signing"
    if isinstance(raw, str):
        if raw == Scheme.standard_webhooks.value:
            return Signing(Scheme.standard_webhooks)
        if raw == Scheme.none.value:
            return Signing(Scheme.none)
    if isinstance(raw, dict) and set(raw) == {Scheme.hmac_sha256.value}:
        options = raw[Scheme.hmac_sha256.value]
        inner = f"{key}.{Scheme.hmac_sha256.value}"
        if not isinstance(options, dict):
            raise ConfigError(
                f'{inner}: expected a table: {{ header = "X-Signature", prefix = "sha256=", '
                f'encoding = "hex" }}'
            )
        readers.unknown(inner, options, {"header", "prefix", "encoding"})
        if "header" not in options:
            raise ConfigError(
                f"{inner}.header: required: the header the receiver reads the signature from, "
                f'e.g. "X-Signature"'
            )
        header = readers.string(f"{inner}.header", options["header"])
        _header_name(f"{inner}.header", header)
        if header.lower() in _RESERVED or header.lower() == "authorization":
            raise ConfigError(f"{inner}.header: {header!r} is a header relay writes itself")
        prefix = options.get("prefix", "")
        if not isinstance(prefix, str) or any(c in prefix for c in _CONTROL):
            raise ConfigError(
                f'{inner}.prefix: expected text put before the signature, like "sha256="'
            )
        enc = _choice(
            f"{inner}.encoding", Encoding, options.get("encoding", "hex"), "'hex' or 'base64'"
        )
        return Signing(Scheme.hmac_sha256, header, prefix, enc)
    raise ConfigError(
        f'{key}: expected "standard-webhooks" (the default), "none", or {{ hmac_sha256 = '
        f'{{ header = "X-Signature", prefix = "sha256=", encoding = "hex" }} }}, got {raw!r}'
    )


def _auth(where: str, raw: Any, env: Mapping[str, str]) -> str | None:
    if raw is None:
        return None
    key = f"{where}.auth"
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in ("bearer", "basic"):
        raise ConfigError(
            f'{key}: expected {{ bearer = {{ env = "TOKEN" }} }} or {{ basic = {{ username = '
            f'"...", password = {{ env = "PASSWORD" }} }} }}'
        )
    if "bearer" in raw:
        token = _credential(f"{key}.bearer", raw["bearer"], env)
        return f"Bearer {token}"
    basic = raw["basic"]
    if not isinstance(basic, dict):
        raise ConfigError(
            f'{key}.basic: expected {{ username = "...", password = {{ env = "PASSWORD" }} }}'
        )
    readers.unknown(f"{key}.basic", basic, {"username", "password"})
    for part in ("username", "password"):
        if part not in basic:
            raise ConfigError(f"{key}.basic.{part}: required")
    username = _credential(f"{key}.basic.username", basic["username"], env)
    password = _credential(f"{key}.basic.password", basic["password"], env)
    if ":" in username:
        # RFC 7617: the user-id ends at the first colon.
        raise ConfigError(f"{key}.basic.username: a basic-auth username cannot hold ':'")
    pair = f"{username}:{password}".encode()
    return f"Basic {base64.b64encode(pair).decode()}"


def _credential(where: str, raw: Any, env: Mapping[str, str]) -> str:
    text = readers.secret_text(where, readers.value(where, raw, env))
    if any(c in text for c in _CONTROL):
        raise ConfigError(f"{where}: cannot hold a line break or NUL")
    return text


def _header_name(where: str, name: str) -> None:
    if not _TOKEN.match(name):
        raise ConfigError(
            f"{where}: {name!r} is not a header name (letters, digits and !#$%&'*+-.^_`|~, "
            f"no spaces or colons)"
        )


def _fixed_headers(where: str, raw: Any, env: Mapping[str, str]) -> dict[str, str]:
    key = f"{where}.headers"
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a table of header names to values")
    resolved = {name: readers.value(f"{key}.{name}", v, env) for name, v in raw.items()}
    out = readers.headers(key, resolved)
    for name in out:
        _header_name(f"{key}.{name}", name)
    return out


def _header_map(where: str, section: str, raw: Any) -> dict[str, str]:
    key = f"{where}.{section}"
    what = "column" if section == "header_columns" else "SQL expression"
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a table of header names to a {what} each")
    out: dict[str, str] = {}
    for name, source in raw.items():
        _header_name(f"{key}.{name}", name)
        if section == "header_columns":
            out[name] = readers.ident(f"{key}.{name}", source)
        else:
            out[name] = _expression(f"{key}.{name}", source)
    return out


def _distinct_headers(
    where: str,
    fixed: Mapping[str, str],
    columns: Mapping[str, str],
    expressions: Mapping[str, str],
    scheme: Signing,
    authorization: str | None,
) -> None:
    seen: dict[str, str] = {}
    for section, names in (
        ("headers", fixed),
        ("header_columns", columns),
        ("header_sql", expressions),
    ):
        for name in names:
            key = f"{where}.{section}.{name}"
            lower = name.lower()
            if lower in _RESERVED:
                raise ConfigError(f"{key}: {name!r} is a header relay writes itself; remove it")
            if scheme.scheme is Scheme.hmac_sha256 and lower == scheme.header.lower():
                raise ConfigError(
                    f"{key}: {name!r} carries the signature ({where}.signing); remove it"
                )
            if authorization is not None and lower == "authorization":
                raise ConfigError(f"{key}: {where}.auth writes Authorization; set only one")
            if lower in seen:
                raise ConfigError(f"{key}: {name!r} is also set by {seen[lower]}; set it once")
            seen[lower] = key


def _secrets(
    where: str, data: Mapping[str, Any], scheme: Signing, env: Mapping[str, str]
) -> tuple[tuple[bytes, ...], str | None]:
    has_secret = "secret" in data
    has_column = "secret_column" in data
    if scheme.scheme is Scheme.none:
        for key in ("secret", "secret_column"):
            if key in data:
                raise ConfigError(
                    f"{where}.{key}: signing = 'none' sends no signature, so it would go "
                    f"unused; remove {key}, or choose a signing scheme"
                )
        return (), None
    if has_secret and has_column:
        raise ConfigError(
            f"{where}: set at most one of secret (fixed) or secret_column (the row's column "
            f"that holds its receiver's secret)"
        )
    column = readers.opt_ident(f"{where}.secret_column", data.get("secret_column"))
    if scheme.scheme is Scheme.hmac_sha256:
        if not has_secret and not has_column:
            raise ConfigError(
                f"{where}.secret: required with signing = {{ hmac_sha256 = ... }}: the "
                f"receiver's shared secret (or secret_column, the row's column that holds it)"
            )
        if not has_secret:
            return (), column
        raw = data["secret"]
        if isinstance(raw, list):
            if len(raw) != 1:
                raise ConfigError(
                    f"{where}.secret: {scheme.scheme.value} sends one signature, so it takes "
                    f"one secret, got a list of {len(raw)}"
                )
            text = _credential(f"{where}.secret[0]", raw[0], env)
        else:
            text = _credential(f"{where}.secret", raw, env)
        # The receiver's shared secret as it is: these receivers use the text as the key.
        return (text.encode(),), None
    if not has_secret:
        return (), column
    raw = data["secret"]
    if isinstance(raw, list):
        resolved: Any = [readers.value(f"{where}.secret[{i}]", v, env) for i, v in enumerate(raw)]
    else:
        resolved = readers.value(f"{where}.secret", raw, env)
    secrets = readers.signing_secrets(f"{where}.secret", resolved)
    return tuple(signing.config_key(s) for s in secrets), None


# -- build ------------------------------------------------------------------------------------


def build(
    shape: Shape,
    *,
    source: str,
    key: str,
    attempt: int,
    values: Mapping[str, Any],
    now: int,
    keys: tuple[bytes, ...] | None = None,
) -> Request | Refused:
    """The request for one claimed row. `values` holds what `shape.values()` names (a row's
    secret already decrypted); `now` is the Unix time signed into Standard Webhooks;
    `keys` the HMAC keys, `shape.keys` unless given (a row's secret_column wins over both)."""
    url = _url(shape, values)
    if isinstance(url, Refused):
        return url
    body = _body_bytes(shape, values)
    if isinstance(body, Refused):
        return body
    msg_id = f"{source}_{key}"
    headers: dict[str, str] = {}
    if shape.content_type is not None:
        headers["Content-Type"] = shape.content_type
    headers["webhook-id"] = msg_id
    if shape.signing.scheme is Scheme.standard_webhooks:
        headers["webhook-timestamp"] = str(now)
    headers["relay-attempt"] = str(attempt)
    headers.update(shape.headers)
    for name in (*shape.header_columns, *shape.header_sql):
        found = _header_value(shape, name, values)
        if isinstance(found, Refused):
            return found
        if found is not None:
            if name.lower() == "content-type":
                headers.pop("Content-Type", None)
            headers[name] = found
    if shape.authorization is not None:
        headers["Authorization"] = shape.authorization
    signed = _sign(shape, headers, values, keys, msg_id, now, body)
    if isinstance(signed, Refused):
        return signed
    return Request(shape.method, url, headers, body)


def _url(shape: Shape, values: Mapping[str, Any]) -> str | Refused:
    if shape.url is not None:
        return shape.url
    if shape.url_column is not None:
        return _required(values, URL, shape.url_column, "the target URL")
    assert shape.route is not None
    route = shape.route
    value = _text(values[ROUTE])
    target = route.targets.get(value) if value is not None else None
    if target is None:
        target = route.targets.get(WILDCARD)
    if target is not None:
        return target
    shown = "NULL" if value is None else repr(value if len(value) <= 80 else value[:80] + "...")
    return Refused(
        f"route column {route.column!r} value {shown} has no target; add it under "
        f"[{shape.where}.route.targets] or '*'"
    )


def _required(values: Mapping[str, Any], name: str, column: str, what: str) -> str | Refused:
    text = _text(values[name])
    if not text:
        return Refused(
            f"{name} column {column!r} is NULL or empty for this row; store {what} there"
        )
    return text


def _body_bytes(shape: Shape, values: Mapping[str, Any]) -> bytes | Refused:
    if not shape.sends_body:
        return b""
    raw = values[BODY]
    if shape.format is Format.json:
        if not isinstance(raw, str):
            # A JSON value (the whole row as an object, a number, ...) or NULL as `null`.
            try:
                return orjson.dumps(raw)
            except orjson.JSONEncodeError as exc:
                return Refused(
                    f"{_body_origin(shape)} cannot be written as JSON ({exc}); select it as JSON "
                    f"text instead"
                )
        if not _is_json(raw):
            return Refused(
                f"{_body_origin(shape)} is not valid JSON; store JSON text there, or shape the "
                f"body with payload_sql"
            )
        # A json/jsonb value as its JSON text, exactly as the database gave it.
        return raw.encode()
    return _form(_body_origin(shape), raw)


def _body_origin(shape: Shape) -> str:
    """Where the body came from, for an error (worked out only then: this runs per row)."""
    origin = shape.body_value()
    assert origin is not None
    return f"the body ({origin.describe()})"


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        # orjson refuses numbers beyond a double (1e400) that PostgreSQL's json keeps, and
        # lone surrogate escapes; the standard parser takes both.
        try:
            json.loads(text, parse_constant=_no_constant)
        except ValueError:
            return False
    return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _form(where: str, raw: Any) -> bytes | Refused:
    """application/x-www-form-urlencoded from a JSON object of scalars: text as it is, numbers
    as written in the JSON, true/false, a list as the field repeated; a null field is left
    out."""
    fix = "build a flat object with payload_sql, e.g. jsonb_build_object('To', phone, 'Body', text)"
    if isinstance(raw, str):
        try:
            # Numbers kept as their JSON text: a float would round a 20-digit id.
            data = json.loads(
                raw, parse_int=_Number, parse_float=_Number, parse_constant=_no_constant
            )
        except ValueError:
            return Refused(f"{where} is not valid JSON; format = 'form' needs a JSON object")
    else:
        data = raw
    if not isinstance(data, dict):
        kind = _json_kind(data)
        return Refused(f"format = 'form' needs a JSON object, but {where} is {kind}; {fix}")
    pairs: list[tuple[str, str]] = []
    for name, value in data.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict | list):
                return Refused(
                    f"format = 'form' takes text, numbers, booleans or lists of them, but field "
                    f"{name!r} of {where} holds {_json_kind(item)}; {fix}"
                )
            text = _text(item)
            if text is not None:
                pairs.append((name, text))
    return urlencode(pairs).encode()


class _Number(str):
    """A JSON number kept as the text it was written as."""

    __slots__ = ()


def _json_kind(value: Any) -> str:
    if isinstance(value, _Number):
        return "a number"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _text(value: Any) -> str | None:
    """A fetched value as header/URL/route text: str as it is, JSON scalars as JSON writes them,
    objects and arrays as compact JSON; NULL stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return orjson.dumps(value).decode()


def _header_value(shape: Shape, name: str, values: Mapping[str, Any]) -> str | Refused | None:
    """A header from a column or an expression; NULL sends no header."""
    text = _text(values[HEADER + name])
    if text is None:
        return None
    if any(c in text for c in _CONTROL):
        if name in shape.header_columns:
            origin = f"column {shape.header_columns[name]!r}"
        else:
            origin = f"expression {shape.header_sql[name]!r}"
        return Refused(
            f"header {name!r} from {origin} holds a line break or NUL, which no header value "
            f"can; strip them in the application or with header_sql"
        )
    return text


def _sign(
    shape: Shape,
    headers: dict[str, str],
    values: Mapping[str, Any],
    keys: tuple[bytes, ...] | None,
    msg_id: str,
    now: int,
    body: bytes,
) -> Refused | None:
    scheme = shape.signing
    if scheme.scheme is Scheme.none:
        return None
    secret = values[SECRET] if shape.secret_column is not None else None
    if shape.secret_column is not None and scheme.scheme is Scheme.hmac_sha256:
        # The receiver checks a signature, so a row without its secret cannot be sent.
        secret = _required(values, SECRET, shape.secret_column, "the receiver's secret")
        if isinstance(secret, Refused):
            return secret
    if secret:
        if scheme.scheme is Scheme.hmac_sha256:
            keys = (secret.encode(),)
        else:
            try:
                keys = (signing.secret_key(secret),)
            except ValueError as exc:  # never quotes the secret
                return Refused(
                    f"cannot sign with the secret in column {shape.secret_column!r}: {exc}"
                )
    elif keys is None:
        # Standard Webhooks and a row without its own secret: the configured ones, if any
        # (as relay always has: a NULL secret_column sends unsigned).
        keys = shape.keys
    if not keys:
        # Standard Webhooks without a secret: sent unsigned, as relay always has
        # (hmac_sha256 requires one at parse).
        return None
    if scheme.scheme is Scheme.standard_webhooks:
        headers["webhook-signature"] = signing.signatures(keys, msg_id, now, body)
    else:
        digest = signing.body_hmac(keys[0], body, scheme.encoding.value)
        headers[scheme.header] = scheme.prefix + digest
    return None
