"""`make run`: relay on an embedded PostgreSQL with a demo queue and a receiver that prints.

With no DATABASE_URL: starts (or reuses) an embedded PostgreSQL whose data folder persists in
`.relay/pgdata`, installs relay's schema, the demo `webhook_delivery_queue` table and their
triggers, starts a demo receiver, and runs relay in the foreground. Ctrl-C stops relay, receiver
and database. With DATABASE_URL set, it is `relay run` for that database and its config file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from psycopg import sql

from relay import cli, logs
from relay import config as config_mod
from relay.app import Service
from relay.config import Config, ConfigError
from relay.db.sqltext import sql_dir
from relay.db.store import Store
from relay.embedded import EmbeddedError, EmbeddedPostgres

DEMO_DB = "relay_demo"
DEMO_ALLOW = ("127.0.0.0/8", "::1", "localhost")

log = logs.get("relay.demo")

# The demo queue (sql/demo/webhook_delivery_queue.sql) as a table source: the mapping a user of
# such a queue writes in [sources.NAME]. The tests and the benchmark use it too.
QUEUE_SOURCE: dict[str, Any] = {
    "kind": "table",
    "table": "public.webhook_delivery_queue",
    "key": "id",
    "status": "status",
    "pending": ["pending", "failed"],
    "retry": "failed",
    "processing": "processing",
    "done": "delivered",
    "dead": "dead_letter",
    "attempts": "attempt_count",
    "max_attempts_column": "max_attempts",
    # Only read: a row is not claimed before it. relay's own claims and retry times live in
    # relay.leases; the write-back below keeps the column telling when the next attempt is due.
    "due": "next_retry_at",
    "on_failure": {"next_retry_at": "attempt.next_at"},
    "last_error": "last_error",
    "last_status": "last_response_status",
    "done_at": "delivered_at",
    "payload": "payload",
    "url_column": "url",
    "secret_column": "secret",
}


def demo_config(db_url: str, receiver_url: str, health_port: int) -> Config:
    """The demo's sources: the partner-webhook queue (target per row) and relay's outbox."""
    return config_mod.from_mapping(
        {
            "database": {"url": db_url},
            "relay": {"worker_id": "demo"},
            # The demo receiver runs on this machine: loopback is opened through the outbound
            # guard for the demo only (a real config lists what it needs in http.allow).
            "http": {"allow": list(DEMO_ALLOW)},
            "health": {"listen": f"127.0.0.1:{health_port}"},
            "sources": {
                "deliveries": QUEUE_SOURCE,
                "events": {"kind": "outbox", "topics": {"*": receiver_url}},
            },
        },
        {},
    )


async def _receiver(port: int) -> web.AppRunner:
    async def hook(request: web.Request) -> web.Response:
        body = (await request.read()).decode(errors="replace")
        stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
        attempt = request.headers.get("relay-attempt", "?")
        print(
            f"[receiver {stamp}] {request.method} {request.path} "
            f"id={request.headers.get('webhook-id')} attempt={attempt} body={body}",
            flush=True,
        )
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hook)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def _prepare_database(pg: EmbeddedPostgres) -> str:
    with psycopg.connect(pg.url("postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DEMO_DB,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DEMO_DB)))
    url = pg.url(DEMO_DB)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((sql_dir() / "triggers" / "relay_schema.sql").read_text())
        conn.execute((sql_dir() / "demo" / "webhook_delivery_queue.sql").read_text())
    return url


async def _run_demo(pg: EmbeddedPostgres, receiver_port: int, health_port: int) -> int:
    receiver = await _receiver(receiver_port)
    receiver_port = receiver.addresses[0][1]
    receiver_url = f"http://127.0.0.1:{receiver_port}/hook"
    db_url = _prepare_database(pg)
    config = demo_config(db_url, receiver_url, health_port)
    store = Store(config.database_url, config.sources, channel=config.notify_channel, max_size=1)
    await store.open()
    try:
        await store.install()
    finally:
        await store.close()

    # No configuration file here: SIGHUP says there is nothing to reload and goes on.
    service = Service(config)
    service.install_signal_handlers()
    relay = service.relay
    task = asyncio.create_task(service.run(), name="relay")
    ready = asyncio.create_task(relay.listener.up.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if not task.done():
        payload = '{"order": 42}'
        print(
            "\n".join(
                [
                    "",
                    "relay demo is running.",
                    f"  database: {db_url}  (data in {pg.data_dir}, kept across runs)",
                    f"  receiver: {receiver_url}",
                    f"  allowed:  {', '.join(DEMO_ALLOW)} (http.allow: loopback is open for the "
                    f"demo's receiver; relay refuses non-public targets by default)",
                    f"  health:   http://127.0.0.1:{service.health_port}/readyz"
                    f"  (metrics: /metrics)",
                    "",
                    "Connect with:",
                    f"  {pg.psql_command(DEMO_DB)}",
                    "Then try (each arrives at the receiver below at once):",
                    f"  INSERT INTO webhook_delivery_queue (url, payload) "
                    f"VALUES ('{receiver_url}', '{payload}');",
                    f"  SELECT relay.publish('order.created', '{payload}');",
                    "",
                    "Ctrl-C stops relay, receiver and database.",
                    "",
                ]
            ),
            flush=True,
        )
    try:
        await task
    finally:
        await receiver.cleanup()
    return cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__)
    parser.add_argument("--config", help="config file, when DATABASE_URL names a real database")
    parser.add_argument("--data-dir", default=os.environ.get("RELAY_DEMO_DIR", ".relay"))
    parser.add_argument("--port", type=int, default=54329, help="embedded PostgreSQL's port")
    parser.add_argument("--receiver-port", type=int, default=8099)
    parser.add_argument("--health-port", type=int, default=8081)
    args = parser.parse_args(argv)

    if os.environ.get("DATABASE_URL"):
        # A real database: exactly `relay run` with the user's config file.
        return cli.main([*(["--config", args.config] if args.config else []), "run"])

    level = os.environ.get("RELAY_LOG_LEVEL", "INFO").upper()
    if level not in logs.LEVELS:
        print(
            f"make run: RELAY_LOG_LEVEL: expected one of {', '.join(logs.LEVELS)}, "
            f"got {logs.field(level)}",
            file=sys.stderr,
        )
        return cli.EXIT_CONFIG
    try:
        kind = cli.log_format(None, os.environ)
    except ConfigError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return cli.EXIT_CONFIG
    logs.setup(level, kind)
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pg = EmbeddedPostgres(data_dir / "pgdata", port=args.port)
    try:
        print(f"starting embedded PostgreSQL in {pg.data_dir} ...", flush=True)
        pg.start()
    except EmbeddedError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return cli.EXIT_FAILED
    try:
        return asyncio.run(_run_demo(pg, args.receiver_port, args.health_port))
    except ConfigError as exc:
        print(f"make run: configuration error: {exc}", file=sys.stderr)
        return cli.EXIT_CONFIG
    except OSError as exc:
        print(
            f"make run: {exc}; is another demo already running? (ports: receiver "
            f"{args.receiver_port}, health {args.health_port})",
            file=sys.stderr,
        )
        return cli.EXIT_FAILED
    finally:
        print("stopping embedded PostgreSQL ...", flush=True)
        pg.stop("fast")


if __name__ == "__main__":
    sys.exit(main())
