-- Named queries for inboxes (relay.inbox). One transaction per request: the key, then the
-- inbox's own statement.

-- name: take
-- No row back: the key is there already (a concurrent first request's insert is waited for).
INSERT INTO relay.inbox (inbox, key, body) VALUES (%(inbox)s, %(key)s, %(body)s)
ON CONFLICT (inbox, key) DO NOTHING
RETURNING 1;

-- name: prune
DELETE FROM relay.inbox
WHERE ctid = ANY(ARRAY(SELECT ctid FROM relay.inbox
                       WHERE body IS NULL AND received_at < now() - interval '30 days'
                       LIMIT 100));
