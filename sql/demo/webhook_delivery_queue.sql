-- The demo work queue: the shape of a partner-webhook delivery queue as people run it today
-- (see shared/MISSION.md, system 2). relay claims it in place through a mapping; nothing here is
-- relay-specific.
CREATE TABLE IF NOT EXISTS public.webhook_delivery_queue (
    id                   bigserial PRIMARY KEY,
    url                  text        NOT NULL,
    secret               text,
    event_type           text        NOT NULL DEFAULT 'demo.event',
    payload              jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status               text        NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'processing', 'delivered', 'failed', 'dead_letter')),
    attempt_count        integer     NOT NULL DEFAULT 0,
    max_attempts         integer     NOT NULL DEFAULT 5,
    next_retry_at        timestamptz,
    last_error           text,
    last_response_status integer,
    created_at           timestamptz NOT NULL DEFAULT now(),
    delivered_at         timestamptz
);
-- What relay's claim scans: rows waiting for delivery, in id order.
CREATE INDEX IF NOT EXISTS webhook_delivery_queue_waiting_idx
    ON public.webhook_delivery_queue (id) WHERE status IN ('pending', 'failed');
