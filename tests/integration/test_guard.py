"""The outbound guard end to end: relay running in-process on real PostgreSQL, real receivers
on loopback, and a test resolver that makes names stand for the addresses to be refused.

Every socket relay opens goes through a tripwire (tests/network.py) that refuses anything not
loopback, so even a broken guard sends nothing off this machine; the tests assert that a refused
target never got as far as a socket, and that a receiver listening at the refused address got
nothing.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import psycopg
import pytest
import standardwebhooks
from aiohttp import web

from relay.app import Relay
from relay.deliverer import excerpt
from tests.integration.documenso_schema import JOBS, WEBHOOKS
from tests.integration.test_delivery import insert_values
from tests.integration.test_documenso_jobs import add_job, calls, execute, job
from tests.integration.user_tables import execute as admin_execute
from tests.network import network
from tests.support import (
    WAIT,
    Receiver,
    fetch_rows,
    install,
    make_config,
    running,
    serving,
)

REFUSED = "relay does not send to non-public addresses unless http.allow lists them"


class Settles:
    """Hooks the relay's settler to learn which rows have had their settle written."""

    def __init__(self, relay: Relay) -> None:
        self.keys: set[Any] = set()
        self._changed = asyncio.Event()
        inner = relay.settler.on_settled

        def on_settled(source: str, batch: list[Any], settled: set[Any] | None) -> None:
            inner(source, batch, settled)
            self.keys |= {s.key for s in batch}
            self._changed.set()

        relay.settler.on_settled = on_settled

    async def wait(self, keys: set[Any], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not keys <= self.keys:
                self._changed.clear()
                await self._changed.wait()


async def insert_urls(db: str, urls: list[str], **columns: Any) -> list[int]:
    """One queue row per URL, all in one statement; returns their ids in the same order."""
    return await insert_values(db, [{"url": url, "payload": "{}", **columns} for url in urls])


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="relay")
    yield caplog


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# -- refusals ---------------------------------------------------------------------------------

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "0x7f000001",
    "2130706433",
    "017700000001",
    "127.1",
    "[::ffff:127.0.0.1]",
    "localhost",
    "[::1]",
]


async def test_loopback_in_every_spelling_is_refused_dead_at_once_and_never_reached(
    db: str, receiver: Receiver
) -> None:
    # The receiver really listens on 127.0.0.1; only the name receiver.test is allowed.
    net, _, tripwire = network({"receiver.test": ["127.0.0.1"]})
    config = make_config(db, http={"allow": ["receiver.test"]})
    await install(config)
    urls = [f"http://{host}:{receiver.port}/hook" for host in LOOPBACK_SPELLINGS]
    async with running(config, net) as relay:
        settles = Settles(relay)
        *refused, good = await insert_urls(
            db, [*urls, f"http://receiver.test:{receiver.port}/hook"]
        )
        await settles.wait({*refused, good})
    assert receiver.ids() == [f"deliveries_{good}"]
    assert set(tripwire.opened) == {"127.0.0.1"} and tripwire.blocked == []
    rows = await fetch_rows(db)
    assert rows[good]["status"] == "delivered"
    for key, host in zip(refused, LOOPBACK_SPELLINGS, strict=True):
        row = rows[key]
        assert (row["status"], row["attempt_count"]) == ("dead_letter", 1), host
        assert row["last_response_status"] is None
        assert row["last_error"].startswith("refused: target ")
        assert "loopback" in row["last_error"] and row["last_error"].endswith(REFUSED)
    assert rows[refused[1]]["last_error"] == (
        f"refused: target 0x7f000001 is 127.0.0.1, a loopback address; {REFUSED}"
    )


async def test_names_resolving_to_refused_addresses_are_refused_before_any_socket(
    db: str, receiver: Receiver
) -> None:
    table = {
        "internal.test": ["10.0.0.5"],
        "metadata.test": ["169.254.169.254"],
        "cgnat.test": ["100.64.0.1"],
        "ula.test": ["fd00::1"],
        "mixed.test": ["93.184.216.34", "192.168.1.1"],
        "loop.test": ["127.0.0.1"],  # where the receiver really listens
        "receiver.test": ["127.0.0.1"],
    }
    net, resolver, tripwire = network(table)
    config = make_config(db, http={"allow": ["receiver.test"]})
    await install(config)
    names = [n for n in table if n != "receiver.test"]
    async with running(config, net) as relay:
        settles = Settles(relay)
        ids = await insert_urls(db, [f"http://{n}:{receiver.port}/hook" for n in table])
        await settles.wait(set(ids))
    *refused, good = ids
    assert receiver.ids() == [f"deliveries_{good}"]
    assert set(resolver.asked) == set(table)
    assert set(tripwire.opened) == {"127.0.0.1"} and tripwire.blocked == []
    rows = await fetch_rows(db)
    errors = {name: rows[key]["last_error"] for name, key in zip(names, refused, strict=True)}
    assert errors == {
        "internal.test": f"refused: target internal.test resolves to 10.0.0.5, a private "
        f"address; {REFUSED}",
        "metadata.test": f"refused: target metadata.test resolves to 169.254.169.254, a "
        f"link-local address; {REFUSED}",
        "cgnat.test": f"refused: target cgnat.test resolves to 100.64.0.1, a carrier-grade "
        f"NAT address; {REFUSED}",
        "ula.test": f"refused: target ula.test resolves to fd00::1, a unique-local address; "
        f"{REFUSED}",
        "mixed.test": f"refused: target mixed.test resolves to 192.168.1.1, a private "
        f"address; {REFUSED}",
        "loop.test": f"refused: target loop.test resolves to 127.0.0.1, a loopback address; "
        f"{REFUSED}",
    }
    assert all(rows[k]["status"] == "dead_letter" for k in refused)


async def test_the_allow_list_opens_exactly_what_it_lists(db: str, receiver: Receiver) -> None:
    a, b, c = Receiver(host="127.0.0.2"), Receiver(host="127.0.0.3"), Receiver(host="127.0.0.5")
    for r in (a, b, c):
        await r.start()
    try:
        net, _, tripwire = network({"named.test": ["127.0.0.3"], "other.test": ["127.0.0.3"]})
        # An address, a network (127.0.0.4/31 is .4 and .5) and a host name.
        config = make_config(db, http={"allow": ["127.0.0.2", "127.0.0.4/31", "named.test"]})
        await install(config)
        urls = {
            "address": a.url,
            "network": c.url,
            "name": f"http://named.test:{b.port}/hook",
            "unlisted name": f"http://other.test:{b.port}/hook",
            "address of an allowed name": b.url,
            "loopback": receiver.url,
        }
        async with running(config, net) as relay:
            settles = Settles(relay)
            ids = dict(zip(urls, await insert_urls(db, list(urls.values())), strict=True))
            await settles.wait(set(ids.values()))
    finally:
        for r in (a, b, c):
            await r.stop()
    rows = await fetch_rows(db)
    status = {what: rows[key]["status"] for what, key in ids.items()}
    assert status == {
        "address": "delivered",
        "network": "delivered",
        "name": "delivered",
        "unlisted name": "dead_letter",
        "address of an allowed name": "dead_letter",
        "loopback": "dead_letter",
    }
    assert a.ids() == [f"deliveries_{ids['address']}"]
    assert c.ids() == [f"deliveries_{ids['network']}"]
    assert b.ids() == [f"deliveries_{ids['name']}"]
    assert receiver.received == []
    assert tripwire.blocked == []


# -- what a response can leave behind ---------------------------------------------------------


async def test_a_redirect_is_not_followed_and_nothing_of_it_is_kept(
    db: str, receiver: Receiver
) -> None:
    async def redirect(request: web.Request, _: int) -> web.StreamResponse:
        return web.Response(
            status=302, headers={"Location": "/landing"}, text="internal admin page s3cr3t"
        )

    receiver.behaviour = redirect
    config = make_config(db)
    await install(config)
    async with running(config) as relay:
        settles = Settles(relay)
        [key] = await insert_urls(db, [receiver.url], max_attempts=1)
        await settles.wait({key})
    assert [r.path for r in receiver.received] == ["/hook"]
    row = (await fetch_rows(db))[key]
    assert (row["status"], row["last_response_status"]) == ("dead_letter", 302)
    assert row["last_error"] == "HTTP 302: redirect not followed; set the final URL"


@pytest.mark.parametrize("chars", [16, 0])
async def test_last_error_keeps_a_bounded_escaped_start_of_the_body(
    db: str, receiver: Receiver, logs: pytest.LogCaptureFixture, chars: int
) -> None:
    body = b"first\nlevel=error msg=forged\x1b[2J" + b"y" * 5000

    async def fail(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=500, body=body)

    receiver.behaviour = fail
    config = make_config(db, http={"error_body_chars": chars})
    await install(config)
    async with running(config) as relay:
        settles = Settles(relay)
        [key] = await insert_urls(db, [receiver.url], max_attempts=1)
        await settles.wait({key})
    row = (await fetch_rows(db))[key]
    expected = f"HTTP 500: {excerpt(body, chars)}" if chars else "HTTP 500"
    assert row["last_error"] == expected
    if chars:
        assert expected == "HTTP 500: first\\nlevel=err"
    dead = [r for r in logs.records if getattr(r, "event", None) == "delivery.dead"]
    assert len(dead) == 1 and dead[0].fields["error"] == expected
    assert not any("\n" in r.getMessage() or "\x1b" in r.getMessage() for r in logs.records)


async def test_passwords_and_query_strings_never_reach_last_error_or_the_log(
    db: str, receiver: Receiver, logs: pytest.LogCaptureFixture
) -> None:
    async def fail(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=500, text="no")

    receiver.behaviour = fail
    net, _, _ = network({"receiver.test": ["127.0.0.1"]})
    config = make_config(db, http={"allow": ["receiver.test"]})
    await install(config)
    urls = [
        "http://user:pw1@/x?token=TOK1",
        "ftp://user:pw2@host/p?token=TOK2",
        f"http://user:pw3@0x7f000001:{receiver.port}/p?token=TOK3",
        f"http://user:pw4@localhost:{receiver.port}/p?token=TOK4",
        f"http://user:pw5@receiver.test:{receiver.port}/hook?token=TOK5",
        "http://user:pw6@receiver.test:1/p?token=TOK6",  # nothing listens: connection refused
    ]
    async with running(config, net) as relay:
        settles = Settles(relay)
        ids = await insert_urls(db, urls, max_attempts=1)
        await settles.wait(set(ids))
    assert len(receiver.received) == 1
    rows = await fetch_rows(db)
    errors = [rows[key]["last_error"] for key in ids]
    assert all(rows[key]["status"] == "dead_letter" for key in ids)
    assert errors[0].startswith("invalid target URL 'http:///x' in column 'url'")
    assert errors[1].startswith("invalid target URL 'ftp://host/p' in column 'url'")
    assert errors[2].startswith("refused: target 0x7f000001 is 127.0.0.1")
    assert errors[4] == "HTTP 500: no"
    shown = "\n".join(errors) + log_text(logs)
    for n in range(1, 7):
        assert f"pw{n}" not in shown and f"TOK{n}" not in shown


# -- Documenso's webhook jobs -----------------------------------------------------------------


@pytest.fixture
def documenso(db: str) -> str:
    execute(db, JOBS + WEBHOOKS)
    return db


def add_webhook(db: str, url: str) -> None:
    execute(
        db,
        """INSERT INTO "Webhook" ("id", "webhookUrl", "secret", "enabled", "userId", "teamId")
           VALUES ('wh_1', %(url)s, 'hook-secret', true, 1, 1)""",
        {"url": url},
    )


async def test_a_documenso_webhook_at_loopback_is_refused_and_its_call_records_only_that(
    documenso: str, receiver: Receiver
) -> None:
    add_webhook(documenso, receiver.url)
    config = make_config(
        documenso, http={"allow": []}, sources={"jobs": {"kind": "documenso_jobs"}}
    )
    await install(config)
    async with running(config) as relay:
        settles = Settles(relay)
        add_job(documenso, "cjob1")
        await settles.wait({"cjob1"})
    assert receiver.received == []
    assert job(documenso, "cjob1")["state"] == "FAILED"
    (call,) = calls(documenso)
    assert (call["state"], call["responseCode"]) == ("FAILED", 0)
    assert call["responseBody"] == (f"refused: target 127.0.0.1 is a loopback address; {REFUSED}")


async def test_a_non_utf8_response_header_is_kept_readable_in_the_webhook_call(
    documenso: str,
) -> None:
    # aiohttp's server cannot send such a header; a few lines of raw HTTP can.
    answered = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Odd: caf\xe9 \xff\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()
        answered.set()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        add_webhook(documenso, f"http://127.0.0.1:{port}/hook")
        config = make_config(documenso, sources={"jobs": {"kind": "documenso_jobs"}})
        await install(config)
        async with running(config) as relay:
            settles = Settles(relay)
            add_job(documenso, "cjob1")
            await settles.wait({"cjob1"})
    finally:
        server.close()
    assert answered.is_set()
    assert job(documenso, "cjob1")["state"] == "COMPLETED"
    (call,) = calls(documenso)
    assert call["state"] == "SUCCESS"
    assert call["responseHeaders"]["x-odd"] == "caf\ufffd \ufffd"  # (named as Documenso does)


# -- secrets ----------------------------------------------------------------------------------

SECRET_A = "whsec_" + base64.b64encode(b"A" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(b"B" * 24).decode()
SECRET_C = "whsec_" + base64.b64encode(b"C" * 32).decode()


@pytest.mark.parametrize("secrets", [[SECRET_A], [SECRET_A, SECRET_B]], ids=["one", "rotation"])
async def test_the_official_standardwebhooks_library_verifies_relays_requests(
    db: str, receiver: Receiver, secrets: list[str]
) -> None:
    source = {"kind": "outbox", "url": receiver.url, "secret": secrets}
    config = make_config(db, sources={"events": source})
    await install(config)
    async with running(config):
        admin_execute(db, """SELECT relay.publish('order.created', '{"id": 7}'::jsonb)""")
        await receiver.wait_count(1)
    [got] = receiver.received
    assert len(got.headers["webhook-signature"].split(" ")) == len(secrets)
    for secret in secrets:
        assert standardwebhooks.Webhook(secret).verify(got.body, got.headers) == {"id": 7}
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET_C).verify(got.body, got.headers)


async def test_a_malformed_row_secret_settles_that_row_dead_and_no_other(
    db: str, receiver: Receiver
) -> None:
    config = make_config(db)
    await install(config)
    bad = "whsec_!!not-base64!!"
    async with running(config) as relay:
        settles = Settles(relay)
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            cur = await conn.execute(
                "INSERT INTO webhook_delivery_queue (url, payload, secret) VALUES "
                "(%(url)s, '{}', %(bad)s), (%(url)s, '{}', NULL) RETURNING id",
                {"url": receiver.url, "bad": bad},
            )
            broken, fine = [r[0] for r in await cur.fetchall()]
        await settles.wait({broken, fine})
    assert receiver.ids() == [f"deliveries_{fine}"]
    row = (await fetch_rows(db))[broken]
    assert row["status"] == "dead_letter"
    assert row["last_error"].startswith(
        "cannot sign with the secret in column 'secret': a secret starting with 'whsec_'"
    )
    assert "not-base64" not in row["last_error"]


async def test_secrets_and_header_values_never_show_in_logs_or_status(
    db: str, receiver: Receiver, logs: pytest.LogCaptureFixture
) -> None:
    async def fail_first(_: web.Request, count: int) -> web.StreamResponse:
        return web.Response(status=500 if count == 1 else 200, text="try again")

    receiver.behaviour = fail_first
    source = {
        "kind": "outbox",
        "url": receiver.url,
        "secret": SECRET_A,
        "headers": {"Authorization": "Bearer T0KEN-xyz"},
    }
    config = make_config(db, sources={"events": source})
    await install(config)
    async with serving(config) as service:
        admin_execute(db, """SELECT relay.publish('order.created', '{"id": 7}'::jsonb)""")
        await receiver.wait_count(2)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{service.health_port}/status") as resp,
        ):
            status = await resp.text()
    assert receiver.received[1].headers["Authorization"] == "Bearer T0KEN-xyz"
    shown = status + log_text(logs) + repr(config)
    assert "delivery.failed" in shown
    assert SECRET_A not in shown and SECRET_A[6:] not in shown and "T0KEN" not in shown
