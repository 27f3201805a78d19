"""`relay run` as a log shipper sees it: with --log-format json every line is a JSON object,
with logfmt (the default when stderr is no terminal) every line parses as logfmt, with text
every line is one record; `[log] deliveries = true` logs each delivered row at INFO."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.support import (
    HERMETIC_ENV,
    Receiver,
    RelayProcess,
    delivery_ids,
    insert_rows,
    install,
    raw_config,
    write_config,
)
from tests.unit.test_logs import logfmt_fields, text_fields

# A receiver's answer that tries every trick: a second line, quotes, `=`, a terminal escape, a
# Unicode line separator.
NASTY = 'line1\nlevel=error event=forged "quoted" \\ \x1b[31mred\u2028sep'.encode()
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"debug", "info", "warning", "error", "critical"}


def parsed(kind: str, line: str) -> dict[str, Any]:
    """One line as its fields: `event` (relay's records) or `msg` (other libraries'), the
    rest by name; logfmt and text values are strings."""
    if kind == "json":
        data = json.loads(line)
        assert isinstance(data, dict), line
        return data
    if kind == "logfmt":
        fields = logfmt_fields(line)
        assert TIME.match(fields["time"] or ""), line
        return fields
    head = re.match(r"^\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO |WARN |ERROR|CRIT ) (\S+)", line)
    assert head, line
    if head.group(2).endswith(":"):  # another library's record: `logger: message`
        return {"level": head.group(1).strip(), "msg": line[head.end() :]}
    fields = text_fields(line)
    event = next(iter(fields))
    assert fields.pop(event) is None, line
    return {"level": head.group(1).strip(), "event": event, **fields}


@pytest.mark.parametrize("kind", ["json", "logfmt", "text"])
async def test_relay_run_writes_nothing_but_its_log_format(
    db: str, receiver: Receiver, tmp_config: Path, kind: str
) -> None:
    async def fail_once(request: web.Request, count: int) -> web.StreamResponse:
        if request.path == "/nasty" and count == 1:
            return web.Response(status=500, body=NASTY)
        return web.Response(status=200, text="ok")

    receiver.behaviour = fail_once
    await install(write_config(tmp_config, raw_config(db, log={"deliveries": True})))
    # logfmt is asked for by no flag: it is the default when stderr is a pipe.
    args = ("run",) if kind == "logfmt" else ("--log-format", kind, "run")
    relay = RelayProcess(tmp_config, env=HERMETIC_ENV)
    try:
        await relay.start(*args)
        await relay.wait_line("listener.connected")
        plain = await insert_rows(db, receiver.url, 3)
        [nasty] = await insert_rows(db, receiver.url.replace("/hook", "/nasty"), 1)
        await receiver.wait_ids(delivery_ids(plain))
        await receiver.wait_for(lambda _: receiver.seen[f"deliveries_{nasty}"] >= 2)
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)  # a graceful stop logs what is in flight
        assert await relay.wait_exit() == 0, relay.output()
    finally:
        relay.kill()

    records = [parsed(kind, line) for line in relay.lines]
    assert records
    for record, line in zip(records, relay.lines, strict=True):
        assert ("event" in record) != ("msg" in record), line
        if kind != "text":
            assert TIME.match(record["time"]) and record["level"] in LEVELS, line
            assert record["logger"], line
            if record["logger"].startswith("relay"):
                assert "event" in record, line
    events = [r["event"] for r in records if "event" in r]
    assert "relay.started" in events and events[-1] == "relay.stopped", events

    # One INFO line per delivered row, with its key (and the nasty row's on its 2nd attempt).
    succeeded = [r for r in records if r.get("event") == "delivery.succeeded"]
    assert sorted(str(r["key"]) for r in succeeded) == sorted(map(str, [*plain, nasty]))
    for r in succeeded:
        assert r["level"].lower() == "info" and r["source"] == "deliveries"
        assert str(r["attempt"]) == ("2" if str(r["key"]) == str(nasty) else "1")
        assert str(r["status"]) == "200" and float(r["ms"]) >= 0

    # The receiver's answer is one field of one line, as relay keeps it in last_error.
    [failed] = [r for r in records if r.get("event") == "delivery.failed"]
    assert str(failed["key"]) == str(nasty) and str(failed["status"]) == "500"
    assert failed["error"] == (
        'HTTP 500: line1\\nlevel=error event=forged "quoted" \\ \\x1b[31mred\\u2028sep'
    )
    assert float(failed["retry_in_s"]) >= 0
    if kind == "json":
        assert isinstance(failed["retry_in_s"], float) and isinstance(failed["key"], int)
