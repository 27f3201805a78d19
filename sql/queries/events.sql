-- Named queries for relay's own event tables (relay.outbox, relay.documenso_events), claimed in
-- place: relay owns every column there. relay.sources.events fills the braces with quoted
-- identifiers, literals and types (psycopg.sql); %(name)s are parameters. {now} is now() for timestamptz columns and now() AT TIME ZONE 'UTC' for
-- timestamp columns, which by convention hold UTC.

-- name: claim
-- Take up to %(limit)s claimable rows in one short transaction. The inner SELECT locks with
-- SKIP LOCKED so concurrent relays never take the same row; `= ANY(ARRAY(...))` keeps the index
-- scan a CTE or join loses after ANALYZE. Attempts count here, at claim time, so a row that
-- crashes the relay cannot loop forever. The new due time is the claim's expiry and its token.
-- {bounded} returns the URL, secret, topic and payload only if they are within their limits,
-- and says which are not: relay never loads a value it will not send. It reads them from the
-- UPDATE's result, so that each (a payload built from the whole row, say) is computed once.
-- `since` is when the row was written (created_at: the writing transaction's now()), for the
-- commit-to-delivered histogram of /metrics.
-- With an ordering key, {ordering_from} computes each candidate's key and {head} keeps only a
-- key's first unfinished row (none while that one is in flight or waits for its retry): one
-- index probe per candidate (relay.sources.events.install_ordering).
-- {after} and {skip} are empty, or in the claim's versions that have them: only ids after the
-- claim pass's cursor; not the rows of topics whose endpoint cannot take them now
-- (relay.sources.base.claim_versions).
-- The limit is a parameter on purpose: PostgreSQL then plans each claim for the table as it
-- is now (a cached generic plan, made while the table was small, would go on scanning it
-- whole after it grew, until autovacuum invalidated the plan). Planning costs 0.4-0.6 ms a
-- claim; a claim takes up to batch_size rows.
WITH claimed AS (
    UPDATE {table} AS t
    SET {status} = {processing},
        {due} = {now} + make_interval(secs => %(lease_seconds)s::float8),
        {attempts} = COALESCE(t.{attempts}, 0) + 1
    WHERE t.{key} = ANY(ARRAY(
        SELECT c.{key} FROM {table} AS c{ordering_from}
        WHERE c.{status} IN ({pending}) AND (c.{due} IS NULL OR c.{due} <= {now}){after}{skip}{head}
        ORDER BY c.{key}
        LIMIT %(limit)s
        FOR UPDATE OF c SKIP LOCKED))
    RETURNING {returning_named}
)
SELECT c.key, c.lease, c.attempt, c.max_attempts, {bounded}, c.since FROM claimed AS c;

-- name: settle
-- Settle a batch in one statement. The batch is one JSON array of objects (Store.settle): one
-- orjson call instead of six typed arrays dumped element by element, half the client's CPU.
-- The keys come again as an array for `= ANY`, an index condition whose cost the planner sizes
-- by the array: joined only on json_to_recordset (which it guesses at 100 rows), a table of
-- ~20k rows with few "processing" in its statistics got a sequential scan per settle. Each row is touched only if this worker still owns it:
-- still processing, with the due time its claim set. A late settle after the claim expired and
-- another worker took the row over changes nothing.
UPDATE {table} AS t
SET {status} = CAST(CASE s.outcome
                        WHEN 'done' THEN {done}
                        WHEN 'retry' THEN {retry}
                        WHEN 'dead' THEN {dead}
                        ELSE {release} END AS {status_type}),
    {due} = CASE s.outcome
                WHEN 'retry' THEN {now} + make_interval(secs => s.delay)
                -- A row handed back unsent: claimable again at once (shutdown), or after the
                -- delay its endpoint asked for (relay.endpoints: busy, slow or paused).
                WHEN 'release' THEN {now} + make_interval(secs => s.delay)
                ELSE t.{due} END,
    {attempts} = CASE s.outcome WHEN 'release' THEN t.{attempts} - 1 ELSE t.{attempts} END
    {extra_sets}
FROM json_to_recordset(%(batch)s::json)
     AS s(key {key_type}, lease {due_type}, outcome text, delay float8, error text,
          http_status int4)
WHERE t.{key} = ANY(%(keys)b::{key_type}[])
  AND t.{key} = s.key AND t.{status} = {processing} AND t.{due} = s.lease
RETURNING t.{key};

-- name: rescue
-- Claims whose worker died: back to claimable once their expiry has passed.
UPDATE {table}
SET {status} = {retry}
WHERE {status} = {processing} AND {due} < {now};

-- name: next_due
-- Seconds until the earliest waiting row falls due (NULL if none). It may be negative: a row
-- that fell due after the claim ran, or one another relay holds; the claimer then looks again
-- shortly rather than at the next sweep.
SELECT EXTRACT(EPOCH FROM (min({due}) - {now}))::float8
FROM {table}
WHERE {status} IN ({pending}) AND {due} IS NOT NULL;

-- name: counts
SELECT {status}::text, count(*)::bigint FROM {table} GROUP BY 1 ORDER BY 1;

-- name: oldest_due
-- Seconds the longest-waiting claimable row has been due (NULL if none).
SELECT EXTRACT(EPOCH FROM ({now} - min(COALESCE({due}, {now}))))::float8
FROM {table}
WHERE {status} IN ({pending}) AND ({due} IS NULL OR {due} <= {now});

-- name: retry_dead
-- Dead rows back to claimable now, with a fresh attempt budget: all, those of %(keys)s, or
-- those created since %(since)s.
UPDATE {table}
SET {status} = {retry}, {due} = {now}, {attempts} = 0
WHERE {status} = {dead}
  AND (%(keys)s::text[] IS NULL OR {key} = ANY(%(keys)s::text[]::{key_type}[]))
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz);

-- name: dead
-- A page of dead rows, by key, after %(after)s: key, last error, last HTTP status, attempts,
-- and when the row was made.
SELECT {key}::text, last_error, last_status, {attempts}, created_at
FROM {table}
WHERE {status} = {dead} AND (%(after)s::text IS NULL OR {key} > %(after)s::text::{key_type})
ORDER BY {key}
LIMIT %(limit)s;
