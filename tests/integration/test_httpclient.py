"""relay's HTTP/1.1 client against real servers on loopback: aiohttp's, and raw asyncio ones that
answer exactly the bytes a test gives (chunked, interim answers, no length, a closed idle
connection, malformed heads, hangs), and TLS with a CA the test makes."""

from __future__ import annotations

import asyncio
import datetime
import errno
import ipaddress
import select
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from yarl import URL

from relay import guard
from relay.httpclient import MAX_HEAD, Client, HttpError
from tests.network import FixedResolver, Tripwire

LOOPBACK = guard.allow(["127.0.0.0/8", "::1", "localhost"])


def client(
    timeout: float = 5.0, ssl_context: ssl.SSLContext | None = None, max_idle: int = 4
) -> Client:
    checks = guard.Guard(LOOPBACK, guard.default_resolver(), Tripwire())
    return Client(
        checks, timeout=timeout, user_agent="relay/test", max_idle=max_idle, ssl_context=ssl_context
    )


Answer = Callable[[bytes, int], bytes | None]  # (request head and body, n-th request) -> bytes


class RawServer:
    """Answers each request on a connection with `answer(request, n)` (None: say nothing);
    records the requests and how many connections were made."""

    def __init__(self, answer: Answer, close_after: bool = False, host: str = "127.0.0.1") -> None:
        self.answer = answer
        self.host = host
        self.close_after = close_after  # close each connection after its answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed = asyncio.Event()  # a connection ended (the client closed it, say)
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                reply = self.answer(request, len(self.requests))
                if reply is None:
                    await asyncio.sleep(3600)  # hang: the client's timeout must end it
                writer.write(reply)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went, or the test ended
        finally:
            writer.close()
            self.closed.set()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    def url(self, path: str = "/hook") -> URL:
        return URL(f"http://{self.host}:{self.port}{path}")


def ok(body: bytes = b"ok", extra: bytes = b"") -> Answer:
    return lambda _, __: (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s"
        % (
            len(body),
            extra,
            body,
        )
    )


async def test_a_request_is_written_as_relay_means_it_and_connections_are_reused() -> None:
    http = client()
    async with RawServer(ok()) as server:
        for _ in range(5):
            response = await http.request(
                server.url("/hook?a=1"),
                "POST",
                b'{"x":1}',
                {"Content-Type": "application/json"},
                100,
            )
            assert (response.status, response.body) == (200, b"ok")
        head = server.requests[0].decode()
        assert head.startswith("POST /hook?a=1 HTTP/1.1\r\n")
        assert f"\r\nHost: 127.0.0.1:{server.port}\r\n" in head
        assert "\r\nUser-Agent: relay/test\r\n" in head
        assert "\r\nContent-Length: 7\r\n" in head
        assert "\r\nContent-Type: application/json\r\n" in head
        assert head.endswith('\r\n\r\n{"x":1}')
        assert (server.connections, http.connections_made) == (1, 1)
    await http.close()


async def test_credentials_in_the_url_become_basic_authorization() -> None:
    http = client()
    async with RawServer(ok()) as server:
        url = URL(f"http://us%40er:p%3Ass@127.0.0.1:{server.port}/hook")
        await http.request(url, "POST", b"", {}, 100)
        # user "us@er", password "p:ss"
        assert b"\r\nAuthorization: Basic dXNAZXI6cDpzcw==\r\n" in server.requests[0]
    await http.close()


async def test_chunked_interim_and_until_close_answers_are_read() -> None:
    http = client()
    chunked = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        b"HTTP/1.1 500 Internal Server Error\r\n"
        b"Transfer-Encoding: chunked\r\nRetry-After: 7\r\n\r\n"
        b"4;ext=1\r\nbusy\r\n6\r\n, try \r\n5\r\nlater\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    async with RawServer(lambda _, __: chunked) as server:
        response = await http.request(server.url(), "POST", b"{}", {}, 100)
        assert (response.status, response.body) == (500, b"busy, try later")
        assert response.header("retry-after") == "7"
        # The chunked answer ended cleanly: its connection is reused.
        await http.request(server.url(), "POST", b"{}", {}, 100)
        assert server.connections == 1
    until_close = b"HTTP/1.0 200 OK\r\n\r\nall of it"
    async with RawServer(lambda _, __: until_close, close_after=True) as server:
        response = await http.request(server.url(), "POST", b"{}", {}, 100)
        assert (response.status, response.body) == (200, b"all of it")
    await http.close()


async def test_a_body_past_the_cap_is_not_read_and_its_connection_is_not_reused() -> None:
    http = client()
    # 100,000 bytes announced, 2,000 sent, the rest never: the answer is complete at the cap,
    # without waiting for the rest, and its connection is not used again.
    announced = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 2000
    async with RawServer(lambda _, n: announced if n == 1 else ok()(b"", n)) as server:
        response = await http.request(server.url(), "POST", b"{}", {}, 1000)
        assert response.body == b"x" * 1000
        response = await http.request(server.url(), "POST", b"{}", {}, 1000)
        assert response.body == b"ok" and server.connections == 2
    async with RawServer(
        lambda _, __: (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"1000\r\n" + b"y" * 4096 + b"\r\n" for _ in range(10))
            + b"0\r\n\r\n"
        )
    ) as server:
        response = await http.request(server.url(), "POST", b"{}", {}, 5000)
        assert response.body == b"y" * 5000
    await http.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced_once() -> None:
    http = client()
    # Keep-alive is promised but the server closes after every answer.
    async with RawServer(ok(), close_after=True) as server:
        for _ in range(3):
            response = await http.request(server.url(), "POST", b"{}", {}, 100)
            assert response.status == 200
        assert len(server.requests) == 3 and server.connections == 3
    await http.close()


async def test_a_server_that_closes_without_answering_is_an_error_not_a_loop() -> None:
    http = client()
    async with RawServer(lambda _, __: b"", close_after=True) as server:
        with pytest.raises(HttpError, match="closed the connection without a response"):
            await http.request(server.url(), "POST", b"{}", {}, 100)
        assert len(server.requests) == 1  # a new connection is not retried
    await http.close()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD + 10), "larger than"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\n\r\n", "control character in its headers"),
        (b"HTTP/1.1 200 OK\r\nX-Lf: a\nInjected: b\r\n\r\n", "control character in its headers"),
    ],
)
async def test_malformed_answers_are_clear_errors(reply: bytes, message: str) -> None:
    http = client()
    async with RawServer(lambda _, __: reply) as server:
        with pytest.raises(HttpError, match=message):
            await http.request(server.url(), "POST", b"{}", {}, 100)
    await http.close()


async def test_a_hanging_receiver_times_out_and_its_connection_is_dropped() -> None:
    http = client(timeout=0.3)
    async with RawServer(lambda _, n: None if n == 1 else ok()(b"", n)) as server:
        with pytest.raises(TimeoutError):
            await http.request(server.url(), "POST", b"{}", {}, 100)
        response = await http.request(server.url(), "POST", b"{}", {}, 100)
        assert response.status == 200 and server.connections == 2
    await http.close()


@pytest.mark.parametrize(
    "headers",
    [{"X-Bad": "a\r\nInjected: yes"}, {"X-Bad": "a\nb"}, {"Bad Name": "x"}, {"X-Nul": "a\x00"}],
)
async def test_headers_http_cannot_carry_are_refused_before_anything_is_sent(
    headers: dict[str, str],
) -> None:
    http = client()
    async with RawServer(ok()) as server:
        with pytest.raises(HttpError) as caught:
            await http.request(server.url(), "POST", b"{}", headers, 100)
        assert caught.value.final
        assert server.requests == []
    await http.close()


async def test_the_guard_decides_every_address() -> None:
    checks = guard.Guard(guard.allow([]), guard.default_resolver(), Tripwire())
    http = Client(checks, timeout=5, user_agent="relay/test", max_idle=1)
    with pytest.raises(guard.Refused):
        await http.request(URL("http://localhost:9/hook"), "POST", b"{}", {}, 100)
    await http.close()


async def test_an_address_that_does_not_answer_gives_way_to_the_next() -> None:
    # two.test is 127.0.0.1 and 127.0.0.2. On 127.0.0.1 the port is a listener whose queue is
    # full, so the kernel drops new SYNs and a connect there hangs; 127.0.0.2 answers.
    async with RawServer(ok(), host="127.0.0.2") as server:
        hole = socket.socket()
        hole.bind(("127.0.0.1", server.port))
        hole.listen(0)
        waiting = []
        try:
            while True:  # fill its queue: until a connect gets no answer
                s = socket.socket()
                s.setblocking(False)
                waiting.append(s)
                if s.connect_ex(("127.0.0.1", server.port)) not in (0, errno.EINPROGRESS):
                    break
                _, writable, _ = select.select([], [s], [], 0.2)
                if not writable:
                    break
            checks = guard.Guard(
                guard.allow(["127.0.0.0/8", "two.test"]),
                FixedResolver({"two.test": ["127.0.0.1", "127.0.0.2"]}),
                Tripwire(),
            )
            http = Client(checks, timeout=5, user_agent="relay/test", max_idle=1)
            response = await http.request(
                URL(f"http://two.test:{server.port}/hook"), "POST", b"{}", {}, 100
            )
            assert response.status == 200 and server.connections == 1
            await http.close()
        finally:
            for s in waiting:
                s.close()
            hole.close()


async def test_connection_refused_names_the_host_and_port() -> None:
    http = client()
    with pytest.raises(HttpError, match=r"cannot connect to 127\.0\.0\.1:9: 127\.0\.0\.1: "):
        await http.request(URL("http://127.0.0.1:9/hook"), "POST", b"{}", {}, 100)
    await http.close()


async def test_an_idle_connection_is_closed_after_keepalive() -> None:
    checks = guard.Guard(LOOPBACK, guard.default_resolver(), Tripwire())
    http = Client(checks, timeout=5, user_agent="relay/test", max_idle=4, keepalive=0.2)
    async with RawServer(ok()) as server:
        await http.request(server.url(), "POST", b"{}", {}, 100)
        assert http._idle_count == 1 and not server.closed.is_set()
        # Nothing more is sent there: the client closes it, the server sees the end.
        await asyncio.wait_for(server.closed.wait(), 5)
        assert http._idle_count == 0
    await http.close()


async def test_idle_connections_are_bounded() -> None:
    http = client(max_idle=2)
    async with RawServer(ok()) as a, RawServer(ok()) as b, RawServer(ok()) as c:
        for server in (a, b, c):
            await http.request(server.url(), "POST", b"{}", {}, 100)
        assert http._idle_count == 2
        await http.request(a.url(), "POST", b"{}", {}, 100)  # a's was the oldest: dropped
        assert a.connections == 2 and (b.connections, c.connections) == (1, 1)
    await http.close()


# -- TLS ------------------------------------------------------------------------------------


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signed for localhost and 127.0.0.1: (ca, cert, key) files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[int, ssl.SSLContext]]:
    ca, cert, key = _certificates(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def hook(request: web.Request) -> web.Response:
        return web.Response(text=f"tls {await request.text()}")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    trusting = ssl.create_default_context(cafile=str(ca))
    yield runner.addresses[0][1], trusting
    await runner.cleanup()


async def test_https_with_a_trusted_ca_and_a_refused_untrusted_one(
    tls_server: tuple[int, ssl.SSLContext],
) -> None:
    port, trusting = tls_server
    http = client(ssl_context=trusting)
    for host in ("localhost", "127.0.0.1"):
        response = await http.request(URL(f"https://{host}:{port}/hook"), "POST", b"hi", {}, 100)
        assert (response.status, response.body) == (200, b"tls hi")
    await http.close()
    # The system's CAs do not know the test's CA.
    http = client()
    with pytest.raises(
        HttpError, match=r"TLS with localhost:.* failed: .*CERTIFICATE_VERIFY_FAILED"
    ):
        await http.request(URL(f"https://localhost:{port}/hook"), "POST", b"hi", {}, 100)
    await http.close()
