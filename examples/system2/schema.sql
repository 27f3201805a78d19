-- System 2 of shared/MISSION.md: partner webhook delivery workers, as the application has them.
--
-- The application enqueues one row per partner endpoint and event (enqueue_webhook below, in the
-- transaction that made the event); workers used to claim the rows with SKIP LOCKED and POST
-- them. With relay, examples/system2/relay.toml maps this table as it is: nothing here is
-- relay-specific, and the application's own functions (stats, cleanup, enqueue) keep working.
--
-- Partner secrets are encrypted at rest with AES-256-GCM under a key from the application's
-- environment, in the text form
--     relay:v1:<key id>:<base64url(nonce || ciphertext+tag)>     (96-bit nonce, no padding)
-- so that keys can rotate: a new key gets a new id, and rows encrypted under the old one stay
-- readable while both keys are configured.
--
-- Retrying a dead letter by hand (the operators' runbook):
--     UPDATE webhook_delivery_queue SET status = 'pending' WHERE id = $1 AND status = 'dead_letter';
-- relay sends it at once, with a fresh count of attempts.

CREATE TABLE partner_webhooks (
    id           bigserial   PRIMARY KEY,
    partner_name text        NOT NULL,
    endpoint     text        NOT NULL,
    secret       text        NOT NULL,               -- encrypted, see above
    event_types  text[]      NOT NULL DEFAULT '{}',  -- events subscribed to; empty: all of them
    is_active    boolean     NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_delivery_queue (
    id                   bigserial   PRIMARY KEY,
    partner_webhook_id   bigint      REFERENCES partner_webhooks (id) ON DELETE SET NULL,
    url                  text        NOT NULL,
    secret               text,                       -- the partner's secret, encrypted
    event_type           text        NOT NULL,
    payload              jsonb       NOT NULL,
    status               text        NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'processing', 'delivered', 'failed',
                                           'dead_letter')),
    attempt_count        integer     NOT NULL DEFAULT 0,
    max_attempts         integer     NOT NULL DEFAULT 5,
    next_retry_at        timestamptz,                -- a failed row is not retried before this
    last_error           text,
    last_response_status integer,
    created_at           timestamptz NOT NULL DEFAULT now(),
    delivered_at         timestamptz
);
-- The workers' claim: rows waiting, oldest first.
CREATE INDEX webhook_delivery_queue_waiting_idx
    ON webhook_delivery_queue (id) WHERE status IN ('pending', 'failed');
-- cleanup_delivered_webhooks
CREATE INDEX webhook_delivery_queue_delivered_idx
    ON webhook_delivery_queue (delivered_at) WHERE status = 'delivered';

-- One row per delivery attempt (the audit trail partners ask about).
CREATE TABLE webhook_delivery_log (
    id             bigserial   PRIMARY KEY,
    delivery_id    bigint      NOT NULL REFERENCES webhook_delivery_queue (id) ON DELETE CASCADE,
    attempt_number integer     NOT NULL,
    url            text        NOT NULL,
    success        boolean     NOT NULL,
    status_code    integer,                          -- NULL: no HTTP answer
    error          text,
    response_body  text,
    duration_ms    integer,
    attempted_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_delivery_log_delivery_idx ON webhook_delivery_log (delivery_id);

-- One queue row per active partner subscribed to the event; returns how many were queued.
CREATE FUNCTION enqueue_webhook(p_event_type text, p_payload jsonb)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    queued integer;
BEGIN
    INSERT INTO webhook_delivery_queue (partner_webhook_id, url, secret, event_type, payload)
    SELECT p.id, p.endpoint, p.secret, p_event_type, p_payload
      FROM partner_webhooks p
     WHERE p.is_active
       AND (p.event_types = '{}' OR p_event_type = ANY (p.event_types))
     ORDER BY p.id;
    GET DIAGNOSTICS queued = ROW_COUNT;
    RETURN queued;
END
$$;

-- Queue statistics for dashboards and alerts: per status, how many rows, the oldest one's
-- creation time and the average number of attempts.
CREATE FUNCTION get_webhook_queue_stats()
RETURNS TABLE (status text, count bigint, oldest_created_at timestamptz, avg_attempts numeric)
LANGUAGE sql STABLE AS $$
    SELECT q.status, count(*), min(q.created_at), round(avg(q.attempt_count), 2)
      FROM webhook_delivery_queue q
     GROUP BY q.status
     ORDER BY q.status
$$;

-- Deletes delivered rows older than `days` days (and, by cascade, their log rows); returns how
-- many rows of the queue it deleted. Run nightly.
CREATE FUNCTION cleanup_delivered_webhooks(days integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    deleted integer;
BEGIN
    DELETE FROM webhook_delivery_queue
     WHERE status = 'delivered'
       AND delivered_at < now() - make_interval(days => cleanup_delivered_webhooks.days);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;
