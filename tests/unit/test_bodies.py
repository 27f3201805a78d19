"""Response bodies as relay records them: always something PostgreSQL can store."""

from __future__ import annotations

import orjson

from relay.sources.documenso_jobs import _json_text


def test_a_json_response_is_kept_as_json() -> None:
    assert orjson.loads(_json_text(b'{"ok": true, "n": [1, 2]}')) == {"ok": True, "n": [1, 2]}


def test_a_text_response_is_kept_as_a_json_string() -> None:
    assert orjson.loads(_json_text(b"Bad Gateway")) == "Bad Gateway"


def test_nul_never_reaches_jsonb() -> None:
    # jsonb refuses \u0000, whether the response escaped it or sent the raw byte.
    escaped = _json_text(b'{"a": "x\\u0000y"}')
    raw = _json_text(b"x\x00y")
    assert "\\u0000" not in escaped.replace("\\\\", "")
    assert orjson.loads(escaped) == '{"a": "x\\u0000y"}'  # kept as the text it was
    assert orjson.loads(raw) == "xy"
