"""The small HTTP endpoint for operators: liveness, readiness and status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def make_app(status: Callable[[], dict[str, Any]]) -> web.Application:
    """`status()` returns a dict with at least {"listener": "connected" | "disconnected"}."""

    async def healthz(_: web.Request) -> web.Response:
        state = status()
        ok = state["listener"] == "connected"
        return _json(state, 200 if ok else 503)

    async def status_view(_: web.Request) -> web.Response:
        return _json(status())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", healthz)
    app.router.add_get("/status", status_view)
    return app


async def serve(status: Callable[[], dict[str, Any]], host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(status), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
