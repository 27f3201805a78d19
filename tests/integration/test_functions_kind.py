"""kind = "functions": the user's own statements are checked by PostgreSQL at start-up, and
one that does not fit stops relay naming its key (the end-to-end run is tests/e2e/test_system3)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from relay import config as config_mod
from relay.config import ConfigError
from relay.db.store import Store
from tests.support import raw_config

SCHEMA = """
CREATE TABLE work (id bigserial PRIMARY KEY, body jsonb, status text DEFAULT 'new',
                   owner text);
CREATE FUNCTION take_work(worker text) RETURNS SETOF work LANGUAGE sql AS $$
    UPDATE work SET status = 'taken', owner = worker
    WHERE id = (SELECT id FROM work WHERE status = 'new' ORDER BY id
                FOR UPDATE SKIP LOCKED LIMIT 1)
    RETURNING *
$$;
"""


def functions_source(**overrides: Any) -> dict[str, Any]:
    source: dict[str, Any] = {
        "kind": "functions",
        "key": "id",
        "claim": "SELECT * FROM take_work(:worker)",
        "complete": "UPDATE work SET status = 'done' WHERE id = :key AND owner = :worker",
        "fail": "UPDATE work SET status = 'new', owner = NULL WHERE id = :key",
        "payload": "body",
        "url": "http://127.0.0.1:9/",
    }
    source.update(overrides)
    return source


async def prepare(db: str, source: dict[str, Any]) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    config = config_mod.from_mapping(raw_config(db, sources={"work": source}), {})
    store = Store(config.database_url, config.sources)
    await store.open()
    try:
        await store.prepare()
    finally:
        await store.close()


async def test_statements_that_fit_are_accepted(db: str) -> None:
    await prepare(db, functions_source())


async def test_a_statement_postgresql_refuses_is_named(db: str) -> None:
    with pytest.raises(ConfigError) as refused:
        await prepare(db, functions_source(complete="SELECT finish_work(:key)"))
    assert str(refused.value).startswith(
        "sources.work.complete: PostgreSQL does not accept it: function finish_work("
    )


def test_an_unknown_parameter_is_named_with_the_ones_there_are() -> None:
    with pytest.raises(ConfigError) as refused:
        config_mod.from_mapping(
            raw_config("postgresql://x/y", sources={"work": functions_source(fail="SELECT :oops")}),
            {},
        )
    message = str(refused.value)
    assert message.startswith("sources.work.fail: unknown parameter :oops;")
    assert ":error_json" in message and ":worker" in message
