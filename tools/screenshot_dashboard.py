"""Make the README's picture of the dashboard (docs/dashboard.png) from a real relay:

    .venv/bin/python tools/screenshot_dashboard.py [--out docs/dashboard.png] [--seconds 90]

Needs Debian's Chromium and its driver (`apt-get install chromium chromium-driver`). Nothing on
the page is made up: an embedded PostgreSQL in a temporary folder (as the tests start it), relay
running in this process with its admin API, a receiver on loopback that answers most deliveries
and fails some (a busy upstream, a deleted endpoint, a proxy's HTML error page), a closed port,
rows inserted and events published for `--seconds`, three scheduled jobs. One thing differs from
a relay in production: the rates are sampled every second instead of every 10 s, so that the
chart fills within the run (its window is then 90 s rather than 15 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from psycopg import sql
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay import app  # noqa: E402
from relay import config as config_mod  # noqa: E402
from relay.db.sqltext import sql_dir  # noqa: E402
from relay.db.store import Store  # noqa: E402
from relay.demo import QUEUE_SOURCE  # noqa: E402
from relay.embedded import EmbeddedPostgres  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "screenshot-token-0123456789"
WIDTH = 1400


async def receiver() -> tuple[web.AppRunner, str]:
    """Answers like the receivers people run: mostly 200, sometimes busy, one endpoint gone."""
    rand = random.Random(7)

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        if request.path == "/gone":
            return web.json_response({"error": "webhook endpoint 42 was deleted"}, status=410)
        if request.path == "/events" and rand.random() < 0.06:
            return web.Response(
                status=502,
                content_type="text/html",
                text="<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>",
            )
        if rand.random() < 0.08:
            return web.json_response({"error": "upstream busy, try later"}, status=503)
        return web.json_response({"ok": True})

    web_app = web.Application()
    web_app.router.add_route("*", "/{tail:.*}", hook)
    runner = web.AppRunner(web_app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def database(pg: EmbeddedPostgres) -> str:
    with psycopg.connect(pg.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("shop")))
    url = pg.url("shop")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((sql_dir() / "triggers" / "relay_schema.sql").read_text())
        conn.execute((sql_dir() / "demo" / "webhook_delivery_queue.sql").read_text())
    return url


def relay_config(url: str, receiver_url: str) -> config_mod.Config:
    raw: dict[str, Any] = {
        "database": {"url": url},
        "relay": {"worker_id": "relay-1", "sweep_interval": 5},
        "http": {"timeout": 5, "allow": ["127.0.0.0/8"]},
        "retry": {"base": 0.5, "max_delay": 4, "jitter": 0.2, "max_attempts": 4},
        "health": {"listen": "127.0.0.1:0"},
        "admin": {"tokens": {"ops": TOKEN}},
        "sources": {
            "deliveries": QUEUE_SOURCE,
            "events": {"kind": "outbox", "topics": {"*": f"{receiver_url}/events"}},
        },
        "jobs": {
            "release_reservations": {
                "every": "5m",
                "sql": "SELECT 3 AS processed, 3 AS succeeded, 0 AS failed",
            },
            "nightly_cleanup": {
                "cron": "0 3 * * *",
                "sql": "SELECT 120 AS processed, 120 AS succeeded, 0 AS failed",
            },
            "reindex_search": {"sql": "SELECT 1"},
        },
    }
    return config_mod.from_mapping(raw, {})


async def traffic(url: str, receiver_url: str, seconds: float) -> None:
    """Rows and events at a rate that rises and falls, a few bound to fail."""
    rand = random.Random(11)
    start = time.monotonic()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while (elapsed := time.monotonic() - start) < seconds:
            wave = 0.5 + 0.5 * math.sin(elapsed / seconds * 2 * math.pi * 1.5)
            for _ in range(1 + int(6 * wave)):
                pick = rand.random()
                target, attempts = f"{receiver_url}/hook", 5
                if pick < 0.015:
                    target = f"{receiver_url}/gone"
                elif pick < 0.025:
                    target, attempts = "http://127.0.0.1:9/hook", 2  # nothing listens there
                elif pick < 0.12:
                    attempts = 1  # a busy answer is its last
                await conn.execute(
                    "INSERT INTO webhook_delivery_queue (url, payload, max_attempts) "
                    "VALUES (%s, jsonb_build_object('order', %s::int), %s)",
                    (target, rand.randrange(10_000, 99_999), attempts),
                )
            if rand.random() < 0.2 + 0.5 * wave:
                await conn.execute(
                    "SELECT relay.publish('order.paid', jsonb_build_object('order', %s::int))",
                    (rand.randrange(10_000, 99_999),),
                )
            await asyncio.sleep(0.25)


def shoot(port: int, out: Path) -> None:
    # The driver is given; Selenium Manager must not go looking for (or download) another.
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={WIDTH},1000")
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/admin/")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "open").click()
        WebDriverWait(driver, 20).until(
            lambda d: (
                d.find_elements(By.CSS_SELECTOR, "#chart polyline")
                and d.find_elements(By.CSS_SELECTOR, "#jobs tr[data-job]")
            )
        )
        # The whole page in one picture: a viewport as tall as the page.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(driver.get_screenshot_as_png())
    finally:
        driver.quit()


async def run(out: Path, seconds: float) -> None:
    app.PROGRESS_EVERY = 1.0  # see the module's docstring
    folder = Path(tempfile.mkdtemp(prefix="relay-screenshot-"))
    pg = EmbeddedPostgres(folder / "data", fast_and_unsafe=True)
    pg.start()
    runner, receiver_url = await receiver()
    try:
        url = database(pg)
        config = relay_config(url, receiver_url)
        store = Store(config.database_url, config.sources, channel=config.notify_channel)
        await store.open()
        try:
            await store.install()
        finally:
            await store.close()
        service = app.Service(config)
        task = asyncio.create_task(service.run(), name="relay")
        await asyncio.wait_for(service.ready.wait(), 30)
        await traffic(url, receiver_url, seconds)
        assert service.health_port is not None
        await asyncio.to_thread(shoot, service.health_port, out)
        service.stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        await runner.cleanup()
        pg.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--seconds", type=float, default=90.0, help="how long traffic runs")
    args = parser.parse_args()
    # relay's own log would list every failure the traffic is made to cause.
    logging.basicConfig(level=logging.CRITICAL)
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            sys.exit(f"{path} is missing: apt-get install chromium chromium-driver")
    asyncio.run(run(args.out, args.seconds))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
