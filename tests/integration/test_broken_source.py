"""A source whose table changes under a running relay stops alone: it is logged once, shown as
failing in /readyz and /status, checked again at each sweep and resumed when fixed, while the
other sources go on delivering and relay keeps running."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import psycopg
import pytest

from relay.db.sqltext import sql_dir
from tests.support import (
    WAIT,
    Receiver,
    delivery_ids,
    insert_rows,
    install,
    make_config,
    publish,
    queue_source,
    raw_config,
    run_cli,
    serving,
    write_config,
)

HOOK = "http://127.0.0.1:9/hook"  # never called
QUEUE_SQL = (sql_dir() / "demo" / "webhook_delivery_queue.sql").read_text()

# How each breakage is done, and undone.
BREAKAGES = {
    "column renamed": (
        "ALTER TABLE webhook_delivery_queue RENAME COLUMN attempt_count TO tries",
        "ALTER TABLE webhook_delivery_queue RENAME COLUMN tries TO attempt_count",
    ),
    "table dropped": ("DROP TABLE webhook_delivery_queue", QUEUE_SQL),
}


async def get(port: int, path: str) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.json()


async def execute(db: str, statement: str) -> None:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute(statement)


@pytest.mark.parametrize("breakage", list(BREAKAGES))
async def test_a_broken_source_stops_alone_and_resumes_when_fixed(
    db: str, receiver: Receiver, breakage: str, caplog: pytest.LogCaptureFixture
) -> None:
    break_it, fix_it = BREAKAGES[breakage]
    config = make_config(
        db,
        relay={"sweep_interval": 1},
        sources={"deliveries": queue_source(), "events": {"kind": "outbox", "url": receiver.url}},
    )
    await install(config)
    async with serving(config) as service:
        relay = service.relay
        port = service.health_port
        assert port is not None
        claimer = relay.claimers["deliveries"]
        await execute(db, break_it)
        if breakage == "column renamed":
            # Its trigger still fires: the notification wakes a claim that fails.
            await insert_rows(db, receiver.url, 3)
        await asyncio.wait_for(claimer.failing.wait(), WAIT)

        # The other source goes on, through several sweeps of the failing one.
        sweeps = relay.sweeper.sweeps
        events = await publish(db, 5)
        await receiver.wait_ids(delivery_ids(events, "events"))
        await relay.sweeper.quiet()
        while relay.sweeper.sweeps < sweeps + 3:
            relay.sweeper.sweep_now()
            await relay.sweeper.quiet()

        status, body = await get(port, "/readyz")
        assert status == 503
        failing = body["failing"]
        assert isinstance(failing, dict) and list(failing) == ["deliveries"]
        reason = str(failing["deliveries"])
        assert (
            ("attempt_count" in reason)
            if breakage == "column renamed"
            else ("webhook_delivery_queue" in reason)
        ), reason
        status, body = await get(port, "/status")
        assert status == 200
        assert body["sources"]["deliveries"]["failing"] == reason  # type: ignore[index]
        assert body["sources"]["events"]["failing"] is None  # type: ignore[index]
        # Logged once when it began failing, not at every attempt or sweep.
        failures = [r for r in caplog.records if r.getMessage().startswith("source.failing")]
        assert len(failures) == 1, [r.getMessage() for r in failures]
        assert "source=deliveries" in failures[0].getMessage()

        # Fixed: the next sweep finds it usable, and its rows (old and new) are delivered.
        await execute(db, fix_it)
        ids = await insert_rows(db, receiver.url, 3)
        await receiver.wait_ids(delivery_ids(ids))
        assert claimer.failure is None and not claimer.failing.is_set()
        status, body = await get(port, "/readyz")
        assert (status, body["failing"]) == (200, {})
        assert any(r.getMessage().startswith("source.resumed") for r in caplog.records)
        events = await publish(db, 1)
        await receiver.wait_ids(delivery_ids(events, "events"))


async def test_relay_status_shows_a_broken_source_as_failing(db: str, tmp_config: Path) -> None:
    raw = raw_config(
        db,
        sources={"deliveries": queue_source(), "events": {"kind": "outbox", "url": HOOK}},
    )
    await install(write_config(tmp_config, raw))
    await execute(db, BREAKAGES["column renamed"][0])
    code, out = await run_cli(tmp_config, "status")
    assert code == 1, out
    lines = out.splitlines()
    [failing] = [x for x in lines if x.startswith("deliveries:")]
    assert "failing: sources.deliveries.attempts" in failing and "'attempt_count'" in failing
    assert any(x.startswith("events: empty") for x in lines), out
