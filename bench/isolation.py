"""The `ordering` and `isolation` workloads (issue 14): what per-key ordering costs, and what
one hanging endpoint costs the others.

`ordering`: `isolation_rows` rows over 1,000 keys (20 each, the keys interleaved as a busy
application writes them) drained with `ordering_key` and without, in interleaved rounds.

A backlog of `isolation_rows` rows for the bench's receiver is drained four times per round, in
interleaved order: alone; with one extra row in ten (interleaved by id) for an endpoint that
accepts connections and never answers (`Blackhole`); with the same rows for an endpoint that
answers its first LATE_AFTER requests at once and then hangs (`LateHole`: a hang that begins
mid-drain, after relay has learnt a fast response time); and, as a control, with the same rows
not due for an hour. Measured: the healthy rows' rate (from
relay listening to the last healthy row settled) and relay's CPU per healthy delivery; their
ratio within each round. relay runs with its defaults (each endpoint takes at most half of
relay.max_in_flight; the hanging requests last http.timeout, 10 s, longer than a drain).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
from typing import TYPE_CHECKING, Any

import psycopg
from aiohttp import web

if TYPE_CHECKING:
    from bench.run import Bench

HEALTHY_LEFT = (
    "SELECT count(*) FROM webhook_delivery_queue "
    "WHERE url = %s AND status NOT IN ('delivered', 'dead_letter')"
)


class Blackhole:
    """A receiver that hangs: it accepts every connection and never reads or answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.sock.settimeout(0.2)
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="blackhole", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)
            self.accepted += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self.conns:
            conn.close()
        self.sock.close()


LATE_AFTER = 100  # requests LateHole answers before it hangs


class LateHole:
    """A receiver that answers its first LATE_AFTER requests at once, then never again."""

    def __init__(self) -> None:
        self.answered = 0
        self._loop = asyncio.new_event_loop()
        self._port = 0
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/hook"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self._port = self._runner.addresses[0][1]
        ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        if self.answered >= LATE_AFTER:
            await self._closing.wait()  # hangs until the bench closes it
            raise web.HTTPServiceUnavailable()
        self.answered += 1
        return web.Response(text="ok")

    def close(self) -> None:
        async def stop() -> None:
            self._closing.set()  # the hanging requests end, or cleanup would wait for them
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def drain(
    bench: Bench, hanging: str | None, s: dict[str, Any], not_due: bool = False
) -> dict[str, Any]:
    """`hanging`: the URL of the extra rows (one in eleven), if any; `not_due`: those rows are
    not due for an hour, so claims pass over them without relay ever taking one (the cost of
    sharing the table, without any endpoint's)."""

    n = s["isolation_rows"]
    healthy = bench.target
    db = bench.fresh_db()
    with psycopg.connect(db, autocommit=True) as conn:
        if hanging is None:
            conn.execute(
                "INSERT INTO webhook_delivery_queue (url, payload) "
                "SELECT %s, jsonb_build_object('n', g) FROM generate_series(1, %s) g",
                (healthy, n),
            )
        else:
            # n healthy rows, and after every ten of them one for the hanging endpoint.
            conn.execute(
                "INSERT INTO webhook_delivery_queue (url, payload, next_retry_at) "
                "SELECT CASE WHEN g %% 11 = 0 THEN %s ELSE %s END, jsonb_build_object('n', g), "
                "CASE WHEN g %% 11 = 0 AND %s THEN now() + interval '1 hour' END "
                "FROM generate_series(1, %s) g",
                (hanging, healthy, not_due, n + n // 10),
            )
        conn.execute("VACUUM ANALYZE webhook_delivery_queue")
    bench.reset_receiver()

    def left() -> int:
        with psycopg.connect(db, autocommit=True) as conn:
            row = conn.execute(HEALTHY_LEFT, (healthy,)).fetchone()
            assert row is not None
            return int(row[0])

    name = "isolation-not-due" if not_due else "isolation-hanging" if hanging else "isolation-alone"
    with bench.deliverer("relay", db, name) as proc:
        timed = bench.timed(proc, n, lambda: left() == 0, f"{n} healthy rows to settle")
        claims = bench.metric(proc, "relay_claims_total")
        deferred = bench.metric(proc, "relay_deferred_rows_total")
        with psycopg.connect(db, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE attempt_count > 0), count(*) "
                "FROM webhook_delivery_queue WHERE url <> %s",
                (healthy,),
            ).fetchone()
    assert row is not None
    return {
        "rows": n,
        **timed,
        "received": bench.receiver_stats()["count"],
        # The hanging endpoint's rows: how many were attempted (in flight or waited out) by
        # the time the healthy ones were done, of how many.
        "hanging_attempted": row[0],
        "hanging_rows": row[1],
        "claims": claims,  # claim statements
        "deferred": deferred,  # handed back with a delay (a row may be more than once)
    }


def run(bench: Bench, s: dict[str, Any]) -> dict[str, Any]:
    hole = Blackhole()
    try:
        rounds = []
        variants = ("alone", "hanging", "late", "not_due")
        for i in range(s["isolation_rounds"]):
            order = variants if i % 2 == 0 else variants[::-1]
            one = {}
            for v in order:
                if v == "late":
                    late = LateHole()  # a fresh one: it hangs after its first requests
                    try:
                        one[v] = drain(bench, late.url, s)
                    finally:
                        late.close()
                else:
                    url = None if v == "alone" else hole.url
                    one[v] = drain(bench, url, s, not_due=v == "not_due")
            rounds.append(one)
    finally:
        hole.close()
    ratios = [r["hanging"]["rows_per_s"] / r["alone"]["rows_per_s"] for r in rounds]
    late_ratios = [r["late"]["rows_per_s"] / r["alone"]["rows_per_s"] for r in rounds]
    cpu = [r["hanging"]["cpu_us_per_row"] / r["alone"]["cpu_us_per_row"] for r in rounds]
    shared = [r["not_due"]["rows_per_s"] / r["alone"]["rows_per_s"] for r in rounds]
    return {
        "rounds": rounds,
        "rows_per_s_ratio": ratios,
        "rows_per_s_ratio_median": statistics.median(ratios),
        "cpu_ratio_median": statistics.median(cpu),
        # The same extra rows, never claimable: what sharing the table costs by itself.
        # A hang that begins mid-drain (LateHole).
        "late_ratio": late_ratios,
        "late_ratio_median": statistics.median(late_ratios),
        "late_rows_per_s": statistics.median(r["late"]["rows_per_s"] for r in rounds),
        "not_due_ratio": shared,
        "not_due_ratio_median": statistics.median(shared),
        "not_due_rows_per_s": statistics.median(r["not_due"]["rows_per_s"] for r in rounds),
        "alone_rows_per_s": statistics.median(r["alone"]["rows_per_s"] for r in rounds),
        "hanging_rows_per_s": statistics.median(r["hanging"]["rows_per_s"] for r in rounds),
        "alone_cpu_us": statistics.median(r["alone"]["cpu_us_per_row"] for r in rounds),
        "hanging_cpu_us": statistics.median(r["hanging"]["cpu_us_per_row"] for r in rounds),
        "hanging_attempted": statistics.median(r["hanging"]["hanging_attempted"] for r in rounds),
    }


ORDER_KEYS = 1000


def ordered_drain(bench: Bench, ordered: bool, s: dict[str, Any]) -> dict[str, Any]:
    from bench.run import QUEUE_SOURCE

    n = s["isolation_rows"]
    db = bench.fresh_db()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO webhook_delivery_queue (url, payload) "
            "SELECT %s, jsonb_build_object('doc', 'd' || (g %% %s), 'n', g) "
            "FROM generate_series(1, %s) g",
            (bench.target, ORDER_KEYS, n),
        )
    bench.reset_receiver()
    source = {**QUEUE_SOURCE, **({"ordering_key": "payload->>'doc'"} if ordered else {})}
    name = "ordering-on" if ordered else "ordering-off"
    if ordered:
        bench.install(db, name, source)  # its index, as `relay install` makes it
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE webhook_delivery_queue")
    with bench.deliverer("relay", db, name, source=source) as proc:
        timed = bench.timed(proc, n, lambda: bench.unsettled(db) == 0, f"{n} rows to settle")
    return {"rows": n, **timed}


def ordering(bench: Bench, s: dict[str, Any]) -> dict[str, Any]:
    rounds = []
    for i in range(s["isolation_rounds"]):
        order = (False, True) if i % 2 == 0 else (True, False)
        one = {("on" if o else "off"): ordered_drain(bench, o, s) for o in order}
        rounds.append(one)
    result: dict[str, Any] = {"rounds": rounds}
    for metric in ("rows_per_s", "cpu_us_per_row", "pg_cpu_us_per_row"):
        for variant in ("on", "off"):
            result[f"{variant}_{metric}"] = statistics.median(r[variant][metric] for r in rounds)
        result[f"ratio_{metric}"] = statistics.median(
            r["on"][metric] / r["off"][metric] for r in rounds
        )
    return result


def ordering_markdown(res: dict[str, Any] | None, s: dict[str, Any]) -> list[str]:
    if not res:
        return []
    per_round = ", ".join(
        f"{r['on']['rows_per_s'] / r['off']['rows_per_s']:.2f}" for r in res["rounds"]
    )
    rows = [
        ("without ordering_key", "off"),
        ("ordering_key, 1,000 keys", "on"),
    ]
    lines = [
        "",
        f"## Per-key ordering ({s['isolation_rows']:,} rows over {ORDER_KEYS:,} keys, the demo's "
        f"queue)",
        "",
        "| | rows/s | relay CPU µs per delivery | PostgreSQL CPU µs per delivery |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, v in rows:
        lines.append(
            f"| {label} | {res[f'{v}_rows_per_s']:,.0f} | {res[f'{v}_cpu_us_per_row']:.0f} | "
            f"{res[f'{v}_pg_cpu_us_per_row']:.0f} |"
        )
    lines += [
        f"| ratio (median of rounds) | {res['ratio_rows_per_s']:.2f} | "
        f"{res['ratio_cpu_us_per_row']:.2f} | {res['ratio_pg_cpu_us_per_row']:.2f} |",
        "",
        f"Per round, rows/s with ordering / without: {per_round}.",
    ]
    return lines


def markdown(res: dict[str, Any] | None, s: dict[str, Any]) -> list[str]:
    if not res:
        return []
    n = s["isolation_rows"]
    per_round = ", ".join(f"{x:.2f}" for x in res["rows_per_s_ratio"])
    late = ", ".join(f"{x:.2f}" for x in res["late_ratio"])
    return [
        "",
        f"## One endpoint hanging ({n:,} rows for a healthy endpoint, alone and with "
        f"{n // 10:,} more for an endpoint that never answers)",
        "",
        "| | healthy rows/s | relay CPU µs per healthy delivery |",
        "| --- | ---: | ---: |",
        f"| alone | {res['alone_rows_per_s']:,.0f} | {res['alone_cpu_us']:.0f} |",
        f"| next to a hanging endpoint | {res['hanging_rows_per_s']:,.0f} | "
        f"{res['hanging_cpu_us']:.0f} |",
        f"| ratio (median of rounds) | {res['rows_per_s_ratio_median']:.2f} | "
        f"{res['cpu_ratio_median']:.2f} |",
        f"| next to an endpoint that answers {LATE_AFTER} requests, then hangs | "
        f"{res['late_rows_per_s']:,.0f} (ratio {res['late_ratio_median']:.2f}) | |",
        f"| control: the same extra rows, not due for an hour | "
        f"{res['not_due_rows_per_s']:,.0f} (ratio {res['not_due_ratio_median']:.2f}) | |",
        "",
        f"Per round, healthy rows/s next to the hanging endpoint / alone: {per_round}; with the "
        f"extra rows never claimable (the cost of sharing the table, no endpoint involved): "
        f"{', '.join(f'{x:.2f}' for x in res['not_due_ratio'])}; next to the endpoint that "
        f"hangs after {LATE_AFTER} requests: {late}. The "
        f"hanging endpoint's rows attempted by the time the healthy ones were done (median): "
        f"{res['hanging_attempted']:.0f} (its cap of requests in flight; the others waited "
        f"or were deferred, no attempt counted).",
    ]
