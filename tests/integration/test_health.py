"""The health endpoint: /livez is liveness (200 while relay runs, whatever the database does),
/readyz (and /healthz, as it always was) follows the listener, the pool and the sources, and no
answer names the server's software."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import Server
from tests.support import WAIT, install, make_config, serving


async def get(port: int, path: str) -> tuple[int, dict[str, object], dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.json(), dict(resp.headers)


@pytest.mark.restart
async def test_readyz_and_healthz_follow_the_listener_and_livez_stays_alive(
    db: str, server: Server
) -> None:
    config = make_config(db, relay={"heartbeat_interval": 0.5})
    await install(config)
    async with serving(config) as service:
        relay = service.relay
        assert service.health_port
        status, body, _ = await get(service.health_port, "/readyz")
        assert (status, body["listener"], body["database"]) == (200, "connected", "ok")

        await asyncio.to_thread(server.stop)
        await asyncio.wait_for(relay.listener.down.wait(), WAIT)
        for path in ("/readyz", "/healthz"):
            status, body, _ = await get(service.health_port, path)
            assert (status, body["listener"]) == (503, "disconnected")
            # The pool cannot run a query either, and readiness says so.
            assert body["database"] != "ok"
        # Liveness: relay is reconnecting by itself; restarting it would not help.
        status, body, _ = await get(service.health_port, "/livez")
        assert (status, body["listener"]) == (200, "disconnected")

        await asyncio.to_thread(server.start)
        await asyncio.wait_for(relay.listener.up.wait(), WAIT)
        # The pings above sent the pool into psycopg_pool's reconnect backoff (1 s, 2 s, 4 s...);
        # the listener's reconnect tells the store the database is back, and the pool answers
        # now, not on its next attempt.
        for path in ("/readyz", "/healthz"):
            status, body, _ = await get(service.health_port, path)
            assert (status, body["ready"]) == (200, True)
        status, body, _ = await get(service.health_port, "/status")
        assert status == 200 and body["listener_connections"] == 2


async def test_no_answer_names_the_server_software(db: str) -> None:
    config = make_config(db)
    await install(config)
    async with serving(config) as service:
        assert service.health_port
        for path in ("/livez", "/healthz", "/readyz", "/status", "/nowhere"):
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{service.health_port}{path}") as resp,
            ):
                server = resp.headers.get("Server", "")
                assert "aiohttp" not in server.lower() and "python" not in server.lower(), (
                    path,
                    server,
                )
                assert server == "relay", (path, server)
