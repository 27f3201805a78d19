-- Named queries about the database itself (no source placeholders).

-- name: columns
SELECT a.attname, format_type(a.atttypid, a.atttypmod), ty.typtype, a.atttypid::int8
FROM pg_attribute AS a
JOIN pg_type AS ty ON ty.oid = a.atttypid
WHERE a.attrelid = to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))
  AND a.attnum > 0 AND NOT a.attisdropped;

-- name: table_exists
SELECT to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text)) IS NOT NULL;

-- name: enum_labels
SELECT enumlabel::text FROM pg_enum WHERE enumtypid = %(type_oid)s::oid ORDER BY enumsortorder;

-- name: installed_trigger
-- How many of a source's triggers (by name) call its function, and what that function was made from
-- (its comment, written by `relay install`; see relay.store.fingerprint).
SELECT (SELECT count(*)::int FROM pg_trigger
        WHERE tgname = ANY(%(triggers)s::text[])
          AND tgrelid = to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))
          AND tgfoid = f.oid),
       obj_description(f.oid, 'pg_proc')
FROM (SELECT to_regprocedure(format('%%I.%%I()', 'relay', %(function)s::text)) AS oid) AS f;

-- name: current_role
SELECT current_user::text;

-- name: schema_usage
-- NULL if the schema does not exist.
SELECT has_schema_privilege(n.oid, 'USAGE') FROM pg_namespace AS n WHERE n.nspname = %(schema)s;

-- name: privileges
-- What the current role may do with one table: SELECT and UPDATE per column, INSERT and
-- DELETE on the table. No rows if the table does not exist.
SELECT a.attname::text,
       has_column_privilege(c.oid, a.attnum, 'SELECT'),
       has_column_privilege(c.oid, a.attnum, 'UPDATE'),
       has_table_privilege(c.oid, 'INSERT'),
       has_table_privilege(c.oid, 'DELETE')
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = %(schema)s AND c.relname = %(table)s;

-- name: status_checks
-- CHECK constraints that involve only the status column: the status values relay writes must
-- pass them, or every settle would fail.
SELECT c.conname::text, pg_get_constraintdef(c.oid)
FROM pg_constraint AS c
JOIN pg_attribute AS a ON a.attrelid = c.conrelid AND a.attname = %(column)s
WHERE c.conrelid = to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))
  AND c.contype = 'c' AND c.conkey = ARRAY[a.attnum];

-- name: documenso_probe
-- Which Documenso schema this is: "Envelope" (v1.13+) or "Document" (v1.12 and earlier), and
-- the tables and columns the document payload reads. From pg_attribute, not
-- information_schema: the latter shows only columns the current role has privileges on, and
-- relay's role (for `relay check`) need not be the installer.
SELECT to_regclass(format('%%I.%%I', %(schema)s::text, 'Envelope')) IS NOT NULL,
       to_regclass(format('%%I.%%I', %(schema)s::text, 'Document')) IS NOT NULL,
       to_regclass(format('%%I.%%I', %(schema)s::text, 'Recipient')) IS NOT NULL,
       EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = to_regclass(format('%%I.%%I', %(schema)s::text, 'DocumentMeta'))
                 AND attname = 'id' AND NOT attisdropped),
       EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = to_regclass(format('%%I.%%I', %(schema)s::text, 'Envelope'))
                 AND attname = 'documentMetaId' AND NOT attisdropped),
       EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = to_regclass(format('%%I.%%I', %(schema)s::text, 'DocumentMeta'))
                 AND attname = 'documentId' AND NOT attisdropped),
       EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = to_regclass(format('%%I.%%I', %(schema)s::text, 'DocumentAuditLog'))
                 AND attname = 'envelopeId' AND NOT attisdropped);
