"""The "leases" workload's table: a user's delivery queue with a realistic history (issue 9).

`make bench` drains the same table twice, on two mappings of one source (`mappings`):

(a) in place: relay keeps its claim in a column of the user's table;
(b) leases: the table is mapped without that column, so claims, their expiry and relay's retry
    times live in `relay.leases`.

The table is the demo's `webhook_delivery_queue` (system 2 of MISSION.md) with the indexes such
a queue has in production, filled like one that has run for a while: most rows delivered long
ago, some dead letters, and a tail of pending rows and failed rows waiting for a retry that fell
due (these are what the workload drains). The failed rows were tried by relay before, so on the
leases mapping they have a lease whose time has passed. Everything is VACUUM ANALYZEd, as
autovacuum would have left it.
"""

from __future__ import annotations

from typing import Any

from relay.demo import QUEUE_SOURCE

# The in-place claim column. Today (main at the branch point) the `due` key is both "not before"
# and the claim's expiry; after issue 9, `due` is only read and the in-place claim is mapped with
# `claim_column`. Switch here, and nowhere else:
#   IN_PLACE_CLAIM = {"claim_column": "next_retry_at"}
IN_PLACE_CLAIM: dict[str, Any] = {"due": "next_retry_at"}


def mappings() -> dict[str, dict[str, Any]]:
    """The source's two mappings: "in_place" (a) and "leases" (b); the same in every other key."""
    base = {k: v for k, v in QUEUE_SOURCE.items() if k not in ("due", "claim_column")}
    return {"in_place": {**base, **IN_PLACE_CLAIM}, "leases": base}


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

# %(rows)s rows, one every 30 s of history (100,000 rows: about 35 days). The last %(drain)s
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
                     (g * 7919) %% 1000 AS h) AS r,
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

# Leases relay left for the failed rows it tried before (mapping (b) only): due, not held.
LEASES = """
INSERT INTO relay.leases (source, key, due)
SELECT %(source)s, id::text, next_retry_at
FROM public.webhook_delivery_queue WHERE status = 'failed'
ON CONFLICT (source, key) DO NOTHING
"""

# Rows not settled yet, read through the (status, next_retry_at) index: the harness polls it
# every 50 ms, so it must not scan the table.
WAITING = (
    "SELECT count(*) FROM public.webhook_delivery_queue "
    "WHERE status IN ('pending', 'failed', 'processing')"
)


def fill_params(target: str, rows: int, drain: int, dead_pct: int = 2) -> dict[str, Any]:
    return {"target": target, "rows": rows, "drain": drain, "dead_pct": dead_pct}
