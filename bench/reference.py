"""The reference: a minimal hand-written LISTEN/claim/POST loop to compare relay against.

`python -m bench.reference --db URL` LISTENs on channel "relay" (the notifications relay's own
triggers send) on a dedicated connection. Whenever it wakes (a notification, or every
`--sweep` seconds) it claims batches of pending rows with one
`UPDATE ... WHERE id = ANY(ARRAY(SELECT ... FOR UPDATE SKIP LOCKED)) RETURNING ...` until none are
left, POSTs each row's payload to its url with aiohttp (at most `--concurrency` at once) and marks
each row delivered with its own UPDATE. No retries, no signing: the naive baseline. Prints
`ready` once it listens; runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import aiohttp
import psycopg
from psycopg_pool import AsyncConnectionPool

CLAIM = """
UPDATE webhook_delivery_queue
   SET status = 'processing', attempt_count = attempt_count + 1
 WHERE id = ANY(ARRAY(
       SELECT id FROM webhook_delivery_queue
        WHERE status = 'pending'
        ORDER BY id LIMIT %s
          FOR UPDATE SKIP LOCKED))
RETURNING id, url, payload::text
"""
DONE = (
    "UPDATE webhook_delivery_queue SET status = 'delivered', delivered_at = now(), "
    "last_response_status = %s WHERE id = %s"
)
FAILED = "UPDATE webhook_delivery_queue SET status = 'dead_letter', last_error = %s WHERE id = %s"


async def run(db: str, concurrency: int, batch: int, sweep: float) -> None:
    pool = AsyncConnectionPool(
        db, min_size=2, max_size=concurrency + 1, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True)
    listen = await psycopg.AsyncConnection.connect(db, autocommit=True)
    await listen.execute("LISTEN relay")
    wake = asyncio.Event()
    wake.set()  # sweep once at start
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def listener() -> None:
        async for _ in listen.notifies():
            wake.set()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def deliver(row_id: int, url: str, payload: str) -> None:
            try:
                async with session.post(
                    url,
                    data=payload.encode(),
                    headers={"content-type": "application/json", "webhook-id": f"ref_{row_id}"},
                ) as resp:
                    await resp.read()
                async with pool.connection() as conn:
                    await conn.execute(DONE, (resp.status, row_id))
            except Exception as exc:
                async with pool.connection() as conn:
                    await conn.execute(FAILED, (repr(exc), row_id))
            finally:
                slots.release()

        listen_task = asyncio.create_task(listener())
        print("ready", flush=True)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), sweep)
                wake.clear()
                while True:
                    async with pool.connection() as conn:
                        cur = await conn.execute(CLAIM, (batch,))
                        rows = await cur.fetchall()
                    if not rows:
                        break
                    for row_id, url, payload in rows:
                        await slots.acquire()
                        task = asyncio.create_task(deliver(row_id, url, payload))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
        finally:
            listen_task.cancel()
            await listen.close()
            await pool.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--db", required=True)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--sweep", type=float, default=30.0)
    args = p.parse_args()
    asyncio.run(run(args.db, args.concurrency, args.batch, args.sweep))


if __name__ == "__main__":
    main()
