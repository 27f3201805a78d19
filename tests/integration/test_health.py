"""GET /healthz follows the listener: 200 while connected, 503 while the database is away."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import Server
from tests.support import WAIT, install, make_config, running


async def get(port: int, path: str) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.restart
async def test_healthz_reports_the_listener(db: str, server: Server) -> None:
    config = make_config(db, relay={"heartbeat_interval": 0.5})
    await install(config)
    async with running(config) as relay:
        assert relay.health_port
        status, body = await get(relay.health_port, "/healthz")
        assert (status, body["listener"]) == (200, "connected")

        await asyncio.to_thread(server.stop)
        await asyncio.wait_for(relay.listener.down.wait(), WAIT)
        status, body = await get(relay.health_port, "/healthz")
        assert (status, body["listener"]) == (503, "disconnected")

        await asyncio.to_thread(server.start)
        await asyncio.wait_for(relay.listener.up.wait(), WAIT)
        status, body = await get(relay.health_port, "/healthz")
        assert status == 200
        status, body = await get(relay.health_port, "/status")
        assert status == 200 and body["listener_connections"] == 2
