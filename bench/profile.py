"""Profile relay draining a backlog: `python -m bench.profile [--rows N]` (`make profile`).

Starts an embedded PostgreSQL and the benchmark's receiver as `bench.run` does, queues N pending
rows, then runs relay under py-spy until every row is settled. Writes the sampled stacks to
bench-results/profile-<timestamp>.txt (collapsed stacks: open them in speedscope.app, or feed
them to a flame graph tool) and prints where the time went: by part of relay (delivery workers,
settler, claimer, the event loop itself) and the functions with the most samples.

py-spy samples wall-clock time, so a process waiting for the CPU (two cores shared by relay,
PostgreSQL and the receiver) shows as time in whatever call was running; compare with the CPU
per delivery that `make bench` reports.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.run import PY, RESULTS, Bench, Procs, log, wait_until
from relay.embedded import EmbeddedPostgres

PARTS = (
    ("Deliverer._work", "delivery workers (HTTP)"),
    ("Settler.run", "settler"),
    ("Claimer.run", "claimer"),
    ("Listener.", "listener"),
)


def summarise(path: Path, top: int = 25) -> str:
    parts: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        part = next(
            (label for marker, label in PARTS if any(marker in f for f in frames)),
            "event loop, start-up and the rest",
        )
        parts[part] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "by part:"]
    lines += [f"  {100 * n / total:5.1f}%  {label}" for label, n in parts.most_common()]
    lines += ["", f"top {top} functions by own samples:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--rows", type=int, default=50_000, help="pending rows to drain")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: run `make install` (it is a dev dependency)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="relay-profile-"))
    pg = EmbeddedPostgres(workdir / "pgdata", fast_and_unsafe=True)
    procs = Procs(workdir)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"profile-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.txt"
    try:
        pg.start()
        bench = Bench(pg, procs, workdir)
        bench.prepare_templates()
        bench.start_receiver()
        db = bench.fresh_db()
        bench.insert_pending(db, bench.target, args.rows)
        spy_cmd = [spy, "record", "--format", "raw", "--rate", str(args.rate), "-o", str(out)]
        log(f"draining {args.rows:,} rows under py-spy")
        # Stopped with SIGINT: py-spy then writes its file and ends relay too.
        with bench.deliverer("relay", db, "profile", under=[*spy_cmd, "--"]):
            started = time.monotonic()
            wait_until(lambda: bench.unsettled(db) == 0, 600, f"{args.rows} rows to settle")
            seconds = time.monotonic() - started
    finally:
        procs.stop_all()
        with contextlib.suppress(Exception):
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{args.rows:,} rows in {seconds:.1f} s under py-spy ({args.rows / seconds:,.0f}/s)")
    print(summarise(out))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
