-- System 3 of shared/MISSION.md: a job worker with claim/complete/heartbeat functions, as the
-- application has them. Workers call claim_next_job_v3 with their id, the job types and the
-- lanes they serve; while a job runs they call update_job_heartbeat; when it is done,
-- complete_job with the result. Only the worker that holds a job may heartbeat, complete or fail
-- it: a job taken back from a worker that went quiet belongs to its new worker alone.
--
-- With relay, examples/system3/relay.toml calls these three functions as they are
-- (kind = "functions"); examples/system3/relay.table.toml maps the table directly instead.

CREATE TABLE job_queue (
    id            bigserial   PRIMARY KEY,
    job_type      text        NOT NULL,
    lane          text        NOT NULL DEFAULT 'default',
    job_payload   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    job_result    jsonb,
    error_details jsonb,                             -- the last failure, structured
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    worker_id     text,                              -- who holds (or last held) the job
    started_at    timestamptz,
    heartbeat_at  timestamptz,
    retry_count   integer     NOT NULL DEFAULT 0,    -- failed attempts so far
    max_retries   integer     NOT NULL DEFAULT 3,    -- attempts before the job is failed
    scheduled_at  timestamptz NOT NULL DEFAULT now(),-- not claimed before this
    created_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz
);
-- The claim: pending jobs of a lane and type, due first.
CREATE INDEX job_queue_claim_idx
    ON job_queue (lane, job_type, scheduled_at, id) WHERE status = 'pending';
-- Finding jobs whose worker went quiet.
CREATE INDEX job_queue_heartbeat_idx
    ON job_queue (heartbeat_at) WHERE status = 'processing';

-- Claims the next due job of the given types and lanes (NULL: any) for this worker, or returns
-- no row. Concurrent workers skip each other's locked rows, so they never claim the same job.
CREATE FUNCTION claim_next_job_v3(p_worker_id text, p_job_types text[], p_job_lanes text[])
RETURNS SETOF job_queue
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    UPDATE job_queue j
       SET status       = 'processing',
           worker_id    = p_worker_id,
           started_at   = now(),
           heartbeat_at = now()
     WHERE j.id = (
             SELECT c.id
               FROM job_queue c
              WHERE c.status = 'pending'
                AND c.scheduled_at <= now()
                AND (p_job_types IS NULL OR c.job_type = ANY (p_job_types))
                AND (p_job_lanes IS NULL OR c.lane = ANY (p_job_lanes))
              ORDER BY c.scheduled_at, c.id
              LIMIT 1
                FOR UPDATE SKIP LOCKED)
    RETURNING j.*;
END
$$;

-- Completes a job with its result; true if this worker held it, false (and nothing changed)
-- otherwise.
CREATE FUNCTION complete_job(p_job_id bigint, p_worker_id text, p_result jsonb)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE job_queue
       SET status       = 'completed',
           job_result   = p_result,
           completed_at = now(),
           heartbeat_at = now()
     WHERE id = p_job_id
       AND worker_id = p_worker_id
       AND status = 'processing';
    RETURN FOUND;
END
$$;

-- Records that this worker is still running the job; true if it holds it, false otherwise.
CREATE FUNCTION update_job_heartbeat(p_job_id bigint, p_worker_id text)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE job_queue
       SET heartbeat_at = now()
     WHERE id = p_job_id
       AND worker_id = p_worker_id
       AND status = 'processing';
    RETURN FOUND;
END
$$;
