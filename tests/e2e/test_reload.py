"""Signals as a service manager sends them to `relay run`: SIGHUP reloads the configuration file
without dropping work in flight, a configuration that fails is logged and the running one kept;
SIGQUIT stops gracefully and SIGPIPE is harmless."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.support import (
    HERMETIC_ENV,
    WAIT,
    Receiver,
    RelayProcess,
    delivery_ids,
    fetch_rows,
    insert_rows,
    install,
    publish,
    queue_source,
    raw_config,
    to_toml,
    write_config,
)


@pytest.fixture
async def relay_process(tmp_config: Path) -> AsyncIterator[RelayProcess]:
    relay = RelayProcess(tmp_config, env=HERMETIC_ENV)
    try:
        yield relay
    finally:
        relay.kill()


async def send(relay: RelayProcess, sig: signal.Signals) -> None:
    assert relay.proc is not None and relay.proc.returncode is None
    relay.proc.send_signal(sig)


async def stop(relay: RelayProcess) -> None:
    await send(relay, signal.SIGTERM)
    assert await relay.wait_exit() == 0, relay.output()


def count(relay: RelayProcess, fragment: str) -> int:
    return sum(fragment in line for line in relay.lines)


async def test_sighup_adds_and_removes_sources(
    db: str, receiver: Receiver, tmp_config: Path, relay_process: RelayProcess
) -> None:
    outbox = {"kind": "outbox", "url": receiver.url}
    both = raw_config(db, sources={"deliveries": queue_source(), "events": outbox})
    await install(write_config(tmp_config, both))  # both sources' triggers
    write_config(tmp_config, raw_config(db))  # relay starts with the queue only
    relay = relay_process
    await relay.start()
    await relay.wait_line("listener.connected")
    first = await insert_rows(db, receiver.url, 2)
    await receiver.wait_ids(delivery_ids(first))

    # Added: the outbox. Removed: the queue.
    await asyncio.to_thread(
        tmp_config.write_text, to_toml(raw_config(db, sources={"events": outbox}))
    )
    await send(relay, signal.SIGHUP)
    await relay.wait_line("reload.done sources=events")
    await relay.wait_line("relay.stopped")  # the previous configuration's relay
    queued = await insert_rows(db, receiver.url, 2)
    events = await publish(db, 3)
    await receiver.wait_ids(delivery_ids(events, "events"))
    # The queue's rows, committed before the events, were not claimed: nobody relays them now.
    rows = await fetch_rows(db)
    assert {rows[i]["status"] for i in queued} == {"pending"}
    assert not delivery_ids(queued) & set(receiver.ids())

    await stop(relay)
    assert relay.proc is not None and relay.proc.returncode == 0


def _unknown_key(raw: dict[str, Any]) -> None:
    raw["relay"]["colour"] = "red"


def _missing_column(raw: dict[str, Any]) -> None:
    raw["sources"]["deliveries"]["attempts"] = "tries"


def _unparsable_url(raw: dict[str, Any]) -> None:
    raw["sources"]["events"] = {"kind": "outbox", "url": "http://[::1/hook"}


def _unparsable_database_url(raw: dict[str, Any]) -> None:
    raw["database"]["url"] = "postgresql://[x/app"


BAD_CONFIGS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    # Refused when the file is read...
    "unknown key": (_unknown_key, "relay.colour: unknown key"),
    # (these raised ValueError, not ConfigError, and the reload took the running relay down)
    "unparsable url": (_unparsable_url, "sources.events.url: 'http://[::1/hook' is not"),
    "unparsable database url": (_unparsable_database_url, "database.url: not a connection URL"),
    # ... and when the database check of a changed source fails.
    "missing column": (_missing_column, "column 'tries' does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
async def test_sighup_with_a_bad_configuration_keeps_the_running_one(
    db: str, receiver: Receiver, tmp_config: Path, relay_process: RelayProcess, case: str
) -> None:
    change, reason = BAD_CONFIGS[case]
    await install(write_config(tmp_config, raw_config(db)))
    relay = relay_process
    await relay.start()
    await relay.wait_line("listener.connected")

    bad = raw_config(db)
    change(bad)
    await asyncio.to_thread(tmp_config.write_text, to_toml(bad))
    await send(relay, signal.SIGHUP)
    await relay.wait_line("reload.failed")
    [line] = [x for x in relay.lines if "reload.failed" in x]
    assert reason in line and "the running configuration stays" in line
    assert "Traceback" not in relay.output()

    ids = await insert_rows(db, receiver.url, 3)
    await receiver.wait_ids(delivery_ids(ids))
    assert count(relay, "relay.stopped") == 0  # the running relay was never stopped
    await stop(relay)


async def test_deliveries_in_flight_during_a_reload_finish_once(
    db: str, receiver: Receiver, tmp_config: Path, relay_process: RelayProcess
) -> None:
    await install(write_config(tmp_config, raw_config(db)))
    answer = asyncio.Event()

    async def slow(request: web.Request, _: int) -> web.StreamResponse:
        # The first rows wait for the test; later ones answer at once.
        if request.headers["webhook-id"] in held:
            await asyncio.wait_for(answer.wait(), WAIT * 2)
        return web.Response(text="ok")

    receiver.behaviour = slow
    held = delivery_ids(await insert_rows(db, receiver.url, 3))
    relay = relay_process
    try:
        await relay.start()
        await receiver.wait_ids(held)

        changed = raw_config(db, relay={"max_in_flight": 7})
        await asyncio.to_thread(tmp_config.write_text, to_toml(changed))
        await send(relay, signal.SIGHUP)
        await relay.wait_line("reload.done")
        await relay.wait_line("shutdown.draining in_flight=3")  # the old relay waits for them
        # The new relay delivers meanwhile.
        later = await insert_rows(db, receiver.url, 2)
        await receiver.wait_ids(delivery_ids(later))

        answer.set()  # the slow receiver answers after the reload
        await relay.wait_line("relay.stopped delivered=3")
    finally:
        answer.set()
    # The new relay's settles of the later rows are written by the time the process has
    # stopped (the receiver has the requests before relay has their answers: under load the
    # old relay stopped first and a later row was still processing when read).
    await stop(relay)
    rows = await fetch_rows(db)
    assert {(r["status"], r["attempt_count"]) for r in rows.values()} == {("delivered", 1)}
    assert all(n == 1 for n in receiver.seen.values()), receiver.seen  # none twice


async def test_sigpipe_is_harmless_and_sigquit_stops_gracefully(
    db: str, receiver: Receiver, tmp_config: Path, relay_process: RelayProcess
) -> None:
    await install(write_config(tmp_config, raw_config(db)))
    relay = relay_process
    await relay.start()
    await relay.wait_line("listener.connected")
    await send(relay, signal.SIGPIPE)
    ids = await insert_rows(db, receiver.url, 2)
    await receiver.wait_ids(delivery_ids(ids))
    await send(relay, signal.SIGQUIT)
    assert await relay.wait_exit() == 0, relay.output()
    assert "relay.signal signal=SIGQUIT" in relay.output()
    assert "relay.stopped delivered=2" in relay.output()
