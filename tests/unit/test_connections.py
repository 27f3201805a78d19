"""Connection options: relay's bounds are added to the database URL, never over what it sets."""

from __future__ import annotations

from relay import connections


def test_defaults_fill_what_the_url_does_not_set() -> None:
    extra = connections.options("postgresql://app@db/app?keepalives_idle=30", 5.0)
    assert "keepalives_idle" not in extra  # the URL's own value wins
    assert extra["keepalives"] == 1 and extra["connect_timeout"] == 5
    assert extra["tcp_user_timeout"] == 20_000
    assert extra["options"] == "-c statement_timeout=5000 -c TimeZone=UTC"


def test_statement_timeout_is_added_to_the_urls_options() -> None:
    extra = connections.options("host=db dbname=app options='-c search_path=app'", 0.25)
    assert extra["options"] == "-c search_path=app -c statement_timeout=250 -c TimeZone=UTC"


def test_no_statement_timeout_leaves_options_alone() -> None:
    assert "options" not in connections.options("postgresql://app@db/app", None)
