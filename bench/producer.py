"""The benchmark's writer: inserts rows into webhook_delivery_queue from its own process.

`latency`: N rows, one committed transaction each, `--pace` seconds apart; each payload carries
{"lat": i, "sent": time before the INSERT}. Prints {"commits": {i: time.time() when the commit
returned}} as JSON, which the harness joins with the receiver's arrival times (same clock).
`--pace 0` writes as fast as one connection can (the "rows inserted while running" workload).
`--into graphile`: each transaction is `SELECT graphile_worker.add_job('deliver', {url,
payload})` instead of the INSERT (Graphile Worker's jobs, bench/versus.py); `--into outbox`: an
INSERT into relay.outbox; the same payloads.

`tps`: single-row INSERT transactions for `--seconds` from one connection; prints
{"inserts": n, "seconds": s, "tps": r}.
"""

from __future__ import annotations

import argparse
import time

import orjson
import psycopg

from bench.versus import ADD_JOB, PUBLISH

INSERT = "INSERT INTO webhook_delivery_queue (url, payload) VALUES (%(url)s, %(payload)s::jsonb)"
STATEMENTS = {"table": INSERT, "graphile": ADD_JOB, "outbox": PUBLISH}


def latency(db: str, target: str, n: int, pace: float, statement: str = INSERT) -> None:
    commits: dict[int, float] = {}
    with psycopg.connect(db, autocommit=True) as conn:
        for i in range(n):
            sent = time.time()
            payload = orjson.dumps({"lat": i, "sent": sent}).decode()
            conn.execute(statement, {"url": target, "payload": payload})
            commits[i] = time.time()
            if pace:
                time.sleep(pace)
    print(orjson.dumps({"commits": {str(k): v for k, v in commits.items()}}).decode())


def tps(db: str, target: str, seconds: float) -> None:
    done = 0
    with psycopg.connect(db, autocommit=True) as conn:
        start = time.monotonic()
        deadline = start + seconds
        while time.monotonic() < deadline:
            conn.execute(INSERT, {"url": target, "payload": '{"n": 0}'})
            done += 1
        elapsed = time.monotonic() - start
    print(orjson.dumps({"inserts": done, "seconds": elapsed, "tps": done / elapsed}).decode())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["latency", "tps"])
    p.add_argument("--db", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--pace", type=float, default=0.02)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument(
        "--into",
        choices=sorted(STATEMENTS),
        default="table",
        help="webhook_delivery_queue (table), Graphile Worker's jobs, or relay.outbox",
    )
    args = p.parse_args()
    if args.mode == "latency":
        latency(args.db, args.target, args.n, args.pace, STATEMENTS[args.into])
    else:
        tps(args.db, args.target, args.seconds)


if __name__ == "__main__":
    main()
