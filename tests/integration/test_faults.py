"""Fault injection against a real PostgreSQL: terminated backends, a restarted server, and a
graceful (and a not so graceful) shutdown. Nothing committed may be lost."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from aiohttp import web

from tests.conftest import Server
from tests.support import (
    HERMETIC_ENV,
    WAIT,
    Behaviour,
    InsertStream,
    Receiver,
    RelayProcess,
    delivery_ids,
    fetch_rows,
    insert_rows,
    install,
    listener_reconnected,
    make_config,
    raw_config,
    running,
    terminate_backends,
    write_config,
)

STREAM = 200  # rows at least, each inserted in its own transaction
HALFWAY = 100  # committed rows after which the fault strikes
AFTER = 20  # committed rows after the fault is over before the stream ends
PACE = 0.002  # seconds between inserts: a steady stream of some 400 rows a second


async def slowish(_: web.Request, __: int) -> web.StreamResponse:
    # Simulated receiver latency: deliveries, and so claims and settles, are still under way
    # when the fault strikes.
    await asyncio.sleep(0.02)
    return web.Response(text="ok")


@contextlib.asynccontextmanager
async def insert_stream(db: str, target: str) -> AsyncIterator[InsertStream]:
    """Single-row inserts from their own connection, before, during and after the block.

    The block (the fault) starts once HALFWAY rows have committed; after it, the stream goes on
    for AFTER more committed rows (and to STREAM rows at least), so rows are inserted while the
    relay recovers and after it has, whatever the timing.
    """
    stream = InsertStream(db, target)
    enough = asyncio.Event()
    task = asyncio.create_task(stream.run(STREAM, enough, PACE), name="insert-stream")
    try:
        await stream.wait_acked(HALFWAY)
        yield stream
        await stream.wait_acked(len(stream.acked) + AFTER)
        enough.set()
        await asyncio.wait_for(task, WAIT)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def assert_all_delivered(db: str, receiver: Receiver, stream: InsertStream) -> set[int]:
    """Every row in the table (the committed ones) reaches the receiver."""
    committed = set(await fetch_rows(db))
    # The table is the truth about what committed; an acknowledged insert must be in it, and
    # only an insert whose connection died may be missing.
    assert set(stream.acked) <= committed
    assert len(committed) >= STREAM - stream.failed
    await receiver.wait_ids(delivery_ids(committed))
    return committed


async def test_listener_backend_terminated_mid_stream(db: str, receiver: Receiver) -> None:
    # No periodic sweep during the test: rows committed while the listener was away are found
    # only because its reconnect asks for a sweep.
    config = make_config(db, relay={"sweep_interval": 600})
    await install(config)
    async with running(config) as relay:
        first_pid = relay.listener.backend_pid
        assert first_pid is not None and relay.listener.connections == 1
        async with insert_stream(db, receiver.url) as stream:
            back = asyncio.create_task(listener_reconnected(relay))
            assert await terminate_backends(db, [first_pid]) == [first_pid]
            await back
        assert relay.listener.connections == 2
        assert relay.listener.backend_pid not in (None, first_pid)
        assert stream.failed == 0  # only the listener's backend was terminated
        await assert_all_delivered(db, receiver, stream)

        # The new LISTEN works: a later insert is delivered on its notification, not a sweep.
        sweeps = relay.sweeper.sweeps
        late = await insert_rows(db, receiver.url, 1)
        await receiver.wait_ids(delivery_ids(late), timeout=5)
        assert relay.sweeper.sweeps == sweeps
    rows = await fetch_rows(db)
    assert {r["status"] for r in rows.values()} == {"delivered"}
    assert len(receiver.received) == len(rows)  # and none twice


async def test_rows_committed_while_the_listener_is_away_are_swept_on_reconnect(
    db: str, server: Server, receiver: Receiver
) -> None:
    # A sharper version of the above: the listener is kept from reconnecting (the database
    # refuses new connections) while rows commit, and nothing is inserted after it is back, so
    # those rows can only be found by the sweep its reconnect asks for.
    config = make_config(db, relay={"sweep_interval": 600})
    await install(config)
    name = psycopg.sql.Identifier(psycopg.conninfo.conninfo_to_dict(db)["dbname"] or "")
    refuse = psycopg.sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(name)
    accept = psycopg.sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(name)
    async with (
        running(config) as relay,
        await psycopg.AsyncConnection.connect(server.admin_url, autocommit=True) as admin,
        await psycopg.AsyncConnection.connect(db, autocommit=True) as inserter,
    ):
        listener_pid = relay.listener.backend_pid
        assert listener_pid is not None
        back = asyncio.create_task(listener_reconnected(relay))
        await admin.execute(refuse)
        try:
            await admin.execute("SELECT pg_terminate_backend(%s)", (listener_pid,))
            await asyncio.wait_for(relay.listener.down.wait(), WAIT)
            cur = await inserter.execute(
                "INSERT INTO webhook_delivery_queue (url) "
                "SELECT %s FROM generate_series(1, 5) RETURNING id",
                (receiver.url,),
            )
            ids = [r[0] for r in await cur.fetchall()]
            assert not relay.listener.connected
        finally:
            await admin.execute(accept)
        await back
        await receiver.wait_ids(delivery_ids(ids), timeout=10)
        assert relay.listener.connections == 2
    assert len(receiver.received) == 5


async def test_every_backend_terminated_mid_stream(db: str, receiver: Receiver) -> None:
    # A claim whose connection dies after its commit leaves rows claimed until the claim expires;
    # a short claim_timeout and sweep_interval bound how long those take to come back.
    config = make_config(db, relay={"claim_timeout": 2, "sweep_interval": 2}, http={"timeout": 1})
    await install(config)
    receiver.behaviour = slowish
    async with running(config) as relay:
        listener_pid = relay.listener.backend_pid
        async with insert_stream(db, receiver.url) as stream:
            await receiver.wait_count(1)  # deliveries (so claims and settles) are under way
            back = asyncio.create_task(listener_reconnected(relay))
            killed = await terminate_backends(db)
            await back
        # The listener's, the pool's and the inserter's connections all went.
        assert listener_pid in killed
        assert len(killed) >= 3
        assert stream.connections >= 2
        assert relay.listener.connections == 2
        await assert_all_delivered(db, receiver, stream)
    # The pool recovered: the rows are settled (leaving `running` waits for the last settles),
    # not only sent.
    rows = await fetch_rows(db)
    assert {r["status"] for r in rows.values()} == {"delivered"}


@pytest.mark.restart
async def test_server_restart_mid_stream(db: str, server: Server, receiver: Receiver) -> None:
    config = make_config(db, relay={"claim_timeout": 2, "sweep_interval": 2}, http={"timeout": 1})
    await install(config)
    receiver.behaviour = slowish
    async with running(config) as relay:
        async with insert_stream(db, receiver.url) as stream:
            await receiver.wait_count(1)
            back = asyncio.create_task(listener_reconnected(relay))
            await asyncio.to_thread(server.restart)
            await back
        assert stream.connections >= 2, "the restart did not interrupt the inserts"
        # After the restart the relay's listener is connected again.
        assert relay.listener.connected and relay.listener.connections == 2
        await assert_all_delivered(db, receiver, stream)
        # And it still hears notifications.
        late = await insert_rows(db, receiver.url, 1)
        await receiver.wait_ids(delivery_ids(late))
    rows = await fetch_rows(db)
    assert {r["status"] for r in rows.values()} == {"delivered"}


# psycopg_pool retries a failed connection 1 s (+-10%) later, then 2 s, then 4 s: after a third
# failure, its next attempt is at least 3.6 s away.
POOL_FAILURES = 3
PROMPTLY = 1.0  # seconds: from the listener being back to the delivery, well before that


@pytest.mark.restart
async def test_pool_is_usable_when_the_listener_is_back_not_on_its_own_backoff(
    db: str, server: Server, receiver: Receiver
) -> None:
    # A row inserted right after a restart is delivered as soon as the listener is back, even
    # when the pool had been failing to reconnect for a while (anything that used it during
    # the outage: a settle, a readiness probe) and is waiting on psycopg_pool's backoff. The
    # pool is sent there first, the listener kept connected meanwhile, so that its own backoff
    # after the restart stays short: the database refuses new connections, the pool's backends
    # are terminated and a readiness ping fails. No periodic sweep: the row is claimed on the
    # listener's reconnect sweep or its notification, through the pool either way.
    config = make_config(db, relay={"sweep_interval": 600})
    await install(config)
    dbname = psycopg.conninfo.conninfo_to_dict(db)["dbname"] or ""
    name = psycopg.sql.Identifier(dbname)
    refuse = psycopg.sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(name)
    accept = psycopg.sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(name)
    async with running(config) as relay:
        pool = relay.store.pool
        admin = await psycopg.AsyncConnection.connect(server.admin_url, autocommit=True)
        async with admin:
            await admin.execute(refuse)
            try:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> %s",
                    (dbname, relay.listener.backend_pid),
                )
                assert await relay.store.ping() is not None
                # Every connection the pool is reconnecting has failed POOL_FAILURES times (the
                # pool has no event for it: its counters are polled).
                async with asyncio.timeout(WAIT):
                    while True:
                        stats = pool.get_stats()
                        if stats.get("connections_errors", 0) >= POOL_FAILURES * max(
                            stats["pool_size"], 1
                        ):
                            break
                        await asyncio.sleep(0.05)
                assert pool.get_stats()["pool_available"] == 0
            finally:
                await admin.execute(accept)
        assert relay.listener.connected and relay.listener.connections == 1

        back = asyncio.create_task(listener_reconnected(relay))
        await asyncio.to_thread(server.restart)
        ids = await insert_rows(db, receiver.url, 1)
        await back
        # Without the store being told the database is back, the claim waits for the pool's
        # next attempt, seconds later.
        await receiver.wait_ids(delivery_ids(ids), timeout=PROMPTLY)
        assert relay.store.revived == 1


# -- shutdown ------------------------------------------------------------------------------------


def hold_until(finish: set[str], release: asyncio.Event, teardown: asyncio.Event) -> Behaviour:
    """A receiver that answers the ids in `finish` once `release` is set, the rest never (until
    the test tears down)."""

    async def behaviour(request: web.Request, _: int) -> web.StreamResponse:
        event = release if request.headers["webhook-id"] in finish else teardown
        await asyncio.wait_for(event.wait(), WAIT * 2)
        return web.Response(text="ok")

    return behaviour


async def test_sigterm_drains_within_grace_and_releases_the_rest(
    db: str, receiver: Receiver, tmp_config: Path
) -> None:
    raw = raw_config(
        db, relay={"max_in_flight": 4, "shutdown_grace": 2}, endpoints={"max_in_flight": 4}
    )
    config = write_config(tmp_config, raw)
    await install(config)
    ids = await insert_rows(db, receiver.url, 6)  # 4 in flight, 2 never claimed
    in_flight, unclaimed = ids[:4], ids[4:]
    finishing, stuck = in_flight[:2], in_flight[2:]
    release, teardown = asyncio.Event(), asyncio.Event()
    receiver.behaviour = hold_until(delivery_ids(finishing), release, teardown)
    relay = RelayProcess(tmp_config, env=HERMETIC_ENV)
    try:
        await relay.start()
        await receiver.wait_ids(delivery_ids(in_flight))
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        await relay.wait_line("shutdown.draining in_flight=4")
        release.set()  # two of the four answer within the grace period
        assert await relay.wait_exit() == 0
    finally:
        relay.kill()
        teardown.set()
    out = relay.output()
    assert "shutdown.releasing unfinished=2" in out
    assert "relay.stopped" in out
    assert "relay.stopped delivered=2 failed=0" in out
    rows = await fetch_rows(db)
    for i in finishing:
        assert (rows[i]["status"], rows[i]["attempt_count"]) == ("delivered", 1)
    async with await psycopg.AsyncConnection.connect(db) as conn:
        now = (await (await conn.execute("SELECT now()")).fetchone())[0]  # type: ignore[index]
    for i in stuck:
        # Handed back claimable at once, the interrupted attempt not counted.
        assert rows[i]["status"] in ("pending", "failed")
        assert rows[i]["attempt_count"] == 0
        assert rows[i]["next_retry_at"] is None or rows[i]["next_retry_at"] <= now
    for i in unclaimed:
        assert (rows[i]["status"], rows[i]["attempt_count"]) == ("pending", 0)
    assert len(receiver.received) == 4  # nothing was claimed after the signal


async def test_second_sigterm_while_draining_exits_at_once(
    db: str, receiver: Receiver, tmp_config: Path
) -> None:
    raw = raw_config(
        db, relay={"max_in_flight": 2, "shutdown_grace": 60}, endpoints={"max_in_flight": 2}
    )
    config = write_config(tmp_config, raw)
    await install(config)
    ids = await insert_rows(db, receiver.url, 2)
    release, teardown = asyncio.Event(), asyncio.Event()
    receiver.behaviour = hold_until(set(), release, teardown)
    relay = RelayProcess(tmp_config, env=HERMETIC_ENV)
    try:
        await relay.start()
        await receiver.wait_ids(delivery_ids(ids))
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        await relay.wait_line("shutdown.draining in_flight=2")
        relay.proc.send_signal(signal.SIGTERM)
        # Far sooner than the 60 s grace would allow.
        code = await relay.wait_exit(timeout=10)
    finally:
        relay.kill()
        teardown.set()
    assert code != 0
    assert "relay.killed" in relay.output()
    assert "relay.stopped" not in relay.output()
