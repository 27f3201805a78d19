"""`relay run` under systemd's readiness protocol, as Type=notify with WatchdogSec= runs it: the
test binds the NOTIFY_SOCKET and reads what relay says there. READY=1 comes only once relay
listens, WATCHDOG=1 keeps coming from its event loop, SIGHUP is RELOADING=1 then READY=1 (a reload
that fails too: relay runs on), and SIGTERM is STOPPING=1 and exit code 0."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.test_health import get
from tests.proxy import FreezableProxy
from tests.support import (
    HERMETIC_ENV,
    WAIT,
    Receiver,
    RelayProcess,
    delivery_ids,
    insert_rows,
    install,
    queue_source,
    raw_config,
    write_config,
)

WATCHDOG_USEC = 200_000  # pings every 0.1 s


class NotifySocket:
    """What systemd listens on: a unix datagram socket; each datagram one message of
    `KEY=VALUE` lines. Every message relay sent is kept, in order, in `messages`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self.sock.close()

    def _parse(self, data: bytes) -> dict[str, str]:
        message = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.messages.append(message)
        return message

    async def next(self, timeout: float = WAIT) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        return self._parse(await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout))

    async def until(self, key: str, timeout: float = WAIT) -> dict[str, str]:
        """The next message that carries `key` (those before it are kept in `messages`)."""
        async with asyncio.timeout(timeout):
            while key not in (message := await self.next()):
                pass
            return message

    def queued(self) -> list[dict[str, str]]:
        """The messages that have arrived and not been read yet (a datagram sent to a local
        socket is queued there before the sender's sendto returns)."""
        found = []
        while True:
            try:
                found.append(self._parse(self.sock.recv(4096)))
            except BlockingIOError:
                return found


@pytest.fixture
def notify_socket(tmp_path: Path) -> AsyncIterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    try:
        yield sock
    finally:
        sock.close()


@contextlib.asynccontextmanager
async def relay_under_systemd(config: Path, notify: NotifySocket) -> AsyncIterator[RelayProcess]:
    relay = RelayProcess(
        config,
        env={
            **HERMETIC_ENV,
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": "",
        },
    )
    try:
        await relay.start()
        yield relay
    finally:
        relay.kill()


def health_port(ready: dict[str, str]) -> int:
    """The health endpoint's port, from the STATUS that came with READY=1."""
    found = re.search(r"health on 127\.0\.0\.1:(\d+)", ready.get("STATUS", ""))
    assert found, ready
    return int(found.group(1))


async def stop(relay: RelayProcess, notify: NotifySocket) -> None:
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGTERM)
    stopping = await notify.until("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert await relay.wait_exit() == 0, relay.output()


async def test_ready_only_once_listening_then_watchdog_pings_and_stopping_on_sigterm(
    db: str, receiver: Receiver, tmp_config: Path, notify_socket: NotifySocket
) -> None:
    notify = notify_socket
    # The listener's connection goes through a proxy that holds it until the test lets it
    # through; the pool's go straight to the database, so start-up's checks pass meanwhile.
    proxy = FreezableProxy.for_url(db)
    await proxy.start()
    try:
        raw = raw_config(db, database={"url": db, "listen_url": proxy.url(db)})
        await install(write_config(tmp_config, raw))
        proxy.freeze_all()
        async with relay_under_systemd(tmp_config, notify) as relay:
            # Checked, health endpoint up, every part started: everything but the listener.
            await relay.wait_line("relay.started")
            await notify.until("WATCHDOG")  # the loop pings while it waits for the listener
            notify.queued()
            early = [m for m in notify.messages if "READY" in m]
            assert not early, f"READY=1 before the listener was connected: {early}"
            assert "listener.connected" not in relay.output()

            proxy.thaw()
            ready = await notify.until("READY")
            assert ready["READY"] == "1"
            assert "relaying deliveries" in ready["STATUS"]
            # At READY=1, readiness holds: a probe asked now says so.
            status, body, _ = await get(health_port(ready), "/readyz")
            assert (status, body["listener"]) == (200, "connected"), body
            ids = await insert_rows(db, receiver.url, 1)
            await receiver.wait_ids(delivery_ids(ids))

            # The watchdog keeps being fed after READY=1, one ping per message.
            pings = 0
            while pings < 5:
                message = await notify.next()
                assert "READY" not in message and "STOPPING" not in message, message
                pings += message.get("WATCHDOG") == "1"

            await stop(relay, notify)
    finally:
        proxy.thaw()
        await proxy.stop()
    assert [m for m in notify.messages if "READY" in m] == [ready], "READY=1 said once"


async def test_sighup_says_reloading_then_ready_whether_the_reload_was_taken_or_failed(
    db: str, receiver: Receiver, tmp_config: Path, notify_socket: NotifySocket
) -> None:
    notify = notify_socket
    await install(write_config(tmp_config, raw_config(db)))
    async with relay_under_systemd(tmp_config, notify) as relay:
        assert relay.proc is not None
        await notify.until("READY")

        # A configuration that loads and checks: taken on.
        write_config(tmp_config, raw_config(db, relay={"shutdown_grace": 3}))
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        relay.proc.send_signal(signal.SIGHUP)
        reloading = await notify.until("RELOADING")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading["RELOADING"] == "1"
        # systemd (Type=notify-reload) matches the reload by this time on the same clock.
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after, (before, reloading, after)
        ready = await notify.until("READY")
        assert ready["STATUS"].startswith("reloaded;"), ready
        await relay.wait_line("reload.done")

        # A configuration that fails its check (a table that is not there): relay says READY=1
        # again, with the failure, and goes on relaying with the running configuration.
        missing = queue_source(table="public.no_such_table")
        write_config(tmp_config, raw_config(db, sources={"deliveries": missing}))
        relay.proc.send_signal(signal.SIGHUP)
        assert (await notify.until("RELOADING"))["RELOADING"] == "1"
        ready = await notify.until("READY")
        assert ready["STATUS"].startswith("reload failed"), ready
        await relay.wait_line("reload.failed")
        ids = await insert_rows(db, receiver.url, 1)
        await receiver.wait_ids(delivery_ids(ids))

        await stop(relay, notify)
    said = [m for m in notify.messages if "WATCHDOG" not in m]
    kinds = [next(k for k in ("RELOADING", "READY", "STOPPING") if k in m) for m in said]
    assert kinds == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"], kinds
