-- Named queries for the `documenso_jobs` preset: Documenso's "BackgroundJob" table, claimed and
-- settled exactly as Documenso's local job runner does, so relay and that runner never both run
-- one job. The same names and result columns as source.sql, so the rest of relay is unchanged.
-- Placeholders: {table}, {webhook}, {call} (quoted names), {now} (UTC, for timestamp(3)
-- columns), {job_ids}, {pending_after}, {stuck_after}, {backoff} (literals from the config),
-- {status_type}, {bounded} (the claim's bounded values, see source.sql), {max_attempts} (a
-- job's attempts as the detected Documenso version makes them, from the row's columns).
--
-- Differences from a generic queue, forced by Documenso's schema: there is no due column, so
-- "updatedAt" (which Documenso's own claim also sets) is the claim's token, and a retry waits
-- {backoff} after "lastRetriedAt"; "retried" counts failures as Documenso counts them.

-- name: claim
WITH claimed AS (
    UPDATE {table} AS t
    SET "status" = 'PROCESSING', "updatedAt" = {now}
    WHERE t."id" = ANY(ARRAY(
        SELECT c."id" FROM {table} AS c
        WHERE c."status" = 'PENDING'
          AND c."jobId" = ANY({job_ids})
          AND c."submittedAt" <= {now} - {pending_after}
          AND (c."lastRetriedAt" IS NULL OR c."lastRetriedAt" + {backoff_c} <= {now})
        ORDER BY c."submittedAt", c."id"
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED))
    RETURNING t."id" AS key, t."updatedAt" AS lease, t."retried" + 1 AS attempt,
        {max_attempts} AS max_attempts,
        -- Looked up by id alone, as Documenso's handler does (a disabled one is called too).
        (SELECT w."webhookUrl" FROM {webhook} AS w
          WHERE t."jobId" = 'internal.execute-webhook'
            AND w."id" = t."payload"->>'webhookId') AS url,
        (SELECT COALESCE(w."secret", '') FROM {webhook} AS w
          WHERE t."jobId" = 'internal.execute-webhook'
            AND w."id" = t."payload"->>'webhookId') AS secret,
        t."jobId" AS topic,
        t."payload"::text AS payload,
        NULL::text AS values
)
SELECT c.key, c.lease, c.attempt, c.max_attempts, {bounded} FROM claimed AS c;

-- name: settle
-- done: COMPLETED. retry: back to PENDING with "retried" + 1. dead: FAILED once "retried"
-- reaches its last attempt. Each with the columns Documenso's runner sets; only if still ours.
UPDATE {table} AS t
SET "status" = CAST(CASE s.outcome
                        WHEN 'done' THEN 'COMPLETED'
                        WHEN 'dead' THEN 'FAILED'
                        ELSE 'PENDING' END AS {status_type}),
    "retried" = CASE s.outcome
                    WHEN 'retry' THEN t."retried" + 1
                    WHEN 'dead' THEN GREATEST(t."retried",
                                              LEAST(t."retried" + 1, {max_attempts} - 1))
                    ELSE t."retried" END,
    "lastRetriedAt" = CASE WHEN s.outcome IN ('retry', 'dead') THEN {now}
                           ELSE t."lastRetriedAt" END,
    "completedAt" = CASE WHEN s.outcome IN ('done', 'dead') THEN {now} ELSE t."completedAt" END,
    "updatedAt" = {now}
FROM json_to_recordset(%(batch)s::json)
     AS s(key text, lease timestamp, outcome text, delay float8, error text,
          http_status int4)
WHERE t."id" = ANY(%(keys)b::text[])
  AND t."id" = s.key AND t."status" = 'PROCESSING' AND t."updatedAt" = s.lease
RETURNING t."id";

-- name: record_calls
-- One "WebhookCall" row per attempt, as Documenso records them.
INSERT INTO {call} ("id", "status", "url", "requestBody", "responseCode", "responseHeaders",
                    "responseBody", "createdAt", "webhookId", "event")
SELECT 'relay_' || replace(gen_random_uuid()::text, '-', ''),
       CAST(c.status AS {call_status_type}), c.url, c.request::jsonb, c.code,
       c.headers::jsonb, c.body::jsonb, {now}, c.webhook, CAST(c.event AS {event_type})
FROM unnest(%(statuses)b::text[], %(urls)b::text[], %(requests)b::text[], %(codes)b::int4[],
            %(headers)b::text[], %(bodies)b::text[], %(webhooks)b::text[], %(events)b::text[])
     AS c(status, url, request, code, headers, body, webhook, event);

-- name: rescue
-- Jobs left PROCESSING by a runner that died (Documenso's or a relay): after {stuck_after}
-- their run counts as a failed attempt, and they are tried again or given up as FAILED.
UPDATE {table}
SET "status" = CAST(CASE WHEN "retried" + 1 >= {max_attempts} THEN 'FAILED' ELSE 'PENDING' END
                    AS {status_type}),
    "retried" = LEAST("retried" + 1, GREATEST({max_attempts} - 1, "retried")),
    "lastRetriedAt" = {now},
    "completedAt" = CASE WHEN "retried" + 1 >= {max_attempts} THEN {now} ELSE "completedAt" END,
    "updatedAt" = {now}
WHERE "status" = 'PROCESSING' AND "jobId" = ANY({job_ids})
  AND "updatedAt" < {now} - {stuck_after};

-- name: next_due
SELECT EXTRACT(EPOCH FROM (min(due) - {now}))::float8
FROM (SELECT GREATEST(c."submittedAt" + {pending_after},
                      COALESCE(c."lastRetriedAt" + {backoff_c}, c."submittedAt")) AS due
      FROM {table} AS c
      WHERE c."status" = 'PENDING' AND c."jobId" = ANY({job_ids})) AS waiting;

-- name: counts
SELECT "status"::text, count(*)::bigint FROM {table} WHERE "jobId" = ANY({job_ids})
GROUP BY 1 ORDER BY 1;

-- name: oldest_due
SELECT EXTRACT(EPOCH FROM ({now} - min("submittedAt")))::float8
FROM {table} WHERE "status" = 'PENDING' AND "jobId" = ANY({job_ids});

-- name: retry_dead
-- FAILED jobs back to PENDING with fresh retries: all, those of %(keys)s, or those that failed
-- since %(since)s ("completedAt" is set when a job ends FAILED).
UPDATE {table}
SET "status" = 'PENDING', "retried" = 0, "lastRetriedAt" = NULL, "completedAt" = NULL,
    "updatedAt" = {now}
WHERE "status" = 'FAILED' AND "jobId" = ANY({job_ids})
  AND (%(keys)s::text[] IS NULL OR "id" = ANY(%(keys)s::text[]))
  AND (%(since)s::timestamptz IS NULL
       OR "completedAt" >= (%(since)s::timestamptz AT TIME ZONE 'UTC'));

-- name: dead
-- A page of FAILED jobs, by id: Documenso keeps no error on the job (a webhook job's calls are
-- in "WebhookCall").
SELECT "id", NULL::text, NULL::int4, "retried" + 1, "completedAt" AT TIME ZONE 'UTC'
FROM {table}
WHERE "status" = 'FAILED' AND "jobId" = ANY({job_ids})
  AND (%(after)s::text IS NULL OR "id" > %(after)s::text)
ORDER BY "id"
LIMIT %(limit)s;
