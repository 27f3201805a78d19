"""relay as its users run it: `relay run` processes killed, doubled and misconfigured, and the
one-shot commands."""

from __future__ import annotations

import asyncio
import re
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web

from tests.support import (
    HERMETIC_ENV,
    Receiver,
    RelayProcess,
    delivery_ids,
    fetch_rows,
    insert_rows,
    install,
    queue_source,
    raw_config,
    run_cli,
    to_toml,
    write_config,
)

STOPPED = re.compile(r"relay\.stopped delivered=(\d+)")


async def slowish(_: web.Request, __: int) -> web.StreamResponse:
    await asyncio.sleep(0.02)  # simulated receiver latency, so a kill lands mid-stream
    return web.Response(text="ok")


def delivered_by(relay: RelayProcess) -> int:
    """The total a relay reports when it stops: `relay.stopped delivered=N failed=M`."""
    [n] = [int(m[1]) for line in relay.lines if (m := STOPPED.search(line))]
    return n


def duplicates(receiver: Receiver) -> list[int]:
    """Indexes into receiver.received of requests whose webhook-id had been seen before."""
    seen: set[str] = set()
    again = []
    for n, r in enumerate(receiver.received):
        if r.id in seen:
            again.append(n)
        seen.add(r.id)
    return again


async def test_sigkill_mid_stream_then_restart_loses_nothing(
    db: str, receiver: Receiver, tmp_config: Path
) -> None:
    max_in_flight, batch_size = 10, 10
    # A relay holds at most its requests in flight, the rows claimed ahead of them (claim_ahead,
    # here batch_size) and a round of outcomes being written (max_in_flight again).
    most_held = 2 * max_in_flight + batch_size
    raw = raw_config(
        db,
        relay={
            "max_in_flight": max_in_flight,
            "batch_size": batch_size,
            "claim_timeout": 2,
            "sweep_interval": 1,
        },
        http={"timeout": 1},
    )
    config = write_config(tmp_config, raw)
    await install(config)
    receiver.behaviour = slowish
    ids = await insert_rows(db, receiver.url, 400)
    first = RelayProcess(tmp_config, env=HERMETIC_ENV)
    second = RelayProcess(tmp_config, env=HERMETIC_ENV)
    try:
        await first.start()
        await receiver.wait_count(100)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)
        assert await first.wait_exit() == -signal.SIGKILL
        killed_at = len(receiver.received)
        assert len(set(receiver.ids())) < len(ids), "the kill came after the last delivery"
        held = {i for i, r in (await fetch_rows(db)).items() if r["status"] == "processing"}
        assert held, "the killed relay held no claims: the kill did not land mid-stream"
        assert len(held) <= most_held

        await second.start()
        # Every row arrives, and so does a new attempt of every row the killed relay held
        # (they come back once their claim expires).
        expected = delivery_ids(ids)
        held_ids = delivery_ids(held)
        await receiver.wait_for(
            lambda got: (
                expected <= {r.id for r in got} and held_ids <= {r.id for r in got[killed_at:]}
            )
        )
        assert second.proc is not None
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait_exit() == 0
    finally:
        first.kill()
        second.kill()
    assert "sweep.rescued" in second.output()
    rows = await fetch_rows(db)
    assert {r["status"] for r in rows.values()} == {"delivered"}
    again = duplicates(receiver)
    # Only rows the killed relay held can arrive twice.
    assert len(again) <= len(held) <= most_held
    for n in again:
        dup = receiver.received[n]
        first_seen = next(r for r in receiver.received if r.id == dup.id)
        assert int(dup.id.removeprefix("deliveries_")) in held
        assert dup.body == first_seen.body
        assert int(dup.headers["relay-attempt"]) > int(first_seen.headers["relay-attempt"])


async def test_two_relays_on_one_table_deliver_each_row_once(
    db: str, receiver: Receiver, tmp_config: Path
) -> None:
    config = write_config(tmp_config, raw_config(db))
    await install(config)
    relays = [RelayProcess(tmp_config, env=HERMETIC_ENV) for _ in range(2)]
    ids: list[int] = []
    try:
        for relay in relays:
            await relay.start()
        for relay in relays:
            await relay.wait_line("listener.connected")
        for _ in range(20):
            ids += await insert_rows(db, receiver.url, 100)
        await receiver.wait_ids(delivery_ids(ids))
        for relay in relays:
            assert relay.proc is not None
            relay.proc.send_signal(signal.SIGTERM)
        for relay in relays:
            assert await relay.wait_exit() == 0
    finally:
        for relay in relays:
            relay.kill()
    assert len(ids) == 2000
    twice = [i for i, n in Counter(receiver.ids()).items() if n > 1]
    assert twice == []
    assert len(receiver.received) == len(ids)
    rows = await fetch_rows(db)
    assert {(r["status"], r["attempt_count"]) for r in rows.values()} == {("delivered", 1)}
    per_relay = [delivered_by(r) for r in relays]
    assert sum(per_relay) == len(ids)
    assert all(n > 0 for n in per_relay), f"one relay delivered everything: {per_relay}"


# -- configuration errors -------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to a raw config: set the dotted `path` to `value` (None: delete it)."""

    def change(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value

    return change


def _bad_url(raw: dict[str, Any]) -> None:
    raw["sources"]["deliveries"] = queue_source(url="not-a-url")
    del raw["sources"]["deliveries"]["url_column"]


CONFIG_ERRORS = {
    "unknown top-level key": (_set("colour", "red"), ["colour: unknown key"]),
    "unknown source key": (
        _set("sources.deliveries.colour", "red"),
        ["sources.deliveries.colour: unknown key"],
    ),
    "wrong type": (_set("relay.max_in_flight", "ten"), ["relay.max_in_flight", "'ten'"]),
    "bad url": (_bad_url, ["sources.deliveries.url", "'not-a-url'"]),
    "missing table": (
        _set("sources.deliveries.table", "public.nope"),
        ["sources.deliveries.table", "public.nope", "does not exist"],
    ),
    "missing column": (
        _set("sources.deliveries.status", "state"),
        ["sources.deliveries.status", "'state'", "does not exist"],
    ),
    "missing mapping key": (
        _set("sources.deliveries.key", None),
        ["sources.deliveries.key", "required"],
    ),
}


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
async def test_configuration_errors_exit_2_naming_the_key(
    db: str, tmp_config: Path, case: str, command: str
) -> None:
    change, fragments = CONFIG_ERRORS[case]
    raw = raw_config(db)
    change(raw)
    await asyncio.to_thread(tmp_config.write_text, to_toml(raw))
    code, out = await run_cli(tmp_config, command)
    assert code == 2, out
    assert "configuration error" in out
    for fragment in fragments:
        assert fragment in out, out
    assert "Traceback" not in out


async def test_missing_or_broken_config_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    code, out = await run_cli(missing, "check")
    assert code == 2, out
    assert str(missing) in out and "cannot read" in out

    broken = tmp_path / "broken.toml"
    await asyncio.to_thread(broken.write_text, "[database\nurl = 'x'\n")
    code, out = await run_cli(broken, "run")
    assert code == 2, out
    assert str(broken) in out and "not valid TOML" in out


ENUM_TABLE = """
CREATE TYPE delivery_state AS ENUM ('queued', 'sending', 'sent', 'given_up');
CREATE TABLE enum_queue (
    id bigserial PRIMARY KEY,
    url text NOT NULL,
    state delivery_state NOT NULL DEFAULT 'queued',
    tries integer NOT NULL DEFAULT 0,
    due timestamptz
);
"""


def enum_source(**overrides: Any) -> dict[str, Any]:
    source = {
        "kind": "table",
        "table": "enum_queue",
        "key": "id",
        "status": "state",
        "pending": "queued",
        "processing": "sending",
        "done": "sent",
        "dead": "given_up",
        "attempts": "tries",
        "due": "due",
        "url_column": "url",
    }
    source.update(overrides)
    return source


async def test_status_value_outside_the_enum_exits_2(db: str, tmp_config: Path) -> None:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute(ENUM_TABLE)
    write_config(tmp_config, raw_config(db, sources={"deliveries": enum_source()}))
    assert (await run_cli(tmp_config, "install"))[0] == 0
    code, out = await run_cli(tmp_config, "check")
    assert code == 0, out

    write_config(tmp_config, raw_config(db, sources={"deliveries": enum_source(done="finished")}))
    code, out = await run_cli(tmp_config, "check")
    assert code == 2, out
    assert "sources.deliveries.done" in out and "'finished'" in out and "delivery_state" in out


async def test_status_value_the_check_constraint_forbids_exits_2(db: str, tmp_config: Path) -> None:
    # The demo table's status is text with CHECK (status IN (...)): a done value outside it
    # makes every settle fail, so `check` must refuse it like an enum label it does not know.
    write_config(tmp_config, raw_config(db, sources={"deliveries": queue_source(done="finished")}))
    code, out = await run_cli(tmp_config, "check")
    assert code == 2, out
    assert "sources.deliveries.done" in out and "'finished'" in out


# -- install, check, status ----------------------------------------------------------------


async def test_install_twice_then_check_and_status(db: str, tmp_config: Path) -> None:
    write_config(tmp_config, raw_config(db))
    code, out = await run_cli(tmp_config, "check")
    assert code == 1, out  # a source without its trigger is delivered only at each sweep
    assert (
        "sources.deliveries: its trigger on public.webhook_delivery_queue is not installed" in out
    )

    for _ in range(2):
        code, out = await run_cli(tmp_config, "install")
        assert code == 0, out
        assert "installed relay schema and triggers for: deliveries" in out
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal "
            "AND tgrelid = 'public.webhook_delivery_queue'::regclass ORDER BY 1"
        )
        triggers = [r[0] for r in await cur.fetchall()]
    assert triggers == ["relay_notify_deliveries_insert", "relay_notify_deliveries_update"]

    code, out = await run_cli(tmp_config, "check")
    assert code == 0, out
    assert "configuration OK for sources: deliveries" in out
    assert "not installed" not in out

    ids = await insert_rows(db, "http://127.0.0.1:9/hook", 5)
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute(
            "UPDATE webhook_delivery_queue SET status = 'delivered' WHERE id = %s", (ids[0],)
        )
        await conn.execute(
            "UPDATE webhook_delivery_queue SET status = 'dead_letter' WHERE id = ANY(%s)",
            (ids[1:3],),
        )
    code, out = await run_cli(tmp_config, "status")
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("deliveries:"))
    assert "dead_letter=2" in line and "delivered=1" in line and "pending=2" in line
    assert "oldest due row waiting: " in line and "waiting: none" not in line
