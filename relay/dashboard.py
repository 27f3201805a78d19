"""The dashboard: one static page for the admin API, and the rates history it shows.

The page (relay/dashboard.html, shipped in the package) holds no data and needs no token to be
fetched: it asks for the admin token, keeps it in the tab's sessionStorage and reads everything
from the admin API with `Authorization: Bearer`, which a cross-site page cannot send without a
CORS preflight relay never answers (so there is no CSRF surface and no cookie). Its inline CSS
and JavaScript are allowed by their hashes in a Content-Security-Policy that allows nothing
else; the script inserts every value from a row or a receiver as text, never as markup.

`History` keeps the deliverer's settlement counts, sampled by the running relay every
PROGRESS_EVERY seconds, so the page can draw delivered, retried and dead per minute over the
last quarter hour. It is this process's memory only: several relays each show their own rates
(the depths come from the database and are shared), and a reload starts it again.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from aiohttp import web

from relay.sources.base import Outcome

SAMPLES = 90  # kept samples: 15 minutes at one every 10 s (Relay._report's PROGRESS_EVERY)
WINDOW = 60.0  # seconds the per-minute rates are counted over
# How the page names each outcome it shows; release (a row handed back at shutdown, no attempt
# made) is only in the totals.
SHOWN = (("delivered", Outcome.done), ("retried", Outcome.retry), ("dead", Outcome.dead))

Counts = dict[str, dict[str, int]]  # source -> outcome -> settlements since start


def _copy(outcomes: Mapping[str, Mapping[Outcome, int]]) -> Counts:
    return {name: {o.value: n for o, n in counts.items()} for name, counts in outcomes.items()}


def _delta(source: str, newer: Counts, older: Counts, outcome: Outcome) -> int:
    return newer.get(source, {}).get(outcome.value, 0) - older.get(source, {}).get(outcome.value, 0)


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


class History:
    """The deliverer's `outcomes` counts over time: a ring of `size` samples, one taken about
    every `every` seconds by whoever calls `sample`."""

    def __init__(
        self, every: float, size: int = SAMPLES, clock: Callable[[], float] = time.time
    ) -> None:
        self.every = every
        self.size = size
        self.clock = clock
        # The deliverer counts from zero when the relay is made, which is the first sample.
        self._samples: deque[tuple[float, Counts]] = deque([(clock(), {})], maxlen=size + 1)

    def sample(self, outcomes: Mapping[str, Mapping[Outcome, int]]) -> None:
        self._samples.append((self.clock(), _copy(outcomes)))

    def rates(self, outcomes: Mapping[str, Mapping[Outcome, int]]) -> dict[str, Any]:
        """`every_seconds` and `window_seconds` (how often it samples, how far it reaches),
        and in `sources`, per source: `points`, what each sampled interval settled (`at` its
        end, `seconds` its length); `per_minute`, what was settled in about the last minute up
        to now (since the start, if that is sooner), scaled to one minute; and `totals` since
        the start."""
        now = self.clock()
        current = _copy(outcomes)
        samples = list(self._samples)
        # The newest sample at least WINDOW old; failing that the oldest (a young relay).
        base = samples[0]
        for sample in samples:
            if sample[0] <= now - WINDOW:
                base = sample
        span = max(now - base[0], WINDOW)
        out: dict[str, Any] = {}
        for name, counts in current.items():
            points = [
                {
                    "at": iso(t1),
                    "seconds": round(t1 - t0, 1),
                    **{label: _delta(name, c1, c0, o) for label, o in SHOWN},
                }
                for (t0, c0), (t1, c1) in itertools.pairwise(samples)
                if t1 > t0
            ]
            out[name] = {
                "points": points,
                "per_minute": {
                    label: round(_delta(name, current, base[1], o) * 60 / span, 1)
                    for label, o in SHOWN
                },
                "totals": {
                    **{label: counts.get(o.value, 0) for label, o in SHOWN},
                    "released": counts.get(Outcome.release.value, 0),
                },
            }
        return {
            "every_seconds": self.every,
            "window_seconds": self.every * self.size,
            "sources": out,
        }


# -- the page -----------------------------------------------------------------------------

PAGE = resources.files("relay").joinpath("dashboard.html").read_text("utf-8")


def _hashes(tag: str) -> str:
    """The CSP source list allowing exactly the page's inline `tag` elements, by their hashes
    (computed here, so editing the page cannot leave a stale hash behind)."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, re.DOTALL)
    if not bodies:
        raise RuntimeError(f"relay/dashboard.html has no <{tag}> element")
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
        for b in bodies
    )


POLICY = "; ".join(
    (
        "default-src 'none'",
        f"script-src {_hashes('script')}",
        f"style-src {_hashes('style')}",
        # The admin API only, on the origin that served the page.
        "connect-src 'self'",
        "base-uri 'none'",
        # The token form is handled by the script; a form that submitted itself would put the
        # token into a URL.
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
}


async def page(_: web.Request) -> web.Response:
    return web.Response(
        text=PAGE, content_type="text/html", charset="utf-8", headers=HEADERS.copy()
    )


async def to_page(_: web.Request) -> web.Response:
    # Relative, so that it also works behind a proxy that serves relay under a prefix; the
    # page's own API calls are relative to /admin/ for the same reason.
    raise web.HTTPFound("admin/", headers={"Cache-Control": "no-store"})
