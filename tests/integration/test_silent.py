"""Silent connections: a TCP proxy between relay and PostgreSQL stops forwarding without closing
anything (no FIN, no RST), as a stuck NAT or middlebox does. relay must notice, replace its
connections and deliver, and stop on SIGTERM in bounded time whatever the connections do."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay import config as config_mod
from tests.proxy import FreezableProxy
from tests.support import (
    HERMETIC_ENV,
    WAIT,
    InsertStream,
    Receiver,
    RelayProcess,
    delivery_ids,
    fetch_rows,
    install,
    listener_reconnected,
    raw_config,
    running,
    to_toml,
)

AFTER_FREEZE = 30  # rows committed after the freeze that must arrive
WITHIN = 15.0  # seconds, with the default settings
PACE = 0.01  # seconds between inserts
FROZEN_FOR = 30.0  # seconds the whole database path stays silent


@contextlib.asynccontextmanager
async def proxy_for(db: str) -> AsyncIterator[FreezableProxy]:
    proxy = FreezableProxy.for_url(db)
    await proxy.start()
    try:
        yield proxy
    finally:
        proxy.thaw()
        await proxy.stop()


@contextlib.asynccontextmanager
async def streaming(db: str, target: str) -> AsyncIterator[InsertStream]:
    """Rows inserted one per transaction, straight into the database (not through the proxy),
    until the block ends."""
    stream = InsertStream(db, target)
    enough = asyncio.Event()
    task = asyncio.create_task(stream.run(0, enough, PACE), name="insert-stream")
    try:
        yield stream
    finally:
        enough.set()
        await asyncio.wait_for(task, WAIT)


def defaults(db: str, **sections: Any) -> dict[str, Any]:
    """A raw config with relay's own defaults for every timing (the test helpers shorten some)."""
    raw = raw_config(db, **sections)
    for key in ("sweep_interval", "claim_timeout", "shutdown_grace", "heartbeat_interval"):
        raw["relay"].pop(key)
    raw["http"].pop("timeout")
    return raw


async def test_connections_that_go_silent_are_replaced_within_15s_with_the_defaults(
    db: str, receiver: Receiver
) -> None:
    async with proxy_for(db) as proxy:
        config = config_mod.from_mapping(defaults(proxy.url(db)), {})
        assert config.statement_timeout == 5.0 and config.heartbeat_interval == 5.0
        await install(config)
        async with running(config) as relay:
            async with streaming(db, receiver.url) as stream:
                # Deliveries (so claims and settles on the pool) are under way when it freezes.
                await stream.wait_acked(20)
                await receiver.wait_ids(delivery_ids(stream.acked[:20]))
                # Started before the freeze: it sees the listener drop, then come back.
                replaced = asyncio.create_task(listener_reconnected(relay, WITHIN))
                frozen = proxy.freeze_existing()
                assert frozen >= 2  # the listener's connection and the pool's
                frozen_at = time.monotonic()
                before = len(stream.acked)
                await stream.wait_acked(before + AFTER_FREEZE)
                after = stream.acked[before : before + AFTER_FREEZE]
                await receiver.wait_ids(delivery_ids(after), timeout=WITHIN)
                took = time.monotonic() - frozen_at
                assert took < WITHIN, took
            # The old connections are still open and silent: relay replaced them, and goes on.
            # (Rows may arrive before the listener is back: while passes find rows the claimer
            # looks again every second by itself.)
            await replaced
            assert relay.listener.connections == 2
            assert relay.store.watchdog.severed + relay.listener.watchdog.severed >= 1
            await receiver.wait_ids(delivery_ids(await fetch_rows(db)))


async def test_everything_silent_for_30s_then_back_delivers_every_row(
    db: str, receiver: Receiver
) -> None:
    # Rows whose settle was lost in the freeze come back when their claim expires: a short
    # claim_timeout and sweep_interval keep that within the test's time.
    async with proxy_for(db) as proxy:
        raw = raw_config(
            proxy.url(db), relay={"claim_timeout": 6, "sweep_interval": 2}, http={"timeout": 2}
        )
        config = config_mod.from_mapping(raw, {})
        await install(config)
        async with running(config) as relay:
            async with streaming(db, receiver.url) as stream:
                await stream.wait_acked(20)
                await receiver.wait_ids(delivery_ids(stream.acked[:20]))
                proxy.freeze_all()
                accepted = proxy.accepted
                frozen_for = asyncio.create_task(asyncio.sleep(FROZEN_FOR))
                # Rows keep committing while the database does not answer relay; relay keeps
                # trying (new connections are accepted and then get no answer either).
                await asyncio.wait_for(relay.listener.down.wait(), WAIT)
                await frozen_for
                assert proxy.accepted > accepted
                proxy.thaw()
                await stream.wait_acked(len(stream.acked) + 10)
            # Every row in the table, the ones committed during the freeze too, arrives.
            rows = await fetch_rows(db)
            assert len(rows) >= len(stream.acked)
            await receiver.wait_ids(delivery_ids(rows), timeout=WAIT)
            # The rows can all be in before the listener's backoff lets it reconnect (the
            # sweeps and the pool find them without it): wait for it, then check it is a new one.
            await asyncio.wait_for(relay.listener.up.wait(), WAIT)
            assert relay.listener.connections >= 2


async def hold(_: web.Request, __: int) -> web.StreamResponse:
    await asyncio.sleep(0.5)  # requests in flight when the signal comes
    return web.Response(text="ok")


@pytest.mark.parametrize("when", ["at once", "after a connection was cut"])
async def test_sigterm_ends_within_the_grace_while_the_database_is_silent(
    db: str, receiver: Receiver, tmp_config: Path, when: str
) -> None:
    # "after a connection was cut": the watchdog has severed a silent statement, so the parts
    # now wait for the pool to make a connection the database never answers; shutdown used to
    # wait out the pool's 10 s timeout for them.
    grace = 3.0
    async with proxy_for(db) as proxy:
        raw = raw_config(proxy.url(db), relay={"shutdown_grace": grace, "max_in_flight": 4})
        await asyncio.to_thread(tmp_config.write_text, to_toml(raw))
        await install(config_mod.from_mapping(raw, {}))
        receiver.behaviour = hold
        relay = RelayProcess(tmp_config, env=HERMETIC_ENV)
        try:
            async with streaming(db, receiver.url):
                await relay.start()
                await receiver.wait_count(8)
                # Claims, settles and the listener's probe all wait on a silent database now.
                proxy.freeze_all()
                if when != "at once":
                    await relay.wait_line("db.silent")
                assert relay.proc is not None
                signalled = time.monotonic()
                relay.proc.send_signal(signal.SIGTERM)
                code = await relay.wait_exit(timeout=grace + 10)
                took = time.monotonic() - signalled
        finally:
            relay.kill()
    assert code == 0, relay.output()
    assert took < grace + 5, (took, relay.output())
    assert "relay.stopped" in relay.output()
