"""The small HTTP endpoint for operators: liveness, readiness and status.

- `/healthz` is liveness: 200 while the process's event loop runs. A lost database is not a
  reason to restart relay (it reconnects by itself), so it does not fail this probe.
- `/readyz` is readiness: 503 while the listener is not connected, a source is failing, or a
  source's trigger is missing and relay could not install it again, with the reasons.
- `/status` is everything `Relay.status()` reports.

The inboxes (relay.inbox) are mounted here too, or on listeners of their own, and the admin
API (relay.admin) when it has tokens.

No answer names the server's software or versions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import web


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _anonymous(_: web.Request, response: web.StreamResponse) -> None:
    # aiohttp would send `Server: Python/3.x aiohttp/3.y` (a version list for scanners).
    response.headers["Server"] = "relay"


# (method, path, handler): the inboxes' and the admin API's.
Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


def make_app(
    status: Callable[[], dict[str, Any]] | None, routes: Sequence[Route] = ()
) -> web.Application:
    """The health endpoints (unless `status` is None), and the inboxes' and admin routes."""
    app = web.Application()
    app.on_response_prepare.append(_anonymous)
    if status is not None:
        app.add_routes(_health_routes(status))
    for method, path, handle in routes:
        app.router.add_route(method, path, handle)
    return app


def _health_routes(status: Callable[[], dict[str, Any]]) -> list[web.RouteDef]:
    """`status()` returns a dict with at least {"listener": "connected" | "disconnected",
    "failing": {source: reason}, "untriggered": {source: reason}}."""

    async def healthz(_: web.Request) -> web.Response:
        return _json({"alive": True, "listener": status()["listener"]})

    async def readyz(_: web.Request) -> web.Response:
        state = status()
        ready = (
            state["listener"] == "connected" and not state["failing"] and not state["untriggered"]
        )
        body = {
            "ready": ready,
            "listener": state["listener"],
            "failing": state["failing"],
            "untriggered": state["untriggered"],
        }
        return _json(body, 200 if ready else 503)

    async def status_view(_: web.Request) -> web.Response:
        return _json(status())

    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/status", status_view),
    ]


async def serve(
    status: Callable[[], dict[str, Any]] | None, host: str, port: int, routes: Sequence[Route] = ()
) -> web.AppRunner:
    """The health endpoints (without `status`: none) and `routes`, on host:port."""
    runner = web.AppRunner(make_app(status, routes), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
