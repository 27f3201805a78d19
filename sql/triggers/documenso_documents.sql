-- Documenso's webhook events (preset `documenso_documents`), installed by `relay install`.
-- Sections are named; braces are filled by relay.store with quoted names and with the SQL that
-- fits Documenso's schema version ("Envelope" from v1.13, "Document" before) and the source's
-- configuration (one URL, or Documenso's own "Webhook" rows).
--
-- How a change becomes an event:
-- 1. relay_documenso_change, an ordinary row trigger on Documenso's document table, and
--    relay_documenso_recipient on "Recipient", note what may be an event in
--    relay.documenso_changes. They fire on every write and name no column of Documenso's (no
--    column list, no WHEN clause): PostgreSQL refuses to alter the type of a column a trigger
--    names, and Prisma alters "status" whenever the DocumentStatus enum loses a value. The
--    checks happen inside the functions, which PostgreSQL does not tie to the columns they read.
-- 2. At commit, a deferred trigger on that relay table reads the document as the transaction
--    leaves it, with the recipients and meta inserted after it, compares its status with the one
--    last sent (relay.documenso_state) and records the events with Documenso's payload.
--    Deferring on relay's own table, not Documenso's, keeps Documenso's migrations free to ALTER
--    its tables after writing to them in the same transaction (PostgreSQL refuses that while a
--    table has deferred trigger events pending).
-- 3. Deleting a document or template: relay_documenso_delete, a BEFORE DELETE trigger, records
--    what Documenso's delete-document.ts / delete-template.ts send while the recipients are
--    still there.
-- 4. After every install (and every reinstall when a migration dropped the trigger), the
--    documents whose status differs from relay.documenso_state get their event: no status
--    change is lost while the trigger was missing.
-- The triggers must never break Documenso's write: if building the payload fails, the event is
-- recorded with a minimal payload and the reason; if even that cannot be recorded (relay's
-- table dropped) a WARNING is raised, and the write goes on. Every function runs as its owner
-- (Documenso's role needs no privilege on relay's schema) with a pinned search_path, so only the
-- schema-qualified names written here are ever looked up. The writes stay outside EXCEPTION
-- blocks: a block that writes takes a subtransaction id for every row, and a transaction
-- changing more than 64 documents would overflow PostgreSQL's subtransaction cache, slowing
-- every session while it runs. What could make them fail is checked first instead (the tables
-- run as their owner, so privileges cannot).

-- name: common
CREATE TABLE IF NOT EXISTS relay.documenso_events (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic         text        NOT NULL,   -- Documenso's event name, e.g. DOCUMENT_COMPLETED
    payload       jsonb       NOT NULL,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'processing', 'delivered', 'dead')),
    attempts      integer     NOT NULL DEFAULT 0,
    max_attempts  integer,
    due_at        timestamptz NOT NULL DEFAULT now(),
    last_error    text,
    last_status   integer,
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz
);
CREATE INDEX IF NOT EXISTS documenso_events_pending_idx
    ON relay.documenso_events (id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS documenso_events_processing_idx
    ON relay.documenso_events (due_at) WHERE status = 'processing';
-- With webhooks = true: the Documenso "Webhook" the event goes to, looked up at each attempt
-- (its URL and secret as they are then), as Documenso's execute-webhook job does.
ALTER TABLE relay.documenso_events ADD COLUMN IF NOT EXISTS webhook_id text;

-- The status each document last had an event for (or had when relay was installed), by
-- Documenso's document number (the payload's "id", "Envelope"."secondaryId" = 'document_<n>'),
-- which survives the move from "Document" to "Envelope". One small row per sent document.
CREATE TABLE IF NOT EXISTS relay.documenso_state (
    id      integer PRIMARY KEY,
    status  text NOT NULL
);

-- What a transaction that has not committed yet did to documents; emptied at its commit.
CREATE TABLE IF NOT EXISTS relay.documenso_changes (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document  text    NOT NULL,   -- the document table's "id", as text (indexed below)
    -- NULL: its status may have changed. 'created': inserted. 'resend': written again as
    -- PENDING while PENDING. 'deleted': its "deletedAt" set (a soft delete). 'resealed': a
    -- new "completedAt" while COMPLETED or REJECTED. A recipient's:
    -- 'opened', 'signed', 'signed_created' (inserted as signed: a direct-template link's
    -- signer), 'expired'.
    signal    text,
    updated_before jsonb,         -- the document's "updatedAt" before this write
    recipient integer             -- the recipient's "id", for a recipient's signal
);
CREATE INDEX IF NOT EXISTS documenso_changes_document_idx ON relay.documenso_changes (document);
ALTER TABLE relay.documenso_changes ADD COLUMN IF NOT EXISTS recipient integer;

CREATE OR REPLACE FUNCTION relay.documenso_event_name(status text) RETURNS text
LANGUAGE sql IMMUTABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE status
        WHEN 'PENDING' THEN 'DOCUMENT_SENT'
        WHEN 'COMPLETED' THEN 'DOCUMENT_COMPLETED'
        WHEN 'REJECTED' THEN 'DOCUMENT_REJECTED'
        WHEN 'CANCELLED' THEN 'DOCUMENT_CANCELLED'
    END
$$;

REVOKE ALL ON FUNCTION relay.documenso_event_name(text) FROM PUBLIC;


-- name: shape
-- One schema version's functions and triggers. {table} is Documenso's document table; a row of
-- it is `d` in expressions and `t` in queries; {by_key} finds the one whose "id" is `key`.

-- One document or template as it is now, with its meta and recipients, as rows: relay maps them
-- to the payload of the Documenso version whose columns they have when it sends the event
-- (relay/sources/documenso_payload.py). Documenso does not order the recipients; by id is what
-- an unordered read of them most often gives.
CREATE OR REPLACE FUNCTION relay.documenso_payload(key text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
BEGIN
    SELECT * INTO d FROM {table} AS t WHERE {by_key};
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN jsonb_build_object(
        'capture', 1, 'id', {number}, 'envelopeId', {envelope_id}, 'document', to_jsonb(d),
        'meta', {meta},
        'recipients', (SELECT coalesce(jsonb_agg(to_jsonb(r) ORDER BY r."id"), '[]'::jsonb)
                       FROM {recipient} AS r WHERE {recipient_of}));
END
$$;

-- Record one event: {emit} (to the configured URL if it is one of the configured events, or
-- to each of the team's enabled "Webhook" rows that subscribed to it, as Documenso's
-- triggerWebhook picks them).
CREATE OR REPLACE FUNCTION relay.documenso_emit(event text, payload jsonb, team int, owner int)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hooks text[];
BEGIN
    -- Called at commit too, where a failing INSERT would fail Documenso's own commit.
    IF to_regclass('relay.documenso_events') IS NULL THEN
        RAISE WARNING 'relay: % not recorded: relay.documenso_events is missing; run '
            '`relay install`', event;
        RETURN;
    END IF;
    {emit}
END
$$;

-- The row trigger on Documenso's table (both the AFTER INSERT OR UPDATE and the BEFORE DELETE).
CREATE OR REPLACE FUNCTION relay.documenso_change() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
    kind text;
    number int;
    signal text;
    payload jsonb;
BEGIN
    BEGIN
        IF TG_OP = 'DELETE' THEN
            d := OLD;
            -- Deleted with its team or owner (a cascade, one trigger level down): not one
            -- Documenso's delete-document.ts or delete-template.ts deleted; it sends nothing.
            IF pg_trigger_depth() > 1 THEN
                RETURN OLD;
            END IF;
            kind := {kind};
            number := {number};
            -- delete-document.ts hard-deletes drafts and pending documents and sends
            -- DOCUMENT_CANCELLED (v1.10 on, whatever the status) with the document as it was;
            -- delete-template.ts sends TEMPLATE_DELETED (v2.8.1 on). Documenso's admin delete
            -- writes the same and sends nothing: relay cannot tell them apart.
            BEGIN
                payload := relay.documenso_payload(d."id"::text);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'relay: the deletion of Documenso % % sent with a minimal '
                    'payload: %', lower(kind), number, SQLERRM;
                payload := jsonb_build_object('id', number, 'envelopeId', {envelope_id},
                                              'relayError', SQLERRM);
            END;
        ELSE
            d := NEW;
            kind := {kind};
            IF TG_OP = 'INSERT' THEN
                signal := 'created';
            ELSIF kind <> 'DOCUMENT' THEN
                RETURN NULL;
            ELSIF OLD."deletedAt" IS NULL AND NEW."deletedAt" IS NOT NULL THEN
                -- A completed document is deleted softly; Documenso sends DOCUMENT_CANCELLED.
                signal := 'deleted';
            ELSIF OLD."status" = NEW."status" AND NEW."status"::text IN ('COMPLETED', 'REJECTED')
                  AND OLD."completedAt" IS DISTINCT FROM NEW."completedAt" THEN
                -- Sealed again (an admin's reseal, the seal sweep): the seal job writes a new
                -- completedAt and sends DOCUMENT_COMPLETED or DOCUMENT_REJECTED again.
                signal := 'resealed';
            ELSIF OLD."status" IS NOT DISTINCT FROM NEW."status" THEN
                -- Documenso's send-document.ts on a document already PENDING writes
                -- status = 'PENDING' again (Prisma adds "updatedAt") and sends DOCUMENT_SENT
                -- again. A row trigger cannot see which columns an UPDATE set, only what
                -- changed, and other writes change nothing but "updatedAt" too (an edit that
                -- keeps every value, a move to the same folder): relay.documenso_commit tells
                -- them apart at commit.
                IF NEW."status"::text <> 'PENDING'
                   OR to_jsonb(OLD) - 'updatedAt' <> to_jsonb(NEW) - 'updatedAt' THEN
                    RETURN NULL;
                END IF;
                signal := 'resend';
            END IF;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'relay: a change to a Documenso document not recorded, so no webhook is '
            'sent for it: %', SQLERRM;
        RETURN OLD;
    END;
    IF to_regclass('relay.documenso_changes') IS NULL OR to_regclass('relay.documenso_state') IS NULL
       OR to_regclass('relay.documenso_events') IS NULL THEN
        RAISE WARNING 'relay: a change to Documenso document % not recorded: one of '
            'relay.documenso_changes, relay.documenso_state and relay.documenso_events is '
            'missing; run `relay install`', d."id";
        RETURN OLD;
    END IF;
    IF TG_OP = 'DELETE' THEN
        IF kind = 'DOCUMENT' THEN
            DELETE FROM relay.documenso_state WHERE id = number;
            PERFORM relay.documenso_emit('DOCUMENT_CANCELLED', payload, d."teamId", d."userId");
        ELSE
            PERFORM relay.documenso_emit('TEMPLATE_DELETED', payload, d."teamId", d."userId");
        END IF;
        RETURN OLD;
    END IF;
    INSERT INTO relay.documenso_changes (document, signal, updated_before)
    VALUES (d."id"::text, signal, CASE WHEN TG_OP = 'UPDATE' THEN to_jsonb(OLD)->'updatedAt' END);
    RETURN NULL;
END
$$;

-- The row trigger on "Recipient": what Documenso's viewed-document.ts (readStatus becomes
-- OPENED), complete-document-with-token.ts (signingStatus becomes SIGNED; CC recipients, which
-- the seal job marks SIGNED, send nothing), create-document-from-direct-template.ts (its signer
-- inserted as SIGNED) and the expiry job (expirationNotifiedAt set) write before their webhook.
-- Read through jsonb so that a column an older Documenso lacks reads as NULL.
CREATE OR REPLACE FUNCTION relay.documenso_recipient() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r jsonb;
    o jsonb;
    key text;
    signals text[] := ARRAY[]::text[];
BEGIN
    BEGIN
        r := to_jsonb(NEW);
        key := {recipient_key};
        IF key IS NULL OR r->>'role' = 'CC' THEN
            RETURN NULL;
        END IF;
        IF TG_OP = 'INSERT' THEN
            IF r->>'signingStatus' = 'SIGNED' THEN
                signals := ARRAY['signed_created'];
            END IF;
        ELSE
            o := to_jsonb(OLD);
            IF o->>'readStatus' = 'NOT_OPENED' AND r->>'readStatus' = 'OPENED' THEN
                signals := signals || 'opened'::text;
            END IF;
            IF o->>'signingStatus' <> 'SIGNED' AND r->>'signingStatus' = 'SIGNED' THEN
                signals := signals || 'signed'::text;
            END IF;
            IF o->>'expirationNotifiedAt' IS NULL AND r->>'expirationNotifiedAt' IS NOT NULL THEN
                signals := signals || 'expired'::text;
            END IF;
        END IF;
        IF cardinality(signals) = 0 THEN
            RETURN NULL;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'relay: a change to a Documenso recipient not recorded, so no webhook is '
            'sent for it: %', SQLERRM;
        RETURN NULL;
    END;
    IF to_regclass('relay.documenso_changes') IS NULL THEN
        RAISE WARNING 'relay: a change to Documenso recipient % not recorded: '
            'relay.documenso_changes is missing; run `relay install`', r->>'id';
        RETURN NULL;
    END IF;
    INSERT INTO relay.documenso_changes (document, signal, recipient)
    SELECT key, s, (r->>'id')::int FROM unnest(signals) AS s;
    RETURN NULL;
END
$$;

-- At commit: the document as the transaction leaves it and the events Documenso sends for
-- what the transaction did, in the order Documenso sends them. The first of a document's
-- changes to fire takes all of them (several writes to one document in a transaction make one
-- status event, or none); the others find theirs gone.
CREATE OR REPLACE FUNCTION relay.documenso_commit() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    key text := NEW.document;
    d record;
    kind text;
    found_changes int;
    resend boolean;
    deleted boolean;
    resealed boolean;
    inserted boolean;
    updated_before jsonb;
    recipient_signals text[];
    s text;
    number int;
    status text;
    seen text;
    changed boolean := false;
    event text;
    events text[] := ARRAY[]::text[];
    payload jsonb;
    cancelled jsonb;
BEGIN
    WITH taken AS (
        DELETE FROM relay.documenso_changes AS c WHERE c.document = key
        RETURNING c.id, c.signal, c.updated_before, c.recipient
    )
    SELECT count(*), coalesce(bool_or(taken.signal = 'resend'), false),
           coalesce(bool_or(taken.signal = 'deleted'), false),
           coalesce(bool_or(taken.signal = 'resealed'), false),
           coalesce(bool_or(taken.signal = 'created'), false),
           (array_agg(taken.updated_before ORDER BY taken.id)
                FILTER (WHERE taken.updated_before IS NOT NULL))[1],
           coalesce(array_agg(taken.signal ORDER BY taken.id)
                FILTER (WHERE taken.recipient IS NOT NULL), ARRAY[]::text[])
    INTO found_changes, resend, deleted, resealed, inserted, updated_before, recipient_signals
    FROM taken;
    IF found_changes = 0 THEN
        RETURN NULL;
    END IF;
    BEGIN
        SELECT * INTO d FROM {table} AS t WHERE {by_key};
        IF NOT FOUND THEN
            RETURN NULL;  -- deleted in the same transaction: its deletion said what there was
        END IF;
        kind := {kind};
        number := {number};
        -- Created: create-envelope.ts, create-document-from-template.ts (also TEMPLATE_USED,
        -- with the new document); a direct-template link's document sends neither.
        IF inserted AND kind = 'TEMPLATE' THEN
            events := events || 'TEMPLATE_CREATED'::text;
        ELSIF inserted AND d."source"::text <> 'TEMPLATE_DIRECT_LINK' THEN
            events := events || 'DOCUMENT_CREATED'::text;
            IF d."source"::text = 'TEMPLATE' THEN
                events := events || 'TEMPLATE_USED'::text;
            END IF;
        END IF;
        IF kind = 'DOCUMENT' THEN
            status := d."status"::text;
            -- A document relay has no status for is a draft (drafts send nothing).
            SELECT coalesce(max(st.status), 'DRAFT') INTO seen
            FROM relay.documenso_state AS st WHERE st.id = number;
            event := NULL;
            IF status <> seen THEN
                changed := true;
                event := relay.documenso_event_name(status);
                -- Created as PENDING: a document from a direct template link. Documenso's
                -- sendDocument sends DOCUMENT_SENT after that transaction, by writing it again
                -- (below), and only if someone is left to sign; otherwise it seals it at once.
                IF inserted AND status = 'PENDING'
                   AND d."source"::text = 'TEMPLATE_DIRECT_LINK' AND ({sent_later} OR NOT EXISTS (
                        SELECT 1 FROM {recipient} AS r
                        WHERE {recipient_of} AND r."role"::text <> 'CC'
                          AND r."signingStatus"::text = 'NOT_SIGNED')) THEN
                    event := NULL;
                END IF;
            ELSIF resend AND status = 'PENDING' AND ({resend_check}) THEN
                event := 'DOCUMENT_SENT';
            ELSIF deleted THEN
                -- As v2.15 and later send it: the document after its deletedAt was set.
                event := 'DOCUMENT_CANCELLED';
            ELSIF resealed THEN
                event := relay.documenso_event_name(status);
            END IF;
            IF event IS NOT NULL THEN
                events := events || event;
            END IF;
            FOREACH s IN ARRAY recipient_signals LOOP
                events := events || CASE s
                    WHEN 'opened' THEN ARRAY['DOCUMENT_OPENED']
                    -- complete-document-with-token.ts: DOCUMENT_RECIPIENT_COMPLETED (v2.8.1 on),
                    -- then DOCUMENT_SIGNED.
                    WHEN 'signed' THEN ARRAY['DOCUMENT_RECIPIENT_COMPLETED', 'DOCUMENT_SIGNED']
                    WHEN 'signed_created' THEN ARRAY['DOCUMENT_SIGNED']
                    WHEN 'expired' THEN ARRAY['RECIPIENT_EXPIRED']
                    ELSE ARRAY[]::text[] END;
            END LOOP;
        END IF;
        IF cardinality(events) > 0 THEN
            BEGIN
                payload := relay.documenso_payload(key);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'relay: % for Documenso % % sent with a minimal payload: %',
                    array_to_string(events, ', '), lower(kind), number, SQLERRM;
                payload := jsonb_build_object('id', number, 'envelopeId', {envelope_id},
                                              'status', status, 'relayError', SQLERRM);
            END;
            -- cancel-document.ts maps the document as it read it before cancelling, with the
            -- new status and completedAt: updatedAt is the earlier one.
            cancelled := payload;
            IF updated_before IS NOT NULL AND payload ? 'capture' THEN
                cancelled := jsonb_set(payload, '{{document,updatedAt}}', updated_before);
            END IF;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'relay: Documenso document % not read at commit, so no webhook is sent '
            'for it: %', key, SQLERRM;
        events := ARRAY[]::text[];
        changed := false;
    END;
    FOREACH event IN ARRAY events LOOP
        PERFORM relay.documenso_emit(
            event,
            CASE WHEN event = 'DOCUMENT_CANCELLED' AND NOT deleted THEN cancelled ELSE payload END,
            d."teamId", d."userId");
    END LOOP;
    IF changed THEN
        INSERT INTO relay.documenso_state (id, status) VALUES (number, status)
        ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status;
    END IF;
    RETURN NULL;
END
$$;

-- The events no trigger recorded (it was missing: a migration dropped its table): each document
-- whose status is not the one relay.documenso_state holds. With emit false (the first install)
-- it only records the statuses, so history is not sent again. Returns how many it sent.
CREATE OR REPLACE FUNCTION relay.documenso_reconcile(emit boolean) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
    number int;
    event text;
    sent int := 0;
BEGIN
    -- Deleted while no trigger watched: Documenso's payload cannot be rebuilt, so forgotten.
    DELETE FROM relay.documenso_state AS s
    WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {by_number});
    FOR d IN
        SELECT t.* FROM {table} AS t
        WHERE {is_document_t} AND t."status"::text <> 'DRAFT'
          AND NOT EXISTS (SELECT 1 FROM relay.documenso_state AS s
                          WHERE {by_number} AND s.status = t."status"::text)
    LOOP
        number := {number};
        event := relay.documenso_event_name(d."status"::text);
        IF emit AND event IS NOT NULL THEN
            PERFORM relay.documenso_emit(event, relay.documenso_payload(d."id"::text),
                                         d."teamId", d."userId");
            sent := sent + 1;
        END IF;
        INSERT INTO relay.documenso_state (id, status) VALUES (number, d."status"::text)
        ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status;
    END LOOP;
    RETURN sent;
END
$$;

REVOKE ALL ON FUNCTION relay.documenso_payload(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION relay.documenso_emit(text, jsonb, int, int) FROM PUBLIC;
REVOKE ALL ON FUNCTION relay.documenso_change() FROM PUBLIC;
REVOKE ALL ON FUNCTION relay.documenso_recipient() FROM PUBLIC;
REVOKE ALL ON FUNCTION relay.documenso_commit() FROM PUBLIC;
REVOKE ALL ON FUNCTION relay.documenso_reconcile(boolean) FROM PUBLIC;
COMMENT ON FUNCTION relay.documenso_change() IS {fingerprint};
COMMENT ON FUNCTION relay.documenso_recipient() IS {fingerprint};
COMMENT ON FUNCTION relay.documenso_commit() IS {fingerprint};

-- Earlier relay versions' triggers (named "status" in their WHEN clause, which blocks Prisma's
-- enum migrations).
DROP TRIGGER IF EXISTS relay_documenso_status ON {table};
DROP TRIGGER IF EXISTS relay_documenso_created ON {table};

CREATE OR REPLACE TRIGGER relay_documenso_change
    AFTER INSERT OR UPDATE ON {table}
    FOR EACH ROW EXECUTE FUNCTION relay.documenso_change();
CREATE OR REPLACE TRIGGER relay_documenso_delete
    BEFORE DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION relay.documenso_change();
CREATE OR REPLACE TRIGGER relay_documenso_recipient
    AFTER INSERT OR UPDATE ON {recipient}
    FOR EACH ROW EXECUTE FUNCTION relay.documenso_recipient();

-- A constraint trigger cannot be replaced in place.
DROP TRIGGER IF EXISTS relay_documenso_commit ON relay.documenso_changes;
CREATE CONSTRAINT TRIGGER relay_documenso_commit
    AFTER INSERT ON relay.documenso_changes
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION relay.documenso_commit();
