-- Named queries for a `table` source: a user's table taken as it is. relay's claims, their
-- expiry and its attempt count live in relay.leases, keyed by (source, key::text); the user's
-- columns keep what the application meant: `due` is only read, a processing status and an
-- attempts column are written only where the mapping names them.
--
-- A lease row is one of: claimed (token set, due = the claim's expiry), waiting for a retry
-- (token NULL, due = when the retry falls due, status = the status relay left the row in).
-- Settling done or dead deletes it, so a row the application puts back to pending is claimable
-- at once, with fresh attempts; so is a row waiting for a retry whose status the application
-- changed (unless relay's retry status is that pending status itself: then nothing tells).
--
-- Placeholders: {table} {key} {key_type} {status} {status_type} (quoted names and types),
-- {source} {pending} {processing} (literals), {ready} (the row is claimable now, over alias t:
-- its status, the due column if any, the filter if any), {waiting} (status and filter only),
-- {claim_sets} (the claim's writes to the user's row, over alias t and the lease l),
-- {returning} (the claim's values, over t and l), {bounded} (see relay.db.sqltext.bounded),
-- {claim_attempt} (the attempt an on_claim write-back reads, or NULL),
-- {settle_sets}, {live} (the statuses a settle may still find the row in), {context} (the
-- write-back context: response, attempt, request), {due_now} (now() in the due column's type),
-- {ordering_from} and {head} (ordering_key: only each key's first unfinished row is a candidate;
-- see relay.sources.table._ordering), {after} and {skip} (empty, or in the claim's versions
-- that have them: only keys after the claim pass's cursor; not the rows of URLs whose endpoint
-- cannot take them now; see relay.sources.base.claim_versions).

-- name: pick_and_lease
-- A snippet of the two claims below: lock up to %(limit)s claimable rows with SKIP LOCKED and
-- lease them. The claims then find those rows again by key: `= ANY(ARRAY(...))` keeps the index
-- scan a join loses after ANALYZE (DESIGN.md). Not by ctid: a row the application updated after
-- the statement's snapshot is locked in its new version, which a TID scan under that snapshot
-- does not see (leased, never sent until the lease expired); found by key, the old version
-- leads the update to the new one. The limit is a parameter, so each claim is planned for the
-- tables as they are (see events.sql): a generic plan made while relay.leases was small looked
-- each candidate's lease up with a sequential scan of it, twice the claim's time on a
-- 20,000-row drain.
picked AS (
    SELECT t.{key} AS relay_key, t.{status}::text AS relay_status FROM {table} AS t{ordering_from}
    WHERE {ready} AND {unleased}{after}{skip}{head}
    ORDER BY t.{key}
    LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED
), leased AS (
    -- A row waiting for its retry whose status the application changed (put back to pending
    -- by hand) starts again from attempt 1.
    INSERT INTO relay.leases AS x (source, key, due, token, attempts, status)
    SELECT {source}, p.relay_key::text, now() + make_interval(secs => %(lease_seconds)s::float8),
           now(), 1, p.relay_status
    FROM picked AS p
    ON CONFLICT (source, key) DO UPDATE
        SET due = EXCLUDED.due, token = EXCLUDED.token, status = NULL,
            attempts = CASE WHEN x.token IS NULL AND x.status IS DISTINCT FROM EXCLUDED.status
                            AND x.status IS NOT NULL
                            THEN 1 ELSE x.attempts + 1 END
        -- The `unleased` check above saw the leases as the statement began: another relay's
        -- claim committed since then is seen here, and the row is left to it.
        WHERE x.due IS NULL OR x.due <= now()
           OR (x.token IS NULL AND x.status IS NOT NULL
               AND x.status IS DISTINCT FROM EXCLUDED.status)
    RETURNING x.key AS relay_key, x.token AS relay_token, x.attempts AS relay_attempts
)

-- name: claim
-- Claimable rows leased (pick_and_lease), and what their requests need read.
WITH {pick_and_lease}, claimed AS (
    SELECT {returning}
    FROM {table} AS t
    JOIN leased AS l ON l.relay_key = t.{key}::text
    WHERE t.{key} = ANY(ARRAY(SELECT relay_key FROM picked))
)
SELECT c.key, c.lease, c.attempt, c.max_attempts, {bounded} FROM claimed AS c;

-- name: claim_update
-- The same, for a mapping that writes to the row at claim time (a processing status, the
-- attempts column, a heartbeat column, on_claim assignments).
WITH {pick_and_lease}, claimed AS (
    UPDATE {table} AS t
    SET {claim_sets}
    FROM (SELECT leased.*, {claim_attempt}::relay.attempt AS attempt FROM leased) AS l
    WHERE t.{key} = ANY(ARRAY(SELECT relay_key FROM picked)) AND l.relay_key = t.{key}::text
    RETURNING {returning}
)
SELECT c.key, c.lease, c.attempt, c.max_attempts, {bounded} FROM claimed AS c;

-- name: settle
-- Only rows whose lease still holds this claim's token are ours: a late settle after the
-- claim expired and another worker took the row over changes nothing. done and dead drop the
-- lease; retry keeps it (with the attempt count) until the retry falls due; release hands the
-- attempt back. Then the user's row gets its status and write-backs, if it is still in a status
-- relay may settle (the application may have moved it on meanwhile: its choice stands).
WITH s AS (
    SELECT s.*, s.key::text AS relay_key_text
    FROM json_to_recordset(%(batch)s::json)
         AS s(key {key_type}, lease timestamptz, outcome text, delay float8, error text,
              http_status int4, attempt int4{context_columns})
), dropped AS (
    -- The batch's leases found by key (index probes), each checked against its own claim's
    -- token: no join with the batch, which the planner, sure from the statistics of a small,
    -- busy table that it holds a row or two, ran as a nested loop over the whole batch per
    -- lease (0.7 ms of a 30-row settle).
    DELETE FROM relay.leases AS x
    WHERE x.source = {source}
      AND x.key = ANY(ARRAY(SELECT relay_key_text FROM s WHERE outcome IN ('done', 'dead')))
      -- (Both keys compared byte by byte, whatever the column's collation: relay.leases
      -- from before relay 0.2.1 has the database's until `relay install` alters it.)
      AND (x.key COLLATE "C", x.token)
          = ANY(ARRAY(SELECT (relay_key_text COLLATE "C", lease) FROM s
                      WHERE outcome IN ('done', 'dead')))
    RETURNING x.key
), kept AS (
    UPDATE relay.leases AS x
    SET token = NULL,
        due = now() + make_interval(secs => s.delay),
        attempts = CASE s.outcome WHEN 'release' THEN x.attempts - 1 ELSE x.attempts END,
        -- The status the settle leaves a retried row in: another one later means the
        -- application moved it (see the claim). None for a row handed back: its lease holds
        -- it until its delay is out, whatever its status (a mapping with a processing status
        -- puts it in the retry status meanwhile, see relay.sources.table).
        status = CASE s.outcome WHEN 'retry' THEN {retry}::text END
    FROM s
    WHERE x.source = {source}
      AND x.key = ANY(ARRAY(SELECT relay_key_text FROM s WHERE outcome IN ('retry', 'release')))
      AND x.key = s.relay_key_text AND x.token = s.lease AND s.outcome IN ('retry', 'release')
    RETURNING x.key
), owned AS (
    SELECT s.* FROM s
    WHERE s.relay_key_text IN (SELECT key FROM dropped UNION ALL SELECT key FROM kept)
), updated AS (
    UPDATE {table} AS t
    SET {settle_sets}
    FROM (SELECT o.key AS relay_key, o.outcome AS relay_outcome,
                 o.delay AS relay_delay{context}
          FROM owned AS o) AS r
    WHERE t.{key} = ANY(%(keys)b::{key_type}[]) AND t.{key} = r.relay_key AND {live}
    RETURNING t.{key}
)
-- The rows settled. A row deleted or moved on by the application meanwhile is not among them
-- (its lease is settled all the same): the settler reports it, and the application's choice
-- stands.
SELECT * FROM updated;

-- name: heartbeat
-- Requests still in flight: their claims last another lease from now.
UPDATE relay.leases AS x
SET due = now() + make_interval(secs => %(lease_seconds)s::float8)
FROM json_to_recordset(%(batch)s::json) AS s(key {key_type}, lease timestamptz)
WHERE x.source = {source} AND x.key = ANY(%(keys)b::{key_type}[]::text[])
  AND x.key = s.key::text AND x.token = s.lease
RETURNING x.key;

-- name: heartbeat_column
-- The rows whose claims the heartbeat above extended, by their leases' (text) keys.
UPDATE {table} AS t
SET {heartbeat} = {heartbeat_now}
WHERE t.{key} = ANY(CAST(%(keys)s::text[] AS {key_type}[]));

-- name: rescue
-- Claims whose worker died: their lease no longer blocks a claim once expired, and a row the
-- claim had set to processing goes back to the retry status. A row in processing with no relay
-- lease is not relay's (another worker's, during a cut-over): left alone. Leases whose row is
-- gone or no longer waiting (deleted, cancelled, filtered out by the application) are dropped,
-- a batch at a time, so they cannot keep the claimer's timer busy.
WITH expired AS (
    UPDATE relay.leases AS x
    SET token = NULL, status = NULL
    WHERE x.source = {source} AND x.token IS NOT NULL AND x.due < now()
    RETURNING x.key
), stale AS (
    DELETE FROM relay.leases AS x
    WHERE x.source = {source} AND x.token IS NULL
      AND x.key = ANY(ARRAY(
          SELECT y.key FROM relay.leases AS y
          WHERE y.source = {source} AND y.token IS NULL AND y.due < now()
            AND NOT EXISTS (SELECT 1 FROM {table} AS t
                            WHERE t.{key} = CAST(y.key AS {key_type}) AND {waiting})
          LIMIT 1000))
)
UPDATE {table} AS t
SET {status} = CAST({retry} AS {status_type})
WHERE t.{status} = {processing} AND {filtered}
  AND t.{key} = ANY(ARRAY(SELECT CAST(key AS {key_type}) FROM expired));

-- name: next_due
-- Seconds until the earliest waiting row falls due: a retry in relay.leases, or a row whose
-- due column is in the future (NULL if none). The retries in due order, up to the first whose
-- row still waits (leases_due_idx): min() over them joined every waiting row, 3 ms a claim
-- pass with 2,000 retries and 10,000 rows waiting (bench), this 0.1 ms.
SELECT EXTRACT(EPOCH FROM (LEAST(
    (SELECT x.due FROM relay.leases AS x
     WHERE x.source = {source} AND x.token IS NULL AND x.due IS NOT NULL
       AND EXISTS (SELECT 1 FROM {table} AS t
                   WHERE t.{key} = CAST(x.key AS {key_type}) AND {waiting})
     ORDER BY x.due
     LIMIT 1),
    {next_scheduled}) - now()))::float8;

-- Claims kept in the row (`lease_column`, a timestamptz column the mapping gives relay): the
-- row's processing status and that column are the claim, its attempts column relay's count,
-- and relay.leases is not used. The column holds the claim's expiry while the row is
-- processing (and is the claim's token, as relay.outbox's due_at is: no heartbeat extends
-- it), when a retry falls due while the row waits in the retry status, and NULL otherwise.
-- {unleased} here: not waiting out a retry, unless the application moved the row to another
-- pending status (then it starts again from attempt 1).

-- name: claim_in_place
-- Lock up to %(limit)s claimable rows (SKIP LOCKED) with their next attempt number, then write
-- the claim into them: the same two steps as the leases' claim, so the two are comparable.
WITH picked AS (
    SELECT t.{key} AS relay_key,
           CASE WHEN t.{status} = {retry} THEN COALESCE(t.{attempts}, 0) + 1 ELSE 1 END
               AS relay_attempts,
           now() + make_interval(secs => %(lease_seconds)s::float8) AS relay_token
    FROM {table} AS t{ordering_from}
    WHERE {ready} AND {unleased}{after}{skip}{head}
    ORDER BY t.{key}
    LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED
), claimed AS (
    UPDATE {table} AS t
    SET {claim_sets}
    FROM (SELECT leased.*, {claim_attempt}::relay.attempt AS attempt FROM picked AS leased) AS l
    WHERE t.{key} = ANY(ARRAY(SELECT relay_key FROM picked)) AND l.relay_key = t.{key}
    RETURNING {returning}
)
SELECT c.key, c.lease, c.attempt, c.max_attempts, {bounded} FROM claimed AS c;

-- name: settle_in_place
-- Only rows still processing under this claim's token are ours (a late settle after the claim
-- expired and another worker took the row changes nothing; nor does one after the application
-- moved the row on: its choice stands). A retry leaves the row in the retry status with the
-- lease column saying when it falls due; done and dead clear it.
UPDATE {table} AS t
SET {settle_sets},
    {lease_column} = CASE WHEN r.relay_outcome IN ('retry', 'release')
                          THEN now() + make_interval(secs => r.relay_delay) END
FROM (SELECT o.key AS relay_key, o.outcome AS relay_outcome, o.lease AS relay_lease,
             o.delay AS relay_delay{context}
      FROM json_to_recordset(%(batch)s::json)
           AS o(key {key_type}, lease timestamptz, outcome text, delay float8, error text,
                http_status int4, attempt int4{context_columns})) AS r
WHERE t.{key} = ANY(%(keys)b::{key_type}[]) AND t.{key} = r.relay_key
  AND t.{status} = {processing} AND t.{lease_column} = r.relay_lease
RETURNING t.{key};

-- name: rescue_in_place
-- Claims whose worker died: back to the retry status, due at once (the expired claim's time).
-- A row in processing with no expiry in the lease column is not relay's: left alone.
UPDATE {table} AS t
SET {status} = CAST({retry} AS {status_type})
WHERE t.{status} = {processing} AND t.{lease_column} < now() AND {filtered};

-- name: next_due_in_place
-- Seconds until the earliest waiting row falls due: a retry (the lease column, in order: an
-- index on it for the retry status serves this), or a row whose due column is in the future.
SELECT EXTRACT(EPOCH FROM (LEAST(
    (SELECT t.{lease_column} FROM {table} AS t
     WHERE t.{status} = {retry} AND t.{lease_column} IS NOT NULL AND {filtered}
     ORDER BY t.{lease_column}
     LIMIT 1),
    {next_scheduled}) - now()))::float8;

-- name: counts
SELECT t.{status}::text, count(*)::bigint FROM {table} AS t WHERE {filtered} GROUP BY 1 ORDER BY 1;

-- name: oldest_due
SELECT {oldest_due};

-- name: retry_dead
-- Dead rows back to claimable now, with fresh attempts (their leases went at dead): all, or
-- those of %(keys)s.
UPDATE {table} AS t
SET {retry_dead_sets}
WHERE t.{status} = {dead} AND {filtered}
  AND (%(keys)s::text[] IS NULL OR t.{key} = ANY(%(keys)s::text[]::{key_type}[]));

-- name: dead
-- A page of dead rows, by key, after %(after)s: key, and the last error, last HTTP status and
-- attempts where the mapping has columns for them.
SELECT t.{key}::text, {dead_columns}
FROM {table} AS t
WHERE t.{status} = {dead} AND {filtered}
  AND (%(after)s::text IS NULL OR t.{key} > %(after)s::text::{key_type})
ORDER BY t.{key}
LIMIT %(limit)s;
