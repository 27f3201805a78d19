"""relay against an earlier version of itself, in one run: `python -m bench.ab --against REV`.

Each change to the delivery path is measured against its predecessor on the same machine, in
the same minutes: the earlier revision is checked out into a temporary git worktree and run from
there (same Python, same dependencies, same PostgreSQL, same receiver), and the two drain the
same n-row backlog of the demo's queue table in alternating rounds, each on a fresh database.
Prints, per variant, the median rows/s and relay's and PostgreSQL's CPU per delivery, and the
median of the per-round ratios (on a shared 2-core machine single drains move by ±20%; the
ratios within a round move much less).

    .venv/bin/python -m bench.ab --against HEAD~1 --rows 20000 --rounds 6

Nothing is asserted; a revision whose schema differs from the current one may not run.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import run
from relay.embedded import EmbeddedPostgres


def worktree(rev: str, into: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(run.ROOT), "worktree", "add", "--detach", str(into), rev],
        check=True,
        capture_output=True,
    )
    return into


def measure(bench: run.Bench, root: Path, rows: int, name: str, live: bool) -> dict[str, Any]:
    """One drain (or, `live`, rows inserted one per transaction while it runs) by relay run
    from `root` (its `relay` package)."""
    run.ROOT = root  # Procs start `python -m relay.cli` with this as the working directory
    if live:
        result = bench.live("relay", {"live_rows": rows})
        result["p50_ms"] = result["latency_ms"]["p50_ms"]
        return result
    return bench.drain("relay", rows, name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    p.add_argument("--against", required=True, help="the earlier git revision (e.g. HEAD~1)")
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument(
        "--live", action="store_true", help="rows inserted one per transaction while relay runs"
    )
    args = p.parse_args(argv)
    here = run.ROOT
    workdir = Path(tempfile.mkdtemp(prefix="relay-ab-"))
    old = workdir / "old"
    pg = EmbeddedPostgres(workdir / "pgdata", fast_and_unsafe=True)
    procs = run.Procs(workdir)
    results: dict[str, list[dict[str, Any]]] = {"new": [], "old": []}
    try:
        worktree(args.against, old)
        pg.start()
        bench = run.Bench(pg, procs, workdir)
        bench.prepare_templates()
        bench.start_receiver()
        for r in range(args.rounds):
            order = ("new", "old") if r % 2 == 0 else ("old", "new")
            for variant in order:
                root = here if variant == "new" else old
                got = measure(bench, root, args.rows, f"ab-{variant}-{r}", args.live)
                results[variant].append(got)
                run.log(
                    f"round {r + 1} {variant}: {got['rows_per_s']:,.0f} rows/s, relay "
                    f"{got['cpu_us_per_row']:.0f} µs per delivery"
                )
    finally:
        run.ROOT = here
        procs.stop_all()
        with contextlib.suppress(Exception):
            pg.stop()
        subprocess.run(
            ["git", "-C", str(here), "worktree", "remove", "--force", str(old)],
            capture_output=True,
        )
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(args.against, args.rows, results, args.live))
    return 0


def report(
    rev: str, rows: int, results: dict[str, list[dict[str, Any]]], live: bool = False
) -> str:
    new, old = results["new"], results["old"]
    rounds = min(len(new), len(old))
    what = f"{rows:,} rows inserted while running" if live else f"{rows:,}-row drain"
    lines = [
        f"{what}, {rounds} alternating rounds: this tree (new) against {rev} (old)",
        "",
        "| metric | old | new | new/old (median of rounds) |",
        "| --- | ---: | ---: | ---: |",
    ]
    keys = [("rows_per_s", "rows/s"), ("cpu_us_per_row", "relay CPU µs per delivery")]
    if live:
        keys.append(("p50_ms", "commit → receiver p50 ms"))
    else:
        keys.append(("pg_cpu_us_per_row", "PostgreSQL CPU µs per delivery"))
    for key, label in keys:
        o = statistics.median(x[key] for x in old[:rounds])
        n = statistics.median(x[key] for x in new[:rounds])
        ratio = statistics.median(new[i][key] / old[i][key] for i in range(rounds))
        lines.append(f"| {label} | {o:,.0f} | {n:,.0f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    t0 = time.monotonic()
    code = main()
    run.log(f"done in {time.monotonic() - t0:.0f} s")
    raise SystemExit(code)
