"""relay's HTTP/1.1 client: one request at a time per kept-alive connection, nothing more.

aiohttp's client spent about 100 µs of CPU per request on this machine (its request and
response objects, header multidicts, a task per body write, cookie and redirect handling relay
never uses); this one spends under 40 µs, most of it in the socket calls. What a webhook needs
and no more: a request line, headers and a body written in one call; a response read by a
small parser (status line, headers, a body by Content-Length, chunked or until close), of which
at most `cap` bytes of body are kept; connections kept alive per host and port and reused, last
used first.

The outbound guard decides every address: names are resolved by its resolver (which refuses a
name with a refused address) and every socket is made by its socket factory, which checks the
very address about to be used (relay.guard). Everything is bounded: the whole request by
`timeout`, a response's head by MAX_HEAD bytes, a chunk-size line by MAX_LINE, the body kept by
`cap` (a longer body is not read: its connection is closed instead of reused), the connections
kept idle by `max_idle`, each for at most `keepalive` seconds.

A connection the server closed while it sat idle is found only when the next request on it gets
no answer: that request is sent again once, on a new connection (at least once, as every
delivery is; the receiver has the stable webhook id).
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any, cast

from yarl import URL

from relay import guard

MAX_HEAD = (
    64 * 1024
)  # bytes of status line and headers (aiohttp's default limits are 8 KiB per line)
MAX_LINE = 4096  # bytes of a chunk-size line or a trailer line
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Control characters a response's head may not hold (horizontal tab aside, and CR LF only as
# line ends): a NUL or a stray line break in a value recorded from a response would reach a
# JSON column or a log line. One scan of the whole head.
_HEAD_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
# Header names already checked (receivers answer with the same few): bounded.
_NAMES_SEEN: set[bytes] = set()
_NAMES_KEPT = 512
# What a request header's value may not hold.
_BAD_VALUE = re.compile("[\r\n\x00]")


def _valid_name(name: bytes) -> bool:
    if not _TOKEN.match(name):
        return False
    if len(_NAMES_SEEN) < _NAMES_KEPT:
        _NAMES_SEEN.add(name)
    return True


_DEFAULT_PORTS = {"http": 80, "https": 443}
NEXT_AFTER = 1.0  # seconds an address of several may take to connect before the next is tried


class HttpError(Exception):
    """A request that got no complete answer; the message says why (no URL, no secret).
    `final`: no attempt could do better (a header HTTP cannot carry)."""

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


class Response:
    """A response: its status, headers and at most `cap` bytes of its body. The headers are
    decoded only when asked for (most deliveries never look at them)."""

    __slots__ = ("body", "raw_headers", "status")

    def __init__(self, status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.raw_headers = raw_headers
        self.body = body

    @property
    def headers(self) -> list[tuple[str, str]]:
        """As received, decoded as UTF-8 (bytes that are not become U+FFFD); names keep their
        case."""
        return [
            (k.decode("utf-8", "replace"), v.decode("utf-8", "replace"))
            for k, v in self.raw_headers
        ]

    def header(self, name: str) -> str | None:
        """The last value of header `name` (any case), or None."""
        wanted = name.lower().encode()
        found = None
        for key, value in self.raw_headers:
            if key.lower() == wanted:
                found = value.decode("utf-8", "replace")
        return found


# -- the response parser ----------------------------------------------------------------------

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class _Connection(asyncio.Protocol):
    """One connection and the response it is reading (one request at a time)."""

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.requests = 0  # requests sent on it: over 0, it was reused
        self._waiter: asyncio.Future[Response] | None = None
        self._buffer = bytearray()
        self._state = _DONE
        self._head_only = False  # HEAD, 204, 304: no body whatever the headers say
        self._cap = 0
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._remaining = 0
        self._keep_alive = True
        self.received = False  # any byte of this request's response arrived

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, so no isinstance).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for (a server talking out of turn): not reusable.
            self._close()
            return
        self.received = True
        self._buffer += data
        try:
            self._parse()
        except HttpError as exc:
            self._fail(exc)
            self._close()

    def eof_received(self) -> bool | None:
        if self._state == _UNTIL_CLOSE:
            self._finish(keep=False)
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self._state == _UNTIL_CLOSE:
            self._finish(keep=False)
        elif self._waiter is not None and not self._waiter.done():
            if self.received:
                reason = "the server closed the connection before the response was complete"
            else:
                reason = "the server closed the connection without a response"
            if exc is not None:
                reason += f" ({type(exc).__name__}: {exc})"
            self._fail(HttpError(reason))

    # one exchange

    def send(self, data: bytes, head_only: bool, cap: int) -> asyncio.Future[Response]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._buffer.clear()
        self._state = _HEAD
        self._head_only = head_only
        self._cap = cap
        self._body = bytearray()
        self._keep_alive = True
        self.received = False
        self.requests += 1
        self.transport.write(data)
        return self._waiter

    @property
    def reusable(self) -> bool:
        return not self.closed and self._state == _DONE and self._keep_alive

    def abort(self) -> None:
        self._close()

    def _close(self) -> None:
        self._keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        self._state = _DONE
        self._keep_alive = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def _finish(self, keep: bool) -> None:
        self._state = _DONE
        if not keep:
            self._keep_alive = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(Response(self._status, self._headers, bytes(self._body)))
        if not self._keep_alive:
            self._close()

    def _take(self, n: int) -> None:
        """Keep up to `n` bytes of the buffer as body (within the cap) and drop them."""
        room = self._cap - len(self._body)
        if room > 0:
            self._body += self._buffer[: min(n, room)]
        del self._buffer[:n]

    def _over_cap(self) -> bool:
        # The kept body is full: the rest is not read; the connection cannot be reused.
        return len(self._body) >= self._cap and self._cap >= 0

    def _parse(self) -> None:
        while True:
            state = self._state
            if state == _HEAD:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD:
                        raise HttpError(f"response headers larger than {MAX_HEAD} bytes")
                    return
                head = bytes(self._buffer[:end])
                del self._buffer[: end + 4]
                self._head(head)
            elif state == _LENGTH:
                n = min(self._remaining, len(self._buffer))
                self._take(n)
                self._remaining -= n
                if self._remaining == 0:
                    self._finish(keep=True)
                    return
                if self._over_cap():
                    self._finish(keep=False)
                    return
                return
            elif state == _CHUNK_SIZE:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_LINE:
                        raise HttpError("malformed chunked response: chunk-size line too long")
                    return
                line = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
                del self._buffer[: end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise HttpError(
                        f"malformed chunked response: chunk size {line[:20]!r}"
                    ) from None
                if size < 0:
                    raise HttpError("malformed chunked response: negative chunk size")
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                n = min(self._remaining, len(self._buffer))
                self._take(n)
                self._remaining -= n
                if self._over_cap():
                    self._finish(keep=False)
                    return
                if self._remaining:
                    return
                self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    raise HttpError("malformed chunked response: no CRLF after a chunk")
                del self._buffer[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_LINE:
                        raise HttpError("malformed chunked response: trailer line too long")
                    return
                del self._buffer[: end + 2]
                if end == 0:
                    self._finish(keep=not self._buffer)
                    return
            elif state == _UNTIL_CLOSE:
                self._take(len(self._buffer))
                if self._over_cap():
                    self._finish(keep=False)
                return
            else:
                return

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise HttpError(f"malformed response: status line {lines[0][:40]!r}")
        status = int(code)
        if _HEAD_CONTROL.search(head):
            raise HttpError("malformed response: a control character in its headers")
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = False
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or (name not in _NAMES_SEEN and not _valid_name(name)):
                raise HttpError(f"malformed response: header line {line[:40]!r}")
            value = value.strip(b" \t")
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit() or (length is not None and length != int(value)):
                    raise HttpError(f"malformed response: Content-Length {value[:20]!r}")
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
                if not chunked:
                    keep_alive = False  # read until the server closes
            elif lower == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")}
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
            headers.append((name, value))
        if 100 <= status < 200:
            if status == 101:
                raise HttpError("the server switched protocols (HTTP 101)")
            return  # an interim answer (103 Early Hints): the real one follows
        self._status, self._headers, self._keep_alive = status, headers, keep_alive
        if self._head_only or status in (204, 304):
            self._finish(keep=True)
        elif chunked:
            self._state = _CHUNK_SIZE
            if length is not None:
                self._keep_alive = False  # both framings: trust neither for the next request
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH
            if length == 0:
                self._finish(keep=True)
        else:
            self._state = _UNTIL_CLOSE
            self._keep_alive = False


# -- the client -------------------------------------------------------------------------------


def _header_line(name: str, value: str) -> str:
    """`name: value` CRLF, or HttpError (final) for what HTTP cannot carry."""
    if name not in _REQUEST_NAMES:
        if not _TOKEN.match(name.encode("utf-8", "surrogateescape")):
            raise HttpError(
                f"header name {name[:40]!r} is not a valid HTTP header name", final=True
            )
        if len(_REQUEST_NAMES) < _NAMES_KEPT:
            _REQUEST_NAMES.add(name)
    if _BAD_VALUE.search(value):
        raise HttpError(
            f"header {name[:40]!r}: its value holds a line break or NUL, which HTTP cannot send",
            final=True,
        )
    return f"{name}: {value}\r\n"


_REQUEST_NAMES: set[str] = set()  # request header names already checked (bounded)
_FRAMED = frozenset({"content-length", "host", "transfer-encoding", "connection"})


class Client:
    """Requests under the guard, over kept-alive connections."""

    def __init__(
        self,
        checks: guard.Guard,
        *,
        timeout: float,
        user_agent: str,
        max_idle: int,
        keepalive: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.guard = checks
        self.timeout = timeout
        self.max_idle = max(max_idle, 1)
        self.keepalive = keepalive
        self._ssl = ssl_context
        self._user_agent = _header_line("User-Agent", user_agent)
        # The request line and Host (and Basic authorization) of each URL, made once: targets
        # repeat. Bounded like the guard's cache of targets.
        self._starts: dict[URL, str] = {}
        # Idle connections by (scheme, host, port), last used last.
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._idle_count = 0
        self._busy: set[_Connection] = set()
        self._reaper: asyncio.TimerHandle | None = None  # closes expired idle connections
        self.connections_made = 0  # for tests and status

    async def request(
        self, url: URL, method: str, body: bytes, headers: Mapping[str, str], cap: int
    ) -> Response:
        """Send one request and read its response (at most `cap` bytes of body). Raises
        TimeoutError after `timeout` seconds, guard.Refused for an address the guard refuses,
        HttpError for the rest."""
        data = self._encode(url, method, body, headers)
        head_only = method == "HEAD"
        # The whole request is bounded by one deadline: the exchange by a timer on its answer
        # (cheaper than a timeout scope around every request), a new connection by a scope.
        deadline = asyncio.get_running_loop().time() + self.timeout
        conn = self._reuse(url)
        if conn is not None:
            try:
                return await self._exchange(conn, data, head_only, cap, deadline)
            except HttpError:
                if conn.received:
                    raise
                # Closed while idle, as the request went out: once more, on a new one.
        async with asyncio.timeout_at(deadline):
            conn = await self._connect(url)
        return await self._exchange(conn, data, head_only, cap, deadline)

    async def _exchange(
        self, conn: _Connection, data: bytes, head_only: bool, cap: int, deadline: float
    ) -> Response:
        self._busy.add(conn)
        waiter = conn.send(data, head_only, cap)
        timer = asyncio.get_running_loop().call_at(deadline, _expire, waiter)
        try:
            response = await waiter
        except BaseException:
            # Timed out, cancelled or failed mid-exchange: what is left on it is unknown.
            conn.abort()
            raise
        finally:
            timer.cancel()
            self._busy.discard(conn)
        if conn.reusable:
            self._keep(conn)
        return response

    # -- the request ----------------------------------------------------------------------

    def _encode(self, url: URL, method: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        start = self._starts.get(url)
        if start is None:
            start = self._start(url)
            if len(self._starts) >= 4096:
                self._starts.clear()
            self._starts[url] = start
        lines = [f"{method} {start}"]
        given = {name.lower() for name in headers}
        if "user-agent" not in given:
            lines.append(self._user_agent)
        if "accept" not in given:
            lines.append("Accept: */*\r\n")
        if url.raw_user is not None and "authorization" not in given:
            # Credentials in the URL become Basic authorization, as browsers and curl do.
            credentials = f"{url.user or ''}:{url.password or ''}".encode()
            lines.append(f"Authorization: Basic {base64.b64encode(credentials).decode()}\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            if body and "content-type" not in given:
                lines.append("Content-Type: application/octet-stream\r\n")
            lines.append(f"Content-Length: {len(body)}\r\n")
        for name, value in headers.items():
            if name.lower() not in _FRAMED:  # relay frames the request itself
                lines.append(_header_line(name, value))
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape") + body

    @staticmethod
    def _start(url: URL) -> str:
        """`target HTTP/1.1` CRLF `Host: ...` CRLF (methods are upper case: relay.request)."""
        host = url.raw_host or ""
        if ":" in host:
            host = f"[{host}]"
        port = url.port
        if port is not None and port != _DEFAULT_PORTS.get(url.scheme):
            host = f"{host}:{port}"
        return f"{url.raw_path_qs or '/'} HTTP/1.1\r\nHost: {host}\r\n"

    # -- connections ----------------------------------------------------------------------

    @staticmethod
    def _key(url: URL) -> tuple[str, str, int]:
        return (url.scheme, url.raw_host or "", url.port or _DEFAULT_PORTS.get(url.scheme, 80))

    def _reuse(self, url: URL) -> _Connection | None:
        idle = self._idle.get(self._key(url))
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if conn.reusable and now - conn.idle_since < self.keepalive:
                return conn
            conn.abort()
        return None

    def _keep(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        self._idle_count += 1
        if self._idle_count > self.max_idle:
            self._drop_oldest()
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(self.keepalive, self._reap)

    def _reap(self) -> None:
        """Close the connections idle for `keepalive` (to hosts relay no longer sends to, say):
        an idle socket is bounded in time too, not only in number."""
        self._reaper = None
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            kept = [c for c in idle if c.reusable and now - c.idle_since < self.keepalive]
            for conn in idle:
                if conn not in kept:
                    conn.abort()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        self._idle_count = sum(len(idle) for idle in self._idle.values())
        if self._idle_count:
            oldest = min(c.idle_since for idle in self._idle.values() for c in idle)
            wait = max(oldest + self.keepalive - now, 0.0)
            self._reaper = asyncio.get_running_loop().call_later(wait, self._reap)

    def _drop_oldest(self) -> None:
        oldest: list[_Connection] | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest[0].idle_since):
                oldest = idle
        if oldest:
            oldest.pop(0).abort()
            self._idle_count -= 1

    async def _connect(self, url: URL) -> _Connection:
        key = self._key(url)
        _, host, port = key
        addresses = await self._resolve(host, port)
        errors: list[str] = []
        for n, (family, proto, sockaddr) in enumerate(addresses, 1):
            addr_info: guard.AddrInfo = (family, socket.SOCK_STREAM, proto, "", sockaddr)
            sock = self.guard.socket_factory(addr_info)  # raises Refused
            # An address that does not answer (an IPv6 route that goes nowhere) must not use up
            # the request's time while the name has others: each but the last gets NEXT_AFTER.
            within = NEXT_AFTER if n < len(addresses) else None
            try:
                async with asyncio.timeout(within):
                    conn = await self._open(sock, key, sockaddr)
            except TimeoutError:
                sock.close()
                errors.append(f"{sockaddr[0]}: no answer within {NEXT_AFTER:g}s")
                continue
            except ssl.SSLError as exc:  # an OSError too: before it
                sock.close()
                raise HttpError(f"TLS with {guard.host_name(host)}:{port} failed: {exc}") from None
            except OSError as exc:
                sock.close()
                errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
                continue
            except BaseException:
                sock.close()
                raise
            self.connections_made += 1
            return conn
        raise HttpError(
            f"cannot connect to {guard.host_name(host)}:{port}: "
            + "; ".join(errors or ["no address"])
        )

    async def _open(
        self, sock: socket.socket, key: tuple[str, str, int], sockaddr: Any
    ) -> _Connection:
        """Connect `sock` to `sockaddr`, with TLS for https."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, sockaddr)
        context = None
        if key[0] == "https":
            context = self._ssl or _default_context()
        _, conn = await loop.create_connection(
            lambda: _Connection(key),
            sock=sock,
            ssl=context,
            server_hostname=key[1] if context is not None else None,
        )
        return conn

    async def _resolve(self, host: str, port: int) -> list[tuple[int, int, Any]]:
        """(family, proto, sockaddr) for each address, under the guard."""
        ip = guard.parse_ip(host)
        if ip is not None:
            if ip.version == 6:
                return [(socket.AF_INET6, socket.IPPROTO_TCP, (host, port, 0, 0))]
            return [(socket.AF_INET, socket.IPPROTO_TCP, (host, port))]
        try:
            results = await self.guard.resolver.resolve(host, port, family=socket.AF_UNSPEC)
        except guard.Refused:
            raise
        except OSError as exc:
            raise HttpError(f"cannot resolve {guard.host_name(host)}: {exc}") from None
        out: list[tuple[int, int, Any]] = []
        for r in results:
            family = int(r["family"])
            address = (
                (r["host"], r["port"], 0, 0)
                if family == socket.AF_INET6
                else (r["host"], r["port"])
            )
            out.append((family, int(r["proto"]), address))
        return out

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
        self._idle_count = 0
        for conn in list(self._busy):
            conn.abort()
        await self.guard.resolver.close()


def _expire(waiter: asyncio.Future[Response]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


_CONTEXT: ssl.SSLContext | None = None


def _default_context() -> ssl.SSLContext:
    """The system's trusted CAs and hostname checks, made once (it reads the CA files)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ssl.create_default_context()
    return _CONTEXT
