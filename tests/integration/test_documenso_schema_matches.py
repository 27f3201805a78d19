"""The hand-written Documenso tables most tests use (tests/integration/documenso_schema.py) are a
subset of what Documenso's real migrations make at that version: every column they declare is
there, with the same type and nullability. (The real schema, replayed, is slower to fill: most
tests use the subset, the upgrade test the real thing.)"""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import Server
from tests.integration.documenso_migrations import documenso_database, documenso_execute
from tests.integration.documenso_schema import ENVELOPE, JOBS, LEGACY_DOCUMENT, WEBHOOKS

Columns = dict[tuple[str, str], tuple[str, bool]]

COLUMNS = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
FROM pg_attribute AS a JOIN pg_class AS c ON c.oid = a.attrelid
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND a.attnum > 0
  AND NOT a.attisdropped AND c.relname <> 'webhook_delivery_queue'
"""


def columns(url: str) -> Columns:
    with psycopg.connect(url) as conn:
        return {(t, c): (ty, nn) for t, c, ty, nn in conn.execute(COLUMNS).fetchall()}


@pytest.mark.parametrize(
    ("release", "schema"),
    [("v2.17.0", ENVELOPE + JOBS + WEBHOOKS), ("v1.12.10", LEGACY_DOCUMENT)],
)
async def test_the_test_schema_is_a_subset_of_documensos_real_one(
    server: Server, db: str, release: str, schema: str
) -> None:
    real = columns(await documenso_database(server.admin_url, db, release))
    # The hand-written tables in another database of the same server.
    info = psycopg.conninfo.conninfo_to_dict(db)
    hand_name = f"{info['dbname']}_hand"
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{hand_name}"')
    info["dbname"] = hand_name
    hand_db = psycopg.conninfo.make_conninfo(**info)
    try:
        documenso_execute(hand_db, schema)
        hand = columns(hand_db)
    finally:
        with psycopg.connect(server.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{hand_name}" WITH (FORCE)')
    differ = {key: (value, real.get(key)) for key, value in hand.items() if real.get(key) != value}
    assert differ == {}, "\n".join(f"{k}: {v}" for k, v in sorted(differ.items()))
