from __future__ import annotations

from tests.support import Receiver, fetch_rows, insert_rows, install, make_config, running


async def test_insert_is_delivered_through_notify(db: str, receiver: Receiver) -> None:
    config = make_config(db, relay={"sweep_interval": 600})
    await install(config)
    async with running(config) as relay:
        sweeps_before = relay.sweeper.sweeps
        ids = await insert_rows(db, receiver.url, 1)
        await receiver.wait_count(1, timeout=5)
        # Found by the notification: no sweep ran between the insert and the delivery.
        assert relay.sweeper.sweeps == sweeps_before
    rows = await fetch_rows(db)
    assert rows[ids[0]]["status"] == "delivered"
    assert receiver.received[0].json == {"n": 1}
    assert receiver.received[0].id == f"deliveries_{ids[0]}"
