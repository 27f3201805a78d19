-- System 4 of shared/MISSION.md: the background workers of an e-commerce app, as the
-- application has its tables. Three workers used to run inside the app:
--
--   * a webhook retrier: failed webhook_events retried with exponential backoff (1, 2, 4, 8,
--     16 minutes, capped at 60), at most 5 attempts, then archived;
--   * an email sender: email_queue rows POSTed to an HTTP email API as
--     {"from", "to", "subject", "html"} with an Idempotency-Key header (the row's id, so that a
--     retry is never a second email), at most 3 attempts, never before send_at;
--   * a reservation sweeper: expired inventory_reservations released every few minutes, each
--     run reporting {processed, succeeded, failed};
--
-- and maintenance endpoints (list and retry what failed, run the sweeper now) behind a bearer
-- secret. With relay, examples/system4/relay.toml maps these tables as they are: nothing here is
-- relay-specific, and the application keeps writing its rows as it always did.

-- Outgoing webhooks to merchants' endpoints, one row per event and endpoint.
CREATE TABLE webhook_events (
    id                   bigserial   PRIMARY KEY,
    url                  text        NOT NULL,
    event_type           text        NOT NULL,
    payload              jsonb       NOT NULL,
    status               text        NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'processing', 'delivered', 'failed',
                                           'archived')),
    retry_count          integer     NOT NULL DEFAULT 0,  -- attempts made so far
    next_retry_at        timestamptz,                     -- a failed event waits until then
    last_error           text,
    last_response_status integer,
    archived             boolean     NOT NULL DEFAULT false,  -- given up on: kept for support
    created_at           timestamptz NOT NULL DEFAULT now(),
    delivered_at         timestamptz
);
-- The retrier's claim: events waiting, oldest first.
CREATE INDEX webhook_events_waiting_idx
    ON webhook_events (id) WHERE status IN ('pending', 'failed');

-- Transactional emails (order confirmations, shipping notices, abandoned-cart reminders).
CREATE TABLE email_queue (
    id                  bigserial   PRIMARY KEY,
    from_address        text        NOT NULL,
    to_address          text        NOT NULL,
    subject             text        NOT NULL,
    html_body           text        NOT NULL,
    status              text        NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'sending', 'sent', 'failed')),
    attempts            integer     NOT NULL DEFAULT 0,
    send_at             timestamptz NOT NULL DEFAULT now(),  -- scheduled: not sent before
    last_error          text,
    provider_message_id text,                                -- the email API's id for it
    created_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz
);
CREATE INDEX email_queue_waiting_idx ON email_queue (id) WHERE status = 'pending';

-- Stock, and the units held for carts and checkouts in progress.
CREATE TABLE products (
    id       bigserial PRIMARY KEY,
    sku      text      NOT NULL UNIQUE,
    stock    integer   NOT NULL CHECK (stock >= 0),
    reserved integer   NOT NULL DEFAULT 0 CHECK (reserved >= 0 AND reserved <= stock)
);

CREATE TABLE inventory_reservations (
    id          bigserial   PRIMARY KEY,
    product_id  bigint      NOT NULL REFERENCES products (id),
    cart_id     text        NOT NULL,
    quantity    integer     NOT NULL CHECK (quantity > 0),
    status      text        NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'converted', 'released')),
    expires_at  timestamptz NOT NULL,
    released_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- The sweeper's scan: active reservations by expiry.
CREATE INDEX inventory_reservations_active_idx
    ON inventory_reservations (expires_at) WHERE status = 'active';

-- Holds `quantity` units of a product for a cart for `ttl`; the reservation's id, or NULL if
-- there is not enough stock left.
CREATE FUNCTION reserve_stock(p_product_id bigint, p_cart_id text, p_quantity integer,
                              p_ttl interval)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    reservation bigint;
BEGIN
    UPDATE products SET reserved = reserved + p_quantity
     WHERE id = p_product_id AND stock - reserved >= p_quantity;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO inventory_reservations (product_id, cart_id, quantity, expires_at)
    VALUES (p_product_id, p_cart_id, p_quantity, now() + p_ttl)
    RETURNING id INTO reservation;
    RETURN reservation;
END
$$;
