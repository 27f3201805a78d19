"""The "leases" workload's tables: a delivery queue with a realistic history (issue 9).

`make bench` drains the same history four ways, through two kinds of source (`sources`):

(a) in place: relay's own outbox (kind = "outbox", relay.outbox), where relay owns every column
    and claims a row by writing its status and due time;
(b) leases: the user's table (kind = "table", the demo's mapping QUEUE_SOURCE) taken as it is:
    its `due` column (next_retry_at) only read, relay's claims, their expiry and its attempt
    count in `relay.leases`; the mapping also writes `processing` and the attempt count into
    the row when it claims it, as system 2's own workers did;
(c) lean: the same table and leases, nothing written into the row at claim time (the attempt
    count and the retry time written back with the outcome): the leases path on its own;
(d) in the row: the same table and mapping as (b) with one column more, `relay_lease`, given to
    relay (`lease_column`): claims are kept in the row, in place, and relay.leases is not used.
    (b) against (d) is the leases path against claiming in place, all else equal.

The history is the demo's `webhook_delivery_queue` (system 2 of MISSION.md) with the indexes
such a queue has in production, filled like one that has run for a while: most rows delivered
long ago, some dead letters, and a tail of pending rows and failed rows waiting for a retry that
fell due (these are what the workload drains). (a) gets the same rows, in the same order, with
the same payloads, copied into relay.outbox as relay.publish() and relay's settles would have
left them (the queue table then emptied); (b) and (c) keep them in the user's table, and the failed
rows, tried by relay before, have the lease relay left them: waiting for a retry that has fallen
due. Everything is VACUUM ANALYZEd, as autovacuum would have left it.
"""

from __future__ import annotations

from typing import Any

from relay.demo import QUEUE_SOURCE

MAPPINGS = ("in_place", "leases", "lean", "in_row")


def sources(target: str) -> dict[str, dict[str, Any]]:
    """The source of each mapping: "in_place" (a) relay's outbox, every topic to the bench
    receiver; "leases" (b) the demo's mapping of the queue table (each row names its URL),
    which writes `processing` and the attempt count into the row at claim time; "lean" (c) the
    same table with nothing written at claim: the claim is only relay's lease, the attempt
    count and the retry time are written back with the outcome."""
    lean = {k: v for k, v in QUEUE_SOURCE.items() if k not in ("processing", "attempts")}
    lean["on_success"] = {"attempt_count": "attempt.number"}
    lean["on_failure"] = {"attempt_count": "attempt.number", "next_retry_at": "attempt.next_at"}
    return {
        "in_place": {"kind": "outbox", "topics": {"*": target}},
        "leases": dict(QUEUE_SOURCE),
        "lean": lean,
        "in_row": {**QUEUE_SOURCE, "lease_column": "relay_lease"},
    }


# What a production queue of this shape is indexed by: the primary key, the workers' "what is
# waiting" partial index (the demo table's own), status with the retry time (the poll of
# a hand-written worker, and `get_webhook_queue_stats()`), and creation time (the cleanup of
# old delivered rows, `cleanup_delivered_webhooks(days)`).
INDEXES = """
CREATE INDEX IF NOT EXISTS webhook_delivery_queue_status_retry_idx
    ON public.webhook_delivery_queue (status, next_retry_at);
CREATE INDEX IF NOT EXISTS webhook_delivery_queue_created_idx
    ON public.webhook_delivery_queue (created_at);
"""

# %(rows)s rows, one every 30 s of history (300,000 rows: about 100 days). The last %(drain)s
# are waiting: 80% pending (never tried), 20% failed with a retry time that has passed. Before
# them, %(dead_pct)s% dead letters spread through the history; the rest delivered, a few after
# a retry or two.
FILL = """
INSERT INTO public.webhook_delivery_queue
    (url, event_type, payload, status, attempt_count, max_attempts, next_retry_at, last_error,
     last_response_status, created_at, delivered_at)
SELECT %(target)s,
       (ARRAY['order.created', 'order.paid', 'invoice.sent', 'customer.updated'])[1 + g %% 4],
       jsonb_build_object('id', g, 'type', 'order', 'order',
                          jsonb_build_object('number', 'SO-' || g, 'total', (g * 37) %% 10000,
                                             'currency', 'EUR', 'lines', 1 + g %% 5)),
       w.status, w.attempts, 5,
       CASE WHEN w.status = 'failed' THEN now() - make_interval(secs => 1 + g %% 600)
            WHEN w.attempts > 1 THEN created END,
       CASE WHEN w.status IN ('failed', 'dead_letter') THEN 'HTTP 503: Service Unavailable' END,
       CASE w.status WHEN 'delivered' THEN 200 WHEN 'pending' THEN NULL ELSE 503 END,
       created,
       CASE WHEN w.status = 'delivered' THEN created + make_interval(secs => w.attempts) END
FROM generate_series(1, %(rows)s) AS g,
     LATERAL (SELECT now() - make_interval(secs => 30.0 * (%(rows)s - g)) AS created,
                     (g::int8 * 7919) %% 1000 AS h) AS r,
     LATERAL (SELECT CASE WHEN g > %(rows)s - %(drain)s THEN
                              CASE WHEN h < 200 THEN 'failed' ELSE 'pending' END
                          WHEN h < %(dead_pct)s * 10 THEN 'dead_letter'
                          ELSE 'delivered' END AS status) AS s,
     LATERAL (SELECT CASE s.status WHEN 'pending' THEN 0
                                   WHEN 'dead_letter' THEN 5
                                   WHEN 'failed' THEN 1 + h %% 3
                                   ELSE 1 + (h %% 50 = 0)::int + (h %% 200 = 0)::int END
                         AS attempts, s.status) AS w
"""

# (a): the history as relay.outbox holds it. Waiting rows are pending there whether tried or
# not (the outbox has no retry status): a retried one with its attempts and its retry time
# (due_at, fallen due). A settled row keeps the due time of its last claim; dead is `dead`.
OUTBOX = """
INSERT INTO relay.outbox
    (topic, payload, status, attempts, max_attempts, due_at, last_error, last_status,
     created_at, delivered_at)
SELECT q.event_type, q.payload,
       CASE q.status WHEN 'failed' THEN 'pending' WHEN 'dead_letter' THEN 'dead'
                     ELSE q.status END,
       q.attempt_count, q.max_attempts,
       CASE WHEN q.status = 'pending' THEN q.created_at
            WHEN q.status = 'failed' THEN q.next_retry_at
            ELSE coalesce(q.delivered_at, q.created_at) + interval '30 seconds' END,
       q.last_error, q.last_response_status, q.created_at, q.delivered_at
FROM public.webhook_delivery_queue AS q
ORDER BY q.id;
TRUNCATE public.webhook_delivery_queue;
"""

# (b): the leases relay left for the failed rows it tried before: waiting for a retry that has
# fallen due (no claim token), with relay's attempt count and the status it left the row in.
# Rows settled done or dead have none (their leases went at settle).
LEASES = """
INSERT INTO relay.leases (source, key, due, token, attempts, status)
SELECT %(source)s, id::text, next_retry_at, NULL, attempt_count, status
FROM public.webhook_delivery_queue WHERE status = 'failed'
ON CONFLICT (source, key) DO NOTHING
"""

# (d): relay's column, added before relay is installed; the failed rows tried before hold the
# retry time relay left there (fallen due).
LEASE_COLUMN = "ALTER TABLE public.webhook_delivery_queue ADD COLUMN relay_lease timestamptz"
ROW_LEASES = """
UPDATE public.webhook_delivery_queue SET relay_lease = next_retry_at WHERE status = 'failed'
"""

# Rows not settled yet, read through an index: the harness polls it every 50 ms, so it must not
# scan the table (on relay.outbox, `status IN (...)` is a sequential scan of 31 ms, a third of a
# core, while each status alone is its partial index's).
WAITING = {
    "in_place": "SELECT (SELECT count(*) FROM relay.outbox WHERE status = 'pending') "
    "+ (SELECT count(*) FROM relay.outbox WHERE status = 'processing')",
    "leases": "SELECT count(*) FROM public.webhook_delivery_queue "
    "WHERE status IN ('pending', 'failed', 'processing')",
}
WAITING["lean"] = WAITING["in_row"] = WAITING["leases"]


def fill_params(target: str, rows: int, drain: int, dead_pct: int = 2) -> dict[str, Any]:
    return {"target": target, "rows": rows, "drain": drain, "dead_pct": dead_pct}
