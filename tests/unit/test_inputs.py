"""Bad input that used to crash, spin or mislead: each is refused with a message naming it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from relay import config, logs, retry
from relay.config import ConfigError
from tests.support import queue_source

DB = "postgresql://localhost/app"


def error(**sections: Any) -> str:
    raw: dict[str, Any] = {"database": {"url": DB}, "sources": {"q": queue_source()}}
    raw.update(sections)
    with pytest.raises(ConfigError) as info:
        config.from_mapping(raw, {})
    return str(info.value)


@pytest.mark.parametrize(
    ("section", "key", "value", "least"),
    [
        # 0 made the listener reconnect 720 times and the sweeper spin at 98% of a core.
        ("relay", "heartbeat_interval", 0, "500ms"),
        ("relay", "sweep_interval", 0, "1s"),
        ("relay", "sweep_interval", "10ms", "1s"),
        # 0 crashed `relay check` with ZeroDivisionError.
        ("http", "timeout", 0, "100ms"),
        ("relay", "claim_timeout", "0.5s", "1s"),
        ("retry", "base", 0, "10ms"),
    ],
)
def test_durations_below_their_floor_are_refused(
    section: str, key: str, value: Any, least: str
) -> None:
    msg = error(**{section: {key: value}})
    assert msg.startswith(f"{section}.{key}: must be at least {least}")


@pytest.mark.parametrize("value", ["fast", True, 0.5, None])
def test_retry_factor_must_be_a_number_of_at_least_one(value: Any) -> None:
    # "fast" ended in a ValueError traceback.
    msg = error(retry={"factor": value})
    assert msg.startswith("retry.factor: ")


def test_max_delay_cannot_be_below_base() -> None:
    assert error(retry={"base": "10s", "max_delay": "1s"}).startswith(
        "retry.max_delay (1s) must be at least retry.base (10s)"
    )


@pytest.mark.parametrize("listen", [":8081", "0.0.0.0:8081", "[::]:8081", "10.1.2.3:8081"])
def test_a_health_endpoint_off_loopback_needs_allow_remote(listen: str) -> None:
    # ":8081" silently bound every interface.
    msg = error(health={"listen": listen})
    assert msg.startswith("health.listen: ")
    if listen != ":8081":
        assert "health.allow_remote = true" in msg


def test_allow_remote_opens_the_health_endpoint_to_other_hosts() -> None:
    raw = {
        "database": {"url": DB},
        "sources": {"q": queue_source()},
        "health": {"listen": "0.0.0.0:9000", "allow_remote": True},
    }
    cfg = config.from_mapping(raw, {})
    assert (cfg.health_host, cfg.health_port, cfg.health_remote) == ("0.0.0.0", 9000, True)


@pytest.mark.parametrize("listen", ["127.0.0.1:8081", "[::1]:8081", "localhost:8081"])
def test_loopback_health_endpoints_need_nothing_more(listen: str) -> None:
    raw = {"database": {"url": DB}, "sources": {"q": queue_source()}, "health": {"listen": listen}}
    assert config.from_mapping(raw, {}).health_port == 8081


def test_retry_after_with_a_unicode_digit_is_ignored_not_a_crash() -> None:
    # "²".isdigit() is True and float("²") raises: a receiver could crash a delivery with it.
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry.parse_retry_after("²", now) is None
    assert retry.parse_retry_after("١٢", now) is None  # Arabic-Indic digits
    assert retry.parse_retry_after(" 7 ", now) == 7.0


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ("line\nforged=1 level=ERROR", '"line\\nforged=1 level=ERROR"'),
        ('say "hi"', '"say \\"hi\\""'),
        # JSON's escapes, which go-logfmt's decoder reads (it refuses \x1b).
        ("\x1b[31mred", '"\\u001b[31mred"'),
        ("null", '"null"'),  # bare, logfmt's missing value
        ("", '""'),
        ("a\u2028b", '"a\\u2028b"'),
    ],
)
def test_log_values_are_escaped_and_quoted_as_logfmt(value: str, shown: str) -> None:
    assert logs.field(value) == shown


def test_a_newline_in_a_logged_value_cannot_forge_a_line() -> None:
    fields = {"key": 7, "error": "HTTP 500: oops\n2026-01-01 ERROR relay.app relay.crashed"}
    record = logging.makeLogRecord(
        {
            "name": "relay.test",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": logs.Message("delivery.failed", fields),
            "event": "delivery.failed",
            "fields": fields,
        }
    )
    line = logs.LogfmtFormatter().format(record)
    assert "\n" not in line
    assert line.endswith(
        ' level=warning logger=relay.test event=delivery.failed key=7 error="HTTP 500: '
        'oops\\n2026-01-01 ERROR relay.app relay.crashed"'
    )


@pytest.mark.parametrize(
    "url", ["http://[::1/x", "http://[zz]/", "htp://user:tok@e.com/p?k=SECRET"]
)
def test_a_url_that_does_not_parse_is_named_without_its_credentials(url: str) -> None:
    # "[::1/x" raised ValueError from urlsplit (a traceback at start, a crash on SIGHUP), and a
    # refused URL was quoted whole, password and query token included.
    source = {k: v for k, v in queue_source(url=url).items() if k != "url_column"}
    msg = error(sources={"q": source})
    assert msg.startswith("sources.q.url: ") and "is not an http:// or https:// URL" in msg
    assert "tok" not in msg and "SECRET" not in msg


@pytest.mark.parametrize("url", ["postgresql://[x/app", "host=db foo=bar password=hunter2"])
def test_a_database_url_libpq_cannot_parse_is_a_configuration_error(url: str) -> None:
    raw: dict[str, Any] = {"database": {"url": url}, "sources": {"q": queue_source()}}
    with pytest.raises(ConfigError) as info:
        config.from_mapping(raw, {})
    assert str(info.value).startswith("database.url: not a connection URL or string libpq")
    assert "hunter2" not in str(info.value)


def test_a_configuration_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b"[database]\nurl = 'postgresql://x/\xff'\n")
    with pytest.raises(ConfigError, match=r"relay.toml: not UTF-8 text \(byte 33\)"):
        config.load(path, {})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_durations_and_numbers_must_be_finite(value: float) -> None:
    # TOML allows nan and inf; nan passed every comparison and failed every claim in SQL.
    assert error(http={"timeout": value}).startswith("http.timeout: expected a finite duration")
    assert error(retry={"factor": value}).startswith("retry.factor: expected a number")


def test_a_documenso_secret_that_is_not_text_is_not_quoted() -> None:
    source = {"kind": "documenso_documents", "url": "https://hooks.example.com/", "secret": 31337}
    msg = error(sources={"docs": source})
    assert msg.startswith("sources.docs.secret: expected a non-empty string")
    assert "31337" not in msg


def test_a_configs_repr_holds_no_database_password() -> None:
    raw = {"database": {"url": "postgresql://app:hunter2@db/app"}, "sources": {"q": queue_source()}}
    assert "hunter2" not in repr(config.from_mapping(raw, {}))
