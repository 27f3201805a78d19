"""Config for the outbound guard, secrets and value references: every mistake exits with the key
named, and no error ever quotes a secret."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks

from relay import config, signing
from relay.config import ConfigError
from relay.deliverer import excerpt
from tests.support import queue_source

DB = "postgresql://localhost/app"
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 24).decode()


def raw(**sources: Any) -> dict[str, Any]:
    return {"database": {"url": DB}, "sources": sources or {"q": queue_source()}}


def build(raw_config: dict[str, Any], env: dict[str, str] | None = None) -> config.Config:
    return config.from_mapping(raw_config, env or {})


def error(raw_config: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.from_mapping(raw_config, env or {})
    return str(info.value)


def outbox(**extra: Any) -> dict[str, Any]:
    return {"kind": "outbox", "url": "https://hooks.example.com/x", **extra}


# -- http.allow and http.error_body_chars ---------------------------------------------------


def test_the_guard_allows_nothing_non_public_by_default() -> None:
    cfg = build(raw())
    assert cfg.http_allow.networks == () and cfg.http_allow.hosts == frozenset()
    assert cfg.error_body_chars == 200


def test_http_allow_takes_addresses_networks_and_host_names() -> None:
    cfg = build({**raw(), "http": {"allow": ["10.0.0.0/8", "::1", "hooks.internal"]}})
    assert cfg.http_allow.permits(ipaddress.ip_address("10.1.1.1"))
    assert cfg.http_allow.permits(ipaddress.ip_address("::1"))
    assert cfg.http_allow.permits_host("HOOKS.internal")


@pytest.mark.parametrize(
    ("allow", "where"),
    [
        (["10.0.0.0/8", "10.0.0.1/8"], "http.allow[1]: '10.0.0.1/8'"),
        (["not a host!"], "http.allow[0]"),
        ([""], "http.allow[0]"),
        ([5], "http.allow[0]"),
        ("10.0.0.0/8", "http.allow: expected a list"),
    ],
)
def test_a_bad_allow_entry_is_named(allow: Any, where: str) -> None:
    assert error({**raw(), "http": {"allow": allow}}).startswith(where)


def test_error_body_chars_may_be_zero_not_negative() -> None:
    assert build({**raw(), "http": {"error_body_chars": 0}}).error_body_chars == 0
    assert "http.error_body_chars" in error({**raw(), "http": {"error_body_chars": -1}})


def test_an_error_excerpt_is_bounded_and_escapes_control_characters() -> None:
    body = b"line one\nlevel=ERROR forged\x1b[31m red \x00\xff" + b"x" * 1000
    shown = excerpt(body, 40)
    assert len(shown) == 40
    assert "\n" not in shown and "\x1b" not in shown
    assert shown.startswith("line one\\nlevel=ERROR forged\\x1b[31m")
    assert excerpt(body, 0) == ""
    assert excerpt(b"  bad\x00body \n", 200) == "badbody"


# -- secrets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ("hunter2-hunter2-hunter2-hunter2", "does not start with 'whsec_'"),
        ("whsec_not base64!", "not valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "decodes to 65 bytes"),
    ],
)
def test_a_malformed_secret_exits_naming_the_key_and_never_quoting_it(
    secret: str, why: str
) -> None:
    for source in (outbox(secret=secret), queue_source_fixed(secret=secret)):
        message = error(raw(s=source))
        assert message.startswith("sources.s.secret: ")
        assert why in message and "whsec_" in message
        assert secret not in message
        assert secret.removeprefix("whsec_") not in message


def queue_source_fixed(**extra: Any) -> dict[str, Any]:
    source = queue_source(**{"url": "https://partner.example.com/hook", **extra})
    del source["url_column"], source["secret_column"]
    return source


def test_a_list_of_secrets_is_a_rotation_and_each_is_checked() -> None:
    cfg = build(raw(e=outbox(secret=[SECRET, OTHER])))
    assert cfg.sources[0].spec.signing_secrets == (SECRET, OTHER)
    message = error(raw(e=outbox(secret=[SECRET, "whsec_bad!"])))
    assert message.startswith("sources.e.secret[1]: ")
    assert "[]" in error(raw(e=outbox(secret=[])))


def test_secrets_and_headers_never_show_in_a_source_repr() -> None:
    cfg = build(raw(e=outbox(secret=SECRET, headers={"Authorization": "Bearer tok3n"})))
    assert SECRET not in repr(cfg) and "tok3n" not in repr(cfg)


def test_documenso_documents_sends_its_secret_as_is_so_whsec_is_not_required() -> None:
    source = {"kind": "documenso_documents", "url": "https://b.example/", "secret": "plain"}
    assert build(raw(d=source)).sources[0].spec.secret == "plain"


def test_the_spec_example_secret_and_signatures_verify_with_the_official_library() -> None:
    keys = [signing.config_key(SECRET), signing.config_key(OTHER)]
    body = b'{"a":1}'
    header = signing.signatures(keys, "msg_1", 1_700_000_000, body)
    assert len(header.split(" ")) == 2
    for secret in (SECRET, OTHER):
        webhook = standardwebhooks.Webhook(secret)
        expected = webhook.sign("msg_1", _at(1_700_000_000), body.decode())
        assert expected in header.split(" ")


def _at(timestamp: int) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC)


# -- fixed credentials on sources whose rows choose the URL ----------------------------------


def test_a_fixed_secret_or_header_with_url_column_is_refused_naming_the_key() -> None:
    source = queue_source(secret=SECRET)
    del source["secret_column"]
    message = error(raw(q=source))
    assert message.startswith("sources.q.secret: the rows choose where it sends (url_column)")
    assert "fixed_credentials_for_row_urls = true" in message
    message = error(raw(q=queue_source(headers={"X-Api-Key": "k3y"})))
    assert message.startswith("sources.q.headers: ")
    assert "k3y" not in message


def test_fixed_credentials_for_row_urls_is_an_explicit_opt_in() -> None:
    source = queue_source(
        headers={"X-Api-Key": "k3y"}, fixed_credentials_for_row_urls=True, secret=SECRET
    )
    del source["secret_column"]
    (built,) = build(raw(q=source)).sources
    shape = built.spec.shape
    assert shape.headers == {"X-Api-Key": "k3y"} and shape.keys == (signing.config_key(SECRET),)
    flag = error(raw(q={**source, "fixed_credentials_for_row_urls": "yes"}))
    assert flag.startswith("sources.q.fixed_credentials_for_row_urls: expected true or false")


def test_fixed_credentials_with_a_fixed_url_need_no_opt_in() -> None:
    (built,) = build(raw(q=queue_source_fixed(secret=SECRET, headers={"A": "b"}))).sources
    assert built.spec.shape.keys == (signing.config_key(SECRET),)


def test_documenso_jobs_headers_go_to_row_urls_and_need_the_opt_in() -> None:
    jobs: dict[str, Any] = {"kind": "documenso_jobs", "headers": {"X-Key": "k"}}
    assert error(raw(j=jobs)).startswith("sources.j.headers: with webhooks = true")
    assert build(raw(j={**jobs, "fixed_credentials_for_row_urls": True})).sources[0].spec.headers
    forwarded = {**jobs, "webhooks": False, "forward": {"x": "https://b.example/"}}
    assert build(raw(j=forwarded)).sources[0].spec.headers == {"X-Key": "k"}


def test_the_opt_in_is_unknown_where_urls_are_fixed() -> None:
    assert "unknown key" in error(raw(e=outbox(fixed_credentials_for_row_urls=True)))


def test_a_header_value_cannot_smuggle_another_header() -> None:
    message = error(raw(q=queue_source_fixed(headers={"X-A": "v\r\nX-Evil: 1"})))
    assert message.startswith("sources.q.headers.X-A: a header value cannot hold a line break")


# -- value references: { env = "NAME" } and { file = "/path" } --------------------------------


def test_secrets_headers_and_database_urls_can_come_from_the_environment() -> None:
    source = outbox(secret={"env": "HOOK_SECRET"}, headers={"Authorization": {"env": "AUTH"}})
    cfg = build(
        {
            "database": {"url": {"env": "DB"}, "listen_url": {"env": "DB_DIRECT"}},
            "sources": {"e": source},
        },
        {"HOOK_SECRET": SECRET, "AUTH": "Bearer t", "DB": DB, "DB_DIRECT": DB + "2"},
    )
    assert cfg.database_url == DB and cfg.listen_url == DB + "2"
    assert cfg.sources[0].spec.signing_secrets == (SECRET,)
    assert cfg.sources[0].spec.headers == {"Authorization": "Bearer t"}


def test_a_missing_variable_exits_naming_key_and_variable() -> None:
    message = error(raw(e=outbox(secret={"env": "HOOK_SECRET"})))
    assert message.startswith("sources.e.secret: the environment variable HOOK_SECRET is not set")
    listed = error(raw(e=outbox(secret=[SECRET, {"env": "NEXT"}])), {"NEXT": ""})
    assert listed.startswith("sources.e.secret[1]: the environment variable NEXT")


def test_a_secret_read_from_a_file_loses_its_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    cfg = build(raw(e=outbox(secret={"file": str(path)})))
    assert cfg.sources[0].spec.signing_secrets == (SECRET,)


def test_an_unreadable_or_empty_file_exits_naming_key_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    message = error(raw(e=outbox(headers={"X-K": {"file": str(missing)}})))
    assert message.startswith(f"sources.e.headers.X-K: cannot read {missing}")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert error(raw(e=outbox(secret={"file": str(empty)}))).endswith("is empty")


def test_a_malformed_reference_says_what_a_reference_is() -> None:
    message = error(raw(e=outbox(secret={"env": "A", "file": "/b"})))
    assert message.startswith('sources.e.secret: expected a string, { env = "NAME" }')
    assert "sources.e.secret.env" in error(raw(e=outbox(secret={"env": 3})))


def test_a_secret_from_the_environment_is_validated_without_being_quoted() -> None:
    bad = "whsec_c2hvcnQ="
    message = error(raw(e=outbox(secret={"env": "S"})), {"S": bad})
    assert message.startswith("sources.e.secret: decodes to 5 bytes")
    assert bad not in message


@pytest.mark.parametrize(
    ("source", "key"),
    [
        (outbox(url="http://127.0.0.1:9000/x"), "sources.s.url"),
        (outbox(topics={"a.*": "http://[::1]/x"}), "sources.s.topics.'a.*'"),
        (queue_source_fixed(url="http://0x7f000001/"), "sources.s.url"),
        ({"kind": "documenso_documents", "url": "http://169.254.169.254/"}, "sources.s.url"),
        (
            {"kind": "documenso_jobs", "forward": {"x.y": "http://localhost:3000/jobs"}},
            "sources.s.forward.'x.y'",
        ),
    ],
)
def test_a_fixed_target_the_guard_refuses_stops_start_up(source: dict[str, Any], key: str) -> None:
    message = error(raw(s=source))
    assert message.startswith(f"{key}: refused: target ")
    assert message.endswith("unless http.allow lists them")
    allowed = {
        **raw(s=source),
        "http": {"allow": ["127.0.0.0/8", "::1", "localhost", "169.254.0.0/16"]},
    }
    assert build(allowed).sources[0].name == "s"
