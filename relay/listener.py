"""The dedicated LISTEN connection: wakes claimers, and reconnects by itself.

It owns exactly one autocommit connection, never one from the pool (a pooled or PgBouncer
connection cannot be trusted to keep a LISTEN). Between notifications it probes the connection
with `SELECT 1` every heartbeat, bounded by a watchdog that severs the connection if no answer
comes (see relay.connections), so a half-open or silent TCP connection is noticed within about
two heartbeats rather than trusted for ever. On every (re)connect it LISTENs first and then asks
for a sweep, so a row committed while it was away is found by query: notifications are only a
hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from relay import connections, logs

log = logs.get("relay.listener")

# On stop, how long the loop may take to notice its severed connection before it is cancelled.
STOP_WAIT = 2.0


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning(
        "listener.reconnecting",
        attempt=state.attempt_number,
        retry_in_s=round(wait, 3),
        error=logs.first_line(exc) if exc else "",
    )


class Listener:
    def __init__(
        self,
        url: str,
        channel: str,
        *,
        heartbeat: float,
        on_notify: Callable[[str], None],
        on_connect: Callable[[], None],
        on_silent: Callable[[], None] | None = None,
        probe_timeout: float | None = None,
        # The listener's reconnect is what tells relay the database is back (the pool is
        # revived then, and a sweep runs): a wait of up to 2 s between attempts, one connection
        # attempt every 2 s while it is down, resumes deliveries a second after it returns on
        # average (with 5 s, 2.5 s).
        max_backoff: float = 2.0,
        lead: str | None = None,
    ) -> None:
        self.url = url
        self.channel = channel
        self.heartbeat = heartbeat
        self.on_notify = on_notify
        self.on_connect = on_connect
        self.max_backoff = max_backoff
        # A probe unanswered for this long severs the connection, and `on_silent` hears of it.
        self.watchdog = connections.Watchdog(
            heartbeat if probe_timeout is None else probe_timeout, on_silent=on_silent
        )
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.connected = False
        self.up = asyncio.Event()  # set while connected and listening
        self.down = asyncio.Event()  # set while not (for tests and the health endpoint)
        self.down.set()
        self.connections = 0  # successful connects, for status and tests
        self.backend_pid: int | None = None
        self.notified_at: float | None = None  # time.monotonic() of the last notification
        # With `lead` (a name), the listener tries for a session advisory lock on that name at
        # each connect and heartbeat until it holds it: of several relays on one database, the
        # one whose listener holds it does the work one relay does for all (the queue-depth
        # samples of /metrics). The lock goes with the connection, so when that relay dies or
        # loses the database, another takes it at its next heartbeat.
        self.lead = lead
        self.leads = False

    async def run(self, stop: asyncio.Event) -> None:
        work = asyncio.create_task(self._loop(stop), name="listener.loop")
        stopped = asyncio.create_task(stop.wait(), name="listener.stop")
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and self._conn is not None:
                # Cancelling a task inside a statement makes psycopg wait on the server again
                # to cancel it, which a silent connection never answers: sever it instead, and
                # the loop ends by itself.
                connections.sever(self._conn)
                await asyncio.wait({work}, timeout=STOP_WAIT)
        finally:
            for task in (work, stopped):
                task.cancel()
            await asyncio.gather(work, stopped, return_exceptions=True)
        if work.done() and not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]
        self.connected = False

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((psycopg.OperationalError, OSError)),
            wait=wait_random_exponential(multiplier=0.1, max=self.max_backoff),
            before_sleep=_log_retry,
        ):
            with attempt:
                return await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, **connections.options(self.url)
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            conn = self._conn = await self._connect()
            severed = self.watchdog.severed
            try:
                with self.watchdog.watching(conn):
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    await self._try_lead(conn)
                self.connected = True
                self.up.set()
                self.down.clear()
                self.connections += 1
                self.backend_pid = conn.info.backend_pid
                log.info("listener.connected", channel=self.channel, pid=self.backend_pid)
                self.on_connect()
                await self._consume(conn)
            except psycopg.Error as exc:
                # Any failure of this connection (terminated, server restarted, network gone,
                # heartbeat unanswered) means the same thing: reconnect, LISTEN, sweep.
                if not stop.is_set():
                    reason = logs.first_line(exc)
                    if self.watchdog.severed != severed:
                        reason = f"no answer within {self.watchdog.bound:g}s (connection silent)"
                    log.warning("listener.lost", error=reason)
            finally:
                self._conn = None
                self.connected = False
                self.leads = False
                self.up.clear()
                self.down.set()
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _consume(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            async for notify in conn.notifies(timeout=self.heartbeat):
                self.notified_at = time.monotonic()
                self.on_notify(notify.payload)
            # No notification for a whole heartbeat: prove the connection is still alive (by
            # asking for the lead, while another relay holds it: the same round trip).
            with self.watchdog.watching(conn):
                if self.lead is not None and not self.leads:
                    await self._try_lead(conn)
                else:
                    await conn.execute("SELECT 1")

    async def _try_lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.lead is None:
            return
        cur = await conn.execute(
            "SELECT pg_try_advisory_lock(hashtext('relay.lead'), hashtext(%s))", (self.lead,)
        )
        row = await cur.fetchone()
        self.leads = bool(row and row[0])
