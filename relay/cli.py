"""The `relay` command. Exit codes: 0 ok, 1 failed, 2 configuration error."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import psycopg
import psycopg_pool

from relay import config as config_mod
from relay import connections, logs
from relay.app import Service
from relay.config import Config, ConfigError
from relay.db.store import Store

log = logging.getLogger("relay.cli")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
ADMIN_STATEMENT_TIMEOUT = 60.0  # seconds: install, uninstall, status and retry-dead


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay",
        description="Postgres LISTEN/NOTIFY relay: delivers committed rows over HTTP.",
    )
    p.add_argument("--config", "-c", help="TOML configuration file (default: $RELAY_CONFIG)")
    p.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=logs.LEVELS,
        help="DEBUG, INFO, WARNING or ERROR (default: $RELAY_LOG_LEVEL, else INFO)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="relay until SIGTERM/SIGINT")
    sub.add_parser("install", help="create relay's schema and the sources' triggers (idempotent)")
    sub.add_parser("uninstall", help="remove relay's triggers and functions (keeps data)")
    sub.add_parser("check", help="check the configuration against the database")
    sub.add_parser("status", help="rows by status and the oldest due row, per source")
    rd = sub.add_parser("retry-dead", help="make a source's dead rows claimable again")
    rd.add_argument("source", help="the source name from the configuration")
    return p


def _log_level(given: str | None, env: dict[str, str] | os._Environ[str]) -> str:
    level = (given or env.get("RELAY_LOG_LEVEL") or "INFO").upper()
    if level not in logs.LEVELS:
        raise ConfigError(
            f"RELAY_LOG_LEVEL: expected one of {', '.join(logs.LEVELS)}, got {logs.field(level)}"
        )
    return level


async def _with_store(config: Config, command: str, source: str | None) -> int:
    store = Store(
        config.database_url,
        config.sources,
        max_payload_bytes=config.max_payload_bytes,
        channel=config.notify_channel,
        max_size=2,
        worker=config.worker_id,
        pgbouncer=config.pgbouncer,
        # Installing waits for locks on the application's tables; reports read whole tables.
        statement_timeout=(
            config.statement_timeout
            if command == "check"
            else max(config.statement_timeout, ADMIN_STATEMENT_TIMEOUT)
        ),
    )
    problem = await _unreachable(config.database_url)
    if problem is not None:
        print(
            f"relay {command}: cannot connect to the database at database.url "
            f"({_redact(config.database_url)}): {problem}; is it running and reachable?",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        await store.open()
    except psycopg_pool.PoolTimeout:
        print(
            f"relay {command}: cannot connect to the database at database.url "
            f"({_redact(config.database_url)}); is it running and reachable?",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        if command == "install":
            await store.install()
            print(f"installed relay schema and triggers for: {', '.join(store.sources)}")
        elif command == "uninstall":
            await store.uninstall()
            print("removed relay's triggers and functions (relay.outbox and its rows are kept)")
        else:
            failing = await _prepare(store, each=command == "status")
            if config.jobs:
                await store.check_jobs()
            if command == "check":
                problems = await store.trigger_problems()
                for name, problem in problems.items():
                    # Without its trigger a source is delivered only at each sweep, and a stale
                    # one may wake relay for the wrong rows or not at all.
                    print(f"sources.{name}: {problem}; run `relay install`", file=sys.stderr)
                if problems:
                    print(f"relay check: {len(problems)} source(s) need `relay install`")
                    return EXIT_FAILED
                print(f"configuration OK for sources: {', '.join(store.sources)}")
                await _about(store, failing)
            elif command == "status":
                for name in store.sources:
                    if name in failing:
                        print(f"{name}: failing: {logs.escape(failing[name])}")
                        continue
                    counts = await store.counts(name)
                    oldest = await store.oldest_due(name)
                    # Status values are the application's data: shown escaped, never raw.
                    shown = ", ".join(f"{logs.field(k)}={v}" for k, v in counts.items())
                    shown = shown or "empty"
                    age = "none" if oldest is None else f"{oldest:.1f}s"
                    print(f"{name}: {shown}; oldest due row waiting: {age}")
                await _about(store, failing)
                await _job_lines(store, config)
                if failing:
                    return EXIT_FAILED
            elif command == "retry-dead":
                assert source is not None
                if source not in store.sources:
                    raise ConfigError(
                        f"retry-dead: no source named {source!r}; sources are: "
                        f"{', '.join(store.sources)}"
                    )
                count = await store.retry_dead(source)
                print(f"{source}: {count} dead rows made claimable again")
    finally:
        await store.close()
    return EXIT_OK


async def _unreachable(url: str) -> str | None:
    """Why the database cannot be reached, in one line, within connect_timeout; None if it can.

    One plain connection first, so that an unreachable database is one clear line after a few
    seconds rather than the pool's retries and multi-line warnings."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, **connections.options(url))
    except psycopg.OperationalError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return logs.escape(lines[-1] if lines else type(exc).__name__)
    await conn.close()
    return None


async def _about(store: Store, failing: dict[str, str]) -> None:
    """What each source's kind says of it besides its rows (the Documenso release found)."""
    for name in store.sources:
        if name not in failing and (about := await store.about(name)) is not None:
            print(f"sources.{name}: {logs.escape(about)}")


async def _job_lines(store: Store, config: Config) -> None:
    """Each scheduled job: its schedule, its newest run (by any relay) and the next one."""
    if not config.jobs:
        return
    last = await store.last_runs([job.name for job in config.jobs])
    now = datetime.now(UTC)
    for job in config.jobs:
        shown = f"jobs.{job.name}: {job.describe()}; next {job.following(now).isoformat()}"
        run = last.get(job.name)
        if run is None:
            print(f"{shown}; not run yet")
            continue
        result = (
            f"failed: {logs.escape(run.error)}" if run.error is not None else run.counted() or "ok"
        )
        print(
            f"{shown}; last run {run.scheduled_for.isoformat()} by {logs.field(run.worker)} "
            f"in {run.duration_ms:.1f} ms: {result}"
        )


async def _prepare(store: Store, each: bool) -> dict[str, str]:
    """Check and compile the sources. With `each`, one that fails the check is reported (its
    reason, by name) and the others go on, as a running relay does; otherwise it is an error."""
    if not each:
        await store.prepare()
        return {}
    failing = {}
    for name in store.sources:
        try:
            await store.prepare([name])
        except ConfigError as exc:
            failing[name] = str(exc)
    return failing


def _redact(url: str) -> str:
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable>"
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in info.items())


async def run_relay(config: Config, load: Callable[[], Config] | None = None) -> int:
    """`relay run`: until SIGTERM, SIGINT or SIGQUIT; SIGHUP reloads with `load`."""
    service = Service(config, load)
    service.install_signal_handlers()
    await service.run()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        logs.setup(_log_level(args.log_level, os.environ))
        config = config_mod.load(args.config, os.environ)
        if args.command == "run":
            return asyncio.run(run_relay(config, lambda: config_mod.load(args.config, os.environ)))
        return asyncio.run(_with_store(config, args.command, getattr(args, "source", None)))
    except ConfigError as exc:
        print(f"relay: configuration error: {logs.escape(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except psycopg.Error as exc:
        print(f"relay: database error: {logs.escape(str(exc).strip())}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    except BaseExceptionGroup as group:
        # A part of the relay died: say which and why, and exit non-zero.
        for failure in group.exceptions:
            log.critical("relay.crashed error=%s", failure, exc_info=failure)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
