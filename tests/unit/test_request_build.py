"""relay.request.build: a claimed row's values become the request, or a reason it cannot."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest

from relay import request, signing
from relay.request import Refused, Request

WHERE = "sources.s"
URL = "https://hooks.example.com/in"
OTHER = "https://other.example.com/in"
KEY_BYTES = bytes(range(32))
KEY2_BYTES = bytes(range(1, 33))
WHSEC = "whsec_" + base64.b64encode(KEY_BYTES).decode()
WHSEC2 = "whsec_" + base64.b64encode(KEY2_BYTES).decode()
NOW = 1_760_000_000
ENV = {"TOKEN": "tok-123", "PASS": "p@ss"}
CANARY = "SUPERSECRETCANARY"


def shape(**data: Any) -> request.Shape:
    if not {"url", "url_column", "route"} & set(data):
        data["url"] = URL
    return request.parse(WHERE, data, ENV)


def build(
    s: request.Shape,
    values: dict[str, Any] | None = None,
    *,
    key: str = "42",
    attempt: int = 1,
    keys: tuple[bytes, ...] | None = None,
) -> Request | Refused:
    if values is None:
        values = {"body": '{"id": 42}'} if s.sends_body else {}
    return request.build(
        s, source="orders", key=key, attempt=attempt, values=values, now=NOW, keys=keys
    )


def ok(result: Request | Refused) -> Request:
    assert isinstance(result, Request), result
    return result


def refused(result: Request | Refused) -> str:
    assert isinstance(result, Refused), result
    return result.reason


def by_hand(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature, written from the spec rather than through relay.signing."""
    content = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


# -- the request --------------------------------------------------------------------------------


def test_a_default_request() -> None:
    req = ok(build(shape(), {"body": '{"id": 42}'}))
    assert req.method == "POST"
    assert req.url == URL
    assert req.body == b'{"id": 42}'
    assert req.headers == {
        "Content-Type": "application/json",
        "webhook-id": "orders_42",
        "webhook-timestamp": str(NOW),
        "relay-attempt": "1",
    }


def test_the_webhook_id_is_stable_across_attempts_and_the_attempt_is_counted() -> None:
    s = shape()
    first = ok(build(s, attempt=1))
    third = ok(build(s, attempt=3))
    other = ok(build(s, key="43"))
    assert first.headers["webhook-id"] == third.headers["webhook-id"] == "orders_42"
    assert other.headers["webhook-id"] == "orders_43"
    assert (first.headers["relay-attempt"], third.headers["relay-attempt"]) == ("1", "3")


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_methods_with_a_body_send_it(method: str) -> None:
    req = ok(build(shape(method=method)))
    assert (req.method, req.body) == (method, b'{"id": 42}')


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_get_and_delete_send_no_body_and_sign_the_empty_body(method: str) -> None:
    req = ok(build(shape(method=method, secret=WHSEC), {}))
    assert (req.method, req.body) == (method, b"")
    assert "Content-Type" not in req.headers
    assert req.headers["webhook-signature"] == by_hand(KEY_BYTES, "orders_42", NOW, b"")


def test_repr_shows_no_url_headers_or_body() -> None:
    req = ok(
        build(
            shape(url=f"https://h.example.com/?k={CANARY}", auth={"bearer": CANARY}),
            {"body": f'"{CANARY}"'},
        )
    )
    assert CANARY not in repr(req)
    assert "POST" in repr(req)


# -- target -------------------------------------------------------------------------------------


def test_url_from_a_column() -> None:
    s = shape(url_column="target")
    assert ok(build(s, {"url": OTHER, "body": "{}"})).url == OTHER


@pytest.mark.parametrize("value", [None, ""])
def test_a_missing_row_url_is_refused(value: Any) -> None:
    reason = refused(build(shape(url_column="target"), {"url": value, "body": "{}"}))
    assert reason == (
        "url column 'target' is NULL or empty for this row; store the target URL there"
    )


ROUTED = {"column": "job_type", "targets": {"ocr": URL, "5": OTHER, "true": OTHER}}


@pytest.mark.parametrize(
    ("value", "target"), [("ocr", URL), ("5", OTHER), (5, OTHER), (True, OTHER)]
)
def test_route_by_a_columns_value(value: Any, target: str) -> None:
    req = ok(build(shape(route=ROUTED), {"route": value, "body": "{}"}))
    assert req.url == target


def test_a_route_without_a_target_is_refused_naming_the_value_and_the_fix() -> None:
    reason = refused(build(shape(route=ROUTED), {"route": "gpu", "body": "{}"}))
    assert reason == (
        "route column 'job_type' value 'gpu' has no target; add it under "
        "[sources.s.route.targets] or '*'"
    )
    reason = refused(build(shape(route=ROUTED), {"route": None, "body": "{}"}))
    assert reason.startswith("route column 'job_type' value NULL has no target")


def test_a_long_route_value_is_cut_in_the_reason() -> None:
    reason = refused(build(shape(route=ROUTED), {"route": "x" * 500, "body": "{}"}))
    assert "'" + "x" * 80 + "...'" in reason
    assert "x" * 81 not in reason


def test_the_wildcard_takes_other_values_and_null() -> None:
    s = shape(route={"column": "job_type", "targets": {"ocr": URL, "*": OTHER}})
    assert ok(build(s, {"route": "ocr", "body": "{}"})).url == URL
    assert ok(build(s, {"route": "gpu", "body": "{}"})).url == OTHER
    assert ok(build(s, {"route": None, "body": "{}"})).url == OTHER


# -- JSON bodies --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "b": [1, 2], "c": {"d": null}}',  # jsonb's text, spaces and all
        '{"n":123456789012345678901234567890}',  # beyond 64 bits: kept exactly
        '{"n": 1e400}',  # beyond a double: PostgreSQL's json keeps it
        '"\\ud800"',  # a lone surrogate escape: valid JSON text
        "[]",
        "null",
        "  7 ",
    ],
)
def test_a_json_text_body_is_sent_exactly_as_the_database_gave_it(text: str) -> None:
    assert ok(build(shape(payload="payload"), {"body": text})).body == text.encode()


@pytest.mark.parametrize(
    "value",
    [{"id": 1, "tags": ["a"], "at": "2026-01-01T00:00:00+00:00"}, [1, 2], 7, None, "plain"],
)
def test_a_json_value_is_encoded(value: Any) -> None:
    s = shape()
    result = build(s, {"body": value})
    if value == "plain":  # a str is JSON text, and this one is not
        assert "is not valid JSON" in refused(result)
    else:
        assert ok(result).body == orjson.dumps(value)


def test_a_json_value_orjson_cannot_write_is_refused() -> None:
    reason = refused(build(shape(), {"body": {"n": 2**70}}))
    assert reason.startswith("the body (the whole row) cannot be written as JSON (")
    assert reason.endswith("); select it as JSON text instead")


@pytest.mark.parametrize(
    ("data", "origin"),
    [
        ({"payload": "payload"}, "column 'payload'"),
        ({"payload_sql": "payload::text || 'x'"}, "expression \"payload::text || 'x'\""),
        ({}, "the whole row"),
    ],
)
@pytest.mark.parametrize("text", ['{"a": NaN}', "{'a': 1}", f"{CANARY}", '{"a": 1'])
def test_a_body_that_is_not_json_is_refused_naming_its_origin(
    data: dict[str, Any], origin: str, text: str
) -> None:
    reason = refused(build(shape(**data), {"body": text}))
    assert reason == (
        f"the body ({origin}) is not valid JSON; store JSON text there, or shape the body "
        f"with payload_sql"
    )


# -- form bodies --------------------------------------------------------------------------------


def form(values: Any) -> Request | Refused:
    return build(shape(format="form", payload_sql="jsonb_build_object(...)"), {"body": values})


def test_a_form_body_from_json_text() -> None:
    req = ok(
        form(
            '{"To": "+15551234567", "Body": "Hi & bye = 100%", "Id": 12345678901234567890123,'
            ' "Price": 1.50, "Big": 1e400, "Urgent": true, "Quiet": false, "Skip": null,'
            ' "MediaUrl": ["https://a/1", "https://a/2"], "Name": "Zoë"}'
        )
    )
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qsl(req.body.decode(), keep_blank_values=True) == [
        ("To", "+15551234567"),
        ("Body", "Hi & bye = 100%"),
        ("Id", "12345678901234567890123"),  # as written, not rounded through a float
        ("Price", "1.50"),
        ("Big", "1e400"),
        ("Urgent", "true"),
        ("Quiet", "false"),
        ("MediaUrl", "https://a/1"),
        ("MediaUrl", "https://a/2"),
        ("Name", "Zoë"),
    ]
    assert req.body.startswith(b"To=%2B15551234567&Body=Hi+%26+bye+%3D+100%25&")
    assert b"Name=Zo%C3%AB" in req.body


def test_a_form_body_from_a_json_value() -> None:
    req = ok(form({"a": "x y", "n": 5, "f": 0.5, "b": True, "z": None, "l": [1, "2"]}))
    assert req.body == b"a=x+y&n=5&f=0.5&b=true&l=1&l=2"


def test_an_empty_object_is_an_empty_form() -> None:
    assert ok(form("{}")).body == b""


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("[1, 2]", "an array"),
        ('"text"', "a string"),
        ("5", "a number"),
        ("null", "null"),
        (None, "null"),
        (True, "a boolean"),
        ([1], "an array"),
    ],
)
def test_form_needs_an_object(body: Any, kind: str) -> None:
    reason = refused(form(body))
    assert reason.startswith(
        "format = 'form' needs a JSON object, but the body (expression 'jsonb_build_object(...)') "
        f"is {kind}; build a flat object with payload_sql"
    )


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ('{"a": 1, "to": {"x": 1}}', "an object"),
        ('{"to": [1, [2]]}', "an array"),
        ({"to": [{"x": 1}]}, "an object"),
    ],
)
def test_form_fields_cannot_nest(body: Any, kind: str) -> None:
    reason = refused(form(body))
    assert reason.startswith(
        "format = 'form' takes text, numbers, booleans or lists of them, but field 'to' of the "
        f"body (expression 'jsonb_build_object(...)') holds {kind}; "
    )


@pytest.mark.parametrize("text", ["{", '{"a": NaN}', CANARY])
def test_form_from_text_that_is_not_json_is_refused(text: str) -> None:
    reason = refused(form(text))
    assert reason == (
        "the body (expression 'jsonb_build_object(...)') is not valid JSON; format = 'form' "
        "needs a JSON object"
    )


def test_a_form_of_the_whole_row() -> None:
    req = ok(build(shape(format="form"), {"body": {"id": 1, "to": "a@b"}}))
    assert req.body == b"id=1&to=a%40b"


# -- headers ------------------------------------------------------------------------------------


def test_headers_from_fixed_values_columns_and_expressions() -> None:
    s = shape(
        headers={"X-Static": "v", "X-Token": {"env": "TOKEN"}},
        header_columns={"X-Event-Type": "event_type", "X-Count": "n", "X-Meta": "meta"},
        header_sql={"Idempotency-Key": "'email-' || id", "X-Flag": "flag"},
    )
    values = {
        "body": "{}",
        "h:X-Event-Type": "order.created",
        "h:X-Count": 3,
        "h:X-Meta": {"a": [1, 2]},
        "h:Idempotency-Key": "email-42",
        "h:X-Flag": False,
    }
    assert ok(build(s, values)).headers == {
        "Content-Type": "application/json",
        "webhook-id": "orders_42",
        "webhook-timestamp": str(NOW),
        "relay-attempt": "1",
        "X-Static": "v",
        "X-Token": "tok-123",
        "X-Event-Type": "order.created",
        "X-Count": "3",
        "X-Meta": '{"a":[1,2]}',
        "Idempotency-Key": "email-42",
        "X-Flag": "false",
    }


def test_a_null_header_value_sends_no_header() -> None:
    s = shape(header_columns={"X-Event-Type": "event_type"}, header_sql={"X-Key": "k"})
    headers = ok(build(s, {"body": "{}", "h:X-Event-Type": None, "h:X-Key": "k1"})).headers
    assert "X-Event-Type" not in headers
    assert headers["X-Key"] == "k1"


@pytest.mark.parametrize(
    ("data", "origin"),
    [
        ({"header_columns": {"X-A": "a_col"}}, "column 'a_col'"),
        ({"header_sql": {"X-A": "lower(a)"}}, "expression 'lower(a)'"),
    ],
)
@pytest.mark.parametrize("value", [f"{CANARY}\r\nX-Injected: 1", f"{CANARY}\n", f"\x00{CANARY}"])
def test_a_header_value_with_a_line_break_or_nul_is_refused(
    data: dict[str, Any], origin: str, value: str
) -> None:
    reason = refused(build(shape(**data), {"body": "{}", "h:X-A": value}))
    assert reason == (
        f"header 'X-A' from {origin} holds a line break or NUL, which no header value can; "
        f"strip them in the application or with header_sql"
    )


def test_a_content_type_from_a_row_replaces_relays_unless_null() -> None:
    s = shape(header_columns={"content-type": "ct"})
    headers = ok(build(s, {"body": "{}", "h:content-type": "application/cloudevents+json"})).headers
    assert [k for k in headers if k.lower() == "content-type"] == ["content-type"]
    assert headers["content-type"] == "application/cloudevents+json"
    headers = ok(build(s, {"body": "{}", "h:content-type": None})).headers
    assert headers["Content-Type"] == "application/json"
    assert "content-type" not in headers


def test_a_fixed_content_type_replaces_relays() -> None:
    headers = ok(build(shape(headers={"content-type": "text/plain"}))).headers
    assert [k for k in headers if k.lower() == "content-type"] == ["content-type"]


# -- auth ---------------------------------------------------------------------------------------


def test_bearer_auth() -> None:
    headers = ok(build(shape(auth={"bearer": {"env": "TOKEN"}}))).headers
    assert headers["Authorization"] == "Bearer tok-123"


def test_basic_auth() -> None:
    s = shape(auth={"basic": {"username": "AC1", "password": {"env": "PASS"}}})
    value = ok(build(s)).headers["Authorization"]
    scheme, _, encoded = value.partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded, validate=True) == b"AC1:p@ss"


# -- Standard Webhooks --------------------------------------------------------------------------


def test_standard_webhooks_signature_verifies() -> None:
    req = ok(build(shape(secret=WHSEC), {"body": '{"id": 42}'}, attempt=2))
    header = req.headers["webhook-signature"]
    timestamp = int(req.headers["webhook-timestamp"])
    assert timestamp == NOW
    assert signing.verify(KEY_BYTES, "orders_42", NOW, req.body, header)
    assert header == by_hand(KEY_BYTES, "orders_42", NOW, b'{"id": 42}')
    # Bound to the id, the time and the body.
    assert not signing.verify(KEY_BYTES, "orders_43", NOW, req.body, header)
    assert not signing.verify(KEY_BYTES, "orders_42", NOW + 1, req.body, header)
    assert not signing.verify(KEY_BYTES, "orders_42", NOW, req.body + b" ", header)


def test_a_rotation_signs_with_every_key() -> None:
    req = ok(build(shape(secret=[WHSEC, WHSEC2])))
    assert req.headers["webhook-signature"] == " ".join(
        by_hand(k, "orders_42", NOW, req.body) for k in (KEY_BYTES, KEY2_BYTES)
    )
    for key in (KEY_BYTES, KEY2_BYTES):
        assert signing.verify(key, "orders_42", NOW, req.body, req.headers["webhook-signature"])


def test_without_a_secret_standard_webhooks_sends_no_signature() -> None:
    headers = ok(build(shape())).headers
    assert "webhook-signature" not in headers
    assert headers["webhook-timestamp"] == str(NOW)


def test_keys_given_to_build_replace_the_configured_ones() -> None:
    req = ok(build(shape(secret=WHSEC), keys=(KEY2_BYTES,)))
    assert req.headers["webhook-signature"] == by_hand(KEY2_BYTES, "orders_42", NOW, req.body)
    assert "webhook-signature" not in ok(build(shape(secret=WHSEC), keys=())).headers


@pytest.mark.parametrize(
    ("secret", "key"),
    [(WHSEC2, KEY2_BYTES), ("a plain partner secret", b"a plain partner secret")],
)
def test_a_rows_secret_signs_its_request(secret: str, key: bytes) -> None:
    s = shape(secret_column="secret")
    req = ok(build(s, {"body": "{}", "secret": secret}, keys=(KEY_BYTES,)))
    assert req.headers["webhook-signature"] == by_hand(key, "orders_42", NOW, b"{}")


@pytest.mark.parametrize("value", [None, ""])
def test_a_row_without_its_secret_goes_unsigned_with_standard_webhooks(value: Any) -> None:
    # As relay always has: a receiver without a secret gets the row unsigned.
    req = build(shape(secret_column="secret"), {"body": "{}", "secret": value})
    assert isinstance(req, Request) and "webhook-signature" not in req.headers
    assert req.headers["webhook-id"] == "orders_42"


@pytest.mark.parametrize("value", [None, ""])
def test_a_row_without_its_secret_is_refused_with_hmac(value: Any) -> None:
    hmac_shape = shape(secret_column="secret", signing={"hmac_sha256": {"header": "X-Sig"}})
    reason = refused(build(hmac_shape, {"body": "{}", "secret": value}))
    assert reason == (
        "secret column 'secret' is NULL or empty for this row; store the receiver's secret there"
    )


def test_a_rows_malformed_whsec_secret_is_refused_without_quoting_it() -> None:
    s = shape(secret_column="secret")
    reason = refused(build(s, {"body": "{}", "secret": f"whsec_{CANARY}!!"}))
    assert reason.startswith("cannot sign with the secret in column 'secret': ")
    assert CANARY not in reason


def test_signing_none_sends_the_id_but_no_signature_or_timestamp() -> None:
    headers = ok(build(shape(signing="none"), keys=(KEY_BYTES,))).headers
    assert headers == {
        "Content-Type": "application/json",
        "webhook-id": "orders_42",
        "relay-attempt": "1",
    }


# -- hmac_sha256 --------------------------------------------------------------------------------

# GitHub's documented example (docs.github.com, "Validating webhook deliveries").
GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = "Hello, World!"
GITHUB_HEX = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
# RFC 4231, test case 2.
RFC4231_KEY = b"Jefe"
RFC4231_DATA = b"what do ya want for nothing?"
RFC4231_HEX = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"


def test_body_hmac_vectors() -> None:
    assert signing.body_hmac(RFC4231_KEY, RFC4231_DATA, "hex") == RFC4231_HEX
    assert (
        signing.body_hmac(RFC4231_KEY, RFC4231_DATA, "base64")
        == base64.b64encode(bytes.fromhex(RFC4231_HEX)).decode()
    )
    assert signing.body_hmac(GITHUB_SECRET.encode(), GITHUB_BODY.encode(), "hex") == GITHUB_HEX
    with pytest.raises(ValueError, match="unknown signature encoding 'base32'"):
        signing.body_hmac(b"k", b"", "base32")


def hmac_shape(**options: Any) -> request.Shape:
    return shape(
        signing={"hmac_sha256": {"header": "X-Hub-Signature-256", **options}},
        secret=GITHUB_SECRET,
        payload="payload",
    )


def test_hmac_sha256_github_style() -> None:
    req = ok(build(hmac_shape(prefix="sha256="), {"body": f'"{GITHUB_BODY}"'}))
    expected = hmac.new(GITHUB_SECRET.encode(), req.body, hashlib.sha256).hexdigest()
    assert req.headers["X-Hub-Signature-256"] == f"sha256={expected}"
    assert "webhook-signature" not in req.headers
    assert "webhook-timestamp" not in req.headers
    assert req.headers["webhook-id"] == "orders_42"


def test_hmac_sha256_base64_without_prefix() -> None:
    req = ok(build(hmac_shape(encoding="base64"), {"body": "{}"}))
    digest = hmac.new(GITHUB_SECRET.encode(), b"{}", hashlib.sha256).digest()
    assert req.headers["X-Hub-Signature-256"] == base64.b64encode(digest).decode()


def test_hmac_sha256_with_a_rows_secret_uses_its_text_as_the_key() -> None:
    s = shape(signing={"hmac_sha256": {"header": "X-Signature"}}, secret_column="secret")
    req = ok(build(s, {"body": "{}", "secret": WHSEC}))
    expected = hmac.new(WHSEC.encode(), b"{}", hashlib.sha256).hexdigest()
    assert req.headers["X-Signature"] == expected
    reason = refused(build(s, {"body": "{}", "secret": None}))
    assert reason.startswith("secret column 'secret' is NULL or empty")


def test_hmac_sha256_over_an_empty_get() -> None:
    s = shape(method="GET", signing={"hmac_sha256": {"header": "X-Signature"}}, secret="k")
    req = ok(build(s, {}))
    assert req.headers["X-Signature"] == hmac.new(b"k", b"", hashlib.sha256).hexdigest()


# -- values and build agree ---------------------------------------------------------------------


def test_build_reads_every_value_the_shape_asks_for() -> None:
    s = shape(
        url_column="target",
        payload_sql="jsonb_build_object('a', a)",
        secret_column="secret",
        header_columns={"X-A": "a"},
        header_sql={"X-B": "b"},
        fixed_credentials_for_row_urls=True,
    )
    values = {
        "url": OTHER,
        "body": '{"a":1}',
        "secret": WHSEC,
        "h:X-A": "1",
        "h:X-B": "2",
    }
    assert set(s.values()) == set(values)
    req = ok(build(s, values))
    assert (req.url, req.body, req.headers["X-A"], req.headers["X-B"]) == (
        OTHER,
        b'{"a":1}',
        "1",
        "2",
    )
    for name in values:  # and needs each of them
        with pytest.raises(KeyError):
            build(s, {k: v for k, v in values.items() if k != name})
