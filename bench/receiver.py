"""The benchmark's webhook receiver, and a plain HTTP load client to measure its ceiling.

`python -m bench.receiver serve` runs an aiohttp server on 127.0.0.1 (a free port, printed on
stdout as `ready <port>`) that answers every POST /hook with 200 at once. It counts requests and,
for latency rows (a JSON body with a "lat" key), records time.time() at arrival. GET /stats returns
the count (and the arrivals with ?full=1); POST /reset clears both.

`python -m bench.receiver load URL --seconds 3 --concurrency 20` POSTs as fast as it can from its
own process and prints {"requests": n, "seconds": s, "rps": r} as JSON: the receiver's ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson
from aiohttp import web


class Receiver:
    def __init__(self) -> None:
        self.count = 0
        self.arrivals: dict[int, float] = {}

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        self.count += 1
        if b'"lat"' in body:
            self.arrivals[int(orjson.loads(body)["lat"])] = now
        return web.Response(text="ok")

    async def stats(self, request: web.Request) -> web.Response:
        data: dict[str, object] = {"count": self.count}
        if request.query.get("full"):
            data["arrivals"] = {str(k): v for k, v in self.arrivals.items()}
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    async def reset(self, _: web.Request) -> web.Response:
        self.count = 0
        self.arrivals.clear()
        return web.Response(text="ok")


async def serve() -> None:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.hook)
    app.router.add_get("/stats", rec.stats)
    app.router.add_post("/reset", rec.reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"ready {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()  # until killed


async def load(url: str, seconds: float, concurrency: int) -> None:
    done = 0
    body = orjson.dumps({"n": 0})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                async with session.post(url, data=body) as resp:
                    await resp.read()
                done += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    print(orjson.dumps({"requests": done, "seconds": elapsed, "rps": done / elapsed}).decode())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve")
    lp = sub.add_parser("load")
    lp.add_argument("url")
    lp.add_argument("--seconds", type=float, default=3.0)
    lp.add_argument("--concurrency", type=int, default=20)
    args = p.parse_args()
    if args.cmd == "serve":
        asyncio.run(serve())
    else:
        asyncio.run(load(args.url, args.seconds, args.concurrency))


if __name__ == "__main__":
    main()
