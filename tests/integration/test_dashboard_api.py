"""The dashboard over plain HTTP (no browser): the page's headers and what it may load, the
admin API's /admin/overview it reads (behind the token), and the rates history behind it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay import app
from relay.config import Config
from relay.dashboard import History
from relay.sources.base import Outcome
from tests import systems
from tests.support import (
    WAIT,
    Receiver,
    admin_request,
    insert_rows,
    install,
    make_config,
    queue_source,
    serving,
)

TOKEN = "dashboard-token-0123456789"
SOURCE = "payments_queue"  # a name the static page cannot contain by chance


def config_for(db: str) -> Config:
    return make_config(
        db,
        admin={"tokens": {"ops": TOKEN}},
        sources={SOURCE: queue_source()},
        relay={"sweep_interval": 3600},
    )


async def fetch(port: int, path: str, **options: Any) -> tuple[int, str, dict[str, str], str]:
    """Status, body, headers and the final URL's path of a GET without a token."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}", **options) as response,
    ):
        return response.status, await response.text(), dict(response.headers), response.url.path


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


async def test_the_page_is_static_and_allows_only_its_own_script_style_and_api(db: str) -> None:
    config = config_for(db)
    async with serving(config) as service:
        port = service.health_port
        assert port is not None
        status, body, headers, _ = await fetch(port, "/admin/")
        assert status == 200
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-store"
        policy = dict(
            part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";")
        )
        scripts = re.findall(r"<script>(.*?)</script>", body, re.DOTALL)
        styles = re.findall(r"<style>(.*?)</style>", body, re.DOTALL)
        assert len(scripts) == 1 and len(styles) == 1
        # Exactly the page's own inline script and style run; nothing else loads or connects
        # anywhere but this origin, and no other site may frame it.
        assert policy == {
            "default-src": "'none'",
            "script-src": csp_hash(scripts[0]),
            "style-src": csp_hash(styles[0]),
            "connect-src": "'self'",
            "base-uri": "'none'",
            "form-action": "'none'",
            "frame-ancestors": "'none'",
        }
        assert not re.search(r"\s(src|href|style|on\w+)\s*=", body.replace(scripts[0], ""))
        # It holds no data: not the sources, not the token.
        assert SOURCE not in body and TOKEN not in body
        # /admin leads to it (relatively, so a proxy's prefix is kept).
        status, _, headers, _ = await fetch(port, "/admin", allow_redirects=False)
        assert (status, headers["Location"]) == (302, "admin/")
        status, again, _, path = await fetch(port, "/admin")
        assert (status, path, again) == (200, "/admin/", body)


async def test_without_admin_tokens_there_is_no_page(db: str) -> None:
    config = make_config(db)
    async with serving(config) as service:
        assert service.health_port is not None
        for path in ("/admin/", "/admin", "/admin/overview"):
            status, _, _, _ = await fetch(service.health_port, path, allow_redirects=False)
            assert status == 404, path


async def failing_on(request: web.Request, _: int) -> web.StreamResponse:
    if request.path == "/fail":
        return web.Response(status=500, text="<script>alert(1)</script>")
    return web.Response(status=200, text="ok")


async def test_the_overview_shows_depths_rates_and_recent_failures(
    db: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The running relay samples its counts at each progress tick: faster here, so the history
    # has points within the test.
    monkeypatch.setattr(app, "PROGRESS_EVERY", 0.2)
    receiver.behaviour = failing_on
    config = config_for(db)
    await install(config)
    await systems.watch(db, "webhook_delivery_queue")
    async with serving(config) as service:
        port = service.health_port
        assert port is not None
        assert (await admin_request(port, "GET", "/admin/overview", None))[0] == 401
        assert (await admin_request(port, "GET", "/admin/overview", "y" * 26))[0] == 401

        base = f"http://127.0.0.1:{receiver.port}"
        ok = await insert_rows(db, f"{base}/hook", 3)
        bad = await insert_rows(db, f"{base}/fail", 2, max_attempts=2)
        await systems.wait_rows(
            db,
            "SELECT status FROM webhook_delivery_queue WHERE status IN ('delivered', "
            "'dead_letter')",
            None,
            lambda rows: len(rows) == 5,
        )

        # Every sampled interval together holds every settlement (once the tick after the
        # last one has run).
        async def overview_with_points() -> dict[str, Any]:
            async with asyncio.timeout(WAIT):
                while True:
                    status, body = await admin_request(port, "GET", "/admin/overview", TOKEN)
                    assert status == 200, body
                    points = body["rates"]["sources"][SOURCE]["points"]
                    if [sum(p[k] for p in points) for k in ("delivered", "dead")] == [3, 2]:
                        return body
                    await asyncio.sleep(0.1)  # the next progress tick; nothing to wait on

        body = await overview_with_points()
        assert body["sources"] == {
            SOURCE: {"counts": {"dead_letter": 2, "delivered": 3}, "oldest_due_seconds": None}
        }
        assert (body["listener"], body["in_flight"], body["queued"]) == ("connected", 0, 0)
        assert body["worker_id"] == config.worker_id
        rates = body["rates"]
        assert (rates["every_seconds"], rates["window_seconds"]) == (0.2, 0.2 * 90)
        mine = rates["sources"][SOURCE]
        assert mine["totals"] == {"delivered": 3, "retried": 2, "dead": 2, "released": 0}
        points = mine["points"]
        assert [sum(p[k] for p in points) for k in ("delivered", "retried", "dead")] == [3, 2, 2]
        assert all(p["seconds"] > 0 for p in points)
        # A relay younger than a minute: what it settled since it started, not extrapolated.
        assert mine["per_minute"] == {"delivered": 3.0, "retried": 2.0, "dead": 2.0}

        failures = body["recent_failures"]
        assert sorted((f["key"], f["attempt"], f["outcome"]) for f in failures) == sorted(
            [(str(k), 1, "retry") for k in bad] + [(str(k), 2, "dead") for k in bad]
        )
        assert [f["at"] for f in failures] == sorted((f["at"] for f in failures), reverse=True)
        assert {f["attempt"] for f in failures[:2]} == {2}  # newest first: the deaths
        for f in failures:
            assert (f["source"], f["http_status"]) == (SOURCE, 500)
            assert f["error"] == "HTTP 500: <script>alert(1)</script>"  # as data; the page
            # inserts it as text (tests/e2e/test_dashboard.py)
        assert not {str(k) for k in ok} & {f["key"] for f in failures}


# -- the history alone ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def counts(done: int, retry: int = 0, dead: int = 0) -> dict[str, dict[Outcome, int]]:
    return {"a": {Outcome.done: done, Outcome.retry: retry, Outcome.dead: dead, Outcome.release: 1}}


def test_the_history_keeps_its_last_samples_and_rates_the_last_minute() -> None:
    clock = Clock()
    history = History(every=10, size=6, clock=clock)
    for i in range(1, 11):  # 100 s, 10 deliveries and one retry every 10 s
        clock.now += 10
        history.sample(counts(10 * i, i))
    clock.now += 5
    rates = history.rates(counts(105, 10, 1))
    assert (rates["every_seconds"], rates["window_seconds"]) == (10, 60)
    a = rates["sources"]["a"]
    # Six intervals kept (the ring), each with what it settled.
    assert [(p["seconds"], p["delivered"], p["retried"]) for p in a["points"]] == [(10, 10, 1)] * 6
    assert a["points"][-1]["at"] == "1970-01-12T13:48:20+00:00"
    # The last minute and the 5 s since the last sample: 65 s with 65 deliveries, 6 retries
    # and one death, scaled to 60 s.
    assert a["per_minute"] == {"delivered": 60.0, "retried": 5.5, "dead": 0.9}
    assert a["totals"] == {"delivered": 105, "retried": 10, "dead": 1, "released": 1}


def test_a_young_history_counts_since_the_start() -> None:
    clock = Clock()
    history = History(every=10, clock=clock)
    clock.now += 5
    rates = history.rates(counts(7))["sources"]["a"]
    assert rates["points"] == []
    assert rates["per_minute"]["delivered"] == 7.0
