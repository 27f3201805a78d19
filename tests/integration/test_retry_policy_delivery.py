"""A source's own retry policy, [sources.NAME.retry_policy], through the pipeline (issue 9): a
final answer (422) is dead at once, a 429's Retry-After is honoured within the policy's bounds,
an explicit schedule is followed delay by delay."""

from __future__ import annotations

import itertools
from typing import Any

from aiohttp import web

from tests import systems
from tests.integration.user_tables import execute, table_config, table_source
from tests.support import Receiver, install, running

EMAILS = """
CREATE TABLE emails (
    id          serial PRIMARY KEY,
    status      text NOT NULL DEFAULT 'pending',
    last_error  text
);
"""


def emails(url: str, policy: dict[str, Any]) -> dict[str, Any]:
    return table_source("emails", url, last_error="last_error", retry_policy=policy)


async def send_one(
    db: str, receiver: Receiver, policy: dict[str, Any], requests: int
) -> dict[str, Any]:
    """One email through a relay with this policy, until `requests` requests came and its row
    is settled for good (done or dead); its row."""
    execute(db, EMAILS)
    await systems.watch(db, "emails")
    # The top-level policy would retry quickly and often: only the source's may explain what
    # the tests see.
    config = table_config(
        db,
        {"emails": emails(receiver.url, policy)},
        retry={"base": 0.05, "max_delay": 0.05, "jitter": 0.0, "max_attempts": 10},
        relay={"sweep_interval": 600},
    )
    await install(config)
    async with running(config):
        execute(db, "INSERT INTO emails DEFAULT VALUES")
        await receiver.wait_count(requests)
        [row] = await systems.wait_rows(
            db,
            "SELECT * FROM emails",
            None,
            lambda rs: rs[0]["status"] in ("done", "dead"),
        )
    return row


def gaps(receiver: Receiver) -> list[float]:
    at = [r.at for r in receiver.received]
    return [b - a for a, b in itertools.pairwise(at)]


async def test_a_final_status_is_dead_at_once(db: str, receiver: Receiver) -> None:
    async def invalid(_: web.Request, __: int) -> web.StreamResponse:
        return web.json_response({"error": "invalid recipient"}, status=422)

    receiver.behaviour = invalid
    row = await send_one(db, receiver, {"max_attempts": 5}, requests=1)
    assert row["status"] == "dead"
    assert row["last_error"] == 'HTTP 422: {"error": "invalid recipient"}'
    assert len(receiver.received) == 1


async def test_a_status_made_final_by_the_policy_is_not_retried_and_429_is(
    db: str, receiver: Receiver
) -> None:
    async def answers(_: web.Request, nth: int) -> web.StreamResponse:
        return web.Response(status=429 if nth == 1 else 503)

    receiver.behaviour = answers
    policy = {"final_statuses": ["4xx", 503], "schedule": ["10ms"], "max_attempts": 5}
    row = await send_one(db, receiver, policy, requests=2)
    assert (row["status"], row["last_error"]) == ("dead", "HTTP 503")
    assert len(receiver.received) == 2


async def test_retry_after_on_429_is_honoured_within_max_delay(db: str, receiver: Receiver) -> None:
    async def busy_once(_: web.Request, nth: int) -> web.StreamResponse:
        if nth == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        if nth == 2:
            return web.Response(status=429, headers={"Retry-After": "3600"})
        return web.Response(text="sent")

    receiver.behaviour = busy_once
    policy = {"base": "50ms", "max_delay": "1.5s", "jitter": 0}
    row = await send_one(db, receiver, policy, requests=3)
    assert row["status"] == "done"
    honoured, capped = gaps(receiver)
    assert 1.0 <= honoured < 1.45, f"Retry-After: 1 waited {honoured:.2f}s"
    # An hour asked, the policy's 1.5 s cap given.
    assert 1.5 <= capped < 5, f"Retry-After: 3600 waited {capped:.2f}s (max_delay 1.5s)"


async def test_an_explicit_schedule_is_followed(db: str, receiver: Receiver) -> None:
    async def down(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=503)

    receiver.behaviour = down
    # Not a growing series, so exponential backoff cannot pass for it.
    policy = {"schedule": ["50ms", "700ms", "50ms"], "max_attempts": 4}
    row = await send_one(db, receiver, policy, requests=4)
    assert row["status"] == "dead"
    assert len(receiver.received) == 4
    first, second, third = gaps(receiver)
    assert 0.05 <= first < 0.6, first
    assert 0.7 <= second < 2.0, second
    assert 0.05 <= third < 0.6, third
