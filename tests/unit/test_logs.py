"""relay's log records and formats: every field a real field, every format parsed back to the
same fields by a parser that follows its rules (json.loads; a logfmt decoder written after
go-logfmt's), whatever the values hold.

Run as a script (`python -m tests.unit.test_logs`), it prints the event vocabulary, read from
the log calls in relay/, as the table the README's "Logs" section shows."""

from __future__ import annotations

import ast
import enum
import io
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from relay import cli, config, logs
from relay.config import ConfigError
from tests.support import queue_source

ROOT = Path(__file__).resolve().parents[2]

# -- a logfmt decoder, after go-logfmt's (github.com/go-logfmt/logfmt, decode.go) -------------


class LogfmtError(ValueError):
    pass


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "'": "'", "b": "\b", "f": "\f", "n": "\n"}
_ESCAPES |= {"r": "\r", "t": "\t"}


def _unquote(body: str) -> str:
    """The inside of a quoted value, as go-logfmt's unquoteBytes reads it (encoding/json's
    rules): only these escapes, no raw control characters."""
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 >= len(body):
                raise LogfmtError("escape at the end of a quoted value")
            e = body[i + 1]
            if e == "u":
                hex4 = body[i + 2 : i + 6]
                if not re.fullmatch("[0-9a-fA-F]{4}", hex4):
                    raise LogfmtError(f"invalid \\u escape {body[i : i + 6]!r}")
                code = int(hex4, 16)
                i += 6
                if 0xD800 <= code <= 0xDFFF:
                    low = body[i : i + 6]
                    if code < 0xDC00 and re.fullmatch(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}", low):
                        pair = (code - 0xD800) << 10 | (int(low[2:], 16) - 0xDC00)
                        out.append(chr(0x10000 + pair))
                        i += 6
                    else:
                        out.append("\ufffd")  # a lone surrogate, as Go decodes it
                    continue
                out.append(chr(code))
                continue
            if e not in _ESCAPES:
                raise LogfmtError(f"invalid escape \\{e} (go-logfmt refuses the line)")
            out.append(_ESCAPES[e])
            i += 2
            continue
        if c == '"' or c < " ":
            raise LogfmtError(f"raw {c!r} inside a quoted value")
        out.append(c)
        i += 1
    return "".join(out)


def parse_logfmt(line: str) -> list[tuple[str, str | None]]:
    """The key/value pairs of one logfmt line, in order; None for a key without `=`."""
    if "\n" in line:
        raise LogfmtError("a record is one line")
    pairs: list[tuple[str, str | None]] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] <= " ":
            i += 1
        if i >= n:
            return pairs
        start = i
        while i < n and line[i] > " " and line[i] != "=":
            if line[i] == '"':
                raise LogfmtError(f"unexpected '\"' in a key at {i}")
            i += 1
        key = line[start:i]
        if not key:
            raise LogfmtError(f"unexpected '=' at {i}")
        if i >= n or line[i] != "=":
            pairs.append((key, None))
            continue
        i += 1
        if i >= n or line[i] <= " ":
            pairs.append((key, ""))
            continue
        if line[i] == '"':
            j, escaped = i + 1, False
            while j < n:
                if escaped:
                    escaped = False
                elif line[j] == "\\":
                    escaped = True
                elif line[j] == '"':
                    break
                j += 1
            else:
                raise LogfmtError("unterminated quoted value")
            pairs.append((key, _unquote(line[i + 1 : j])))
            i = j + 1
            continue
        start = i
        while i < n and line[i] > " ":
            if line[i] in '="':
                raise LogfmtError(f"unexpected {line[i]!r} in a bare value at {i}")
            i += 1
        pairs.append((key, line[start:i]))


def logfmt_fields(line: str) -> dict[str, str | None]:
    pairs = parse_logfmt(line)
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"a key twice in {line!r}"
    return dict(pairs)


@pytest.mark.parametrize(
    ("line", "pairs"),
    [
        ('a=1 b="x y" c= d', [("a", "1"), ("b", "x y"), ("c", ""), ("d", None)]),
        (r'e="q\"\\\n\u001b\ud83d\ude00"', [("e", 'q"\\\n\x1b😀')]),
    ],
)
def test_the_test_decoder_reads_logfmt(line: str, pairs: list[tuple[str, str | None]]) -> None:
    assert parse_logfmt(line) == pairs


@pytest.mark.parametrize(
    "line", [r'a="\x1b"', 'a="unterminated', "a=b=c", 'a=b"c', '"k"=v', 'a="raw\ttab"']
)
def test_the_test_decoder_refuses_what_go_logfmt_refuses(line: str) -> None:
    with pytest.raises(LogfmtError):
        parse_logfmt(line)


# -- records, as relay's call sites make them ---------------------------------------------


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[tuple[logs.Logger, Capture]]:
    """A relay logger whose records this test alone sees: outside logging's registry, where
    pytest's handlers (which format every record they see) do not reach it."""
    handler = Capture()
    plain = logging.Logger("relay.test_logs", logging.DEBUG)
    plain.addHandler(handler)
    log = logs.Logger("relay.test_logs")
    log.logger = plain
    yield log, handler


def one(handler: Capture) -> logging.LogRecord:
    [record] = handler.records
    handler.records.clear()
    return record


class Colour(enum.StrEnum):
    red = "red"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


@dataclass(frozen=True)
class Case:
    value: object
    as_json: object  # what json.loads gives back
    as_text: str  # what a logfmt decoder gives back


NASTY = [
    Case("plain", "plain", "plain"),
    Case("two words", "two words", "two words"),
    Case("line\nforged=1 level=error", "line\nforged=1 level=error", "line\nforged=1 level=error"),
    Case('say "hi"', 'say "hi"', 'say "hi"'),
    Case("a=b", "a=b", "a=b"),
    Case("back\\slash \\n", "back\\slash \\n", "back\\slash \\n"),
    Case("\x1b[31mred\x1b[0m", "\x1b[31mred\x1b[0m", "\x1b[31mred\x1b[0m"),
    Case("a\u2028b\u2029c\x85d", "a\u2028b\u2029c\x85d", "a\u2028b\u2029c\x85d"),
    Case("cr\rtab\tnul\x00del\x7f", "cr\rtab\tnul\x00del\x7f", "cr\rtab\tnul\x00del\x7f"),
    Case("\u202eevil\u2066", "\u202eevil\u2066", "\u202eevil\u2066"),
    Case("", "", ""),
    Case("null", "null", "null"),
    Case("é ✓ 😀 \ufffd", "é ✓ 😀 \ufffd", "é ✓ 😀 \ufffd"),
    Case(42, 42, "42"),
    Case(-7, -7, "-7"),
    Case(2**70, str(2**70), str(2**70)),
    Case(2.5, 2.5, "2.5"),
    Case(0.1 + 0.2, 0.1 + 0.2, repr(0.1 + 0.2)),
    Case(True, True, "true"),
    Case(None, None, "null"),
    Case(Colour.red, "red", "red"),
    Case(Decimal("1.10"), "1.10", "1.10"),
    Case(datetime(2026, 12, 6, 16, 5, tzinfo=UTC), "2026-12-06T16:05:00+00:00", None),
    Case(ValueError("bad\nvalue"), "bad\nvalue", "bad\nvalue"),
    Case(["a", 1], ["a", 1], "['a', 1]"),
    Case(Unprintable(), "<Unprintable that cannot be shown>", "<Unprintable that cannot be shown>"),
]


def _id(case: Case) -> str:
    return type(case.value).__name__ + ":" + ascii(case.value)[:24]


def formatted(kind: str, record: logging.LogRecord) -> str:
    line = logs.formatter(kind).format(record)
    # One record, one line, by every rule a reader may split lines with (str.splitlines()
    # breaks at \x1c-\x1e, \x85, U+2028 and U+2029 too); and no escape sequence reaches a
    # terminal.
    assert line.splitlines() == [line], line
    assert "\x1b" not in line and "\x9b" not in line
    line.encode("utf-8")  # a lone surrogate would fail here, and the handler with it
    return line


def text_fields(line: str) -> dict[str, str | None]:
    """The fields of a text line: after its time and level, the same `event key=value ...`."""
    match = re.match(r"^\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO |WARN |ERROR|CRIT ) (.*)$", line)
    assert match, line
    return logfmt_fields(match.group(2))


@pytest.mark.parametrize("case", NASTY, ids=_id)
def test_every_format_parses_back_to_the_fields_of_the_call(
    captured: tuple[logs.Logger, Capture], case: Case
) -> None:
    log, handler = captured
    log.warning("delivery.failed", source="orders", key=case.value, attempt=3)
    record = one(handler)
    assert record.event == "delivery.failed"  # type: ignore[attr-defined]
    assert record.fields == {"source": "orders", "key": case.value, "attempt": 3}  # type: ignore[attr-defined]

    data = json.loads(formatted("json", record))
    assert list(data) == ["time", "level", "logger", "event", "source", "key", "attempt"]
    assert data["level"] == "warning" and data["logger"] == "relay.test_logs"
    assert (data["event"], data["source"], data["attempt"]) == ("delivery.failed", "orders", 3)
    assert data["key"] == case.as_json

    text = case.as_text if case.as_text is not None else str(case.value)
    fields = logfmt_fields(formatted("logfmt", record))
    assert list(fields) == ["time", "level", "logger", "event", "source", "key", "attempt"]
    assert fields["level"] == "warning" and fields["logger"] == "relay.test_logs"
    assert (fields["event"], fields["source"], fields["attempt"]) == (
        "delivery.failed",
        "orders",
        "3",
    )
    assert fields["key"] == text

    shown = text_fields(formatted("text", record))
    assert list(shown) == ["delivery.failed", "source", "key", "attempt"]
    assert shown["key"] == text


def test_a_lone_surrogate_is_escaped_in_every_format(captured: tuple[logs.Logger, Capture]) -> None:
    # Undecodable bytes kept by surrogateescape: orjson refuses them, UTF-8 cannot encode them.
    log, handler = captured
    log.error("inbox.refused", reason="bad \udcff byte", status=400, amount=Decimal("1.50"))
    record = one(handler)
    data = json.loads(formatted("json", record))
    assert data["reason"] == "bad \\udcff byte" and data["status"] == 400
    assert data["amount"] == "1.50"  # the other fields as ever
    assert logfmt_fields(formatted("logfmt", record))["reason"] == "bad \ufffd byte"
    assert text_fields(formatted("text", record))["reason"] == "bad \ufffd byte"


def test_the_message_is_the_readable_line_people_grep(
    captured: tuple[logs.Logger, Capture],
) -> None:
    log, handler = captured
    log.warning(
        "delivery.failed",
        source="orders",
        key=42,
        attempt=3,
        status=None,
        retry_in_s=2.5,
        error="HTTP 503: busy\nnow",
    )
    assert one(handler).getMessage() == (
        "delivery.failed source=orders key=42 attempt=3 status=null retry_in_s=2.5 "
        'error="HTTP 503: busy\\nnow"'
    )


def test_json_lines_have_utc_time_and_lower_case_level(
    captured: tuple[logs.Logger, Capture],
) -> None:
    log, handler = captured
    log.info("relay.started", worker="w")
    record = one(handler)
    data = json.loads(formatted("json", record))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["time"])
    when = datetime.strptime(data["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(when.timestamp() - record.created) < 0.001
    assert data["level"] == "info"
    assert logfmt_fields(formatted("logfmt", record))["time"] == data["time"]


def test_a_field_named_like_a_line_key_cannot_replace_it(
    captured: tuple[logs.Logger, Capture],
) -> None:
    log, handler = captured
    log.info("odd.fields", time="forged", level="error", msg="m")
    record = one(handler)
    for fields in (
        json.loads(formatted("json", record)),
        logfmt_fields(formatted("logfmt", record)),
    ):
        assert fields["level"] == "info" and fields["time"] != "forged"
        assert (fields["_time"], fields["_level"], fields["_msg"]) == ("forged", "error", "m")


def test_an_exception_carries_its_traceback_on_the_same_line(
    captured: tuple[logs.Logger, Capture],
) -> None:
    log, handler = captured
    try:
        {}["missing\nkey"]
    except KeyError:
        log.exception("delivery.crashed", source="orders", key=7)
    record = one(handler)
    assert record.levelno == logging.ERROR
    data = json.loads(formatted("json", record))
    assert data["key"] == 7
    assert data["exception"].startswith("Traceback (most recent call last):\n")
    assert "KeyError: 'missing\\nkey'" in data["exception"]
    assert logfmt_fields(formatted("logfmt", record))["exception"] == data["exception"]
    assert text_fields(formatted("text", record))["exception"] == data["exception"]


def test_records_of_other_libraries_come_out_in_every_format() -> None:
    # aiohttp, psycopg and asyncio log plain messages with %-arguments; no event, no fields.
    record = logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request %s\n%s", None, None
    )
    record.args = ("from 10.0.0.1", "\x1b[2J second line")
    message = "Error handling request from 10.0.0.1\n\x1b[2J second line"
    data = json.loads(formatted("json", record))
    assert data == {
        "time": data["time"],
        "level": "error",
        "logger": "aiohttp.server",
        "msg": message,
    }
    fields = logfmt_fields(formatted("logfmt", record))
    assert (fields["logger"], fields["msg"]) == ("aiohttp.server", message)
    assert "event" not in fields
    text = formatted("text", record)
    assert text.endswith(
        r"ERROR aiohttp.server: Error handling request from 10.0.0.1\n\x1b[2J second line"
    )


def test_a_library_record_whose_arguments_do_not_fit_is_still_written() -> None:
    # logging would print "--- Logging error ---" and a traceback to stderr instead of a line.
    record = logging.LogRecord("asyncio", logging.WARNING, __file__, 1, "%d tasks", ("x",), None)
    for kind in logs.FORMATS:
        assert "%d tasks" in formatted(kind, record)
    assert json.loads(formatted("json", record))["msg"] == "%d tasks % ('x',)"


def test_python_warnings_end_without_a_line_break() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("careful", DeprecationWarning, stacklevel=1)
    text = warnings.formatwarning(
        caught[0].message, caught[0].category, caught[0].filename, caught[0].lineno
    )
    record = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1, "%s", (text,), None)
    assert text.endswith("\n")
    msg = json.loads(formatted("json", record))["msg"]
    assert "DeprecationWarning: careful" in msg and not msg.endswith("\n")


# -- cost ------------------------------------------------------------------------------------


class Counted:
    """A value that counts how often it is turned into text."""

    shown = 0

    def __str__(self) -> str:
        Counted.shown += 1
        return "counted"


def test_a_disabled_level_builds_nothing(captured: tuple[logs.Logger, Capture]) -> None:
    log, handler = captured
    log.logger.setLevel(logging.INFO)
    Counted.shown = 0
    log.debug("delivery.succeeded", source="orders", key=Counted())
    assert not handler.records and Counted.shown == 0
    assert not log.isEnabledFor(logging.DEBUG)


def test_the_readable_text_is_made_only_when_asked_for_and_once(
    captured: tuple[logs.Logger, Capture],
) -> None:
    log, handler = captured
    Counted.shown = 0
    log.info("delivery.succeeded", source="orders", key=Counted())
    record = one(handler)
    assert Counted.shown == 0  # a JSON handler would never need it
    assert record.getMessage() == "delivery.succeeded source=orders key=counted"
    assert record.getMessage() == "delivery.succeeded source=orders key=counted"
    formatted("logfmt", record)
    assert Counted.shown == 1


def test_records_point_at_the_call_not_at_the_logs_module(
    captured: tuple[logs.Logger, Capture],
) -> None:
    log, handler = captured
    log.info("here.it_is")
    record = one(handler)
    assert record.pathname == __file__
    assert record.funcName == "test_records_point_at_the_call_not_at_the_logs_module"


# -- choosing a format ---------------------------------------------------------------------


def test_the_default_is_text_on_a_terminal_and_logfmt_otherwise() -> None:
    assert logs.default_format(io.StringIO()) == "logfmt"
    assert logs.default_format(None) == "logfmt"
    primary, secondary = os.openpty()
    try:
        with os.fdopen(secondary, "w", closefd=False) as terminal:
            assert logs.default_format(terminal) == "text"
    finally:
        os.close(primary)
        os.close(secondary)
    closed = io.StringIO()
    closed.close()
    assert logs.default_format(closed) == "logfmt"


def test_the_format_comes_from_the_flag_then_the_environment() -> None:
    env = {"RELAY_LOG_FORMAT": "JSON"}
    assert cli.log_format(None, env) == "json"
    assert cli.log_format("text", env) == "text"
    assert cli.log_format(None, {}) is None
    assert cli.log_format(None, {"RELAY_LOG_FORMAT": ""}) is None
    with pytest.raises(ConfigError) as info:
        cli.log_format(None, {"RELAY_LOG_FORMAT": "yaml\x1b[2J"})
    assert str(info.value).startswith("RELAY_LOG_FORMAT: expected one of json, logfmt, text, got")
    assert "\x1b" not in str(info.value)
    assert cli._parser().parse_args(["--log-format", "JSON", "run"]).log_format == "json"


# -- [log] in the configuration --------------------------------------------------------------

DB = "postgresql://localhost/app"


def build(**sections: Any) -> config.Config:
    return config.from_mapping(
        {"database": {"url": DB}, "sources": {"q": queue_source()}, **sections}, {}
    )


def test_log_deliveries_is_off_unless_asked_for() -> None:
    assert build().log_deliveries is False
    assert build(log={"deliveries": True}).log_deliveries is True


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"format": "json"}, "log.format: unknown key; allowed here: deliveries"),
        ({"deliveries": "yes"}, "log.deliveries: expected true or false, got 'yes'"),
        ("on", "log: expected a table ([log])"),
    ],
)
def test_a_wrong_log_table_is_refused_naming_the_key(table: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(log=table)
    assert str(info.value) == message


# -- the call sites ------------------------------------------------------------------------

EVENT = re.compile(r"^[a-z][a-z_]*(\.[a-z][a-z_]*)+$")
METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


@dataclass
class Call:
    where: str
    level: str
    event: str
    fields: list[str]


def calls() -> list[Call]:
    """Every `log.<level>(...)` call in relay/, with its event and field names."""
    found = []
    for path in sorted((ROOT / "relay").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
                and node.func.attr in METHODS
            ):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            args = node.args[1:] if node.func.attr == "log" else node.args
            assert len(args) == 1, f"{where}: the event alone is positional; fields are keywords"
            event = args[0]
            assert isinstance(event, ast.Constant) and isinstance(event.value, str), where
            names = [k.arg or "**" for k in node.keywords if k.arg != "exc_info"]
            level = {"log": "info/debug", "exception": "error"}.get(node.func.attr, node.func.attr)
            if node.func.attr == "exception" or "exc_info" in {k.arg for k in node.keywords}:
                level += ", with its traceback"
            found.append(Call(where, level, event.value, names))
    return found


def test_every_log_call_names_an_event_and_gives_its_fields_as_keywords() -> None:
    found = calls()
    assert len(found) > 60
    for call in found:
        assert EVENT.match(call.event), f"{call.where}: {call.event!r} is not an event name"
        assert "%" not in call.event and "=" not in call.event, call.where
        reserved = logs.BASE_KEYS.intersection(call.fields)
        assert not reserved, f"{call.where}: fields named like the line's own keys: {reserved}"
    # Every module logs through relay.logs, whose records carry their fields.
    for path in (ROOT / "relay").rglob("*.py"):
        if path.name != "logs.py":
            assert "logging.getLogger(" not in path.read_text(), path


LEVEL_SHOWN = {"info/debug": "debug; info with `[log] deliveries`"}


def vocabulary() -> str:
    """The events, their levels and fields as a Markdown table: one set of fields per shape of
    call (`...`: counts known at run time)."""
    events: dict[str, tuple[set[str], list[list[str]]]] = {}
    for call in calls():
        levels, shapes = events.setdefault(call.event, (set(), []))
        levels.add(LEVEL_SHOWN.get(call.level, call.level))
        if call.fields not in shapes:
            shapes.append(call.fields)
    rows = ["| event | level | fields |", "| --- | --- | --- |"]
    for event in sorted(events):
        levels, shapes = events[event]
        shown = " / ".join(
            " ".join(f"`{f}`" if f != "**" else "..." for f in fields) or "(none)"
            for fields in shapes
        )
        rows.append(f"| `{event}` | {', '.join(sorted(levels))} | {shown} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(vocabulary() + "\n")
