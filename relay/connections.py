"""Every database connection relay opens is bounded in time.

A TCP stream can stop carrying bytes without closing: a NAT or proxy that froze, a cable pulled
between two switches. Keepalives and `tcp_user_timeout` find a peer that is really gone, but not
a middlebox whose kernel still acknowledges, and psycopg waits on such a socket for ever: even an
asyncio timeout only makes it try to cancel the query and then wait on the same socket again.
So each use of a connection is watched by a timer that, when it expires, shuts the socket down
(`sever`): libpq then reads end-of-file at once, the statement fails with an OperationalError
and the pool throws the connection away. Nothing ever waits on the silent peer.

Slow statements are bounded by the server first (`statement_timeout`, which leaves the
connection usable); the watchdog fires a little later, only when the server does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from relay import logs

log = logs.get("relay.connections")

# libpq settings for every connection: a peer that vanished is noticed by the kernel, and a
# connect that gets no answer gives up. A value set in the database URL wins.
DEFAULTS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    # Data sent and not acknowledged for this long: the connection is dead (milliseconds).
    "tcp_user_timeout": 20_000,
    "connect_timeout": 5,
}

# How much longer than the server's statement_timeout the client waits before it concludes
# that the server is not answering at all.
SLACK = 1.0


def options(url: str, statement_timeout: float | None = None) -> dict[str, Any]:
    """Connection parameters to pass with `url`: the defaults the URL does not set, and the
    server-side statement_timeout added to any `options` it has."""
    given = psycopg.conninfo.conninfo_to_dict(url)
    extra = {k: v for k, v in DEFAULTS.items() if k not in given}
    if statement_timeout is not None:
        # UTC sessions: a `timestamp without time zone` column holds UTC by convention (Prisma,
        # Documenso), and a write-back casting a time into one must not shift it by the
        # server's TimeZone. (Through PgBouncer no startup option passes: there relay's own
        # writes still use UTC explicitly, a user's write-back follows the server's setting.)
        setting = f"-c statement_timeout={max(1, round(statement_timeout * 1000))} -c TimeZone=UTC"
        extra["options"] = f"{given['options']} {setting}" if given.get("options") else setting
    return extra


def sever(conn: psycopg.AsyncConnection[Any]) -> None:
    """Shut the connection's socket down without waiting on the peer: whatever psycopg is
    waiting for on it fails at once, and the connection is known to be broken."""
    if conn.closed:
        return
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return  # no socket left: nothing can wait on it
    # A duplicate of the descriptor: shutting it down ends the stream for libpq's copy too,
    # and closing it leaves libpq's copy for libpq to close.
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """Severs a connection that is still in use `bound` seconds after its use began.

    One timer per use, set and cancelled on the event loop (no round trip to the server). When
    one fires, `on_silent` is told: a connection that went silent suggests the others on the
    same path did too.
    """

    def __init__(self, bound: float, on_silent: Callable[[], None] | None = None) -> None:
        self.bound = bound
        self.on_silent = on_silent
        self.busy: dict[psycopg.AsyncConnection[Any], asyncio.TimerHandle] = {}
        self.severed = 0  # connections cut because they stayed silent (for status and tests)

    @contextlib.contextmanager
    def watching(
        self, conn: psycopg.AsyncConnection[Any], bound: float | None = None
    ) -> Iterator[None]:
        after = self.bound if bound is None else bound
        timer = asyncio.get_running_loop().call_later(after, self._expired, conn, after)
        self.busy[conn] = timer
        try:
            yield
        finally:
            timer.cancel()
            self.busy.pop(conn, None)

    def _expired(self, conn: psycopg.AsyncConnection[Any], after: float) -> None:
        self.severed += 1
        log.warning(
            "db.silent",
            pid=_pid(conn),
            after_s=after,
            next="no answer from the database: closing the connection",
        )
        sever(conn)
        if self.on_silent is not None:
            self.on_silent()

    def sever_busy(self) -> int:
        """Cut every connection in use now (shutdown: nothing may wait on the database)."""
        conns = list(self.busy)
        for conn in conns:
            sever(conn)
        return len(conns)


def _pid(conn: psycopg.AsyncConnection[Any]) -> int | None:
    try:
        return conn.info.backend_pid
    except psycopg.Error:
        return None
