"""A table source whose mapping gives relay a column of the row (`lease_column`) keeps its claims
there, in the row, as relay.outbox does: the processing status and that column are the claim,
the attempts column relay's count; relay.leases stays empty."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relay import config as config_mod
from relay.db.store import Store
from relay.readers import ConfigError
from relay.sources.base import Outcome, Settlement
from tests import systems
from tests.integration.test_table_leases import execute
from tests.support import (
    insert_rows,
    install,
    make_config,
    prepared_store,
    queue_source,
    raw_config,
    refusal,
)

LEASE = "ALTER TABLE webhook_delivery_queue ADD COLUMN relay_lease timestamptz"


def in_place(**extra: Any) -> dict[str, Any]:
    source = {k: v for k, v in queue_source(**extra).items() if v is not None}
    return {**source, "lease_column": "relay_lease"}


@contextlib.asynccontextmanager
async def one_row(db: str) -> AsyncIterator[tuple[Store, int]]:
    """One row waiting in a table whose claims are kept in the row, and relay's store for it,
    its statements prepared, as a relay's claimer and settler use it."""
    await execute(db, LEASE)
    config = make_config(db, sources={"deliveries": in_place()})
    await install(config)
    [row] = await insert_rows(db, "http://127.0.0.1:9/", 1)
    async with prepared_store(config) as store:
        yield store, row


async def test_an_expired_claim_is_rescued_and_its_late_settle_changes_nothing(db: str) -> None:
    async with one_row(db) as (store, row):
        # A claim that expired as it was made (a worker that died at once).
        [first] = await store.claim("deliveries", 10, -1)
        assert (first.key, first.attempt) == (row, 1)
        [claimed] = await systems.rows(db, "SELECT * FROM webhook_delivery_queue")
        assert (claimed["status"], claimed["relay_lease"]) == ("processing", first.lease)
        assert await systems.value(db, "SELECT count(*) FROM relay.leases") == 0
        # The sweep puts the row back, due at once.
        assert await store.rescue("deliveries") == 1
        [second] = await store.claim("deliveries", 10, 30)
        assert (second.key, second.attempt) == (row, 2)
        # The first worker's settle arrives late: not its claim any more.
        late = Settlement(key=row, lease=first.lease, outcome=Outcome.done, delay=0.0)
        assert await store.settle("deliveries", [late]) == set()
        ours = Settlement(key=row, lease=second.lease, outcome=Outcome.done, delay=0.0)
        assert await store.settle("deliveries", [ours]) == {row}
    [done] = await systems.rows(db, "SELECT * FROM webhook_delivery_queue")
    assert (done["status"], done["attempt_count"], done["relay_lease"]) == ("delivered", 2, None)


async def test_a_row_handed_back_unsent_keeps_its_attempt_count(db: str) -> None:
    async with one_row(db) as (store, row):

        async def claim_and(outcome: Outcome) -> int:
            [claimed] = await store.claim("deliveries", 10, 30)
            settled = Settlement(key=row, lease=claimed.lease, outcome=outcome, delay=0.0)
            assert await store.settle("deliveries", [settled]) == {row}
            return claimed.attempt

        # Handed back before its first attempt (a relay shutting down): still attempt 1 next.
        assert await claim_and(Outcome.release) == 1
        assert await claim_and(Outcome.retry) == 1
        # Tried once, then claimed and handed back: the next claim is still its 2nd attempt.
        assert await claim_and(Outcome.release) == 2
        assert await claim_and(Outcome.done) == 2
    [done] = await systems.rows(db, "SELECT * FROM webhook_delivery_queue")
    assert (done["status"], done["attempt_count"]) == ("delivered", 2)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"processing": None}, "sources.deliveries.lease_column: claims kept in the row need"),
        ({"attempts": None}, "sources.deliveries.attempts too"),
        ({"heartbeat": "created_at"}, "sources.deliveries.heartbeat: a claim kept in the row"),
        (
            {"on_success": {"relay_lease": "now()"}},
            "sources.deliveries.on_success.relay_lease: 'relay_lease' is also",
        ),
    ],
)
def test_a_mapping_claims_in_the_row_cannot_hold_is_refused(
    db: str, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config_mod.from_mapping(raw_config(db, sources={"deliveries": in_place(**extra)}), {})
    assert message in str(refused.value)


async def test_a_lease_column_that_cannot_hold_a_claim_token_is_refused(db: str) -> None:
    await execute(db, "ALTER TABLE webhook_delivery_queue ADD COLUMN relay_lease timestamp(3)")
    message = await refusal(make_config(db, sources={"deliveries": in_place()}))
    assert message.startswith("sources.deliveries.lease_column: column 'relay_lease'")
    assert "use timestamptz" in message


def test_a_claim_in_the_row_must_outlive_its_request(db: str) -> None:
    # Nothing extends it while the request runs (no heartbeat), as for relay's outbox.
    raw = raw_config(
        db, sources={"deliveries": in_place()}, relay={"claim_timeout": 5}, http={"timeout": 10}
    )
    with pytest.raises(ConfigError) as refused:
        config_mod.from_mapping(raw, {})
    assert str(refused.value).startswith("relay.claim_timeout (5s) must be longer than http")
    # The same with claims in relay.leases: they heartbeat.
    leases = {k: v for k, v in in_place().items() if k != "lease_column"}
    assert config_mod.from_mapping({**raw, "sources": {"deliveries": leases}}, {})
