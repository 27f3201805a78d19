"""The `relay` command. Exit codes: 0 ok, 1 failed, 2 configuration error."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import psycopg
import psycopg_pool

from relay import __version__, connections, logs, notify
from relay import config as config_mod
from relay.app import Service
from relay.config import Config, ConfigError
from relay.db.store import Store

log = logs.get("relay.cli")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
ADMIN_STATEMENT_TIMEOUT = 60.0  # seconds: install, uninstall, status and retry-dead


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay",
        description="Postgres LISTEN/NOTIFY relay: delivers committed rows over HTTP.",
    )
    p.add_argument("--version", action="version", version=f"relay {__version__} (pg-relay)")
    p.add_argument("--config", "-c", help="TOML configuration file (default: $RELAY_CONFIG)")
    p.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=logs.LEVELS,
        help="DEBUG, INFO, WARNING or ERROR (default: $RELAY_LOG_LEVEL, else INFO)",
    )
    p.add_argument(
        "--log-format",
        default=None,
        type=str.lower,
        choices=logs.FORMATS,
        help="json, logfmt or text (default: $RELAY_LOG_FORMAT, else text when stderr is a "
        "terminal and logfmt otherwise)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="relay until SIGTERM/SIGINT")
    sub.add_parser("install", help="create relay's schema and the sources' triggers (idempotent)")
    sub.add_parser("uninstall", help="remove relay's triggers and functions (keeps data)")
    sub.add_parser("check", help="check the configuration against the database")
    sub.add_parser("status", help="rows by status and the oldest due row, per source")
    rd = sub.add_parser("retry-dead", help="make a source's dead rows claimable again")
    rd.add_argument("source", help="the source name from the configuration")
    dead = sub.add_parser("dead", help="a source's dead rows with their last error, by key")
    dead.add_argument("source", help="the source name from the configuration")
    dead.add_argument("--limit", type=int, default=50, help="rows per page (default 50)")
    dead.add_argument("--after", help="the key the previous page ended with")
    retry = sub.add_parser("retry", help="make chosen dead rows claimable again")
    retry.add_argument("source", help="the source name from the configuration")
    retry.add_argument("keys", nargs="*", help="their keys ('-': one per line on stdin)")
    which = retry.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every dead row of the source")
    which.add_argument("--since", help="those made (or, for Documenso jobs, failed) since, ISO")
    enable = sub.add_parser(
        "enable", help="send again to targets a source disabled (410 Gone, endpoints.disable_on)"
    )
    enable.add_argument("source", help="the source name from the configuration")
    enable.add_argument("target", nargs="?", help="the target URL (default: all of the source's)")
    jobs = sub.add_parser("jobs", help="the scheduled jobs: last run, next occurrence")
    jobs.add_argument("--run", metavar="NAME", help="run this job now, once")
    return p


def _log_level(given: str | None, env: dict[str, str] | os._Environ[str]) -> str:
    level = (given or env.get("RELAY_LOG_LEVEL") or "INFO").upper()
    if level not in logs.LEVELS:
        raise ConfigError(
            f"RELAY_LOG_LEVEL: expected one of {', '.join(logs.LEVELS)}, got {logs.field(level)}"
        )
    return level


def log_format(given: str | None, env: Mapping[str, str]) -> str | None:
    """The log format asked for by --log-format or RELAY_LOG_FORMAT; None: the default (text
    on a terminal, logfmt otherwise)."""
    kind = (given or env.get("RELAY_LOG_FORMAT") or "").lower()
    if not kind:
        return None
    if kind not in logs.FORMATS:
        raise ConfigError(
            f"RELAY_LOG_FORMAT: expected one of {', '.join(logs.FORMATS)}, got {logs.field(kind)}"
        )
    return kind


async def _with_store(config: Config, command: str, args: argparse.Namespace) -> int:
    source: str | None = getattr(args, "source", None)
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
            if config.inboxes:
                await store.check_inboxes(config.inboxes)
            if command == "check":
                problems = await _check_problems(store)
                for problem in problems:
                    print(problem, file=sys.stderr)
                if problems:
                    print(f"relay check: {len(problems)} problem(s) to fix, each named above")
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
                await _endpoint_lines(store)
                if failing:
                    return EXIT_FAILED
            elif command == "retry-dead":
                count = await store.retry_dead(_source(store, command, source))
                print(f"{source}: {count} dead rows made claimable again")
            elif command == "dead":
                await _dead(store, _source(store, command, source), args.limit, args.after)
            elif command == "retry":
                await _retry(store, _source(store, command, source), args)
            elif command == "enable":
                enabled = await store.enable_targets(_source(store, command, source), args.target)
                for target in enabled:
                    print(f"{source}: {logs.field(target)} enabled")
                if not enabled:
                    print(f"{source}: no disabled target{' like that' if args.target else 's'}")
                else:
                    print(
                        f"running relays send to them again within relay.sweep_interval; "
                        f"`relay retry {source} --all` sends the rows that went dead meanwhile"
                    )
            elif command == "jobs":
                if args.run is not None:
                    return await _run_job(store, config, args.run)
                await _job_lines(store, config)
                if not config.jobs:
                    print("no jobs configured ([jobs.NAME] tables)")
    finally:
        await store.close()
    return EXIT_OK


async def _check_problems(store: Store) -> list[str]:
    """What `relay check` fails for once the sources are checked and compiled: what `relay
    install` would make or change (triggers, ordering indexes, relay.endpoints) and the grants
    relay.endpoints needs, each with what to do. A running relay starts despite them."""
    problems = [
        # Without its trigger a source is delivered only at each sweep, and a stale one may
        # wake relay for the wrong rows or not at all.
        f"sources.{name}: {problem}; run `relay install`"
        for name, problem in (await store.trigger_problems()).items()
    ]
    for name, index in (await store.missing_ordering_indexes()).items():
        # The statement holds the user's ordering_key: shown escaped, never raw. (A running
        # relay starts without the index, with a warning: ordering.index_missing.)
        concurrently = index.create.replace("CREATE INDEX ", "CREATE INDEX CONCURRENTLY ", 1)
        problems.append(
            f"sources.{name}: its ordering index {logs.escape(index.name)} is missing, so "
            f"each claim reads the table; run `relay install`, or on a large busy table first "
            f"run: {logs.escape(concurrently)};"
        )
    if (endpoints := await store.endpoints_problem()) is not None:
        problems.append(logs.escape(endpoints))  # (it names the role)
    return problems


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


def _source(store: Store, command: str, name: str | None) -> str:
    if name not in store.sources:
        raise ConfigError(
            f"{command}: no source named {name!r}; sources are: {', '.join(store.sources)}"
        )
    return name


async def _dead(store: Store, source: str, limit: int, after: str | None) -> None:
    rows = await store.dead(source, limit + 1, after)
    for row in rows[:limit]:
        # Keys and errors are the application's data: shown escaped, never raw.
        facts = [
            f"{key}={logs.field(str(value))}"
            for key, value in (
                ("attempts", row.attempts),
                ("http_status", row.http_status),
                ("at", row.at.isoformat() if row.at else None),
            )
            if value is not None
        ]
        error = logs.escape(row.error) if row.error else "-"
        print(f"{logs.field(row.key)}  {' '.join(facts)}  error={error}")
    if len(rows) > limit:
        print(f"more: relay dead {source} --after {logs.field(rows[limit - 1].key)}")
    elif not rows:
        print(f"{source}: no dead rows")


RETRY_CHUNK = 1000  # keys per statement when retrying chosen rows


async def _retry(store: Store, source: str, args: argparse.Namespace) -> None:
    keys: list[str] = list(args.keys)
    if keys == ["-"]:
        keys = [line.strip() for line in sys.stdin if line.strip()]
    if bool(keys) + bool(args.all) + bool(args.since) != 1:
        raise ConfigError("retry: give the keys, or --all, or --since TIME (one of them)")
    if not keys:
        since = None
        if args.since:
            try:
                since = datetime.fromisoformat(args.since)
            except ValueError:
                raise ConfigError(
                    f"retry --since: {args.since!r} is not an ISO-8601 time"
                ) from None
            since = since if since.tzinfo else since.replace(tzinfo=UTC)
        count = await store.retry_dead(source, None, since)
        print(f"{source}: {count} dead rows made claimable again")
        return
    count = 0
    chunks = range(0, len(keys), RETRY_CHUNK)
    for done, start in enumerate(chunks, 1):
        count += await store.retry_dead(source, keys[start : start + RETRY_CHUNK])
        if len(chunks) > 1:
            _progress(done, len(chunks), f"{count} retried")
    print(
        f"{source}: {count} of {len(keys)} keys were dead rows, made claimable again"
        + ("" if count == len(keys) else " (the others are not dead, or not there)")
    )


def _progress(done: int, total: int, what: str) -> None:
    """A progress bar on stderr, on one line, for work in many steps."""
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what}",
        end=end,
        file=sys.stderr,
        flush=True,
    )


async def _run_job(store: Store, config: Config, name: str) -> int:
    job = next((j for j in config.jobs if j.name == name), None)
    if job is None:
        raise ConfigError(
            f"jobs --run: no job named {name!r}; jobs are: "
            f"{', '.join(j.name for j in config.jobs) or 'none'}"
        )
    run = await store.run_job(job, datetime.now(UTC))
    if run is None:
        print(f"jobs.{name}: another relay is running it now; not run", file=sys.stderr)
        return EXIT_FAILED
    if run.error is not None:
        print(f"jobs.{name}: failed in {run.duration_ms:.1f} ms: {logs.escape(run.error)}")
        return EXIT_FAILED
    print(f"jobs.{name}: ran in {run.duration_ms:.1f} ms: {run.counted() or 'ok'}")
    return EXIT_OK


async def _job_lines(store: Store, config: Config) -> None:
    """Each scheduled job: its schedule, its newest run (by any relay) and the next one."""
    if not config.jobs:
        return
    last = await store.last_runs([job.name for job in config.jobs])
    now = datetime.now(UTC)
    for job in config.jobs:
        shown = f"jobs.{job.name}: {job.describe()}"
        if not job.on_demand:
            shown += f"; next {job.following(now).isoformat()}"
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


async def _endpoint_lines(store: Store) -> None:
    """Endpoints paused by a relay's circuit breaker, and targets disabled by their answer."""
    try:
        rows = await store.endpoint_states()
    except psycopg.errors.UndefinedTable:
        print("endpoints: relay.endpoints does not exist; run `relay install`")
        return
    for state, target, source, worker, reason, since, _until, resumes_in in rows:
        # Targets and reasons come from rows and answers: shown escaped, never raw.
        if state == "paused":
            when = f"probed in {resumes_in:.0f}s" if resumes_in > 0 else "probe overdue (stale?)"
            print(
                f"endpoint {logs.field(target)}: paused by {logs.field(worker)} since "
                f"{since.isoformat()}, {when}: {logs.escape(reason)}"
            )
        else:
            print(
                f"sources.{source}: target {logs.field(target)} disabled since "
                f"{since.isoformat()} (`relay enable {source}` to send again)"
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
    # systemd's NOTIFY_SOCKET and WATCHDOG_USEC, read here with the rest of the environment.
    service = Service(config, load, notifier=notify.Notifier.from_environ(os.environ))
    service.install_signal_handlers()
    await service.run()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        logs.setup(_log_level(args.log_level, os.environ), log_format(args.log_format, os.environ))
        config = config_mod.load(args.config, os.environ)
        if args.command == "run":
            return asyncio.run(run_relay(config, lambda: config_mod.load(args.config, os.environ)))
        return asyncio.run(_with_store(config, args.command, args))
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
            log.critical("relay.crashed", error=logs.first_line(failure), exc_info=failure)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
