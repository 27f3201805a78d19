"""relay.request.parse: the request-shaping keys of a source, their defaults and their errors."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from relay import request
from relay.readers import ConfigError
from relay.request import Format, Scheme, Value, ValueKind

WHERE = "sources.s"
URL = "https://hooks.example.com/in"
KEY_BYTES = bytes(range(32))
WHSEC = "whsec_" + base64.b64encode(KEY_BYTES).decode()
WHSEC2 = "whsec_" + base64.b64encode(bytes(range(1, 33))).decode()
ENV = {"TOKEN": "tok-123", "PASS": "p@ss", "SECRET": WHSEC, "TARGET": URL, "USER": "AC1"}
# Stands for a credential: no error message may quote it.
CANARY = "SUPERSECRETCANARY"


def parse(**data: Any) -> request.Shape:
    return request.parse(WHERE, data, ENV)


def parse_url(**data: Any) -> request.Shape:
    return parse(url=URL, **data)


def refuses(match: str, **data: Any) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        parse(**data)
    return str(info.value)


# -- defaults and the keys it owns --------------------------------------------------------------


def test_defaults_post_the_whole_row_as_json_signed_with_standard_webhooks() -> None:
    shape = parse_url()
    assert shape.method == "POST"
    assert shape.url == URL
    assert shape.format is Format.json
    assert shape.signing.scheme is Scheme.standard_webhooks
    assert shape.content_type == "application/json"
    assert shape.keys == ()
    assert shape.sends_body
    assert shape.values() == {"body": Value(ValueKind.row)}


def test_keys_of_other_kinds_are_left_to_them() -> None:
    shape = parse_url(table="public.jobs", status="status", filter="lane = 'a'")
    assert shape.url == URL


BAD_VALUES: dict[str, Any] = {
    "method": 5,
    "url": "ftp://example.com",
    "url_column": "",
    "route": "job_type",
    "payload": "",
    "payload_sql": "",
    "format": "xml",
    "headers": "X-A: b",
    "header_columns": ["X-A"],
    "header_sql": "X-A",
    "auth": "Bearer x",
    "signing": "hmac",
    "secret": "not-a-whsec",
    "secret_column": "",
    "fixed_credentials_for_row_urls": "yes",
}


def test_every_owned_key_has_a_bad_value_case() -> None:
    assert set(BAD_VALUES) == set(request.KEYS)


@pytest.mark.parametrize("key", sorted(request.KEYS))
def test_parse_reads_every_key_it_owns_and_names_it_in_errors(key: str) -> None:
    # A bad value for each key in KEYS is refused with the key's name: parse reads them all.
    if key in ("url", "url_column", "route"):
        base: dict[str, Any] = {}
    elif key == "fixed_credentials_for_row_urls":
        base = {"url_column": "url", "secret": WHSEC}
    else:
        base = {"url": URL}
    with pytest.raises(ConfigError, match=rf"^{WHERE}\.{key}\b"):
        request.parse(WHERE, {**base, key: BAD_VALUES[key]}, ENV)


# -- method -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "post", "Patch"])
def test_methods_with_a_body(method: str) -> None:
    shape = parse_url(method=method)
    assert shape.method == method.upper()
    assert shape.sends_body


@pytest.mark.parametrize("method", ["GET", "DELETE", "get"])
def test_get_and_delete_send_no_body(method: str) -> None:
    shape = parse_url(method=method)
    assert shape.method == method.upper()
    assert not shape.sends_body
    assert shape.content_type is None
    assert shape.values() == {}


@pytest.mark.parametrize("key", ["payload", "payload_sql", "format"])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_body_keys_are_refused_on_a_method_without_body(method: str, key: str) -> None:
    value = {"payload": "payload", "payload_sql": "to_jsonb(t)", "format": "json"}[key]
    message = refuses(
        rf"{WHERE}\.{key}: method = '{method}' sends no body",
        url=URL,
        method=method,
        **{key: value},
    )
    assert "POST, PUT or PATCH" in message


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "CONNECT", "", None])
def test_other_methods_are_refused(method: Any) -> None:
    refuses(
        rf"{WHERE}\.method: expected one of POST, PUT, PATCH, GET, DELETE", url=URL, method=method
    )


# -- target -------------------------------------------------------------------------------------


def test_a_target_is_required() -> None:
    message = refuses(rf"^{WHERE}: set exactly one of url")
    assert "url_column" in message
    assert f"[{WHERE}.route]" in message
    assert "(got" not in message


@pytest.mark.parametrize(
    ("data", "got"),
    [
        ({"url": URL, "url_column": "u"}, "url and url_column"),
        ({"url": URL, "route": {"column": "c", "targets": {"*": URL}}}, "url and route"),
        (
            {"url_column": "u", "route": {"column": "c", "targets": {"*": URL}}},
            "url_column and route",
        ),
    ],
)
def test_two_targets_are_refused(data: dict[str, Any], got: str) -> None:
    refuses(rf"set exactly one of .* \(got {got}\)", **data)


def test_url_may_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert parse(url={"env": "TARGET"}).url == URL
    path = tmp_path / "url"
    path.write_text(URL + "\n")
    assert parse(url={"file": str(path)}).url == URL


def test_an_invalid_url_is_shown_without_its_query_string() -> None:
    message = refuses(rf"{WHERE}\.url: .* is not an http", url=f"ftp://host/x?token={CANARY}")
    assert CANARY not in message


def test_url_column() -> None:
    shape = parse(url_column="target_url")
    assert shape.url is None
    assert shape.url_column == "target_url"
    assert shape.values() == {
        "url": Value(ValueKind.column, "target_url"),
        "body": Value(ValueKind.row),
    }


def test_route() -> None:
    shape = parse(
        route={"column": "job_type", "targets": {"ocr": URL, "*": {"env": "TARGET"}}},
    )
    assert shape.route is not None
    assert shape.route.column == "job_type"
    assert dict(shape.route.targets) == {"ocr": URL, "*": URL}
    assert shape.values()["route"] == Value(ValueKind.column, "job_type")


@pytest.mark.parametrize(
    ("route", "match"),
    [
        ("job_type", rf"{WHERE}\.route: expected a table"),
        ({"targets": {"*": URL}}, rf"{WHERE}\.route\.column: required"),
        ({"column": "c"}, rf"{WHERE}\.route\.targets: required"),
        ({"column": "c", "targets": {}}, rf"{WHERE}\.route\.targets: expected a table of value"),
        ({"column": "c", "targets": URL}, rf"{WHERE}\.route\.targets: expected a table of value"),
        ({"column": "", "targets": {"*": URL}}, rf"{WHERE}\.route\.column: expected a non-empty"),
        ({"column": "c", "targets": {"ocr": "nope"}}, rf"{WHERE}\.route\.targets\.'ocr': 'nope'"),
        ({"column": "c", "targets": {"*": URL}, "default": URL}, rf"{WHERE}\.route\.default: unk"),
        (
            {"column": "c", "targets": {"ocr": {"env": "MISSING"}}},
            rf"{WHERE}\.route\.targets\.'ocr': the environment variable MISSING",
        ),
    ],
)
def test_bad_routes_are_refused(route: Any, match: str) -> None:
    refuses(match, route=route)


# -- body ---------------------------------------------------------------------------------------


def test_payload_column() -> None:
    shape = parse_url(payload="payload")
    assert shape.values() == {"body": Value(ValueKind.column, "payload")}


def test_payload_sql() -> None:
    expression = "jsonb_build_object('to', email, 'subject', subject)"
    shape = parse_url(payload_sql=expression)
    assert shape.values() == {"body": Value(ValueKind.sql, expression)}


def test_payload_and_payload_sql_together_are_refused() -> None:
    message = refuses(
        rf"^{WHERE}: set at most one of payload", url=URL, payload="p", payload_sql="to_jsonb(t)"
    )
    assert "whole row" in message


def test_a_sql_expression_with_nul_is_refused() -> None:
    refuses(
        rf"{WHERE}\.payload_sql: a SQL expression cannot hold NUL", url=URL, payload_sql="1\x00"
    )


def test_form_format() -> None:
    shape = parse_url(format="form", payload_sql="jsonb_build_object('To', phone)")
    assert shape.format is Format.form
    assert shape.content_type == "application/x-www-form-urlencoded"


def test_a_fixed_content_type_replaces_relays() -> None:
    assert parse_url(headers={"content-type": "application/cloudevents+json"}).content_type is None
    # From a row: build replaces it where the row's value is not NULL.
    assert parse_url(header_columns={"Content-Type": "ct"}).content_type == "application/json"


# -- headers ------------------------------------------------------------------------------------


def test_headers_from_fixed_values_references_columns_and_expressions(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("from-file\n")
    shape = parse_url(
        headers={"X-Static": "v", "X-Token": {"env": "TOKEN"}, "X-File": {"file": str(path)}},
        header_columns={"X-Event-Type": "event_type"},
        header_sql={"Idempotency-Key": "'email-' || id"},
    )
    assert dict(shape.headers) == {"X-Static": "v", "X-Token": "tok-123", "X-File": "from-file"}
    assert shape.values() == {
        "body": Value(ValueKind.row),
        "h:X-Event-Type": Value(ValueKind.column, "event_type"),
        "h:Idempotency-Key": Value(ValueKind.sql, "'email-' || id"),
    }


@pytest.mark.parametrize("name", ["X Bad", "X:Bad", "", "X-Ünicode", "X\nY", "(x)"])
@pytest.mark.parametrize("section", ["headers", "header_columns", "header_sql"])
def test_header_names_must_be_tokens(section: str, name: str) -> None:
    refuses(rf"(?s){WHERE}\.{section}\..*is not a header name", url=URL, **{section: {name: "v"}})


@pytest.mark.parametrize("value", [f"{CANARY}\r\nX-Injected: 1", f"{CANARY}\n", f"a\x00{CANARY}"])
def test_fixed_header_values_with_line_breaks_or_nul_are_refused(value: str) -> None:
    message = refuses(
        rf"{WHERE}\.headers\.X-A: a header value cannot hold", url=URL, headers={"X-A": value}
    )
    assert CANARY not in message


def test_a_header_from_an_unset_environment_variable_is_refused() -> None:
    refuses(
        rf"{WHERE}\.headers\.X-A: the environment variable NOPE is not set",
        url=URL,
        headers={"X-A": {"env": "NOPE"}},
    )


@pytest.mark.parametrize(
    "name",
    [
        "webhook-id",
        "Webhook-Signature",
        "webhook-timestamp",
        "relay-attempt",
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "connection",
    ],
)
@pytest.mark.parametrize("section", ["headers", "header_columns", "header_sql"])
def test_headers_relay_writes_itself_are_refused(section: str, name: str) -> None:
    refuses(
        rf"{WHERE}\.{section}\.{name}: .* is a header relay writes itself",
        url=URL,
        **{section: {name: "v"}},
    )


def test_a_header_set_twice_is_refused_whatever_its_case() -> None:
    refuses(
        rf"{WHERE}\.header_sql\.x-event: 'x-event' is also set by {WHERE}\.headers\.X-Event",
        url=URL,
        headers={"X-Event": "a"},
        header_sql={"x-event": "'b'"},
    )
    refuses(
        r"header_columns\.X-A: 'X-A' is also set by sources\.s\.headers\.x-a",
        url=URL,
        headers={"x-a": "a"},
        header_columns={"X-A": "c"},
    )


@pytest.mark.parametrize(
    ("section", "value", "match"),
    [
        ("headers", "x", "expected a table of header names to values"),
        ("header_columns", "x", "expected a table of header names to a column each"),
        ("header_sql", "x", "expected a table of header names to a SQL expression each"),
        ("header_columns", {"X-A": ""}, r"header_columns\.X-A: expected a non-empty string"),
        ("header_sql", {"X-A": 5}, r"header_sql\.X-A: expected a non-empty string"),
        ("headers", {"X-A": 5}, r"headers\.X-A: expected a non-empty string"),
    ],
)
def test_bad_header_tables_are_refused(section: str, value: Any, match: str) -> None:
    refuses(match, url=URL, **{section: value})


# -- auth ---------------------------------------------------------------------------------------


def test_bearer_auth() -> None:
    assert parse_url(auth={"bearer": {"env": "TOKEN"}}).authorization == "Bearer tok-123"
    assert parse_url(auth={"bearer": "plain"}).authorization == "Bearer plain"


def test_basic_auth() -> None:
    shape = parse_url(auth={"basic": {"username": {"env": "USER"}, "password": {"env": "PASS"}}})
    assert shape.authorization == "Basic " + base64.b64encode(b"AC1:p@ss").decode()


@pytest.mark.parametrize(
    ("auth", "match"),
    [
        ("Bearer x", r"auth: expected \{ bearer"),
        ({}, r"auth: expected \{ bearer"),
        ({"bearer": "a", "basic": {}}, r"auth: expected \{ bearer"),
        ({"token": "a"}, r"auth: expected \{ bearer"),
        ({"bearer": ""}, r"auth\.bearer: expected a non-empty string"),
        ({"bearer": {"env": "NOPE"}}, r"auth\.bearer: the environment variable NOPE"),
        ({"basic": "u:p"}, r"auth\.basic: expected \{ username"),
        ({"basic": {"password": "p"}}, r"auth\.basic\.username: required"),
        ({"basic": {"username": "u"}}, r"auth\.basic\.password: required"),
        ({"basic": {"username": "u", "password": "p", "realm": "r"}}, r"basic\.realm: unknown"),
    ],
)
def test_bad_auth_is_refused(auth: Any, match: str) -> None:
    refuses(match, url=URL, auth=auth)


@pytest.mark.parametrize(
    ("auth", "key"),
    [
        ({"bearer": f"{CANARY}\r\nX-Injected: 1"}, "auth.bearer"),
        ({"basic": {"username": f"{CANARY}:x", "password": "p"}}, "auth.basic.username"),
        ({"basic": {"username": "u", "password": f"{CANARY}\n"}}, "auth.basic.password"),
    ],
)
def test_auth_errors_never_quote_the_credential(auth: Any, key: str) -> None:
    message = refuses(rf"{WHERE}\.{key}: ", url=URL, auth=auth)
    assert CANARY not in message


@pytest.mark.parametrize("section", ["headers", "header_columns", "header_sql"])
def test_auth_and_an_authorization_header_together_are_refused(section: str) -> None:
    refuses(
        rf"{section}\.authorization: {WHERE}\.auth writes Authorization; set only one",
        url=URL,
        auth={"bearer": "t"},
        **{section: {"authorization": "x"}},
    )


def test_an_authorization_header_alone_is_fine() -> None:
    shape = parse_url(headers={"Authorization": {"env": "TOKEN"}})
    assert dict(shape.headers) == {"Authorization": "tok-123"}


# -- signing and secrets ------------------------------------------------------------------------


def test_standard_webhooks_secrets_become_keys_once() -> None:
    assert parse_url(secret=WHSEC).keys == (KEY_BYTES,)
    assert parse_url(secret={"env": "SECRET"}).keys == (KEY_BYTES,)
    rotation = parse_url(secret=[{"env": "SECRET"}, WHSEC2]).keys
    assert rotation == (KEY_BYTES, bytes(range(1, 33)))


def test_secret_column() -> None:
    shape = parse_url(secret_column="secret")
    assert shape.secret_column == "secret"
    assert shape.values()["secret"] == Value(ValueKind.column, "secret")


def test_secret_and_secret_column_together_are_refused() -> None:
    refuses(rf"^{WHERE}: set at most one of secret", url=URL, secret=WHSEC, secret_column="s")


@pytest.mark.parametrize(
    ("secret", "key"),
    [
        (CANARY, "secret"),
        ("whsec_" + CANARY + "!!", "secret"),
        ("whsec_" + base64.b64encode(CANARY.encode()).decode(), "secret"),
        ([WHSEC, CANARY], r"secret\[1\]"),
        ([], "secret"),
    ],
)
def test_bad_standard_webhooks_secrets_are_refused_without_quoting_them(
    secret: Any, key: str
) -> None:
    message = refuses(rf"{WHERE}\.{key}: ", url=URL, secret=secret)
    assert CANARY not in message


def test_signing_none() -> None:
    shape = parse_url(signing="none")
    assert shape.signing.scheme is Scheme.none
    assert shape.keys == ()


@pytest.mark.parametrize("key", ["secret", "secret_column"])
def test_secrets_on_an_unsigned_source_are_refused(key: str) -> None:
    refuses(
        rf"{WHERE}\.{key}: signing = 'none' sends no signature",
        url=URL,
        signing="none",
        **{key: WHSEC if key == "secret" else "s"},
    )


def test_hmac_sha256() -> None:
    shape = parse_url(
        signing={
            "hmac_sha256": {
                "header": "X-Hub-Signature-256",
                "prefix": "sha256=",
                "encoding": "base64",
            }
        },
        secret={"env": "TOKEN"},
    )
    assert shape.signing == request.Signing(
        Scheme.hmac_sha256, "X-Hub-Signature-256", "sha256=", request.Encoding.base64
    )
    # The receiver's shared secret as it is, not decoded as a Standard Webhooks secret.
    assert shape.keys == (b"tok-123",)


def test_hmac_sha256_defaults_to_hex_without_prefix() -> None:
    shape = parse_url(signing={"hmac_sha256": {"header": "X-Signature"}}, secret=["s3cret"])
    assert shape.signing == request.Signing(
        Scheme.hmac_sha256, "X-Signature", "", request.Encoding.hex
    )
    assert shape.keys == (b"s3cret",)


def test_hmac_sha256_with_a_secret_column() -> None:
    shape = parse_url(signing={"hmac_sha256": {"header": "X-Signature"}}, secret_column="secret")
    assert shape.keys == ()
    assert shape.secret_column == "secret"


HMAC = {"hmac_sha256": {"header": "X-Signature"}}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"signing": HMAC}, r"\.secret: required with signing = \{ hmac_sha256"),
        ({"signing": HMAC, "secret": ["a", "b"]}, r"\.secret: hmac_sha256 sends one signature"),
        ({"signing": HMAC, "secret": ""}, r"\.secret: expected a non-empty string"),
        ({"signing": "hmac_sha256"}, r"\.signing: expected \"standard-webhooks\""),
        ({"signing": {"hmac_sha256": {}}}, r"\.signing\.hmac_sha256\.header: required"),
        ({"signing": {"hmac_sha256": "X-Sig"}}, r"\.signing\.hmac_sha256: expected a table"),
        (
            {"signing": {"hmac_sha256": {"header": "X-S", "encoding": "b32"}}},
            r"\.signing\.hmac_sha256\.encoding: expected 'hex' or 'base64'",
        ),
        (
            {"signing": {"hmac_sha256": {"header": "X-S", "prefix": 1}}},
            r"\.signing\.hmac_sha256\.prefix: expected",
        ),
        (
            {"signing": {"hmac_sha256": {"header": "X-S", "algo": "x"}}},
            r"\.signing\.hmac_sha256\.algo: unknown key",
        ),
        (
            {"signing": {"hmac_sha256": {"header": "X S"}}},
            r"\.signing\.hmac_sha256\.header: 'X S' is not a header",
        ),
        (
            {"signing": {"hmac_sha256": {"header": "webhook-id"}}},
            r"\.signing\.hmac_sha256\.header: 'webhook-id' is a h",
        ),
        (
            {"signing": {"hmac_sha256": {"header": "Authorization"}}},
            r"\.signing\.hmac_sha256\.header: 'Authorization' is a",
        ),
        ({"signing": {"hmac_sha256": {"header": "X-S"}, "none": {}}}, r"\.signing: expected"),
        ({"signing": "Standard-Webhooks"}, r"\.signing: expected"),
        (
            {"signing": HMAC, "secret": "s", "headers": {"x-signature": "v"}},
            r"\.headers\.x-signature: 'x-signature' carries the signature",
        ),
    ],
)
def test_bad_signing_is_refused(data: dict[str, Any], match: str) -> None:
    refuses(rf"^{WHERE}{match}", url=URL, **data)


def test_hmac_secret_errors_never_quote_it() -> None:
    message = refuses(
        r"secret: cannot hold a line break", url=URL, signing=HMAC, secret=f"{CANARY}\n"
    )
    assert CANARY not in message


# -- fixed credentials and row URLs -------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"secret": WHSEC},
        {"headers": {"X-Api-Key": "k"}},
        {"auth": {"bearer": "t"}},
    ],
)
def test_fixed_credentials_with_row_urls_are_refused_unless_opted_in(data: dict[str, Any]) -> None:
    key = next(iter(data))
    refuses(rf"{WHERE}\.{key}: the rows choose where it sends", url_column="url", **data)
    shape = parse(url_column="url", fixed_credentials_for_row_urls=True, **data)
    assert shape.url_column == "url"


def test_row_chosen_secrets_and_headers_with_row_urls_are_fine() -> None:
    shape = parse(url_column="url", secret_column="secret", header_columns={"X-A": "a"})
    assert shape.secret_column == "secret"


def test_route_targets_are_fixed_so_fixed_credentials_are_fine() -> None:
    shape = parse(route={"column": "c", "targets": {"*": URL}}, auth={"bearer": "t"})
    assert shape.authorization == "Bearer t"


# -- secrets stay out of reprs ------------------------------------------------------------------


def test_repr_shows_no_credential() -> None:
    shape = parse(
        url=f"https://h.example.com/in?token={CANARY}1",
        headers={"X-Api-Key": f"{CANARY}2"},
        auth={"basic": {"username": "u", "password": f"{CANARY}3"}},
        secret=WHSEC,
    )
    routed = parse(route={"column": "c", "targets": {"*": f"https://h.example.com/?k={CANARY}4"}})
    text = repr(shape) + repr(routed)
    assert CANARY not in text
    assert base64.b64encode(f"u:{CANARY}3".encode()).decode() not in text
    assert WHSEC not in text and repr(KEY_BYTES) not in text
    assert "sources.s" in text  # the repr is still useful


def test_hmac_sha256_takes_a_whsec_looking_secret_as_text_too() -> None:
    # Only Standard Webhooks decodes "whsec_": other receivers key their HMAC with the text.
    shape = parse_url(signing=HMAC, secret=WHSEC)
    assert shape.keys == (WHSEC.encode(),)
