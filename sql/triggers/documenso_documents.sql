-- Documenso document status events (preset `documenso_documents`), installed by `relay install`.
-- Sections are named; braces are filled by relay.store with quoted names and with the SQL that
-- fits Documenso's schema version ("Envelope" from v1.13, "Document" before).
--
-- How a status change becomes an event:
-- 1. relay_documenso_change, an ordinary row trigger on Documenso's document table, notes a
--    document whose status may have changed in relay.documenso_changes. It fires on every write
--    and names no column of Documenso's (no column list, no WHEN clause): PostgreSQL refuses to
--    alter the type of a column a trigger names, and Prisma alters "status" whenever the
--    DocumentStatus enum loses a value. The checks happen inside the function, which PostgreSQL
--    does not tie to the columns it reads.
-- 2. At commit, a deferred trigger on that relay table reads the document as the transaction
--    leaves it, with the recipients and meta inserted after it, compares its status with the one
--    last sent (relay.documenso_state) and records the event with Documenso's payload. Deferring
--    on relay's own table, not Documenso's, keeps Documenso's migrations free to ALTER its
--    tables after writing to them in the same transaction (PostgreSQL refuses that while a
--    table has deferred trigger events pending).
-- 3. Deleting a document: relay_documenso_delete, a BEFORE DELETE trigger, records what
--    Documenso's delete-document.ts sends while the recipients are still there.
-- 4. After every install (and every reinstall when a migration dropped the trigger), the
--    documents whose status differs from relay.documenso_state get their event: no status
--    change is lost while the trigger was missing.
-- The triggers must never break Documenso's write: if building the payload fails, the event is
-- recorded with a minimal payload and the reason; if even that cannot be recorded (relay's
-- table dropped) a WARNING is raised, and the write goes on. Every function runs as its owner
-- (Documenso's role needs no privilege on relay's schema) with a pinned search_path, so only the
-- schema-qualified names written here are ever looked up.

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

-- The status each document last had an event for (or had when relay was installed), by
-- Documenso's document number (the payload's "id", "Envelope"."secondaryId" = 'document_<n>'),
-- which survives the move from "Document" to "Envelope". One small row per sent document.
CREATE TABLE IF NOT EXISTS relay.documenso_state (
    id      integer PRIMARY KEY,
    status  text NOT NULL
);

-- Documents written in a transaction that has not committed yet; emptied at its commit.
CREATE TABLE IF NOT EXISTS relay.documenso_changes (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document  text    NOT NULL,   -- the document table's "id", as text (indexed below)
    signal    text,               -- 'resend': written again as PENDING while PENDING;
                                  -- 'deleted': its "deletedAt" set (a soft delete)
    updated_before jsonb          -- "updatedAt" before this write (NULL for an INSERT)
);
CREATE INDEX IF NOT EXISTS documenso_changes_document_idx ON relay.documenso_changes (document);

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

-- One document as it is now, with its meta and recipients, as rows: relay maps them to the
-- payload of the Documenso version whose columns they have when it sends the event
-- (relay/sources/documenso_payload.py). NULL if it is not a document. Documenso does not order
-- the recipients; by id is what an unordered read of them most often gives.
CREATE OR REPLACE FUNCTION relay.documenso_payload(key text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
BEGIN
    SELECT * INTO d FROM {table} AS t WHERE {by_key};
    IF NOT FOUND OR NOT ({is_document}) THEN
        RETURN NULL;
    END IF;
    RETURN jsonb_build_object(
        'capture', 1, 'id', {number}, 'envelopeId', {envelope_id}, 'document', to_jsonb(d),
        'meta', {meta},
        'recipients', (SELECT coalesce(jsonb_agg(to_jsonb(r) ORDER BY r."id"), '[]'::jsonb)
                       FROM {recipient} AS r WHERE {recipient_of}));
END
$$;

-- The row trigger on Documenso's table (both the AFTER INSERT OR UPDATE and the BEFORE DELETE).
CREATE OR REPLACE FUNCTION relay.documenso_change() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
    number int;
    signal text;
    payload jsonb;
BEGIN
    BEGIN
        IF TG_OP = 'DELETE' THEN
            d := OLD;
            -- Deleted with its team or owner (a cascade, one trigger level down): not a
            -- document Documenso's delete-document.ts deleted, and Documenso sends nothing.
            IF pg_trigger_depth() > 1 OR NOT ({is_document}) THEN
                RETURN OLD;
            END IF;
            number := {number};
            -- Documenso's delete-document.ts hard-deletes drafts and pending documents and
            -- sends DOCUMENT_CANCELLED (v1.10 on, whatever the status) with the document as it
            -- was. Its admin delete writes the same and sends nothing: relay cannot tell them
            -- apart, and sends it for both.
            BEGIN
                payload := relay.documenso_payload(d."id"::text);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'relay: DOCUMENT_CANCELLED for document % sent with a minimal '
                    'payload: %', number, SQLERRM;
                payload := jsonb_build_object('id', number, 'envelopeId', {envelope_id},
                                              'status', d."status"::text, 'relayError', SQLERRM);
            END;
        ELSE
            d := NEW;
            IF NOT ({is_document}) THEN
                RETURN NULL;
            END IF;
            IF TG_OP = 'INSERT' THEN
                IF d."status"::text = 'DRAFT' THEN
                    RETURN NULL;
                END IF;
            ELSIF OLD."deletedAt" IS NULL AND NEW."deletedAt" IS NOT NULL THEN
                -- A completed document is deleted softly; Documenso sends DOCUMENT_CANCELLED.
                signal := 'deleted';
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
    -- The writes stay outside any EXCEPTION block: a block that writes takes a subtransaction
    -- id for every row, and a transaction changing more than 64 documents would overflow
    -- PostgreSQL's subtransaction cache, slowing every session while it runs. What could make
    -- them fail is checked first instead (the tables run as their owner, so privileges cannot).
    IF to_regclass('relay.documenso_changes') IS NULL OR to_regclass('relay.documenso_state') IS NULL
       OR to_regclass('relay.documenso_events') IS NULL THEN
        RAISE WARNING 'relay: a change to Documenso document % not recorded: one of '
            'relay.documenso_changes, relay.documenso_state and relay.documenso_events is '
            'missing; run `relay install`', d."id";
        RETURN OLD;
    END IF;
    IF TG_OP = 'DELETE' THEN
        DELETE FROM relay.documenso_state WHERE id = number;
        IF payload IS NOT NULL THEN
            INSERT INTO relay.documenso_events (topic, payload)
            VALUES ('DOCUMENT_CANCELLED', payload);
        END IF;
        RETURN OLD;
    END IF;
    INSERT INTO relay.documenso_changes (document, signal, updated_before)
    VALUES (d."id"::text, signal, CASE WHEN TG_OP = 'UPDATE' THEN to_jsonb(OLD)->'updatedAt' END);
    RETURN NULL;
END
$$;

-- At commit: the document as the transaction leaves it, sent if its status is not the one
-- last sent. The first of a document's changes to fire takes all of them (several writes to one
-- document in a transaction make one event, or none); the others find theirs gone.
CREATE OR REPLACE FUNCTION relay.documenso_commit() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    key text := NEW.document;
    d record;
    found_changes int;
    resend boolean;
    deleted boolean;
    inserted boolean;
    updated_before jsonb;
    number int;
    status text;
    seen text;
    changed boolean := false;
    event text;
    payload jsonb;
BEGIN
    WITH taken AS (
        DELETE FROM relay.documenso_changes AS c WHERE c.document = key
        RETURNING c.id, c.signal, c.updated_before
    )
    SELECT count(*), bool_or(taken.signal = 'resend'), bool_or(taken.signal = 'deleted'),
           bool_or(taken.updated_before IS NULL),
           (array_agg(taken.updated_before ORDER BY taken.id))[1]
    INTO found_changes, resend, deleted, inserted, updated_before
    FROM taken;
    IF found_changes = 0 THEN
        RETURN NULL;
    END IF;
    BEGIN
        SELECT * INTO d FROM {table} AS t WHERE {by_key};
        IF FOUND AND ({is_document}) THEN
            number := {number};
            status := d."status"::text;
            -- A document relay has no status for is a draft (drafts send nothing).
            SELECT coalesce(max(s.status), 'DRAFT') INTO seen
            FROM relay.documenso_state AS s WHERE s.id = number;
            IF status <> seen THEN
                changed := true;
                event := relay.documenso_event_name(status);
                -- Created as PENDING: a document from a direct template link. Documenso's
                -- sendDocument sends DOCUMENT_SENT after that transaction, by writing it again
                -- (below), and only if someone is left to sign; otherwise it seals it at once.
                IF inserted AND status = 'PENDING' AND ({sent_later} OR NOT EXISTS (
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
            END IF;
            IF event IS NOT NULL THEN
                BEGIN
                    payload := relay.documenso_payload(key);
                    -- cancel-document.ts maps the document as it read it before cancelling,
                    -- with the new status and completedAt: updatedAt is the earlier one.
                    IF event = 'DOCUMENT_CANCELLED' AND updated_before IS NOT NULL THEN
                        payload := jsonb_set(payload, '{{document,updatedAt}}', updated_before);
                    END IF;
                EXCEPTION WHEN OTHERS THEN
                    RAISE WARNING 'relay: % for document % sent with a minimal payload: %',
                        event, number, SQLERRM;
                    payload := jsonb_build_object('id', number, 'envelopeId', {envelope_id},
                                                  'status', status, 'relayError', SQLERRM);
                END;
            END IF;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'relay: Documenso document % not read at commit, so no webhook is sent '
            'for it: %', key, SQLERRM;
        event := NULL;
        changed := false;
    END;
    IF event IS NOT NULL THEN
        INSERT INTO relay.documenso_events (topic, payload) VALUES (event, payload);
    END IF;
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
    payload jsonb;
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
            payload := relay.documenso_payload(d."id"::text);
            INSERT INTO relay.documenso_events (topic, payload) VALUES (event, payload);
            sent := sent + 1;
        END IF;
        INSERT INTO relay.documenso_state (id, status) VALUES (number, d."status"::text)
        ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status;
    END LOOP;
    RETURN sent;
END
$$;

REVOKE ALL ON FUNCTION relay.documenso_payload(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION relay.documenso_change() FROM PUBLIC;
REVOKE ALL ON FUNCTION relay.documenso_commit() FROM PUBLIC;
REVOKE ALL ON FUNCTION relay.documenso_reconcile(boolean) FROM PUBLIC;
COMMENT ON FUNCTION relay.documenso_change() IS {fingerprint};
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

-- A constraint trigger cannot be replaced in place.
DROP TRIGGER IF EXISTS relay_documenso_commit ON relay.documenso_changes;
CREATE CONSTRAINT TRIGGER relay_documenso_commit
    AFTER INSERT ON relay.documenso_changes
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION relay.documenso_commit();
