"""`make run`'s demo as a user meets it: banner, the printed INSERT, the receiver, Ctrl-C."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import psycopg

from relay.embedded import EmbeddedPostgres, free_port
from tests.support import ROOT, WAIT


class Demo:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.changed = asyncio.Condition()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, data_dir: Path, pg_port: int) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay.demo",
            "--data-dir",
            str(data_dir),
            "--port",
            str(pg_port),
            "--receiver-port",
            "0",
            "--health-port",
            "0",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
        )
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().rstrip())
            async with self.changed:
                self.changed.notify_all()

    async def wait_line(self, pattern: str) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return next((m for line in self.lines if (m := regex.search(line))), None)

        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(lambda: found() is not None)
        match = found()
        assert match is not None
        return match


async def test_make_run_demo_delivers_the_banner_insert_and_stops_cleanly(tmp_path: Path) -> None:
    demo = Demo()
    await demo.start(tmp_path / "demo", free_port())
    try:
        await demo.wait_line(r"relay demo is running")
        db_url = (await demo.wait_line(r"database: (\S+)")).group(1)
        insert = (await demo.wait_line(r"^\s+(INSERT INTO webhook_delivery_queue .*;)$")).group(1)
        publish = (await demo.wait_line(r"^\s+(SELECT relay.publish\(.*\);)$")).group(1)
        await demo.wait_line(r"psql '" + re.escape(db_url) + "'")

        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(insert)
            conn.execute(publish)
        await demo.wait_line(r'\[receiver .*id=deliveries_1 attempt=1 body=\{"order": 42\}')
        await demo.wait_line(r'\[receiver .*id=events_1 attempt=1 body=\{"order": 42\}')

        assert demo.proc is not None
        # No configuration file to reload: SIGHUP says so and the demo goes on.
        demo.proc.send_signal(signal.SIGHUP)
        await demo.wait_line(r'reload\.skipped reason="no configuration file')
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(publish)
        await demo.wait_line(r'\[receiver .*id=events_2 attempt=1 body=\{"order": 42\}')

        demo.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert await asyncio.wait_for(demo.proc.wait(), WAIT) == 0
        await demo.reader
        assert any("relay.stopped" in line for line in demo.lines)
        # The embedded server was stopped too, and its data folder is kept for the next run.
        assert not (tmp_path / "demo" / "pgdata" / "postmaster.pid").exists()
        assert (tmp_path / "demo" / "pgdata" / "PG_VERSION").exists()
    finally:
        if demo.proc is not None and demo.proc.returncode is None:
            demo.proc.kill()
            await demo.proc.wait()
        EmbeddedPostgres(tmp_path / "demo" / "pgdata").stop("immediate")  # never leak a server
