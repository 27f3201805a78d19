"""The service manager's readiness protocol (systemd's sd_notify), without libsystemd.

systemd (Type=notify) gives the process `NOTIFY_SOCKET`: a unix datagram socket, named by a path
or, when it starts with `@`, an abstract address. Each message is one datagram of `KEY=VALUE`
lines: `READY=1` once relay relays, `RELOADING=1` while it takes on a new configuration,
`STOPPING=1` once it stops, `WATCHDOG=1` while its event loop runs, `STATUS=` for
`systemctl status`. With `WATCHDOG_USEC` set (WatchdogSec=), systemd restarts a service that
stops pinging for that long: the pings come from a task on relay's own event loop, so a loop that
is blocked stops them, which is the point.

Without `NOTIFY_SOCKET` every call does nothing, so relay outside systemd behaves as it always
did. A message that cannot be sent is logged (at WARNING once, until sends work again) and never
stops relay: the service manager's view of relay is not worth a delivery.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

from relay import logs

log = logs.get("relay.notify")


class Notifier:
    """Sends sd_notify messages to `address` (None: sends nothing); pings the watchdog every
    `watchdog` seconds from `watchdog_loop` (None: no watchdog)."""

    def __init__(self, address: str | None = None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog if address is not None else None
        self._sock: socket.socket | None = None
        self._failing = False  # the last send failed (and was said at WARNING)

    @classmethod
    def from_environ(cls, env: Mapping[str, str], pid: int | None = None) -> Notifier:
        """The notifier systemd's variables ask for: `NOTIFY_SOCKET`, `WATCHDOG_USEC` and
        `WATCHDOG_PID` (pings only when it is unset or names this process, `pid`)."""
        given = env.get("NOTIFY_SOCKET") or None
        address = _address(given)
        if given is not None and address is None:
            log.warning(
                "notify.unsupported",
                socket=given,
                next="no readiness or watchdog messages: NOTIFY_SOCKET must be an absolute path or "
                "an @abstract name",
            )
        watchdog = None
        usec = env.get("WATCHDOG_USEC") or None
        owner = env.get("WATCHDOG_PID") or None
        if address is not None and usec is not None:
            if owner is not None and owner != str(os.getpid() if pid is None else pid):
                # The watchdog is another process's (a parent that started relay), not ours.
                log.info("notify.watchdog_skipped", watchdog_pid=owner)
            elif not usec.isdigit() or int(usec) == 0:
                log.warning(
                    "notify.watchdog_invalid",
                    watchdog_usec=usec,
                    next="no watchdog pings: WATCHDOG_USEC must be a positive number of "
                    "microseconds",
                )
            else:
                # Twice per period, as systemd advises: one late ping is not a restart.
                watchdog = int(usec) / 1e6 / 2
        notifier = cls(address, watchdog)
        if address is not None:
            log.info(
                "notify.enabled",
                socket=given,
                watchdog_every_s=None if watchdog is None else round(watchdog, 3),
            )
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of `KEY=VALUE` fields; True if it was sent. Never raises, never blocks
        (a service manager that does not read its socket must not hold the event loop)."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "notify.failed",
                    socket=_shown(self.address),
                    error=logs.first_line(exc),
                    next="relay goes on; the service manager may think it is not ready or hung "
                    "(check NOTIFY_SOCKET and NotifyAccess=)",
                )
            else:
                log.debug("notify.failed", socket=_shown(self.address), error=logs.first_line(exc))
            return False
        if self._failing:
            self._failing = False
            log.info("notify.recovered", socket=_shown(self.address))
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", _status(status))

    def reloading(self, status: str = "reloading the configuration") -> bool:
        # systemd >= 253 (Type=notify-reload) pairs RELOADING=1 with the SIGHUP it sent by this
        # time on CLOCK_MONOTONIC; Type=notify just shows the unit as reloading until READY=1.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", _status(status))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", _status(status))

    def status(self, status: str) -> bool:
        return self.send(_status(status))

    async def watchdog_loop(self) -> None:
        """`WATCHDOG=1` every `watchdog` seconds until cancelled (at once, if there is none)."""
        if self.watchdog is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(given: str | None) -> str | None:
    """The socket address for `sendto`, or None if there is none or it is not one we can use
    (systemd >= 254 may also give `vsock:` addresses, for virtual machines)."""
    if given is None:
        return None
    if given.startswith("@") and len(given) > 1:
        return "\0" + given[1:]  # Linux's abstract namespace
    if given.startswith("/"):
        return given
    return None


def _shown(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address


def _status(text: str) -> str:
    # A message is lines of KEY=VALUE: a newline in the text would start a forged field.
    return "STATUS=" + " ".join(text.split())
