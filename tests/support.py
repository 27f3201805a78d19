"""Shared test helpers: a loopback receiver, configs, and a relay running in-process or as a
subprocess. Everything is real: PostgreSQL, HTTP over loopback, signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import psycopg
import pytest
from aiohttp import web

from relay import config as config_mod
from relay import guard
from relay.app import Relay, Service
from relay.config import Config, ConfigError
from relay.db.store import Store
from relay.demo import QUEUE_SOURCE

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # the longest any test waits for an event before failing
LOOPBACK = ("127.0.0.0/8", "::1", "localhost")  # http.allow for receivers on this machine


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]


Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


async def ok(_: web.Request, __: int) -> web.StreamResponse:
    return web.Response(status=200, text="ok")


@dataclass
class Receiver:
    """An HTTP server on loopback that records every request and answers as told."""

    behaviour: Behaviour = ok
    received: list[Received] = field(default_factory=list)
    seen: Counter[str] = field(default_factory=Counter)  # requests per webhook-id
    port: int = 0
    host: str = "127.0.0.1"  # any address of 127.0.0.0/8 works on loopback
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        record = Received(request.path, dict(request.headers), body, time.time())
        self.seen[record.id] += 1
        count = self.seen[record.id]
        self.received.append(record)
        async with self._changed:
            self._changed.notify_all()
        return await self.behaviour(request, count)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float = WAIT
    ) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.received))

    async def wait_count(self, n: int, timeout: float = WAIT) -> None:
        await self.wait_for(lambda r: len(r) >= n, timeout)

    async def wait_ids(self, ids: set[str], timeout: float = WAIT) -> None:
        await self.wait_for(lambda r: ids <= {x.id for x in r}, timeout)

    def ids(self) -> list[str]:
        return [r.id for r in self.received]


async def admin_request(
    port: int, method: str, path: str, token: str | None, body: Any = None
) -> tuple[int, Any]:
    """A request to relay's admin API on loopback, with `Authorization: Bearer token` unless
    None; its status and JSON answer."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"http://127.0.0.1:{port}{path}",
            data=None if body is None else orjson.dumps(body),
            headers=headers,
        ) as response,
    ):
        return response.status, orjson.loads(await response.read())


def queue_source(**overrides: Any) -> dict[str, Any]:
    """A table source mapped onto the demo webhook_delivery_queue."""
    return {**QUEUE_SOURCE, **overrides}


def raw_config(db_url: str, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "database": {"url": db_url},
        "relay": {
            "sweep_interval": 30,
            "claim_timeout": 30,
            "shutdown_grace": 5,
            "heartbeat_interval": 2,
        },
        # Every test receiver is on loopback, which the outbound guard refuses by default.
        "http": {"timeout": 5, "allow": list(LOOPBACK)},
        "retry": {"base": 0.05, "max_delay": 0.5, "jitter": 0.0},
        "health": {"listen": "127.0.0.1:0"},
        "sources": {"deliveries": queue_source()},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(name), dict) and name != "sources":
            raw[name] = {**raw[name], **value}
        else:
            raw[name] = value
    return raw


def make_config(db_url: str, **sections: Any) -> Config:
    return config_mod.from_mapping(raw_config(db_url, **sections), {})


def to_toml(raw: dict[str, Any]) -> str:
    """Just enough TOML for our configs: nested tables of scalars, lists and inline tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return orjson.dumps(v).decode()
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return (
                "{"
                + ", ".join(f"{orjson.dumps(k).decode()} = {value(x)}" for k, x in v.items())
                + "}"
            )
        raise TypeError(v)

    lines: list[str] = []

    def table(prefix: str, data: dict[str, Any]) -> None:
        scalars = {
            k: v for k, v in data.items() if not isinstance(v, dict) or k in ("topics", "headers")
        }
        nested = {k: v for k, v in data.items() if k not in scalars}
        if prefix:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{orjson.dumps(k).decode()} = {value(v)}")
        for k, v in nested.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", raw)
    return "\n".join(lines) + "\n"


async def install(config: Config) -> None:
    """`relay install` for this config (schema and triggers), in-process."""
    store = Store(config.database_url, config.sources, channel=config.notify_channel)
    await store.open()
    try:
        await store.install()
    finally:
        await store.close()


S = TypeVar("S", bound=Store)


@contextlib.asynccontextmanager
async def prepared_store(config: Config, kind: type[S] = Store) -> AsyncIterator[S]:  # type: ignore[assignment]
    """relay's store for `config` (a `kind` of it), its statements prepared, as a relay's
    claimer and settler use it (relay installed already)."""
    store = kind(config.database_url, config.sources)
    await store.open()
    try:
        await store.prepare()
        yield store
    finally:
        await store.close()


async def refusal(config: Config) -> str:
    """The ConfigError that checking `config`'s sources against the database raises (the test
    fails if there is none)."""
    store = Store(config.database_url, config.sources)
    await store.open()
    try:
        with pytest.raises(ConfigError) as refused:
            await store.prepare()
    finally:
        await store.close()
    return str(refused.value)


@contextlib.asynccontextmanager
async def serving(config: Config, network: guard.Network | None = None) -> AsyncIterator[Service]:
    """relay as `relay run` runs it (health endpoint included), in this event loop until the
    block ends (then a graceful stop)."""
    service = Service(config, network=network)
    relay = service.relay
    task = asyncio.create_task(service.run(), name="relay-under-test")
    try:
        listening = asyncio.create_task(relay.listener.up.wait())
        await asyncio.wait({task, listening}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if task.done():
            task.result()  # it died while starting: raise why
        assert relay.listener.connected, "relay did not start listening in time"
        # The sweep the connect asked for has run: from here on, only notifications, timers and
        # the periodic sweep find rows.
        await asyncio.wait_for(relay.sweeper.quiet(), WAIT)
        yield service
    finally:
        service.stop.set()
        await asyncio.wait_for(task, WAIT)


@contextlib.asynccontextmanager
async def running(config: Config, network: guard.Network | None = None) -> AsyncIterator[Relay]:
    """A relay running in this event loop until the block ends (then a graceful stop)."""
    async with serving(config, network) as service:
        yield service.relay


async def insert_rows(url: str, target: str, n: int, **columns: Any) -> list[int]:
    """Insert `n` queue rows in one statement (one transaction); returns their ids."""
    extra_cols = "".join(f", {c}" for c in columns)
    extra_vals = "".join(f", %({c})s" for c in columns)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            f"INSERT INTO webhook_delivery_queue (url, payload{extra_cols}) "
            f"SELECT %(url)s, jsonb_build_object('n', g){extra_vals} "
            f"FROM generate_series(1, %(n)s) g RETURNING id",
            {"url": target, "n": n, **columns},
        )
        return [r[0] for r in await cur.fetchall()]


async def publish(url: str, n: int) -> list[int]:
    """`relay.publish` `n` events (topic 't') in one statement; returns their outbox ids."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT relay.publish('t', jsonb_build_object('n', g)) FROM generate_series(1, %s) g",
            (n,),
        )
        return [r[0] for r in await cur.fetchall()]


async def fetch_rows(url: str) -> dict[int, dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute("SELECT * FROM webhook_delivery_queue ORDER BY id")
        return {r["id"]: r for r in await cur.fetchall()}


class RelayProcess:
    """`relay run` as a subprocess, with its stderr collected."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.env = {**os.environ, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._new_line = asyncio.Condition()

    async def start(self, *args: str) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay.cli",
            "--config",
            str(self.config_path),
            *(args or ("run",)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip())
            async with self._new_line:
                self._new_line.notify_all()

    async def wait_line(self, fragment: str, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout), self._new_line:
            await self._new_line.wait_for(lambda: any(fragment in line for line in self.lines))

    async def wait_exit(self, timeout: float = WAIT) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout)
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    def output(self) -> str:
        return "\n".join(self.lines)


# -- fault injection and processes (used by tests/integration/test_faults.py and tests/e2e) ----

# A subprocess must read its database from the config file we wrote, whatever the caller's shell
# exports.
HERMETIC_ENV = {
    "DATABASE_URL": "",
    "RELAY_LISTEN_URL": "",
    "RELAY_CONFIG": "",
    "RELAY_LOG_LEVEL": "",
    "RELAY_LOG_FORMAT": "",
}


def delivery_ids(ids: Any, source: str = "deliveries") -> set[str]:
    """The webhook-id each of these queue row ids is delivered with."""
    return {f"{source}_{i}" for i in ids}


def write_config(path: Path, raw: dict[str, Any]) -> Config:
    """Write `raw` as TOML to `path` and return the Config a relay reading it will run with."""
    path.write_text(to_toml(raw))
    return config_mod.from_mapping(raw, {})


async def run_cli(
    config_path: Path, *args: str, timeout: float = WAIT, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Run a one-shot `relay` command to the end; its exit code and combined output."""
    proc = RelayProcess(config_path, env={**HERMETIC_ENV, **(env or {})})
    try:
        await proc.start(*args)
        code = await proc.wait_exit(timeout)
    finally:
        proc.kill()
    return code, proc.output()


class InsertStream:
    """Inserts queue rows one per transaction from its own connection, and carries on when that
    connection dies (backend terminated, server restarted): it reconnects and goes on.

    `acked` holds the ids whose INSERT returned, so surely committed. An INSERT whose connection
    died may or may not have committed: the table, not this list, says which rows exist.
    """

    def __init__(self, url: str, target: str) -> None:
        self.url = url
        self.target = target
        self.acked: list[int] = []
        self.failed = 0  # inserts whose outcome the client never heard
        self.connections = 0
        self.finished = False
        self._progress = asyncio.Condition()

    async def run(self, n: int, until: asyncio.Event | None = None, pace: float = 0.0) -> None:
        """Insert `n` rows, and go on after that until `until` is set (if given).

        `pace` spaces the inserts (seconds between them) so that the stream is a steady load
        rather than a burst, and lasts however long the fault under test does without
        piling up more rows than a relay delivers in a test's time.
        """
        conn: psycopg.AsyncConnection[Any] | None = None
        i = 0
        try:
            while i < n or (until is not None and not until.is_set()):
                i += 1
                if conn is None:
                    conn = await self._connect()
                try:
                    cur = await conn.execute(
                        "INSERT INTO webhook_delivery_queue (url, payload) "
                        "VALUES (%s, jsonb_build_object('n', %s::int)) RETURNING id",
                        (self.target, i),
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    self.acked.append(row[0])
                except psycopg.OperationalError:
                    self.failed += 1
                    with contextlib.suppress(Exception):
                        await conn.close()
                    conn = None
                async with self._progress:
                    self._progress.notify_all()
                if pace:
                    await asyncio.sleep(pace)
        finally:
            self.finished = True
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            async with self._progress:
                self._progress.notify_all()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=5
                )
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                # The server is restarting: nothing to wait on but the server itself, so retry
                # the connect at a short interval, bounded by the deadline.
                await asyncio.sleep(0.05)
                continue
            self.connections += 1
            return conn

    async def wait_acked(self, n: int, timeout: float = WAIT) -> None:
        """Wait until `n` inserts have committed (fails at once if the stream stopped short)."""
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: len(self.acked) >= n or self.finished)
        assert len(self.acked) >= n, f"the insert stream stopped after {len(self.acked)} rows"


async def terminate_backends(db_url: str, pids: list[int] | None = None) -> list[int]:
    """pg_terminate_backend: the given backends, or every other backend of this database."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        if pids is None:
            # Pick the victims first: the planner may evaluate WHERE clauses in any order, and
            # must never terminate this very connection.
            cur = await conn.execute(
                "WITH victims AS MATERIALIZED (SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()) "
                "SELECT pid FROM victims WHERE pg_terminate_backend(pid)"
            )
        else:
            cur = await conn.execute(
                "SELECT pid FROM unnest(%s::int[]) AS pid WHERE pg_terminate_backend(pid)",
                (pids,),
            )
        return [r[0] for r in await cur.fetchall()]


async def listener_reconnected(relay: Relay, timeout: float = WAIT) -> None:
    """Wait until the listener has dropped its connection and is connected and listening again.

    Start this (as a task) before breaking the connection: it waits for the drop first, so a
    listener that never noticed cannot pass for one that came back.
    """
    async with asyncio.timeout(timeout):
        await relay.listener.down.wait()
        await relay.listener.up.wait()
