-- Documenso document status events (preset `documenso_documents`), installed by `relay install`.
-- Sections are named; braces are filled by relay.store with quoted names and, where Documenso's
-- schema version lacks a table, with NULL in its place.
--
-- A row-level trigger on Documenso's document table captures each real status change (Prisma
-- rewrites "updatedAt" on every update, so only a changed status counts) into
-- relay.documenso_events, with the payload Documenso's own webhook carries, built at that moment
-- from the document and its recipients. relay then delivers it in Documenso's webhook shape.
-- The trigger must never break Documenso's own write: if building the payload fails, it records
-- the event with a minimal payload and the reason; if even that cannot be recorded (relay's table
-- dropped, a privilege taken away) it raises a WARNING, and the write goes on. Every function
-- runs as its owner (Documenso's role needs no privilege on relay's schema) with a pinned
-- search_path, so only the schema-qualified names written here are ever looked up.

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

-- Documenso stores UTC in timestamp(3) without time zone and sends JavaScript's toISOString().
CREATE OR REPLACE FUNCTION relay.documenso_iso(value jsonb) RETURNS jsonb
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN value IS NULL OR jsonb_typeof(value) = 'null' THEN 'null'::jsonb
           ELSE to_jsonb(to_char((value #>> ARRAY[]::text[])::timestamp,
                                 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')) END
$$;

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

-- Fields are read with -> so a column a Documenso version lacks comes out null, not an error.
CREATE OR REPLACE FUNCTION relay.documenso_recipient_json(r jsonb, document_id int, envelope_id text)
RETURNS jsonb
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_build_object(
        'id', r->'id', 'envelopeId', to_jsonb(envelope_id), 'documentId', to_jsonb(document_id),
        'templateId', r->'templateId', 'email', r->'email', 'name', r->'name',
        'token', r->'token', 'documentDeletedAt', relay.documenso_iso(r->'documentDeletedAt'),
        'expiresAt', relay.documenso_iso(r->'expiresAt'),
        'expirationNotifiedAt', relay.documenso_iso(r->'expirationNotifiedAt'),
        'signedAt', relay.documenso_iso(r->'signedAt'), 'authOptions', r->'authOptions',
        'signingOrder', r->'signingOrder', 'rejectionReason', r->'rejectionReason',
        'role', r->'role', 'readStatus', r->'readStatus', 'signingStatus', r->'signingStatus',
        'sendStatus', r->'sendStatus')
$$;

CREATE OR REPLACE FUNCTION relay.documenso_document_json(
    d jsonb, document_id int, envelope_id text, meta jsonb, recipients jsonb)
RETURNS jsonb
LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_build_object(
        'id', to_jsonb(document_id), 'envelopeId', to_jsonb(envelope_id),
        'externalId', d->'externalId', 'userId', d->'userId', 'authOptions', d->'authOptions',
        'formValues', d->'formValues', 'visibility', d->'visibility', 'title', d->'title',
        'status', d->'status',
        'createdAt', relay.documenso_iso(d->'createdAt'),
        'updatedAt', relay.documenso_iso(d->'updatedAt'),
        'completedAt', relay.documenso_iso(d->'completedAt'),
        'deletedAt', relay.documenso_iso(d->'deletedAt'),
        'teamId', d->'teamId', 'templateId', d->'templateId', 'source', d->'source',
        'documentMeta', CASE WHEN meta IS NULL THEN 'null'::jsonb ELSE jsonb_build_object(
            'id', meta->'id', 'subject', meta->'subject', 'message', meta->'message',
            'timezone', meta->'timezone', 'dateFormat', meta->'dateFormat',
            'redirectUrl', meta->'redirectUrl', 'signingOrder', meta->'signingOrder',
            'allowDictateNextSigner', meta->'allowDictateNextSigner',
            'typedSignatureEnabled', meta->'typedSignatureEnabled',
            'uploadSignatureEnabled', meta->'uploadSignatureEnabled',
            'drawSignatureEnabled', meta->'drawSignatureEnabled', 'language', meta->'language',
            'distributionMethod', meta->'distributionMethod',
            'emailSettings', meta->'emailSettings') END,
        'recipients', recipients,
        'Recipient', recipients)
    || CASE WHEN d ? 'documentDataId'
            THEN jsonb_build_object('documentDataId', d->'documentDataId')
            ELSE '{{}}'::jsonb END
$$;

REVOKE ALL ON FUNCTION relay.documenso_iso(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION relay.documenso_event_name(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION relay.documenso_recipient_json(jsonb, int, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION relay.documenso_document_json(jsonb, int, text, jsonb, jsonb) FROM PUBLIC;

-- name: envelope
-- Documenso v1.13 and later: "Envelope" holds documents and templates; only documents count.
CREATE OR REPLACE FUNCTION relay.documenso_envelope_event() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    event text;
    legacy_id int;
    payload jsonb;
BEGIN
    BEGIN
        event := relay.documenso_event_name(NEW."status"::text);
        IF event IS NULL OR NEW."type"::text <> 'DOCUMENT' THEN
            RETURN NULL;
        END IF;
        legacy_id := substring(NEW."secondaryId" FROM '^document_([0-9]+)$')::int;
        BEGIN
            payload := relay.documenso_document_json(
                to_jsonb(NEW), legacy_id, NEW."id",
                {meta},
                (SELECT coalesce(jsonb_agg(
                            relay.documenso_recipient_json(to_jsonb(r), legacy_id, NEW."id")
                            ORDER BY r."id"), '[]'::jsonb)
                 FROM {recipient} AS r WHERE r."envelopeId" = NEW."id"));
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'relay: % for document % sent with a minimal payload: %',
                event, NEW."id", SQLERRM;
            payload := jsonb_build_object('id', legacy_id, 'envelopeId', NEW."id",
                                          'status', NEW."status"::text, 'relayError', SQLERRM);
        END;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'relay: % for document % not recorded, so no webhook is sent for it: %',
            coalesce(event, 'the status change'), NEW."id", SQLERRM;
        RETURN NULL;
    END;
    -- The write stays outside any EXCEPTION block: a block that writes takes a subtransaction
    -- id for every row, and a transaction changing more than 64 documents would overflow
    -- PostgreSQL's subtransaction cache, slowing every session while it runs. What could make
    -- it fail is checked first instead (the table runs as its owner, so privileges cannot).
    IF to_regclass('relay.documenso_events') IS NULL THEN
        RAISE WARNING 'relay: % for document % not recorded: relay.documenso_events is missing; '
            'run `relay install`', event, NEW."id";
        RETURN NULL;
    END IF;
    INSERT INTO relay.documenso_events (topic, payload) VALUES (event, payload);
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION relay.documenso_envelope_event() FROM PUBLIC;
COMMENT ON FUNCTION relay.documenso_envelope_event() IS {fingerprint};

CREATE OR REPLACE TRIGGER relay_documenso_status
    AFTER UPDATE OF "status" ON {table}
    FOR EACH ROW WHEN (OLD."status" IS DISTINCT FROM NEW."status")
    EXECUTE FUNCTION relay.documenso_envelope_event();

-- Documents created directly as PENDING (from a direct template link) were sent too.
CREATE OR REPLACE TRIGGER relay_documenso_created
    AFTER INSERT ON {table}
    FOR EACH ROW WHEN (NEW."status"::text <> 'DRAFT')
    EXECUTE FUNCTION relay.documenso_envelope_event();

-- name: document
-- Documenso v1.12 and earlier: "Document", integer ids; templates live in another table.
CREATE OR REPLACE FUNCTION relay.documenso_document_event() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    event text;
    payload jsonb;
BEGIN
    BEGIN
        event := relay.documenso_event_name(NEW."status"::text);
        IF event IS NULL THEN
            RETURN NULL;
        END IF;
        BEGIN
            payload := relay.documenso_document_json(
                to_jsonb(NEW), NEW."id", NULL,
                {meta},
                (SELECT coalesce(jsonb_agg(
                            relay.documenso_recipient_json(to_jsonb(r), NEW."id", NULL)
                            ORDER BY r."id"), '[]'::jsonb)
                 FROM {recipient} AS r WHERE r."documentId" = NEW."id"));
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'relay: % for document % sent with a minimal payload: %',
                event, NEW."id", SQLERRM;
            payload := jsonb_build_object('id', NEW."id", 'status', NEW."status"::text,
                                          'relayError', SQLERRM);
        END;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'relay: % for document % not recorded, so no webhook is sent for it: %',
            coalesce(event, 'the status change'), NEW."id", SQLERRM;
        RETURN NULL;
    END;
    -- The write stays outside any EXCEPTION block: a block that writes takes a subtransaction
    -- id for every row, and a transaction changing more than 64 documents would overflow
    -- PostgreSQL's subtransaction cache, slowing every session while it runs. What could make
    -- it fail is checked first instead (the table runs as its owner, so privileges cannot).
    IF to_regclass('relay.documenso_events') IS NULL THEN
        RAISE WARNING 'relay: % for document % not recorded: relay.documenso_events is missing; '
            'run `relay install`', event, NEW."id";
        RETURN NULL;
    END IF;
    INSERT INTO relay.documenso_events (topic, payload) VALUES (event, payload);
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION relay.documenso_document_event() FROM PUBLIC;
COMMENT ON FUNCTION relay.documenso_document_event() IS {fingerprint};

CREATE OR REPLACE TRIGGER relay_documenso_status
    AFTER UPDATE OF "status" ON {table}
    FOR EACH ROW WHEN (OLD."status" IS DISTINCT FROM NEW."status")
    EXECUTE FUNCTION relay.documenso_document_event();

CREATE OR REPLACE TRIGGER relay_documenso_created
    AFTER INSERT ON {table}
    FOR EACH ROW WHEN (NEW."status"::text <> 'DRAFT')
    EXECUTE FUNCTION relay.documenso_document_event();
