"""Per-key ordering as users run it: three `relay run` processes on one database, 1,000 keys of
20 rows each, a receiver that fails one request in ten, and one relay killed with SIGKILL in
the middle. Every row arrives; each key's rows arrive in the order they were written (a row the
killed relay had sent comes again after its claim expires: its first arrival counts); and no two
requests of one key are ever at the receiver at once."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import psycopg
from aiohttp import web

from tests.support import (
    HERMETIC_ENV,
    WAIT,
    Receiver,
    RelayProcess,
    install,
    queue_source,
    raw_config,
    write_config,
)

KEYS, PER_KEY = 1000, 20


async def test_1000_keys_arrive_in_order_across_three_relays_and_a_kill(
    db: str, receiver: Receiver, tmp_config: Path
) -> None:
    source = queue_source(ordering_key="payload->>'doc'")
    source.pop("max_attempts_column")  # retry.max_attempts: enough for any run of failures
    raw = raw_config(
        db,
        sources={"deliveries": source},
        relay={"claim_timeout": 3, "sweep_interval": 1},
        http={"timeout": 1},
        retry={"max_attempts": 30},
        health={"listen": ""},
    )
    config = write_config(tmp_config, raw)
    await install(config)

    chance = random.Random(1014)
    at_once: Counter[str] = Counter()
    most = 0
    first_ok: dict[str, list[int]] = defaultdict(list)  # per key: seqs, first success of each
    succeeded: set[str] = set()  # webhook-ids answered 200
    everything = asyncio.Event()

    async def behaviour(request: web.Request, _: int) -> web.StreamResponse:
        nonlocal most
        payload = orjson.loads(await request.read())
        doc, seq = payload["doc"], payload["seq"]
        at_once[doc] += 1
        most = max(most, at_once[doc])
        try:
            await asyncio.sleep(0.001)
            if chance.random() < 0.1:
                return web.Response(status=503, text="random failure")
            if request.headers["webhook-id"] not in succeeded:
                succeeded.add(request.headers["webhook-id"])
                first_ok[doc].append(seq)
                if len(succeeded) == KEYS * PER_KEY:
                    everything.set()
            return web.Response(text="ok")
        finally:
            at_once[doc] -= 1

    receiver.behaviour = behaviour
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        # Row by row in key order within each round of keys: seq 1 of every doc, then seq 2...
        await conn.execute(
            "INSERT INTO webhook_delivery_queue (url, payload) "
            "SELECT %s, jsonb_build_object('doc', 'd' || k, 'seq', s) "
            "FROM generate_series(1, %s) s, generate_series(1, %s) k ORDER BY s, k",
            (receiver.url, PER_KEY, KEYS),
        )
    relays = [RelayProcess(tmp_config, env=HERMETIC_ENV) for _ in range(3)]
    try:
        for relay in relays:
            await relay.start()
        await receiver.wait_count(KEYS * PER_KEY // 3, timeout=WAIT * 2)
        victim = relays[0]
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        assert await victim.wait_exit() == -signal.SIGKILL
        assert not everything.is_set(), "the kill came after the last delivery"
        await asyncio.wait_for(everything.wait(), WAIT * 4)
        for relay in relays[1:]:
            assert relay.proc is not None
            relay.proc.send_signal(signal.SIGTERM)
            assert await relay.wait_exit() == 0
    finally:
        for relay in relays:
            relay.kill()
    assert most == 1, "two requests of one key at the receiver at once"
    assert len(first_ok) == KEYS
    wrong = {doc: seqs for doc, seqs in first_ok.items() if seqs != list(range(1, PER_KEY + 1))}
    assert not wrong, f"{len(wrong)} keys out of order, e.g. {next(iter(wrong.items()))}"
