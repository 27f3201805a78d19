from __future__ import annotations

import pytest

from relay.db import sqltext


def test_named_parameters_become_psycopgs_and_percent_signs_are_doubled() -> None:
    text, used = sqltext.named_params(
        "SELECT f(:key, :worker) WHERE x LIKE 'a%:b' AND y::int = 1 AND z % 2 = 0 -- :c",
        frozenset({"key", "worker"}),
    )
    assert text == (
        "SELECT f(%(key)s, %(worker)s) WHERE x LIKE 'a%%:b' AND y::int = 1 AND z %% 2 = 0 -- :c"
    )
    assert used == {"key", "worker"}


def test_a_parameter_inside_quotes_or_a_quoted_name_is_text() -> None:
    text, used = sqltext.named_params("""SELECT ':key', ":key" FROM t""", frozenset({"key"}))
    assert text == """SELECT ':key', ":key" FROM t"""
    assert used == frozenset()


def test_an_unknown_parameter_is_named_with_those_allowed() -> None:
    with pytest.raises(ValueError, match=r"unknown parameter :wrker; the parameters here are :key"):
        sqltext.named_params("SELECT f(:wrker)", frozenset({"key", "worker"}))


def test_context_references_become_field_selections_outside_quotes() -> None:
    assert (
        sqltext.context_refs(
            "jsonb_build_object('error', attempt.error, 'x.response.json', response.json->>'sid')",
            "r",
        )
        == "jsonb_build_object('error', (r.attempt).error, 'x.response.json', "
        "(r.response).json->>'sid')"
    )
    # A column of the row, or another table's name ending in the same letters, stays as it is.
    assert sqltext.context_refs("t.attempt + my_response.x + request_id", "r") == (
        "t.attempt + my_response.x + request_id"
    )


def test_context_fields_are_those_read_outside_quotes_and_comments() -> None:
    text = (
        "COALESCE(Response.json->>'id', 'attempt.error', attempt.next_at::text) "
        "-- request.url\n|| my.response.body"
    )
    assert sqltext.context_fields(text) == {("response", "json"), ("attempt", "next_at")}


def test_the_settle_computes_only_the_fields_read() -> None:
    from relay.sources.table import settle_context

    none = settle_context(frozenset())
    assert "ROW(" not in none.select.as_string(None)
    assert (none.columns.as_string(None), none.needs_detail) == ("", False)

    # attempt.next_at comes from the outcome and the delay: no detail from the deliverer.
    next_at = settle_context(frozenset({("attempt", "next_at")}))
    select = next_at.select.as_string(None)
    assert "::relay.attempt AS attempt" in select
    assert "relay.response" not in select and "relay.request" not in select
    assert "o.worker" not in select and "o.ms" not in select
    assert (next_at.columns.as_string(None), next_at.needs_detail) == ("", False)

    headers = settle_context(frozenset({("response", "headers"), ("request", "url")}))
    assert headers.columns.as_string(None) == ", response_headers jsonb, url text"
    assert headers.needs_detail
