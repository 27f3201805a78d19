"""The admin API: off unless `[admin] tokens` names at least one bearer token. Mounted on relay's
health server under /admin; every request needs `Authorization: Bearer <token>`, and every
action is logged with the token's name.

    GET  /admin/sources                        counts by status and oldest due row, per source
    GET  /admin/sources/NAME/dead?limit&after  a page of dead rows with their last error
    POST /admin/sources/NAME/retry             {"keys": [...]} | {"all": true} | {"since": ISO}
    GET  /admin/jobs                           each job's schedule, last run and next occurrence
    POST /admin/jobs/NAME/run                  run it now; answers with the run
    GET  /admin/overview                       /admin/sources, and this process's in-flight,
                                               rates history and recent failed attempts

    GET  /admin/                               the dashboard (relay.dashboard): a static page,
                                               served without a token; its data comes from the
                                               routes above, with the token the page asks for
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import psycopg_pool
from aiohttp import web

from relay import dashboard, logs, readers
from relay.readers import ConfigError

log = logs.get("relay.admin")

MAX_PAGE = 1000
# How long counted depths answer /admin/sources and /admin/overview again (the dashboard
# refreshes every 5 s; any number of them then costs one count per source in that time).
DEPTHS_FRESH = 4.0


def parse(raw: Any, env: Mapping[str, str]) -> dict[str, str]:
    """`[admin] tokens = { NAME = { env = "..." } }`: token by name (empty: the API is off)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("admin: expected a table with tokens = { NAME = TOKEN }")
    readers.unknown("admin", raw, {"tokens"})
    tokens = raw.get("tokens", {})
    if not isinstance(tokens, dict):
        raise ConfigError('admin.tokens: expected a table of name = token (e.g. { env = "..." })')
    out = {}
    for name, value in tokens.items():
        token = readers.secret_text(
            f"admin.tokens.{name}", readers.value(f"admin.tokens.{name}", value, env)
        )
        if len(token) < 16:
            raise ConfigError(
                f"admin.tokens.{name}: at least 16 characters, so it cannot be guessed "
                f"(e.g. `openssl rand -hex 24`)"
            )
        out[readers.ident(f"admin.tokens.{name}", name)] = token
    return out


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def routes(tokens: Mapping[str, str], relay: Callable[[], Any]) -> list[tuple[str, str, Handler]]:
    """The admin routes; `relay()` gives the running Relay (a reload may replace it)."""

    def who(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return None
        given = header.removeprefix("Bearer ").encode()
        found = None
        for name, token in tokens.items():  # every token compared: no timing difference
            if hmac.compare_digest(given, token.encode()):
                found = name
        return found

    def guarded(action: Callable[[web.Request, str], Awaitable[web.Response]]) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            name = who(request)
            if name is None:
                return _json({"error": "Authorization: Bearer <token> is missing or wrong"}, 401)
            try:
                return await action(request, name)
            except ConfigError as exc:
                return _json({"error": str(exc)}, 400)
            except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
                return _json(
                    {"error": f"the database is not available: {logs.first_line(exc)}"}, 503
                )

        return handle

    def source_of(request: web.Request) -> str:
        name = request.match_info["name"]
        if name not in relay().store.sources:
            raise web.HTTPNotFound(
                text=orjson.dumps({"error": f"no source named {name!r}"}).decode(),
                content_type="application/json",
            )
        return name

    # The last depths and when, for the relay they were counted on: each is a count by status
    # of every source's table (a scan of it), and every open dashboard asks every few seconds.
    counted: dict[str, Any] = {}

    async def depths(current: Any) -> dict[str, Any]:
        now = time.monotonic()
        if counted.get("relay") is current and now - counted["at"] < DEPTHS_FRESH:
            return counted["depths"]  # type: ignore[no-any-return]
        out = await count_depths(current)
        counted.update(relay=current, at=now, depths=out)
        return out

    async def count_depths(current: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in current.store.sources:
            failing = current.failing().get(name)
            if failing is not None:
                out[name] = {"failing": failing}
                continue
            out[name] = {
                "counts": await current.store.counts(name),
                "oldest_due_seconds": await current.store.oldest_due(name),
            }
        return out

    async def sources(_: web.Request, __: str) -> web.Response:
        return _json(await depths(relay()))

    async def overview(_: web.Request, __: str) -> web.Response:
        current = relay()
        deliverer = current.deliverer
        return _json(
            {
                "now": datetime.now(UTC).isoformat(timespec="seconds"),
                "worker_id": current.config.worker_id,
                "listener": "connected" if current.listener.connected else "disconnected",
                "in_flight": deliverer.in_flight,
                "queued": deliverer.queued,
                "untriggered": dict(current.sweeper.untriggered),
                "sources": await depths(current),
                "rates": current.history.rates(deliverer.outcomes),
                # Newest first; only this process's attempts, since it started.
                "recent_failures": [
                    {
                        "at": dashboard.iso(f.at),
                        "source": f.source,
                        "key": str(f.key),
                        "attempt": f.attempt,
                        "outcome": f.outcome,
                        "http_status": f.http_status,
                        "error": f.error,
                    }
                    for f in reversed(deliverer.recent_failures)
                ],
            }
        )

    async def dead(request: web.Request, _: str) -> web.Response:
        name = source_of(request)
        try:
            limit = min(int(request.query.get("limit", "50")), MAX_PAGE)
        except ValueError:
            return _json({"error": "limit: expected a number"}, 400)
        rows = await relay().store.dead(name, limit + 1, request.query.get("after"))
        page = rows[:limit]
        return _json(
            {
                "rows": [row.summary() for row in page],
                "next": page[-1].key if len(rows) > limit else None,
            }
        )

    async def retry(request: web.Request, who_: str) -> web.Response:
        name = source_of(request)
        try:
            body = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            return _json({"error": "the body is not JSON"}, 400)
        keys, since = body.get("keys"), body.get("since")
        chosen = [keys is not None, since is not None, body.get("all") is True]
        if chosen.count(True) != 1 or (keys is not None and not isinstance(keys, list)):
            return _json(
                {
                    "error": 'send one of {"keys": [...]}, {"since": "2026-12-01T00:00:00Z"}, '
                    '{"all": true}'
                },
                400,
            )
        when = None
        if since is not None:
            try:
                when = datetime.fromisoformat(str(since))
            except ValueError:
                return _json({"error": f"since: {since!r} is not an ISO-8601 time"}, 400)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
        count = await relay().store.retry_dead(
            name, None if keys is None else [str(k) for k in keys], when
        )
        counted.clear()  # the depths changed: the next look counts again
        log.info(
            "admin.retry",
            who=who_,
            source=name,
            keys="all" if keys is None else len(keys),
            since=since or "-",
            retried=count,
        )
        return _json({"retried": count})

    async def jobs(_: web.Request, __: str) -> web.Response:
        current = relay()
        last = await current.store.last_runs(list(current.scheduler.jobs))
        status = current.scheduler.status()
        for name, run in last.items():
            status[name]["last"] = run.summary()
        return _json(status)

    async def run_job(request: web.Request, who_: str) -> web.Response:
        current = relay()
        job = current.scheduler.jobs.get(request.match_info["name"])
        if job is None:
            return _json({"error": f"no job named {request.match_info['name']!r}"}, 404)
        run = await current.store.run_job(job, datetime.now(UTC))
        log.info("admin.run_job", who=who_, job=job.name, ran=run is not None)
        if run is None:
            return _json({"error": "another relay is running this job now"}, 409)
        return _json(run.summary())

    return [
        ("GET", "/admin", dashboard.to_page),
        ("GET", "/admin/", dashboard.page),
        ("GET", "/admin/overview", guarded(overview)),
        ("GET", "/admin/sources", guarded(sources)),
        ("GET", "/admin/sources/{name}/dead", guarded(dead)),
        ("POST", "/admin/sources/{name}/retry", guarded(retry)),
        ("GET", "/admin/jobs", guarded(jobs)),
        ("POST", "/admin/jobs/{name}/run", guarded(run_job)),
    ]
