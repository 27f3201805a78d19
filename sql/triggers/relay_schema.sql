-- relay's own schema: the outbox that applications publish to, and relay.publish().
-- Idempotent: `relay install` runs it on every install.
--
-- Privileges (README, "Roles and grants"): the role that installs owns all of this. Nothing here
-- is granted to PUBLIC; install even takes back the EXECUTE that PostgreSQL gives PUBLIC on every
-- new function. The role relay runs as is granted what it needs by the DBA; an application that
-- publishes needs only USAGE on the schema (name lookup) and EXECUTE on relay.publish, which
-- runs as its owner and can set nothing but the topic, the payload and the due time.

CREATE SCHEMA IF NOT EXISTS relay;

CREATE TABLE IF NOT EXISTS relay.outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic         text        NOT NULL,
    payload       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'processing', 'delivered', 'dead')),
    attempts      integer     NOT NULL DEFAULT 0,
    max_attempts  integer,                 -- NULL: the source's max_attempts from the config
    -- When the row may next be claimed; while processing, when the claim expires. The claim's
    -- expiry doubles as its token: a settle applies only if it still matches.
    due_at        timestamptz NOT NULL DEFAULT now(),
    last_error    text,
    last_status   integer,
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz
);

-- The claim scans pending rows in id order; the partial index keeps that scan off the delivered
-- history, however long it grows.
CREATE INDEX IF NOT EXISTS outbox_pending_idx ON relay.outbox (id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS outbox_processing_idx ON relay.outbox (due_at) WHERE status = 'processing';

-- SECURITY DEFINER: writers need no privilege on relay.outbox, so they can neither read other
-- rows nor choose a row's status, attempts or max_attempts. The pinned search_path keeps a
-- caller's objects (a table or function named like ours in their schema) out of it.
CREATE OR REPLACE FUNCTION relay.publish(topic text, payload jsonb DEFAULT '{}'::jsonb,
                                         deliver_at timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    published bigint;
BEGIN
    IF topic IS NULL OR topic = '' OR octet_length(topic) > 1024 THEN
        RAISE EXCEPTION 'relay.publish: topic must be 1 to 1024 bytes of text, got %',
            coalesce(quote_literal(left(topic, 64)), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO relay.outbox (topic, payload, due_at)
    VALUES (publish.topic, coalesce(publish.payload, '{}'::jsonb),
            coalesce(publish.deliver_at, pg_catalog.now()))
    RETURNING relay.outbox.id INTO published;
    RETURN published;
END
$$;

REVOKE ALL ON FUNCTION relay.publish(text, jsonb, timestamptz) FROM PUBLIC;

COMMENT ON FUNCTION relay.publish(text, jsonb, timestamptz) IS
    'Queue an event for relay: delivered to the URL configured for its topic once the transaction commits.';

-- Claims and retry times for rows of tables that have no due column of their own (a table
-- source mapped without `due`): while a row is processing, `due` is its claim's expiry and
-- token; while it waits for a retry, when it falls due; NULL once settled for good.
CREATE TABLE IF NOT EXISTS relay.leases (
    source  text COLLATE "C" NOT NULL,
    key     text COLLATE "C" NOT NULL,
    due     timestamptz,
    PRIMARY KEY (source, key)
);
-- Keys compared byte by byte: a lease is looked up, inserted and deleted for every row claimed
-- and settled, and under a linguistic collation (the database's default, en_US.UTF-8 and the
-- like) each comparison of its primary key goes through strcoll. Only equality is ever asked of
-- these keys, so their order does not matter. (Installed before relay 0.2.1: changed here, a
-- short rewrite of a table that holds only the rows in flight or waiting for a retry.)
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation
               WHERE a.attrelid = 'relay.leases'::regclass AND a.attname IN ('source', 'key')
                 AND c.collname <> 'C') THEN
        ALTER TABLE relay.leases ALTER COLUMN source TYPE text COLLATE "C",
                                 ALTER COLUMN key TYPE text COLLATE "C";
    END IF;
END
$$;

-- From relay 0.2 (sources take users' tables as they are): a lease also holds its claim's token
-- (when it was taken; heartbeats extend `due`, never the token) and relay's attempt count, so
-- the user's table needs neither a processing status nor an attempts column.
ALTER TABLE relay.leases ADD COLUMN IF NOT EXISTS token timestamptz;
ALTER TABLE relay.leases ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 0;
-- While a row waits for its retry: the status relay left it in (so a change is seen).
ALTER TABLE relay.leases ADD COLUMN IF NOT EXISTS status text;
-- Retries falling due, for the claimer's timer.
CREATE INDEX IF NOT EXISTS leases_due_idx ON relay.leases (source, due) WHERE token IS NULL;

-- What write-back expressions (on_success, on_failure, on_dead, on_claim) and attempt logs can
-- read besides the row: `response.json`, `attempt.error`, `request.url`. Composite types, so
-- that these names never clash with the user's own columns.
DO $$
BEGIN
    IF to_regtype('relay.response') IS NULL THEN
        CREATE TYPE relay.response AS (status integer, headers jsonb, json jsonb, body text);
    END IF;
    IF to_regtype('relay.attempt') IS NULL THEN
        CREATE TYPE relay.attempt AS (number integer, error text, worker text,
                                      started_at timestamptz, finished_at timestamptz,
                                      next_at timestamptz, outcome text, ms float8);
    END IF;
    IF to_regtype('relay.request') IS NULL THEN
        CREATE TYPE relay.request AS (method text, url text, headers jsonb, body text);
    END IF;
END
$$;

-- relay's own attempt log, for a table source with `attempt_log.table = "relay"`: one row per
-- attempt, bodies cut to attempt_log.max_body_chars, old rows deleted by the retention settings.
CREATE TABLE IF NOT EXISTS relay.attempts (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source            text        NOT NULL,
    key               text        NOT NULL,
    attempt           integer,
    outcome           text,       -- done | retry | dead
    status            integer,    -- the HTTP status; NULL: no answer
    error             text,
    url               text,       -- shown without userinfo or query string
    request_body      text,
    response_headers  jsonb,
    response_body     text,
    ms                float8,
    worker            text,
    at                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS attempts_at_idx ON relay.attempts (at);
CREATE INDEX IF NOT EXISTS attempts_row_idx ON relay.attempts (source, key);

-- Scheduled jobs ([jobs.NAME]): one row per occurrence run, by whichever relay ran it. The
-- primary key is what makes an occurrence run once among several relays: the one that runs it
-- records it in the same transaction, under an advisory lock on the job. relay keeps the last
-- 100 runs of each job.
CREATE TABLE IF NOT EXISTS relay.job_runs (
    job            text        NOT NULL,
    scheduled_for  timestamptz NOT NULL,   -- the occurrence
    started_at     timestamptz NOT NULL,
    duration_ms    double precision NOT NULL,
    worker         text        NOT NULL,   -- relay.worker_id of the relay that ran it
    rows_affected  bigint,
    processed      bigint,                 -- what the statement returned, if it did
    succeeded      bigint,
    failed         bigint,
    error          text,                   -- NULL: it succeeded
    PRIMARY KEY (job, scheduled_for)
);

-- Endpoints relay holds back (relay.endpoints, [endpoints]): a target whose answer disabled it
-- for a source (410 Gone), until `relay enable`, honoured by every relay; and an endpoint a
-- relay's circuit breaker paused, while it is paused (for `relay status`).
CREATE TABLE IF NOT EXISTS relay.endpoints (
    state   text COLLATE "C" NOT NULL CHECK (state IN ('disabled', 'paused')),
    target  text COLLATE "C" NOT NULL,           -- disabled: its URL; paused: host:port
    source  text COLLATE "C" NOT NULL DEFAULT '', -- disabled: for this source
    worker  text COLLATE "C" NOT NULL DEFAULT '', -- paused: by this relay (relay.worker_id)
    reason  text        NOT NULL,
    since   timestamptz NOT NULL DEFAULT now(),
    until   timestamptz,                         -- paused: its next probe
    PRIMARY KEY (state, target, source, worker)
);

-- Inboxes ([inbox.NAME]): each request's key, so a repeat is answered without running anything
-- again; with the body for an inbox that keeps it (no statement of its own). Keys without a
-- body are kept 30 days.
CREATE TABLE IF NOT EXISTS relay.inbox (
    inbox        text        NOT NULL,
    key          text        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    body         jsonb,
    PRIMARY KEY (inbox, key)
);
CREATE INDEX IF NOT EXISTS inbox_keys_received_idx ON relay.inbox (received_at) WHERE body IS NULL;
