-- Named queries for a table source mapped WITHOUT a due column: the same names and result
-- columns as source.sql, with the claim's expiry (its token) and the retry time kept in
-- relay.leases, keyed by (source, key::text), so the user's table is still not changed.
-- Placeholders as in source.sql, plus {source} (the source name).

-- name: claim
WITH claimed AS (
    UPDATE {table} AS t
    SET {status} = {processing},
        {attempts} = COALESCE(t.{attempts}, 0) + 1
    WHERE t.{key} = ANY(ARRAY(
        SELECT c.{key} FROM {table} AS c
        WHERE c.{status} IN ({pending})
          AND NOT EXISTS (SELECT 1 FROM relay.leases AS l
                          WHERE l.source = {source} AND l.key = c.{key}::text
                            AND l.due > now())
        ORDER BY c.{key}
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED))
    RETURNING {returning_named}
), leased AS (
    INSERT INTO relay.leases (source, key, due)
    SELECT {source}, claimed.key::text, now() + make_interval(secs => %(lease_seconds)s::float8)
    FROM claimed
    ON CONFLICT (source, key) DO UPDATE SET due = EXCLUDED.due
    RETURNING key, due
)
SELECT c.key, l.due, c.attempt, c.max_attempts, {bounded}
FROM claimed AS c JOIN leased AS l ON l.key = c.key::text;

-- name: settle
-- The keys also come as an array for `= ANY` index conditions (see source.sql's settle).
WITH s AS (
    SELECT *
    FROM json_to_recordset(%(batch)s::json)
         AS s(key {key_type}, lease timestamptz, outcome text, delay float8, error text,
              http_status int4)
), owned AS (
    -- Only rows whose lease still holds this claim's token are ours to settle.
    UPDATE relay.leases AS l
    SET due = CASE s.outcome
                  WHEN 'retry' THEN now() + make_interval(secs => s.delay)
                  WHEN 'release' THEN now()
                  ELSE NULL END
    FROM s
    WHERE l.source = {source} AND l.key = ANY(%(keys)b::{key_type}[]::text[])
      AND l.key = s.key::text AND l.due = s.lease
    RETURNING s.*
)
UPDATE {table} AS t
SET {status} = CAST(CASE s.outcome
                        WHEN 'done' THEN {done}
                        WHEN 'retry' THEN {retry}
                        WHEN 'dead' THEN {dead}
                        ELSE {release} END AS {status_type}),
    {attempts} = CASE s.outcome WHEN 'release' THEN t.{attempts} - 1 ELSE t.{attempts} END
    {extra_sets}
FROM owned AS s
WHERE t.{key} = ANY(%(keys)b::{key_type}[]) AND t.{key} = s.key AND t.{status} = {processing}
RETURNING t.{key};

-- name: rescue
-- Expired claims back to claimable; settled rows' leases are dropped on the way.
WITH cleaned AS (
    DELETE FROM relay.leases WHERE source = {source} AND due IS NULL
), expired AS (
    UPDATE relay.leases AS l
    SET due = now()
    WHERE l.source = {source} AND l.due < now()
      AND EXISTS (SELECT 1 FROM {table} AS t
                  WHERE t.{key} = CAST(l.key AS {key_type}) AND t.{status} = {processing})
    RETURNING l.key
)
UPDATE {table} AS t
SET {status} = {retry}
FROM expired
WHERE t.{key} = CAST(expired.key AS {key_type}) AND t.{status} = {processing};

-- name: next_due
SELECT EXTRACT(EPOCH FROM (min(l.due) - now()))::float8
FROM relay.leases AS l
JOIN {table} AS t ON t.{key} = CAST(l.key AS {key_type})
WHERE l.source = {source} AND l.due IS NOT NULL AND t.{status} IN ({pending});

-- name: counts
SELECT {status}::text, count(*)::bigint FROM {table} GROUP BY 1 ORDER BY 1;

-- name: oldest_due
-- Without a due column there is no "due since"; status reports counts only.
SELECT NULL::float8;

-- name: retry_dead
UPDATE {table}
SET {status} = {retry}, {attempts} = 0
WHERE {status} = {dead};
