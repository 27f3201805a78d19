"""The one-shot commands given bad input: one clear line, the right exit code, no traceback,
nothing raw from the database on the terminal."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg

from relay.embedded import free_port
from tests.support import (
    HERMETIC_ENV,
    RelayProcess,
    install,
    queue_source,
    raw_config,
    run_cli,
    write_config,
)


async def test_an_unknown_log_level_exits_2_listing_the_levels(db: str, tmp_config: Path) -> None:
    # `--log-level verbose` ended in a traceback.
    write_config(tmp_config, raw_config(db))
    code, out = await run_cli(tmp_config, "--log-level", "verbose", "check")
    assert code == 2, out
    assert "Traceback" not in out
    assert "verbose" in out.lower() and "DEBUG" in out and "ERROR" in out


async def test_an_unknown_log_level_in_the_environment_exits_2(db: str, tmp_config: Path) -> None:
    write_config(tmp_config, raw_config(db))
    proc = RelayProcess(tmp_config, env={**HERMETIC_ENV, "RELAY_LOG_LEVEL": "loud"})
    await proc.start("check")
    code = await proc.wait_exit()
    out = proc.output()
    assert code == 2, out
    assert "RELAY_LOG_LEVEL" in out and "'loud'" not in out and "LOUD" in out
    assert "Traceback" not in out


async def test_an_unreachable_database_fails_within_seconds_in_one_line(tmp_config: Path) -> None:
    # It waited 15 s and printed several multi-line pool warnings first.
    nothing_there = f"postgresql://postgres@127.0.0.1:{free_port()}/app"
    write_config(tmp_config, raw_config(nothing_there))
    began = time.monotonic()
    code, out = await run_cli(tmp_config, "check")
    took = time.monotonic() - began
    assert code == 1, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("relay check: cannot connect to the database at database.url")
    assert "is it running and reachable?" in lines[0]
    assert took < 10, f"took {took:.1f}s"


ODD_TABLE = """
CREATE TABLE odd_queue (
    id bigserial PRIMARY KEY,
    url text NOT NULL DEFAULT 'http://127.0.0.1:9/',
    status text NOT NULL DEFAULT 'pending',
    tries integer NOT NULL DEFAULT 0
);
"""


async def test_status_prints_a_rows_status_value_escaped(db: str, tmp_config: Path) -> None:
    # A status value with terminal escape sequences was printed raw by `relay status`.
    source = queue_source(
        table="odd_queue",
        status="status",
        pending="pending",
        retry="pending",
        attempts="tries",
        max_attempts_column=None,
        due=None,
        last_error=None,
        last_status=None,
        done_at=None,
        payload=None,
        secret_column=None,
        on_failure=None,
    )
    source = {k: v for k, v in source.items() if v is not None}
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute(ODD_TABLE)
        await conn.execute(
            "INSERT INTO odd_queue (status) VALUES ('\x1b[2J\x1b[31mpwned'), ('two\nlines')"
        )
    config = write_config(tmp_config, raw_config(db, sources={"deliveries": source}))
    await install(config)
    code, out = await run_cli(tmp_config, "status")
    assert code == 0, out
    assert "\x1b" not in out
    line = next(x for x in out.splitlines() if x.startswith("deliveries:"))
    # Quoted as a logfmt value (logs.field): JSON's escapes, as go-logfmt reads them.
    assert '"\\u001b[2J\\u001b[31mpwned"=1' in line
    assert '"two\\nlines"=1' in line
