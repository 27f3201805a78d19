"""relay.notify, systemd's readiness protocol, against real unix datagram sockets: the path and
the abstract `@` forms of NOTIFY_SOCKET, nothing at all without one, the watchdog's period and
owner, and a socket that is not there costing one WARNING, never an exception."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import notify
from tests.support import WAIT


def bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    # A datagram to a local socket is queued before sendto returns: nothing to wait for.
    sock.setblocking(False)
    return sock


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = bound(path)
    try:
        yield path, sock
    finally:
        sock.close()


def test_messages_go_to_a_socket_path(listening: tuple[str, socket.socket]) -> None:
    path, sock = listening
    notifier = notify.Notifier.from_environ({"NOTIFY_SOCKET": path})
    try:
        assert notifier.ready("relaying a")
        assert sock.recv(4096) == b"READY=1\nSTATUS=relaying a"
        assert notifier.stopping("bye")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"
    finally:
        notifier.close()


def test_an_at_sign_names_an_abstract_socket() -> None:
    name = f"relay-test-{uuid.uuid4().hex}"
    sock = bound("\0" + name)  # Linux's abstract namespace: no file anywhere
    notifier = notify.Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notifier.ready("ok")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"
    finally:
        notifier.close()
        sock.close()


async def test_without_notify_socket_nothing_is_sent_and_there_is_no_watchdog(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "relay.notify")
    # WATCHDOG_USEC without a socket to ping: nothing to do either.
    notifier = notify.Notifier.from_environ({"WATCHDOG_USEC": "200000"})
    assert not notifier.enabled and notifier.watchdog is None
    assert not notifier.ready("x")
    assert not notifier.reloading()
    assert not notifier.stopping()
    assert not notifier.send("WATCHDOG=1")
    # Returns at once rather than pinging nobody for ever.
    await asyncio.wait_for(notifier.watchdog_loop(), WAIT)
    notifier.close()
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_status_text_cannot_add_a_field(listening: tuple[str, socket.socket]) -> None:
    path, sock = listening
    notifier = notify.Notifier(path)
    try:
        notifier.status("a\nREADY=1\n")
        assert sock.recv(4096) == b"STATUS=a READY=1"
    finally:
        notifier.close()


def test_reloading_carries_the_monotonic_time(listening: tuple[str, socket.socket]) -> None:
    path, sock = listening
    notifier = notify.Notifier(path)
    try:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = sock.recv(4096).decode().split("\n")
    finally:
        notifier.close()
    assert lines[0] == "RELOADING=1"
    key, usec = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after


@pytest.mark.parametrize(
    ("env", "every"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),  # half the period
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # not ours
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_period_and_owner(
    listening: tuple[str, socket.socket], env: dict[str, str], every: float | None
) -> None:
    notifier = notify.Notifier.from_environ({"NOTIFY_SOCKET": listening[0], **env})
    assert notifier.watchdog == every


async def test_the_watchdog_pings_until_cancelled(listening: tuple[str, socket.socket]) -> None:
    path, sock = listening
    notifier = notify.Notifier(path, watchdog=0.01)
    loop = asyncio.get_running_loop()
    pinging = asyncio.create_task(notifier.watchdog_loop())
    try:
        for _ in range(3):
            assert await asyncio.wait_for(loop.sock_recv(sock, 4096), WAIT) == b"WATCHDOG=1"
    finally:
        pinging.cancel()
        await asyncio.gather(pinging, return_exceptions=True)
        notifier.close()


def test_a_socket_that_is_not_there_is_one_warning_never_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "relay.notify")
    path = str(tmp_path / "gone")
    notifier = notify.Notifier(path, watchdog=0.1)
    try:
        assert not notifier.send("WATCHDOG=1")
        assert not notifier.ready("x")
        assert not notifier.send("WATCHDOG=1")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "notify.failed" in warnings[0].getMessage()

        # The service manager is back: sends work again, and the next failure warns again.
        with bound(path) as sock:
            assert notifier.send("WATCHDOG=1")
            assert sock.recv(4096) == b"WATCHDOG=1"
        assert any("notify.recovered" in r.getMessage() for r in caplog.records)
        os.unlink(path)
        assert not notifier.send("WATCHDOG=1")
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    finally:
        notifier.close()


@pytest.mark.parametrize("given", ["relative/notify", "vsock:2:1234", "@"])
def test_a_socket_address_relay_cannot_use_is_said_and_ignored(
    given: str, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = notify.Notifier.from_environ({"NOTIFY_SOCKET": given, "WATCHDOG_USEC": "1000"})
    assert not notifier.enabled and notifier.watchdog is None
    assert any("notify.unsupported" in r.getMessage() for r in caplog.records)
