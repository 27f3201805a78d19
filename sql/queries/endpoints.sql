-- Named queries for relay.endpoints (relay.endpoints module, relay.app.EndpointStates): targets
-- disabled by their answer, and endpoints paused by a relay's circuit breaker.

-- name: disabled
-- The newest %(limit)s (relay.endpoints.MAX_DISABLED, what a relay holds in memory): targets come
-- from rows, so the table is not bounded; what one relay reads of it is.
SELECT source, target, reason, since FROM relay.endpoints WHERE state = 'disabled'
ORDER BY since DESC LIMIT %(limit)s;

-- name: disable
-- The first relay to disable a target keeps its reason and time.
INSERT INTO relay.endpoints (state, target, source, reason)
VALUES ('disabled', %(target)s, %(source)s, %(reason)s)
ON CONFLICT DO NOTHING;

-- name: pause
INSERT INTO relay.endpoints (state, target, worker, reason, until)
VALUES ('paused', %(target)s, %(worker)s, %(reason)s,
        now() + make_interval(secs => %(seconds)s::float8))
ON CONFLICT (state, target, source, worker)
DO UPDATE SET reason = EXCLUDED.reason, until = EXCLUDED.until;

-- name: resume
DELETE FROM relay.endpoints
WHERE state = 'paused' AND target = %(target)s AND worker = %(worker)s;

-- name: resume_all
-- A relay stopping: its pauses end with it. A relay killed leaves them, shown as stale.
DELETE FROM relay.endpoints WHERE state = 'paused' AND worker = %(worker)s;

-- name: enable
-- The disabled targets of a source (all, or the one given) enabled again.
DELETE FROM relay.endpoints
WHERE state = 'disabled' AND source = %(source)s
  AND (%(target)s::text IS NULL OR target = %(target)s::text)
RETURNING target;

-- name: listed
-- For `relay status`: disabled targets, and pauses whose next probe is not long past (a pause
-- whose relay was killed stops showing a minute after its probe was due).
SELECT state, target, source, worker, reason, since, until,
       EXTRACT(EPOCH FROM (until - now()))::float8 AS resumes_in
FROM relay.endpoints
WHERE state = 'disabled' OR until > now() - interval '1 minute'
ORDER BY state, target, source, worker;
