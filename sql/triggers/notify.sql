-- The wake-up trigger for one source, installed by `relay install` for each configured source.
-- Placeholders in braces are filled with quoted identifiers and literals (psycopg.sql).
--
-- Statement-level, with a transition table: a 10,000-row INSERT fires once, and sends one
-- notification whose payload is only the source name (never row data, so the 8000-byte limit
-- cannot matter). Identical notifications in one transaction fold into one. It notifies only
-- when the statement left a row claimable now, so relay's own settles and retries scheduled for
-- later wake nobody. The notification is a hint: relay's sweeps find every row without it.
--
-- It must never fail the application's statement: it runs as its owner (the writer needs no
-- privilege on relay's schema) with a pinned search_path, and whatever goes wrong in it becomes
-- a WARNING; the row is then found by the next sweep instead.

CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    woken boolean;
BEGIN
    BEGIN
        -- An inserted row may need less checked than an updated one (a table source's
        -- inserted rows hold no claim of relay's: no lease is looked up for them). Two
        -- statements, not one with a CASE: that one locked and opened relay.leases and its
        -- index for the lookup at every INSERT too, a tenth of a single-row INSERT's rate
        -- (bench, writers).
        IF TG_OP = 'INSERT' THEN
            woken := EXISTS (SELECT 1 FROM relay_changed AS t WHERE {inserted});
        ELSE
            woken := EXISTS (SELECT 1 FROM relay_changed AS t WHERE {ready});
        END IF;
        IF woken THEN
            PERFORM pg_catalog.pg_notify({channel}, {source});
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'relay: no wake-up for source % (its rows wait for the next sweep): %',
            {source}, SQLERRM;
    END;
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION {function}() FROM PUBLIC;

-- What `relay check` compares with what `relay install` would install now (stale triggers).
COMMENT ON FUNCTION {function}() IS {fingerprint};

CREATE OR REPLACE TRIGGER {insert_trigger}
    AFTER INSERT ON {table}
    REFERENCING NEW TABLE AS relay_changed
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();

CREATE OR REPLACE TRIGGER {update_trigger}
    AFTER UPDATE ON {table}
    REFERENCING NEW TABLE AS relay_changed
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();
