-- Named queries for scheduled jobs (relay.jobs, relay.scheduler). One transaction per run:
-- the advisory lock, the check, the user's statement (in a savepoint) and its record.

-- name: lock
-- Held until the run's transaction ends: another relay due for the same job at the same time
-- skips it rather than wait (it will find the run recorded at the next occurrence).
SELECT pg_try_advisory_xact_lock(hashtext('relay.job'), hashtext(%(job)s));

-- name: ran
SELECT 1 FROM relay.job_runs WHERE job = %(job)s AND scheduled_for = %(scheduled_for)s;

-- name: record
INSERT INTO relay.job_runs (job, scheduled_for, started_at, duration_ms, worker, rows_affected,
                            processed, succeeded, failed, error)
VALUES (%(job)s, %(scheduled_for)s, %(started_at)s, %(duration_ms)s, %(worker)s,
        %(rows_affected)s, %(processed)s, %(succeeded)s, %(failed)s, %(error)s);

-- name: prune
-- The last 100 runs of the job are kept.
DELETE FROM relay.job_runs
WHERE job = %(job)s
  AND scheduled_for < (SELECT scheduled_for FROM relay.job_runs WHERE job = %(job)s
                       ORDER BY scheduled_for DESC OFFSET 99 LIMIT 1);

-- name: last_runs
-- Each job's newest run.
SELECT DISTINCT ON (job) job, scheduled_for, started_at, duration_ms, worker, rows_affected,
       processed, succeeded, failed, error
FROM relay.job_runs WHERE job = ANY(%(jobs)s::text[])
ORDER BY job, scheduled_for DESC;
