"""relay vs Graphile Worker (issue 13): the peer, its install, its SQL and the report's section.

Graphile Worker (the npm package `graphile-worker`, pinned in bench/graphile/package-lock.json)
runs from bench/graphile/runner.cjs with the task bench/graphile/tasks/deliver.js, which POSTs
each job's payload to its url (the bench receiver) as relay does a row of the demo's queue. It is
installed into bench/graphile/node_modules by `npm ci` when node and npm are on PATH; when they
are not, or the install fails, `install()` says why and the bench reports Graphile Worker as
"not measured" and goes on.

Jobs are added the way Graphile Worker's users add them from SQL, one `graphile_worker.add_job`
per row in the producer's own transaction (`ADD_JOB`), where relay's producer INSERTs one row
into `webhook_delivery_queue`: in both, one row per delivery is written into the table the
deliverer claims from, in one statement of the writing transaction, and that write wakes the
deliverer (relay's trigger NOTIFYs; add_job NOTIFYs `jobs:insert`). A trigger on the queue table
calling add_job would make Graphile Worker's writers pay for two rows per delivery, one of them
never read.

Everything here is pure (settings, SQL, install, the summary and the Markdown); bench/run.py runs
the rounds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

GRAPHILE_DIR = Path(__file__).resolve().parent / "graphile"
RUNNER = GRAPHILE_DIR / "runner.cjs"

# Graphile Worker's performance preset: the configuration its documentation gives for its
# "quick stats" (website/docs/performance.md, "Quick stats" and "With batching"): 24 jobs at
# once, a pool of 25, the local queue (0.17) fetching up to 500 jobs per query, and completions
# and failures batched (a delay of 0: whatever finished in the same tick goes in one query).
# Left at their defaults (src/config.ts), as that configuration leaves them: pollInterval 2000 ms
# (only a fallback: a LISTEN on `jobs:insert` wakes the worker), preparedStatements true,
# useNodeTime false (PostgreSQL's clock; the same machine, so moot). NO_LOG_SUCCESS=1, as its
# performance test (perfTest/run.js) runs it: no log line per completed job, like relay at INFO.
# BENCH_GRAPHILE='{"concurrentJobs": 20}' (JSON) overrides, like BENCH_RELAY.
GRAPHILE_SETTINGS: dict[str, Any] = {
    "concurrentJobs": 24,
    "maxPoolSize": 25,
    "localQueue": {"size": 500},
    "completeJobBatchDelay": 0,
    "failJobBatchDelay": 0,
    **json.loads(os.environ.get("BENCH_GRAPHILE", "{}")),
}

# Graphile Worker's default max_attempts is 25; the demo queue's is 5, so retries count alike.
ADD_JOB = (
    "SELECT graphile_worker.add_job('deliver', "
    "json_build_object('url', %(url)s::text, 'payload', %(payload)s::json), max_attempts => 5)"
)
# relay's own outbox, the queue of relay's that Graphile Worker's jobs table compares with: a
# row per event in the writer's transaction (as relay.publish does; its source sends every
# topic to the receiver, the URL being in relay's configuration, not in the row).
PUBLISH = "INSERT INTO relay.outbox (topic, payload) VALUES ('bench', %(payload)s::jsonb)"
OUTBOX_BACKLOG = (
    "INSERT INTO relay.outbox (topic, payload) "
    "SELECT 'bench', jsonb_build_object('n', g) FROM generate_series(1, %s) g"
)
OUTBOX_UNSETTLED = "SELECT count(*) FROM relay.outbox WHERE status IN ('pending', 'processing')"
# The drain's backlog, in one statement as relay's (an INSERT ... SELECT): the same jobs through
# add_jobs, Graphile Worker's bulk form (20,000 add_job calls took 15 s of the bench's time).
ADD_JOBS_BACKLOG = (
    "SELECT count(*) FROM graphile_worker.add_jobs(ARRAY("
    "SELECT ROW('deliver', json_build_object('url', %s::text, 'payload', "
    "json_build_object('n', g)), NULL, NULL, 5, NULL, NULL, NULL)::graphile_worker.job_spec "
    "FROM generate_series(1, %s) g))"
)
# Completed jobs are deleted; a job still locked (running, in a local queue, or completed and
# waiting for its batched release) or with attempts left is not settled yet; one out of
# attempts is dead.
UNSETTLED = (
    "SELECT count(*) FROM graphile_worker._private_jobs "
    "WHERE locked_at IS NOT NULL OR attempts < max_attempts"
)

PEERS = ("relay", "outbox", "graphile", "reference")
LABELS = {
    "relay": "relay, your table",
    "outbox": "relay, its outbox",
    "graphile": "Graphile Worker",
    "reference": "reference loop",
}
MINE = ("relay", "outbox")  # the peers that are relay


def env(db: str) -> dict[str, str]:
    """What runner.cjs reads, on top of the bench's environment."""
    return {
        "DATABASE_URL": db,
        "NO_LOG_SUCCESS": "1",
        "BENCH_GRAPHILE_PRESET": json.dumps(GRAPHILE_SETTINGS),
        # The task's keep-alive agent: as many sockets as jobs run at once.
        "BENCH_GRAPHILE_SOCKETS": str(GRAPHILE_SETTINGS.get("concurrentJobs", 1)),
    }


def installed_version() -> str | None:
    path = GRAPHILE_DIR / "node_modules" / "graphile-worker" / "package.json"
    try:
        version: str = json.loads(path.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None
    return version


def locked_version() -> str | None:
    try:
        lock = json.loads((GRAPHILE_DIR / "package-lock.json").read_text())
        version: str = lock["packages"]["node_modules/graphile-worker"]["version"]
    except (OSError, ValueError, KeyError):
        return None
    return version


def install(timeout: float = 300.0) -> tuple[str | None, str]:
    """Graphile Worker in bench/graphile/node_modules: `npm ci` (or `npm install` without a
    lock) unless the locked version is already there. (version, "") or (None, why not)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = [name for name, path in (("node", node), ("npm", npm)) if path is None]
        return None, f"node and npm are needed: {' and '.join(missing)} not found on PATH"
    wanted = locked_version()
    have = installed_version()
    if have is None or (wanted is not None and have != wanted):
        verb = "ci" if wanted is not None else "install"
        try:
            done = subprocess.run(
                [npm, verb, "--prefer-offline", "--fetch-retries=1", "--no-audit", "--no-fund"],
                cwd=GRAPHILE_DIR,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"npm {verb} failed: {exc!r}"[:500]
        if done.returncode != 0:
            said = [line.strip() for line in (done.stderr or done.stdout).splitlines()]
            head = "; ".join(line for line in said if line)[:300]
            return None, f"npm {verb} exited {done.returncode}: {head}"
        have = installed_version()
        if have is None:
            return None, f"npm {verb} left no node_modules/graphile-worker"
    node_version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    return f"{have} (node {node_version})", ""


# -- summary and report -------------------------------------------------------------------------


def ratios(rounds: list[dict[str, Any]], key: str, a: str, b: str) -> list[float]:
    """a's `key` over b's, per round, where both have one."""
    out = []
    for one in rounds:
        x, y = one.get(a, {}).get(key), one.get(b, {}).get(key)
        if x is not None and y:
            out.append(x / y)
    return out


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(
    rounds: dict[str, list[dict[str, Any]]], latencies: dict[str, list[float]], peers: list[str]
) -> dict[str, Any]:
    """Medians over the rounds per peer and workload, latency percentiles over every round's
    rows pooled, and relay/Graphile (and relay/reference) per round with their medians."""
    out: dict[str, Any] = {"peers": {}, "ratios": {}}
    for peer in peers:
        one: dict[str, Any] = {}
        ms = sorted(latencies.get(peer, []))
        if ms:
            one["latency"] = {
                "rows": len(ms),
                "p50_ms": ms[round(0.5 * (len(ms) - 1))],
                "p99_ms": ms[round(0.99 * (len(ms) - 1))],
                "max_ms": ms[-1],
                "p50_ms_per_round": [r[peer]["p50_ms"] for r in rounds["latency"] if peer in r],
                "p99_ms_per_round": [r[peer]["p99_ms"] for r in rounds["latency"] if peer in r],
            }
        for workload in ("drain", "live"):
            runs = [r[peer] for r in rounds.get(workload, []) if peer in r]
            if not runs:
                continue
            keys = sorted({k for run in runs for k, v in run.items() if isinstance(v, int | float)})
            one[workload] = {
                k: median([run[k] for run in runs if run.get(k) is not None]) for k in keys
            }
            one[workload]["rows_per_s_per_round"] = [run["rows_per_s"] for run in runs]
        out["peers"][peer] = one
    for mine in MINE:
        if mine not in peers:
            continue
        for other in ("graphile", "reference"):
            if other in peers:
                out["ratios"][f"{mine}_over_{other}"] = _ratios(rounds, out, mine, other)
    return out


def _ratios(
    rounds: dict[str, list[dict[str, Any]]], out: dict[str, Any], mine: str, other: str
) -> dict[str, Any]:
    r: dict[str, Any] = {}
    for workload, key in (
        ("drain", "rows_per_s"),
        ("drain", "worker_cpu_s_per_1k"),
        ("drain", "pg_cpu_s_per_1k"),
        ("drain", "receiver_cpu_s_per_1k"),
        ("drain", "worker_pg_cpu_s_per_1k"),
        ("drain", "total_cpu_s_per_1k"),
        ("drain", "statements_per_1k"),
        ("drain", "peak_rss_mb"),
        ("live", "rows_per_s"),
        ("live", "worker_cpu_s_per_1k"),
        ("latency", "p50_ms"),
        ("latency", "p99_ms"),
    ):
        per_round = ratios(rounds.get(workload, []), key, mine, other)
        r[f"{workload}_{key}"] = {"median": median(per_round), "per_round": per_round}
    for p in ("p50_ms", "p99_ms"):
        x = out["peers"][mine].get("latency", {}).get(p)
        y = out["peers"][other].get("latency", {}).get(p)
        r[f"latency_{p}_pooled"] = x / y if x is not None and y else None
    return r


def _f(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def markdown(res: dict[str, Any] | None, s: dict[str, Any]) -> list[str]:
    """The section "relay vs Graphile Worker": one line per peer, relay/Graphile per column."""
    if res is None:
        return []
    lines = ["", "## relay vs Graphile Worker", ""]
    graphile = res.get("graphile_version")
    if graphile is None:
        lines += [f"Graphile Worker: **not measured** ({res.get('not_measured', '?')}).", ""]
    failed = res.get("graphile_errors") or {}
    if failed:
        lines += ["Graphile Worker runs that failed (left out of its figures):", ""]
        lines += [f"- {k}: {v}" for k, v in failed.items()] + [""]
    summary = res.get("summary")
    if not summary:
        return lines
    peers: list[str] = res["peers"]
    n, rounds = s["versus_drain_rows"], s["versus_rounds"]
    lines += [
        f"{rounds} interleaved rounds (in order, then reversed; a fresh database each run); "
        "medians over the rounds, latency percentiles over every round's rows; "
        "the relay / … lines are the medians of the per-round ratios (latency: the ratios of "
        "the pooled percentiles). CPU per 1,000 deliveries and peak RSS are from the drain.",
        "",
        f"| | commit → receiver p50 / p99 ms | {n:,}-row drain, deliveries/s "
        f"| {s['versus_live_rows']:,} inserted while running, deliveries/s "
        "| worker CPU s per 1,000 | PostgreSQL CPU s per 1,000 | receiver CPU s per 1,000 "
        "| worker + PostgreSQL | statements per 1,000 | peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = [p for p in ("graphile", "outbox", "relay", "reference") if p in peers]
    for peer in order:
        one = summary["peers"].get(peer, {})
        lat, dr, lv = one.get("latency", {}), one.get("drain", {}), one.get("live", {})
        cells = [
            f"{_f(lat.get('p50_ms'), 2)} / {_f(lat.get('p99_ms'), 1)}",
            _f(dr.get("rows_per_s")),
            _f(lv.get("rows_per_s")),
            _f(dr.get("worker_cpu_s_per_1k"), 3),
            _f(dr.get("pg_cpu_s_per_1k"), 3),
            _f(dr.get("receiver_cpu_s_per_1k"), 3),
            _f(dr.get("worker_pg_cpu_s_per_1k"), 3),
            _f(dr.get("statements_per_1k")),
            _f(dr.get("peak_rss_mb")),
        ]
        lines.append(f"| {LABELS[peer]} | " + " | ".join(cells) + " |")
    for mine, other in [(m, o) for m in MINE for o in ("graphile", "reference")]:
        r = summary["ratios"].get(f"{mine}_over_{other}")
        if r is None:
            continue

        def m(key: str, r: dict[str, Any] = r) -> str:
            v = r.get(key)
            v = v.get("median") if isinstance(v, dict) else v
            return "-" if v is None else f"{v:.2f}"

        lines.append(
            f"| {LABELS[mine]} / {LABELS[other]} | {m('latency_p50_ms_pooled')} / "
            f"{m('latency_p99_ms_pooled')} | {m('drain_rows_per_s')} | {m('live_rows_per_s')} | "
            f"{m('drain_worker_cpu_s_per_1k')} | {m('drain_pg_cpu_s_per_1k')} | "
            f"{m('drain_receiver_cpu_s_per_1k')} | {m('drain_worker_pg_cpu_s_per_1k')} | "
            f"{m('drain_statements_per_1k')} | {m('drain_peak_rss_mb')} |"
        )
    for mine in MINE:
        r = summary["ratios"].get(f"{mine}_over_graphile")
        if r is None:
            continue

        def per_round(key: str, r: dict[str, Any] = r) -> str:
            return ", ".join(f"{v:.2f}" for v in r[key]["per_round"]) or "-"

        lines += [
            "",
            f"{LABELS[mine]} / Graphile Worker per round: drain {per_round('drain_rows_per_s')}; "
            f"inserted while running {per_round('live_rows_per_s')}; "
            f"worker + PostgreSQL CPU per delivery {per_round('drain_worker_pg_cpu_s_per_1k')}.",
        ]
    drains = {p: summary["peers"].get(p, {}).get("drain", {}) for p in order}
    if any(drains.values()):
        lines += [
            "",
            "Drain, % of one core (the machine has "
            f"{os.cpu_count()}) for the deliverer / PostgreSQL / the receiver: "
            + "; ".join(
                f"{LABELS[p]} {_f(v.get('worker_cpu_pct_of_core'))} / "
                f"{_f(v.get('pg_cpu_pct_of_core'))} / {_f(v.get('receiver_cpu_pct_of_core'))}"
                for p, v in drains.items()
            )
            + ".",
        ]
    live = {p: summary["peers"].get(p, {}).get("live", {}) for p in order}
    if any(live.values()):
        lines += [
            "",
            "Inserted while running, the producer's own rate (rows committed per second, "
            "its start-up included) / the deliverer's CPU s per 1,000 / commit → receiver "
            "p50 ms: "
            + "; ".join(
                f"{LABELS[p]} {_f(v.get('producer_rows_per_s'))} / "
                f"{_f(v.get('worker_cpu_s_per_1k'), 3)} / {_f(v.get('latency_p50_ms'), 1)}"
                for p, v in live.items()
            )
            + ".",
        ]
    if graphile is not None:
        lines += [
            "",
            f"Graphile Worker {graphile} with {json.dumps(res.get('graphile_settings'))} "
            "(its documented performance preset; NO_LOG_SUCCESS=1); jobs added with "
            "`graphile_worker.add_job('deliver', …, max_attempts => 5)`, one per row in the "
            "producer's transaction, where relay's and the reference's producer INSERT a row "
            "into webhook_delivery_queue (relay, your table: the demo's mapping, claims in "
            "relay.leases) or into relay.outbox (relay, its outbox: claimed in place).",
        ]
    lines += [
        "",
        "Latency: "
        f"{s['versus_latency_rows']} rows a round, one per transaction, "
        f"{s['pace_s'] * 1000:.0f} ms apart, from the producer's commit returning to the "
        "receiver having the request. Drain: the backlog committed first, deliveries/s from "
        "the deliverer listening to the last row settled. Inserted while running: one row per "
        "transaction from one connection, unpaced, from the first insert to the last settled. "
        "CPU: user + system seconds of the deliverer's process, of every PostgreSQL process "
        "and of the receiver over the drain; statements: pg_stat_statements over the drain, "
        "the deliverer's start-up included.",
    ]
    return lines
