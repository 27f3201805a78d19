-- Remove every trigger that calls a function in the relay schema, then those functions.
-- Tables (relay.outbox and its rows) and the schema itself are left alone: uninstalling must
-- never lose data. Idempotent.
DO $$
DECLARE
    t record;
    f record;
BEGIN
    IF to_regnamespace('relay') IS NULL THEN
        RETURN;
    END IF;
    FOR t IN
        SELECT tg.tgname, tg.tgrelid::regclass AS rel
        FROM pg_trigger tg
        JOIN pg_proc p ON p.oid = tg.tgfoid
        WHERE p.pronamespace = 'relay'::regnamespace AND NOT tg.tgisinternal
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', t.tgname, t.rel);
    END LOOP;
    FOR f IN
        SELECT p.oid::regprocedure AS sig
        FROM pg_proc p
        WHERE p.pronamespace = 'relay'::regnamespace
    LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS %s', f.sig);
    END LOOP;
END
$$;
