"""Helpers for the end-to-end tests of examples/ (systems 2 and 3 of shared/MISSION.md): a fresh
database holding an application's schema, an example's config adapted to the test, `relay run`
processes that fail fast when they cannot start, and waits on the application's rows that wake
on the rows' own changes (a statement trigger and LISTEN), never on a clock."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import signal
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from tests.support import (
    HERMETIC_ENV,
    LOOPBACK,
    ROOT,
    WAIT,
    Received,
    RelayProcess,
    run_cli,
    to_toml,
)

EXAMPLES = ROOT / "examples"
CHANGED = "test_rows_changed"  # the channel the tests' own statement triggers notify on
_counter = itertools.count()


# -- the application's database --------------------------------------------------------------


@contextlib.contextmanager
def application_database(
    admin_url: str, url_of: Callable[[str], str], system: str
) -> Iterator[str]:
    """A new, empty database (no relay schema, no demo table) with examples/<system>/schema.sql
    loaded, as the application had it before relay; dropped afterwards."""
    name = f"relay_{system}_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    try:
        url = url_of(name)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute((EXAMPLES / system / "schema.sql").read_text())
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def rows(url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def value(url: str, query: str, params: Any = None) -> Any:
    result = await rows(url, query, params)
    assert len(result) == 1 and len(result[0]) == 1, result
    return next(iter(result[0].values()))


async def watch(url: str, *tables: str) -> None:
    """Make every committed change to these tables ("name" or "schema.name") notify CHANGED
    (wait_rows wakes on it)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            f"CREATE OR REPLACE FUNCTION test_rows_changed() RETURNS trigger LANGUAGE plpgsql "
            f"AS $$ BEGIN PERFORM pg_notify('{CHANGED}', TG_TABLE_NAME); RETURN NULL; END $$"
        )
        for table in tables:
            await conn.execute(
                sql.SQL(
                    "CREATE TRIGGER test_rows_changed AFTER INSERT OR UPDATE OR DELETE ON {} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION test_rows_changed()"
                ).format(sql.Identifier(*table.split(".")))
            )


async def wait_rows(
    url: str,
    query: str,
    params: Any,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float = WAIT,
) -> list[dict[str, Any]]:
    """Run `query` until `done(rows)`, again after each change to a watched table; the rows.

    Fails after `timeout` with the last rows seen."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"LISTEN {CHANGED}")
        cur = conn.cursor(row_factory=dict_row)
        last: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await cur.execute(query, params)
                    last = await cur.fetchall()
                    if done(last):
                        return last
                    # LISTEN came first: a change committed since the query is not missed.
                    async for _ in conn.notifies(stop_after=1):
                        pass
        except TimeoutError:
            raise AssertionError(f"not reached in {timeout}s; last rows: {last}") from None


# -- an example's configuration, adapted to the test -----------------------------------------


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` laid on it: tables merged key by key, anything else replaced."""
    out = dict(base)
    for key, new in over.items():
        old = out.get(key)
        out[key] = merge(old, new) if isinstance(old, dict) and isinstance(new, dict) else new
    return out


def example_config(path: Path, example: str, db_url: str, **over: Any) -> dict[str, Any]:
    """Write examples/<example> (e.g. "system2/relay.toml") to `path` for this test: its
    database, loopback receivers allowed, the health port on loopback and free, then `over`."""
    raw = tomllib.loads((EXAMPLES / example).read_text())
    raw = merge(
        raw,
        {
            "database": {"url": db_url},
            "http": {"allow": list(LOOPBACK)},
            "health": {"listen": "127.0.0.1:0", "allow_remote": False},
        },
    )
    raw = merge(raw, over)
    text = to_toml(raw)
    assert tomllib.loads(text) == raw, "to_toml changed the configuration"
    path.write_text(text)
    return raw


def header(request: Received, name: str) -> str | None:
    """A request header by name, whatever its case on the wire."""
    return next((v for k, v in request.headers.items() if k.lower() == name.lower()), None)


# -- relay as a process ----------------------------------------------------------------------


async def install(
    config: Path, db: str, *tables: str, env: Mapping[str, str] | None = None
) -> None:
    """`relay install`, then `relay check` (which plans every statement and expression of the
    configuration against the database), each exiting 0; then `watch` the application's
    tables."""
    for command in ("install", "check"):
        code, out = await run_cli(config, command, env=env)
        assert code == 0, f"relay {command} exited {code}:\n{out}"
    await watch(db, *tables)


async def started(proc: RelayProcess) -> None:
    """Wait until this relay listens; fail at once, with its output, if it exits instead."""
    assert proc.proc is not None
    listening = asyncio.create_task(proc.wait_line("listener.connected"))
    exited = asyncio.create_task(proc.proc.wait())
    done, _ = await asyncio.wait({listening, exited}, timeout=WAIT, return_when="FIRST_COMPLETED")
    listening.cancel()
    exited.cancel()
    if exited in done:
        code = await proc.wait_exit()
        raise AssertionError(f"relay exited with {code} instead of starting:\n{proc.output()}")
    assert listening in done, f"relay did not start listening in {WAIT}s:\n{proc.output()}"


@contextlib.asynccontextmanager
async def relays(
    config: Path, env: Mapping[str, str] | None = None, count: int = 1
) -> AsyncIterator[list[RelayProcess]]:
    """`count` copies of `relay run` on this config, started and listening; killed at the end
    unless `stop` ended them first."""
    procs = [RelayProcess(config, env={**HERMETIC_ENV, **(env or {})}) for _ in range(count)]
    try:
        for proc in procs:
            await proc.start()
        for proc in procs:
            await started(proc)
        yield procs
    finally:
        for proc in procs:
            proc.kill()


async def stop(procs: list[RelayProcess]) -> None:
    """SIGTERM each (in-flight requests finish and are settled) and check each exits 0."""
    for proc in procs:
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
    for proc in procs:
        code = await proc.wait_exit()
        assert code == 0, proc.output()


# -- secrets encrypted at rest (system 2) ----------------------------------------------------


def new_key() -> bytes:
    return os.urandom(32)


def key_env(key: bytes) -> str:
    """How a key is given to relay in the environment: 32 bytes, base64."""
    return base64.b64encode(key).decode()


def encrypt_secret(key_id: str, key: bytes, plaintext: str) -> str:
    """`relay:v1:<key_id>:<base64url(nonce || ciphertext+tag)>`, AES-256-GCM with a 96-bit
    nonce, as an application stores a partner's secret. relay.secretbox.encrypt once it exists;
    until then the same layout with `cryptography` directly."""
    try:
        from relay import secretbox
    except ImportError:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(12)
        sealed = AESGCM(key).encrypt(nonce, plaintext.encode(), None)
        text = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()
        return f"relay:v1:{key_id}:{text}"
    return str(secretbox.encrypt(key_id, key, plaintext))
