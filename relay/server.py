"""The small HTTP endpoint for operators: liveness, readiness and status.

- `/livez` is liveness: 200 while the process's event loop runs. A lost database is not a
  reason to restart relay (it reconnects by itself), so it does not fail this probe.
- `/readyz` is readiness: 503 while the listener is not connected, the pool cannot run a query,
  a source is failing, or a source's trigger is missing and relay could not install it again,
  with the reasons. `/healthz` answers the same, as it did before /livez and /readyz existed
  (it was readiness then), so probes and monitors set up on it keep their meaning.
- `/metrics` is Prometheus's text format (relay.metrics), mounted by the Service.
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


Probe = Callable[[], Awaitable[str | None]]  # why the database cannot run a query, or None


def make_app(
    status: Callable[[], dict[str, Any]] | None,
    routes: Sequence[Route] = (),
    probe: Probe | None = None,
) -> web.Application:
    """The health endpoints (unless `status` is None), and the inboxes' and admin routes."""
    app = web.Application()
    app.on_response_prepare.append(_anonymous)
    if status is not None:
        app.add_routes(_health_routes(status, probe))
    for method, path, handle in routes:
        app.router.add_route(method, path, handle)
    return app


def _health_routes(status: Callable[[], dict[str, Any]], probe: Probe | None) -> list[web.RouteDef]:
    """`status()` returns a dict with at least {"listener": "connected" | "disconnected",
    "failing": {source: reason}, "untriggered": {source: reason}}; `probe()` runs a query on
    the pool."""

    async def livez(_: web.Request) -> web.Response:
        # Answered by the event loop itself: nothing here waits on the database.
        return _json({"alive": True, "listener": status()["listener"]})

    async def readyz(_: web.Request) -> web.Response:
        state = status()
        database = None if probe is None else await probe()
        ready = (
            state["listener"] == "connected"
            and database is None
            and not state["failing"]
            and not state["untriggered"]
        )
        body = {
            "ready": ready,
            "listener": state["listener"],
            "database": database or "ok",
            "failing": state["failing"],
            "untriggered": state["untriggered"],
        }
        return _json(body, 200 if ready else 503)

    async def status_view(_: web.Request) -> web.Response:
        return _json(status())

    return [
        web.get("/livez", livez),
        # Readiness, as it always was (one handler with /readyz): its monitors keep their meaning.
        web.get("/healthz", readyz),
        web.get("/readyz", readyz),
        web.get("/status", status_view),
    ]


async def serve(
    status: Callable[[], dict[str, Any]] | None,
    host: str,
    port: int,
    routes: Sequence[Route] = (),
    probe: Probe | None = None,
) -> web.AppRunner:
    """The health endpoints (without `status`: none) and `routes`, on host:port."""
    runner = web.AppRunner(make_app(status, routes, probe), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
