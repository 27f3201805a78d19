"""Config checks of the database side of a source: statuses that must differ, and the bound on
what a claim loads (relay.max_payload_bytes)."""

from __future__ import annotations

from typing import Any

import pytest

from relay import config
from relay.config import ConfigError
from tests.support import queue_source

DB = "postgresql://localhost/app"


def error(source: dict[str, Any], **relay: Any) -> str:
    raw = {"database": {"url": DB}, "relay": relay, "sources": {"q": source}}
    with pytest.raises(ConfigError) as info:
        config.from_mapping(raw, {})
    return str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Delivered rows would look claimed, be "rescued" and sent again.
        ({"done": "processing"}, "sources.q.done: 'processing' is also sources.q.processing"),
        ({"dead": "processing"}, "sources.q.dead: 'processing' is also sources.q.processing"),
        ({"dead": "delivered"}, "sources.q.dead: 'delivered' is also sources.q.done"),
        ({"processing": "failed"}, "sources.q.processing: 'failed' is also listed in"),
        ({"processing": "pending"}, "sources.q.processing: 'pending' is also listed in"),
        ({"dead": "pending"}, "sources.q.dead: 'pending' is also listed in sources.q.pending"),
        ({"retry": "processing"}, "sources.q.retry: 'processing' must be one of"),
    ],
)
def test_statuses_that_must_differ_are_refused_naming_both_keys(
    overrides: dict[str, str], message: str
) -> None:
    assert message in error(queue_source(**overrides))


def test_a_table_source_with_distinct_statuses_loads() -> None:
    raw = {"database": {"url": DB}, "sources": {"q": queue_source()}}
    (source,) = config.from_mapping(raw, {}).sources
    spec = source.spec
    assert len({spec.processing, spec.done, spec.dead, *spec.pending}) == 5


def test_max_payload_bytes_defaults_to_a_mebibyte_and_has_a_floor() -> None:
    raw: dict[str, Any] = {"database": {"url": DB}, "sources": {"q": queue_source()}}
    assert config.from_mapping(raw, {}).max_payload_bytes == 1048576
    raw["relay"] = {"max_payload_bytes": 2048}
    assert config.from_mapping(raw, {}).max_payload_bytes == 2048
    assert "relay.max_payload_bytes: must be at least 1024, got 1000" in error(
        queue_source(), max_payload_bytes=1000
    )
