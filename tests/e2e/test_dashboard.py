"""The dashboard in a real browser: Debian's headless Chromium (/usr/bin/chromium and
/usr/bin/chromedriver; `.ci/run` installs them) driven by Selenium, against relay running with
its admin API, a real PostgreSQL and a receiver on loopback.

The page loads, takes the token, shows a dead row the test made (its error, which holds markup,
as text), and its Retry button makes relay deliver the row; a wrong token and a relay that went
away are said on the page. Without Chromium or its driver these tests are reported skipped,
never passed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests import systems
from tests.support import WAIT, Receiver, insert_rows, install, make_config, ok, serving

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')"
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "dashboard-token-0123456789"
KEY = "relay.admin.token"  # where the page keeps the token (sessionStorage)
# What a receiver answered: markup that would load an image and run script if the page ever
# inserted it as HTML.
EVIL = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(
            f"the dashboard's browser test needs {' and '.join(missing)}: "
            f"apt-get install chromium chromium-driver (.ci/run does, as root)"
        )
    # The driver is named below; Selenium Manager must never look for or download another.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The dashboard in `driver`. Selenium blocks, and relay and the receiver run in this event
    loop: every browser call runs in a thread."""

    def __init__(self, driver: WebDriver, port: int) -> None:
        self.driver = driver
        self.url = f"http://127.0.0.1:{port}/admin/"

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def until(self, condition: Callable[[WebDriver], Any], what: str) -> Any:
        """What `condition` returns once it is truthy (the page refreshes by itself)."""

        def wait() -> Any:
            return WebDriverWait(self.driver, WAIT, poll_frequency=0.1).until(
                condition, message=f"not seen within {WAIT}s: {what}"
            )

        return await asyncio.to_thread(wait)

    async def visible(self, css: str) -> WebElement:
        def shown(d: WebDriver) -> WebElement | None:
            found = [e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
            return found[0] if found else None

        element: WebElement = await self.until(shown, f"{css} shown")
        return element

    async def gone(self, css: str) -> None:
        await self.until(lambda d: not d.find_elements(By.CSS_SELECTOR, css), f"{css} gone")

    async def script(self, code: str) -> Any:
        return await self.call(self.driver.execute_script, code)

    async def sign_in(self, token: str) -> None:
        await self.call(self.driver.get, self.url)
        field = await self.visible("#token")
        await self.call(field.send_keys, token)
        await self.call((await self.visible("#open")).click)


def admin_config(db: str) -> Any:
    return make_config(
        db,
        admin={"tokens": {"ops": TOKEN}},
        relay={"sweep_interval": 3600},
        jobs={"nightly": {"every": "1h", "sql": "SELECT 3 AS processed, 0 AS failed"}},
    )


async def refuse(_: web.Request, __: int) -> web.StreamResponse:
    return web.Response(status=500, text=EVIL)


async def test_a_dead_row_is_shown_and_its_retry_button_delivers_it(
    browser: WebDriver, db: str, receiver: Receiver
) -> None:
    config = admin_config(db)
    await install(config)
    await systems.watch(db, "webhook_delivery_queue")
    receiver.behaviour = refuse
    async with serving(config) as service:
        assert service.health_port is not None
        [key] = await insert_rows(db, receiver.url, 1, max_attempts=2)
        status = "SELECT status FROM webhook_delivery_queue WHERE id = %s"
        await systems.wait_rows(db, status, (key,), lambda r: r[0]["status"] == "dead_letter")

        page = Page(browser, service.health_port)
        await page.sign_in(TOKEN)
        row = f'#dead [data-source="deliveries"] tr[data-key="{key}"]'
        await page.visible(row)
        error = await page.visible(f"{row} td.error")
        assert await page.call(error.get_attribute, "textContent") == f"HTTP 500: {EVIL}"
        failure = await page.visible(f'#failures tr[data-key="{key}"] td.error')
        assert await page.call(failure.get_attribute, "textContent") == f"HTTP 500: {EVIL}"
        # Shown as text: none of it became an element, nothing of it ran.
        assert await page.script("return document.querySelectorAll('main img').length") == 0
        assert await page.script("return document.querySelectorAll('script').length") == 1
        assert await page.script("return window.__pwned === undefined") is True

        # The token is in the tab's sessionStorage only: not in the URL, not in a cookie.
        assert await page.script(f"return sessionStorage.getItem('{KEY}')") == TOKEN
        assert TOKEN not in await page.call(getattr, browser, "current_url")
        assert await page.call(browser.get_cookies) == []

        receiver.behaviour = ok
        await page.call((await page.visible(f"{row} button.retry")).click)
        await receiver.wait_for(lambda got: len(got) == 3)  # two refused, then this one
        await systems.wait_rows(db, status, (key,), lambda r: r[0]["status"] == "delivered")
        notice = await page.visible("#notice")
        assert f"row {key} is claimable again" in await page.call(getattr, notice, "text")
        await page.gone(row)
        await page.until(
            lambda d: "No dead letters." in d.find_element(By.ID, "dead").text,
            "the dead letters empty",
        )
    # The CSP let the page's own script and style run and blocked nothing it needs.
    refused = [e["message"] for e in browser.get_log("browser") if "Content Security" in str(e)]
    assert refused == []


async def test_a_wrong_token_and_a_relay_gone_are_said_and_a_job_runs_now(
    browser: WebDriver, db: str
) -> None:
    config = admin_config(db)
    await install(config)
    async with serving(config) as service:
        assert service.health_port is not None
        page = Page(browser, service.health_port)
        await page.sign_in("not-the-token-0123456789")
        problem = await page.visible("#problem")
        said = await page.call(getattr, problem, "text")
        assert "relay refused the token (401)" in said
        assert "Enter a token listed under [admin] tokens" in said
        # Asked again, and the refused token is not kept.
        await page.visible("#login-form")
        assert await page.script(f"return sessionStorage.getItem('{KEY}')") is None

        field = await page.visible("#token")
        await page.call(field.send_keys, TOKEN)
        await page.call((await page.visible("#open")).click)
        await page.visible('#sources tr[data-source="deliveries"]')
        assert not await page.call(
            (await page.call(browser.find_element, By.ID, "problem")).is_displayed
        )

        await service.relay.scheduler.wait_runs(1)  # the start's occurrence
        await page.call((await page.visible('#jobs tr[data-job="nightly"] button.run')).click)
        notice = await page.visible("#notice")
        await page.until(lambda _: "nightly ran in" in notice.text, "the run said")
        assert "processed 3 · failed 0" in await page.call(getattr, notice, "text")
        assert await systems.value(db, "SELECT count(*) FROM relay.job_runs") == 2

    # relay stopped: the page's next refresh finds nothing there and says what to check.
    problem = await page.visible("#problem")
    said = await page.call(getattr, problem, "text")
    assert "relay did not answer" in said and "Check that relay is running" in said
    # What it showed stays, marked stale.
    assert "stale" in await page.call(getattr, await page.visible("#updated"), "text")
