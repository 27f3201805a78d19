"""The only module that runs SQL: the connection pool, and check, install, claim, settle,
heartbeat, sweep and report for every configured source through its kind's compiled statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import psycopg
import psycopg_pool
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from relay import connections, jobs, logs
from relay.db import catalog, sqltext
from relay.db.batch import settle_batch_json
from relay.inbox import Inbox
from relay.jobs import Job, JobRun
from relay.readers import ConfigError
from relay.sources.base import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Claimed,
    Compiled,
    DbContext,
    OrderingIndex,
    Settlement,
    Source,
    json_default,
)

log = logs.get("relay.store")
T = TypeVar("T")

_SCHEMA_SQL = (sqltext.sql_dir() / "triggers" / "relay_schema.sql").read_text()
_UNINSTALL_SQL = (sqltext.sql_dir() / "triggers" / "uninstall.sql").read_text()
_JOBS = sqltext.load_queries(sqltext.sql_dir() / "queries" / "jobs.sql")
_INBOX = sqltext.load_queries(sqltext.sql_dir() / "queries" / "inbox.sql")
_ENDPOINTS = sqltext.load_queries(sqltext.sql_dir() / "queries" / "endpoints.sql")

RETRYABLE = (psycopg.OperationalError, psycopg_pool.PoolTimeout)
# How long a connection may stay silent while one source is checked or installed (a few dozen
# statements, each bounded by the server's statement_timeout as well).
SETUP_BOUND = 30.0
PING_WITHIN = 2.0  # seconds /readyz waits for the pool to run a query
DEFAULT_STATEMENT_TIMEOUT = 5.0


def oversize_reason(source: str, oversize: str, max_payload_bytes: int) -> str:
    """Why a row the claim did not load is dead, and what to do about it."""
    from relay.sources.base import MAX_FIELD_BYTES

    return (
        f"too large to deliver ({oversize} bytes): a payload may have at most "
        f"relay.max_payload_bytes = {max_payload_bytes} bytes, a URL, secret or topic "
        f"{MAX_FIELD_BYTES}; shrink the row or raise relay.max_payload_bytes, then run "
        f"`relay retry-dead {source}`"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class DeadRow:
    key: str
    error: str | None
    http_status: int | None
    attempts: int | None
    at: datetime | None  # when it was made (relay's tables) or died (Documenso's jobs)

    def summary(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "error": self.error,
            "http_status": self.http_status,
            "attempts": self.attempts,
            "at": None if self.at is None else self.at.isoformat(),
        }


class Store:
    """A connection pool and the compiled queries of every configured source.

    Every use of a pooled connection is bounded: the server cancels a statement that runs
    longer than `statement_timeout`, and a connection that has not answered shortly after that
    is severed (see relay.connections) and replaced, as are the pool's idle connections then.
    """

    def __init__(
        self,
        url: str,
        sources: Sequence[Source],
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        channel: str = "relay",
        max_size: int = 8,
        retry_for: float = 30.0,
        worker: str = "relay",
        pgbouncer: bool = False,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
    ) -> None:
        self.sources = {s.name: s for s in sources}
        self.ctx = DbContext(channel=channel, max_payload_bytes=max_payload_bytes)
        self.max_payload_bytes = max_payload_bytes
        self.worker = worker
        self.channel = channel
        self.retry_for = retry_for
        self.pgbouncer = pgbouncer
        self.watchdog = connections.Watchdog(
            statement_timeout + connections.SLACK, on_silent=self.sever_idle
        )
        # Every connection the pool opened, to sever the idle ones when one went silent.
        self._conns: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()
        self._stopping = False
        self._reviving: asyncio.Task[None] | None = None
        self.revived = 0  # times the pool was revived after the database came back (tests)
        self.pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            open=False,
            # Every query here is one statement, so autocommit makes each its own short
            # transaction without a BEGIN/COMMIT round trip. A PgBouncer in transaction mode
            # would refuse the startup `options` that carry statement_timeout: there the
            # client-side bound alone applies.
            kwargs={
                "autocommit": True,
                **connections.options(url, None if pgbouncer else statement_timeout),
            },
            configure=self._configure,
            name="relay",
            timeout=10.0,
        )
        self.compiled: dict[str, Compiled] = {}
        # The hot path's statements are prepared on a connection's first use of them, not its
        # fifth (psycopg's default): the pool hands out its connections in turn, and planning
        # a claim or a settle cost as much as running it. Not through PgBouncer (see below).
        self._prepare: bool | None = None if pgbouncer else True

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conns.add(conn)
        if self.pgbouncer:
            # PgBouncer in transaction mode may hand each statement to another server
            # connection, where a prepared statement does not exist.
            conn.prepare_threshold = None

    async def open(self) -> None:
        if self.pool.closed:
            await self.pool.open()
        await self.pool.wait(timeout=15.0)

    @property
    def interrupted(self) -> bool:
        return self._stopping

    async def close(self) -> None:
        if self._reviving is not None:
            self._reviving.cancel()
            await asyncio.gather(self._reviving, return_exceptions=True)
        # Interrupted, the database is not answering: the pool's attempts to connect are not
        # worth waiting for (each would take up to connect_timeout).
        await self.pool.close(timeout=1.0 if self._stopping else 5.0)

    def database_back(self) -> None:
        """The listener has connected again after losing the database: make the pool usable
        now, rather than when claims, settles and pings find out by themselves.

        After a restart every idle pooled connection is broken, and a claim would try them one
        by one, between retries. And if anything used the pool while the database was away,
        psycopg_pool is reconnecting on its own backoff (1 s, 2 s, 4 s... after each failure)
        with nothing to tell it the database is back: claims and settles wait for its next
        attempt, seconds after the listener is back. Runs once per reconnect of the listener,
        off the hot path."""
        if self._stopping or self.pool.closed:
            return
        if self._reviving is not None and not self._reviving.done():
            return
        self._reviving = asyncio.create_task(self._revive(), name="store.revive")

    async def _revive(self) -> None:
        pool = self.pool
        try:
            stats = pool.get_stats()
            size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
            reconnecting = size - idle - len(self.watchdog.busy)
            # Nothing ready and some connections waiting on psycopg_pool's backoff: open one
            # more now (resize opens the connections it adds at once), and put the sizes back.
            # The pool is one over its size until it shrinks (max_idle) or gives one up; a
            # database that keeps flapping cannot make it grow past twice its size.
            opened = not idle and reconnecting > 0 and size < 2 * pool.max_size
            if opened:
                sizes = pool.min_size, pool.max_size
                await pool.resize(sizes[0] + 1, sizes[1] + 1)
                await pool.resize(*sizes)
            # Idle connections from before the loss: one empty query each, and psycopg_pool
            # replaces the broken ones now, without backoff. (A broken one fails at once: the
            # server that had it is gone, or sever_idle cut it when the listener went silent.)
            await pool.check()
            self.revived += 1
            stats = pool.get_stats()
            log.info(
                "store.revived",
                idle=stats.get("pool_available"),
                size=stats.get("pool_size"),
                opened=opened,
            )
        except Exception as exc:  # the pool's own reconnection goes on regardless
            log.warning("store.revive_failed", error=logs.first_line(exc))

    @contextlib.asynccontextmanager
    async def _connection(
        self, bound: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection for one bounded use: one statement on the hot path (the
        watchdog's own bound), or at least `bound` seconds for a use of many statements."""
        async with self.pool.connection() as conn:
            with self.watchdog.watching(conn, max(bound or 0.0, self.watchdog.bound)):
                yield conn

    def sever_idle(self) -> None:
        """A connection went silent: the pool's idle ones probably share its fate (same path to
        the same server), so cut them now rather than let each be found out by a timeout."""
        for conn in list(self._conns):
            if conn not in self.watchdog.busy:
                connections.sever(conn)

    def interrupt(self) -> None:
        """Stopping: no more retries, and the statements still waiting on the database fail
        now (their rows keep their claims until expiry, as after a crash)."""
        self._stopping = True
        cut = self.watchdog.sever_busy()
        if cut:
            log.warning("store.interrupted", connections=cut, next="stopping without their answer")

    def _retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, RETRYABLE) and not self._stopping

    async def _with_retries(self, action: Callable[[], Awaitable[T]]) -> T:
        """Run `action`, retrying on a lost connection (the pool replaces broken ones)."""
        try:
            # The common case costs one call, not a retry controller per query.
            return await action()
        except RETRYABLE:
            if self._stopping:
                raise
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(self._retryable),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(self.retry_for),
            reraise=True,
        ):
            with attempt:
                return await action()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- set-up ----------------------------------------------------------------------------

    async def prepare(self, names: Iterable[str] | None = None) -> None:
        """Check every source (or those named) against the database and compile its queries."""
        chosen = self.sources.values() if names is None else [self.sources[n] for n in names]
        # One connection per source: checking one takes a few dozen round trips, and the
        # watchdog bounds each use of a connection, not each statement.
        for source in chosen:
            async with self._connection(SETUP_BOUND) as conn:
                _check_encoding(conn)
                compiled = await source.kind.prepare(conn, source, self.ctx)
                self.compiled[source.name] = compiled.render(conn)

    async def endpoints_problem(self) -> str | None:
        """Why relay cannot keep disabled targets and pauses in relay.endpoints (the table
        missing, or grants), or None (catalog.endpoints_problem)."""
        async with self._connection(SETUP_BOUND) as conn:
            return await catalog.endpoints_problem(conn)

    async def missing_ordering_indexes(self) -> dict[str, OrderingIndex]:
        """The sources whose ordering index (Compiled.ordering_index) is not there: their
        claims then read each candidate's key's rows from the table."""
        missing = {}
        async with self._connection(SETUP_BOUND) as conn:
            for name, compiled in self.compiled.items():
                index = compiled.ordering_index
                # (to_regclass: any relation, an index too)
                if index is not None and not await catalog.table_exists(
                    conn, index.schema, index.name
                ):
                    missing[name] = index
        return missing

    async def trigger_problems(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Sources (all, or those named) whose triggers are missing or stale (not what `relay
        install` would install now), and why."""
        problems: dict[str, str] = {}
        chosen = self.compiled if names is None else {n: self.compiled[n] for n in names}
        for name, compiled in chosen.items():
            async with self._connection(SETUP_BOUND) as conn:
                problem = None
                triggers = list(compiled.extra_triggers)
                if compiled.notify is not None:
                    n = compiled.notify
                    triggers.insert(
                        0,
                        (
                            n.schema,
                            n.table,
                            n.function,
                            (n.insert_trigger, n.update_trigger),
                            n.fingerprint,
                        ),
                    )
                for schema, table, function, pair, expected in triggers:
                    problem = await catalog.trigger_problem(
                        conn, schema, table, function, pair, expected
                    )
                    if problem is not None:
                        problems[name] = problem
                        break
        return problems

    async def install(self) -> None:
        """relay's schema and every source's trigger, in one transaction; idempotent."""
        # One transaction for every source (all or nothing), so one bound for all of them.
        bound = SETUP_BOUND * max(1, len(self.sources))
        async with self._connection(bound) as conn, conn.transaction():
            _check_encoding(conn)
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('relay.install'))")
            await conn.execute(_SCHEMA_SQL)
            for source in self.sources.values():
                await self._install_source(conn, source)

    async def reinstall(self, name: str) -> None:
        """One source's triggers as `relay install` installs them, for the database as it is
        now: a migration may have dropped them with their table, or moved the source to another
        table (Documenso's "Document" became "Envelope")."""
        async with self._connection(SETUP_BOUND) as conn, conn.transaction():
            _check_encoding(conn)
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('relay.install'))")
            await self._install_source(conn, self.sources[name])

    async def _install_source(self, conn: psycopg.AsyncConnection[Any], source: Source) -> None:
        await source.kind.install(conn, source, self.ctx)
        compiled = await source.kind.prepare(conn, source, self.ctx)
        self.compiled[source.name] = compiled.render(conn)
        if compiled.notify is not None:
            await conn.execute(compiled.notify.install)

    # -- scheduled jobs ----------------------------------------------------------------------

    async def run_job(self, job: Job, scheduled_for: datetime) -> JobRun | None:
        """Run one occurrence of a job, unless another relay is running the job now or it ran
        already; returns the run recorded, or None. The statement runs in a savepoint of the
        transaction that records it: a failure is recorded too, with its error, and the lock
        is held until the record is written, so no other relay runs the occurrence again."""
        params: dict[str, Any] = {"job": job.name, "scheduled_for": scheduled_for}
        async with self._connection(job.timeout + SETUP_BOUND) as conn, conn.transaction():
            cur = await conn.execute(_JOBS["lock"], params)
            if not (row := await cur.fetchone()) or not row[0]:
                return None
            cur = await conn.execute(_JOBS["ran"], params)
            if await cur.fetchone():
                return None
            started_at = datetime.now(UTC)
            began = time.monotonic()
            result: dict[str, Any] = {"rows_affected": None, "error": None, **jobs.counts(None)}
            await conn.execute(
                "SELECT set_config('statement_timeout', %s, true)", [f"{int(job.timeout * 1000)}"]
            )
            try:
                async with conn.transaction():
                    jcur = conn.cursor(row_factory=psycopg.rows.dict_row)
                    await jcur.execute(job.statement.encode(), prepare=False)
                    first = await jcur.fetchone() if jcur.description else None
                    result.update(jobs.counts(first), rows_affected=max(jcur.rowcount, 0))
            except psycopg.Error as exc:
                if not isinstance(exc, psycopg.errors.QueryCanceled) and isinstance(
                    exc, psycopg.OperationalError
                ):
                    raise  # the connection is gone: nothing can be recorded
                result["error"] = logs.first_line(exc)
            await conn.execute("RESET statement_timeout")
            run = JobRun(
                job=job.name,
                scheduled_for=scheduled_for,
                started_at=started_at,
                duration_ms=(time.monotonic() - began) * 1000,
                worker=self.worker,
                **result,
            )
            await conn.execute(_JOBS["record"], dataclasses.asdict(run))
            await conn.execute(_JOBS["prune"], params)
            return run

    # -- inboxes ----------------------------------------------------------------------------

    async def accept(self, inbox: Inbox, key: str, params: dict[str, Any]) -> bool:
        """Take one inbox request in one transaction: its key, then the inbox's statement (or
        its body kept). False if the key was there already: nothing is run again."""
        body = None if inbox.statement else params["_body"]
        async with self._connection(SETUP_BOUND) as conn, conn.transaction():
            cur = await conn.execute(
                _INBOX["take"], {"inbox": inbox.name, "key": key, "body": body}
            )
            if await cur.fetchone() is None:
                return False
            if inbox.statement:
                await conn.execute(inbox.statement.encode(), params, prepare=False)
            await conn.execute(_INBOX["prune"])
            return True

    async def ping(self) -> str | None:
        """Why the pool cannot run a query now (within PING_WITHIN), or None: for /readyz.

        A connection the server dropped (it restarted) fails once and leaves the pool; the
        question is whether the database answers, so a lost connection is tried again on
        another, within the same bound. After a restart every idle connection may be such a
        one (CI saw two in a row): as many tries as the pool holds, and one on a new
        connection. (Once the listener is back, `database_back` has had them tested.)"""
        try:
            async with asyncio.timeout(PING_WITHIN):
                tries = self.pool.max_size + 1
                for tries_left in range(tries - 1, -1, -1):
                    try:
                        async with self._connection() as conn:
                            await conn.execute("SELECT 1")
                        return None
                    except psycopg.OperationalError:
                        if not tries_left:
                            raise
        except TimeoutError:
            return f"no answer from the database within {PING_WITHIN:g}s"
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            return logs.first_line(exc)
        return None

    async def check_inboxes(self, inboxes: Sequence[Inbox]) -> None:
        """ConfigError naming the inbox if its statement does not fit the database: planned
        (EXPLAIN runs nothing) with every parameter NULL, as relay's other statements are."""
        async with self._connection(SETUP_BOUND) as conn:
            if not await catalog.table_exists(conn, "relay", "inbox"):
                raise ConfigError(
                    "inbox: relay's table relay.inbox does not exist; run `relay install`"
                )
            for box in inboxes:
                if not box.statement:
                    continue
                try:
                    async with conn.transaction():
                        await conn.execute(
                            b"EXPLAIN " + box.statement.encode(),
                            dict.fromkeys(box.params),
                            prepare=False,
                        )
                except psycopg.Error as exc:
                    raise ConfigError(
                        f"inbox.{box.name}.sql: PostgreSQL refuses it: {logs.first_line(exc)}"
                    ) from None

    async def check_jobs(self) -> None:
        """ConfigError unless relay's table of job runs is there (and readable)."""
        async with self._connection() as conn:
            if not await catalog.table_exists(conn, "relay", "job_runs"):
                raise ConfigError(
                    "jobs: relay's table relay.job_runs does not exist; run `relay install` "
                    "(the scheduled jobs record their runs there)"
                )

    async def last_runs(self, names: Sequence[str]) -> dict[str, JobRun]:
        async with self._connection() as conn:
            cur = await conn.execute(_JOBS["last_runs"], {"jobs": list(names)})
            return {row[0]: JobRun(*row) for row in await cur.fetchall()}

    # -- endpoints held back (relay.endpoints) ------------------------------------------------

    async def disabled_targets(self, limit: int) -> list[tuple[str, str, str, datetime]]:
        """(source, target, reason, since) of the newest `limit` targets disabled by their
        answer."""
        async with self._connection() as conn:
            cur = await conn.execute(_ENDPOINTS["disabled"], {"limit": limit})
            return list(await cur.fetchall())

    async def record_endpoint(self, change: str, data: Mapping[str, Any]) -> None:
        """Write what the deliverer's endpoints did: "disabled" a target, "paused" or
        "resumed" an endpoint, or "stopped" (this relay's pauses end)."""
        params: dict[str, Any] = {"worker": self.worker}
        if change == "disabled":
            query = _ENDPOINTS["disable"]
            params |= {"target": data["target"], "source": data["source"]}
            params["reason"] = data["reason"]
        elif change == "paused":
            query = _ENDPOINTS["pause"]
            params |= {"target": data["endpoint"], "reason": data.get("reason") or "paused"}
            params["seconds"] = data.get("resumes_in_s") or 0.0
        elif change == "resumed":
            query, params["target"] = _ENDPOINTS["resume"], data["endpoint"]
        else:
            query = _ENDPOINTS["resume_all"]
        async with self._connection() as conn:
            await conn.execute(query, params)

    async def enable_targets(self, source: str, target: str | None) -> list[str]:
        async with self._connection() as conn:
            cur = await conn.execute(_ENDPOINTS["enable"], {"source": source, "target": target})
            return [row[0] for row in await cur.fetchall()]

    async def endpoint_states(self) -> list[tuple[Any, ...]]:
        """For `relay status`: (state, target, source, worker, reason, since, until,
        resumes_in seconds) of the disabled targets and the current pauses."""
        async with self._connection() as conn:
            cur = await conn.execute(_ENDPOINTS["listed"])
            return list(await cur.fetchall())

    async def uninstall(self) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('relay.install'))")
            await conn.execute(_UNINSTALL_SQL)

    # -- the hot path ----------------------------------------------------------------------

    async def claim(
        self,
        source: str,
        limit: int,
        lease_seconds: float,
        after: Any = None,
        skip: Sequence[str] = (),
    ) -> list[Claimed]:
        """Claim up to `limit` rows; where the source's claim has such versions
        (claim_versions), only rows whose key comes `after` this one, and none whose URL (or
        topic) is in `skip` (see relay.claimer)."""
        compiled = self.compiled[source]
        params = {"limit": limit, "lease_seconds": lease_seconds, "worker": self.worker}
        name = "claim"
        if after is not None and "claim_after" in compiled.queries:
            name += "_after"
            params["after"] = after
        if skip and compiled.skip_by is not None:
            name += "_skip"
            params["skip"] = list(skip)
        query = compiled.queries[name]

        async def run() -> list[Claimed]:
            async with self._connection() as conn:
                cur = await conn.execute(query, params, prepare=self._prepare)
                rows = [Claimed(*row) for row in await cur.fetchall()]
                while compiled.repeat_claim and rows and len(rows) < limit:
                    params["limit"] = limit - len(rows)
                    try:
                        cur = await conn.execute(query, params, prepare=self._prepare)
                        more = [Claimed(*row) for row in await cur.fetchall()]
                    except psycopg.Error:
                        # The rows claimed so far are committed: deliver them; the rest
                        # waits for the next pass.
                        break
                    if not more:
                        break
                    rows += more
                return rows

        return await self._with_retries(run)

    async def settle(self, source: str, settlements: Iterable[Settlement]) -> set[Any]:
        """Apply a batch of settlements; returns the keys that were still ours and were settled."""
        batch = list(settlements)
        compiled = self.compiled[source]
        if compiled.settle_each is not None:
            return await self._settle_each(compiled, batch)
        keys = [s.key for s in batch]
        params = {
            "batch": settle_batch_json(batch, compiled.needs_detail),
            "keys": keys,
        }
        query = compiled.queries["settle"]

        async def run() -> set[Any]:
            async with self._connection() as conn:
                cur = await conn.execute(query, params, prepare=self._prepare)
                return {row[0] for row in await cur.fetchall()}

        return await self._with_retries(run)

    async def _settle_each(self, compiled: Compiled, batch: list[Settlement]) -> set[Any]:
        """One statement per row (a functions source's own complete and fail statements), each
        its own transaction: a row the database refuses is left out (and reported by the
        settler as not settled) without holding back the others, and after a lost connection
        the rows already written are not written again."""
        assert compiled.settle_each is not None
        statements = compiled.settle_each
        settled: set[Any] = set()
        written: set[int] = set()

        async def run() -> set[Any]:
            async with self._connection(SETUP_BOUND) as conn:
                for i, s in enumerate(batch):
                    if i in written:
                        continue
                    query = statements.get(s.outcome)
                    try:
                        if query is not None:
                            await conn.execute(
                                query, settle_params(s, self.worker), prepare=self._prepare
                            )
                        settled.add(s.key)
                    except RETRYABLE:
                        raise
                    except psycopg.Error as exc:
                        log.error(
                            "settle.rejected",
                            key=s.key,
                            outcome=s.outcome,
                            error=logs.first_line(exc),
                        )
                    written.add(i)
            return settled

        return await self._with_retries(run)

    async def heartbeat(
        self, source: str, rows: Sequence[tuple[Any, datetime]], lease_seconds: float
    ) -> set[Any]:
        """Extend the claims of rows in flight; returns the keys still ours (as text, for a
        table source; the keys given otherwise)."""
        compiled = self.compiled[source]
        keys = [k for k, _ in rows]
        params = {
            "batch": orjson.dumps(
                [{"key": k, "lease": lease} for k, lease in rows], default=json_default
            ).decode(),
            "keys": keys,
            "lease_seconds": lease_seconds,
            "worker": self.worker,
        }
        if "heartbeat" not in compiled.queries:
            return set(keys)  # the kind keeps no claims of its own to extend
        query = compiled.queries["heartbeat"]
        column = compiled.queries.get("heartbeat_column")

        async def run() -> set[Any]:
            async with self._connection() as conn:
                if compiled.settle_each is not None:
                    # A functions source's own statement, once per row.
                    for key in keys:
                        await conn.execute(
                            query, {"key": key, "worker": self.worker}, prepare=self._prepare
                        )
                    return set(keys)
                cur = await conn.execute(query, params, prepare=self._prepare)
                ours = [row[0] for row in await cur.fetchall()]
                if column is not None and ours:
                    # Only the rows whose claim is still ours, by the leases' text keys, cast
                    # back in SQL: compared as Python text, a char(n) key (blank-padded here,
                    # not in its text form) was never found.
                    await conn.execute(column, {"keys": ours}, prepare=self._prepare)
                return set(ours)

        return await self._with_retries(run)

    async def log(self, source: str, params: dict[str, Any]) -> None:
        query = self.compiled[source].queries["log"]

        async def run() -> None:
            async with self._connection() as conn:
                await conn.execute(query, params, prepare=self._prepare)

        await self._with_retries(run)

    async def _scalar(self, query: sqltext.Query) -> Any:
        async def run() -> Any:
            async with self._connection() as conn:
                cur = await conn.execute(query, prepare=self._prepare)
                row = await cur.fetchone()
                return None if row is None else row[0]

        return await self._with_retries(run)

    async def _rowcount(self, query: sqltext.Query) -> int:
        async def run() -> int:
            async with self._connection() as conn:
                cur = await conn.execute(query, prepare=self._prepare)
                return cur.rowcount

        return await self._with_retries(run)

    async def rescue(self, source: str) -> int:
        rescued = await self._rowcount(self.compiled[source].queries["rescue"])
        cleanup = self.compiled[source].queries.get("cleanup")
        if cleanup is not None:
            # The attempt log's retention rides on the sweep: a batch at a time.
            await self._rowcount(cleanup)
        return rescued

    async def about(self, source: str) -> str | None:
        """What the source's kind says of it besides its rows (the Documenso release found)."""
        spec = self.sources[source]
        async with self._connection() as conn:
            return await spec.kind.about(conn, spec)

    async def next_due(self, source: str) -> float | None:
        value = await self._scalar(self.compiled[source].queries["next_due"])
        return None if value is None else float(value)

    # -- operations ------------------------------------------------------------------------

    async def counts(self, source: str) -> dict[str, int]:
        async with self._connection() as conn:
            cur = await conn.execute(self.compiled[source].queries["counts"])
            return {row[0]: int(row[1]) for row in await cur.fetchall()}

    async def notification_queue_usage(self) -> float | None:
        """The share of PostgreSQL's notification queue in use. A session that LISTENs and stops
        reading holds it back; once it is full, transactions that NOTIFY fail at commit."""
        value = await self._scalar(psycopg.sql.SQL("SELECT pg_notification_queue_usage()"))
        return None if value is None else float(value)

    async def oldest_due(self, source: str) -> float | None:
        value = await self._scalar(self.compiled[source].queries["oldest_due"])
        return None if value is None else float(value)

    async def retry_dead(
        self, source: str, keys: Sequence[str] | None = None, since: datetime | None = None
    ) -> int:
        """Dead rows made claimable again, with fresh attempts: all, those of `keys`, or those
        since `since` (for the kinds that know when a row was made or died). ConfigError if
        the kind cannot choose."""
        queries = self.compiled[source].queries
        if "dead" not in queries:
            if keys is not None or since is not None:
                raise ConfigError(
                    f"sources.{source}: its kind has only its own retry_dead statement, which "
                    f"retries every dead row; it cannot retry chosen ones"
                )
            return await self._rowcount(queries["retry_dead"])
        params = {"keys": None if keys is None else list(keys), "since": since}

        async def run() -> int:
            async with self._connection() as conn:
                cur = await conn.execute(queries["retry_dead"], params)
                return cur.rowcount

        return await self._with_retries(run)

    async def dead(self, source: str, limit: int = 50, after: str | None = None) -> list[DeadRow]:
        """A page of the source's dead rows, by key, after `after`."""
        query = self.compiled[source].queries.get("dead")
        if query is None:
            raise ConfigError(
                f"sources.{source}: its kind keeps its rows' state in your own functions; "
                f"relay cannot list its dead rows"
            )
        async with self._connection() as conn:
            cur = await conn.execute(query, {"limit": limit, "after": after})
            return [DeadRow(*row) for row in await cur.fetchall()]


def settle_params(s: Settlement, worker: str) -> dict[str, Any]:
    """The named parameters a functions source's own statements may use."""
    d = s.detail
    return {
        "key": s.key,
        "worker": worker,
        "attempt": s.attempt,
        "status": s.http_status,
        "response_json": None if d is None else d.response_json,
        "response_body": None if d is None else d.response_body,
        "response_headers": None
        if d is None or d.response_headers is None
        else orjson.dumps(d.response_headers).decode(),
        "error": s.error,
        "error_json": orjson.dumps(
            {"error": s.error, "status": s.http_status, "attempt": s.attempt}
        ).decode(),
        "final": s.outcome == "dead",
        "retry_in": s.delay,
        "outcome": str(s.outcome),
    }


def _check_encoding(conn: psycopg.AsyncConnection[Any]) -> None:
    catalog.check_encoding(conn)
