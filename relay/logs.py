"""relay's log records, and the three ways they are written out: json, logfmt and text.

Every log call names an event and gives its fields as keywords:

    log.warning("delivery.failed", source=source.name, key=row.key, attempt=row.attempt)

The record carries them as real fields (`record.event`, `record.fields`), so the JSON and logfmt
formatters write each as its own key, with numbers as numbers; `record.getMessage()` is the same
readable `event key=value ...` text the lines have always had, for `grep` and for whatever
handler a library user attaches. Records from other libraries (aiohttp, psycopg, asyncio,
Python's warnings) have no fields: they come out with their message as `msg`.

Values come from rows, receivers' answers and the database's errors, so any of them may hold a
newline (a forged second line), a terminal escape sequence, or a space or `"` (which a logfmt
parser would read as the end of the value). Every format escapes them: one record is always one
line, and nothing in a value reaches a terminal as a control sequence.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import TextIO

import orjson

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("json", "logfmt", "text")

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators and bidi overrides that
# terminals and log viewers treat as line breaks or reorder text with.
_CONTROLS = "\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[{_CONTROLS}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# A logfmt value is written bare only if it holds none of these: go-logfmt quotes anything with a
# byte <= ' ', '=', '"' or U+FFFD; any Unicode space is quoted too, for parsers that split on
# it. Inside quotes, the escapes are JSON's, which is what go-logfmt's decoder reads: `\x1b`
# would be a syntax error there, `\u001b` is not. Lone surrogates (undecodable bytes kept by
# surrogateescape) are escaped too: written raw they could not even be encoded to UTF-8.
_NEEDS_QUOTES = re.compile(f'[\\s"={_CONTROLS}\ufffd\ud800-\udfff]')
_QUOTED_ESCAPES = re.compile(f'["\\\\{_CONTROLS}\ufffd\ud800-\udfff]')
_QUOTED_NAMED = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every control character written as an escape: one line, nothing hidden.
    For what relay prints to a person (the CLI) and keeps (a response's excerpt in
    last_error); log values go through `field`."""
    return _CONTROL.sub(_escape_char, text)


def _quoted_char(match: re.Match[str]) -> str:
    char = match.group()
    return _QUOTED_NAMED.get(char) or f"\\u{ord(char):04x}"


def field(text: str) -> str:
    """A logfmt value: as it is when that is unambiguous, otherwise quoted, with backslashes,
    quotes and control characters escaped as go-logfmt's decoder reads them. `null` is quoted
    too: bare, it is how logfmt writes a missing value."""
    if text and not _NEEDS_QUOTES.search(text) and text != "null":
        return text
    return '"' + _QUOTED_ESCAPES.sub(_quoted_char, text) + '"'


def first_line(exc: BaseException) -> str:
    """An error's message on one line (PostgreSQL's details and hints follow on others)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _str(value: object) -> str:
    """str(value), whatever it is: a log call must never fail because a value's __str__ did."""
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__} that cannot be shown>"


def value_text(value: object) -> str:
    """How a field's value is written in logfmt and text lines (and the message)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return field(value)
    if isinstance(value, int):
        return int.__repr__(value)  # an IntEnum's number, not its name
    if isinstance(value, float):
        # The shortest text that reads back as the same number; a call that wants fewer
        # digits rounds (ms=round(ms, 1)).
        return float.__repr__(value)
    return field(_str(value))


def render(event: str, fields: Mapping[str, object]) -> str:
    """`event key=value ...`: the readable text of an event, each value a logfmt value."""
    parts = [field(event)]
    for key, value in fields.items():
        parts.append(f"{key}={value_text(value)}")
    return " ".join(parts)


class Message:
    """A record's `msg`: the event and its fields, rendered as `event key=value ...` only when
    a handler asks for the text (a JSON line never needs it), and then once."""

    __slots__ = ("_text", "event", "fields")

    def __init__(self, event: str, fields: dict[str, object]) -> None:
        self.event = event
        self.fields = fields
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = render(self.event, self.fields)
        return self._text

    def __repr__(self) -> str:
        return f"Message({self.event!r}, {self.fields!r})"


ExcInfo = BaseException | bool | None


class Logger:
    """relay's logger: `log.info("event.name", key=value, ...)`.

    Nothing is built unless the level is enabled: a disabled call costs the method call and
    `isEnabledFor` (the per-delivery success line runs thousands of times a second). A caller
    whose fields cost something to compute asks `isEnabledFor` first.
    """

    __slots__ = ("logger",)

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def isEnabledFor(self, level: int) -> bool:
        return self.logger.isEnabledFor(level)

    def _emit(self, level: int, event: str, exc_info: ExcInfo, fields: dict[str, object]) -> None:
        self.logger.log(
            level,
            Message(event, fields),
            exc_info=exc_info,
            extra={"event": event, "fields": fields},
            stacklevel=3,  # the record's file, line and function are the call's, not ours
        )

    def log(self, level: int, event: str, /, *, exc_info: ExcInfo = None, **fields: object) -> None:
        if self.logger.isEnabledFor(level):
            self._emit(level, event, exc_info, fields)

    def debug(self, event: str, /, *, exc_info: ExcInfo = None, **fields: object) -> None:
        if self.logger.isEnabledFor(logging.DEBUG):
            self._emit(logging.DEBUG, event, exc_info, fields)

    def info(self, event: str, /, *, exc_info: ExcInfo = None, **fields: object) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, event, exc_info, fields)

    def warning(self, event: str, /, *, exc_info: ExcInfo = None, **fields: object) -> None:
        if self.logger.isEnabledFor(logging.WARNING):
            self._emit(logging.WARNING, event, exc_info, fields)

    def error(self, event: str, /, *, exc_info: ExcInfo = None, **fields: object) -> None:
        if self.logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, event, exc_info, fields)

    def exception(self, event: str, /, *, exc_info: ExcInfo = True, **fields: object) -> None:
        """An ERROR with the exception being handled and its traceback."""
        if self.logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, event, exc_info, fields)

    def critical(self, event: str, /, *, exc_info: ExcInfo = None, **fields: object) -> None:
        if self.logger.isEnabledFor(logging.CRITICAL):
            self._emit(logging.CRITICAL, event, exc_info, fields)


def get(name: str) -> Logger:
    """The logger for a module of relay: `log = logs.get("relay.deliverer")`."""
    return Logger(name)


# -- formatters ------------------------------------------------------------------------------

# The keys every line starts with; a field of the same name is written with a leading `_` so
# that it can neither replace them nor appear twice.
BASE_KEYS = frozenset({"time", "level", "logger", "event", "msg", "exception", "stack"})
_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}
_SHORT_LEVELS = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO ",
    logging.WARNING: "WARN ",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRIT ",
}


def _level(record: logging.LogRecord) -> str:
    return _LEVEL_NAMES.get(record.levelno) or _str(record.levelname).lower()


def _utc(record: logging.LogRecord) -> str:
    """2026-12-06T16:05:34.123Z"""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


def _structured(record: logging.LogRecord) -> tuple[str, Mapping[str, object]] | None:
    """The event and fields of a relay record; None for a plain one (another library's)."""
    event = getattr(record, "event", None)
    fields = getattr(record, "fields", None)
    if isinstance(event, str) and isinstance(fields, Mapping):
        return event, fields
    return None


def _key(key: str) -> str:
    return "_" + key if key in BASE_KEYS else key


class _Formatter(logging.Formatter):
    """What the three formats share: a message that never raises, and the traceback text."""

    def message(self, record: logging.LogRecord) -> str:
        """A plain record's message. A library's bad `%` arguments give its parts, not an
        error (logging would print a traceback of its own to stderr instead of the line)."""
        try:
            # Python's warnings end in a line break (and the line of source they point at).
            return record.getMessage().rstrip("\n")
        except Exception:
            return f"{_str(record.msg)} % {_str(record.args)}"

    def extras(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        """The exception's traceback and the stack, when the record has them."""
        out = []
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            out.append(("exception", record.exc_text))
        elif record.exc_text:
            out.append(("exception", record.exc_text))
        if record.stack_info:
            out.append(("stack", self.formatStack(record.stack_info)))
        return out

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self.line(record)
        except Exception as exc:  # a formatter that raises loses the record: say what it was
            return self.line(
                logging.makeLogRecord(
                    {
                        "name": record.name,
                        "levelno": record.levelno,
                        "levelname": record.levelname,
                        "created": record.created,
                        "msecs": record.msecs,
                        "msg": f"unformattable log record: {_str(exc)}",
                    }
                )
            )

    def line(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class LogfmtFormatter(_Formatter):
    """`time=... level=warning logger=relay.deliverer event=delivery.failed source=orders ...`"""

    def line(self, record: logging.LogRecord) -> str:
        head = f"time={_utc(record)} level={_level(record)} logger={field(_str(record.name))}"
        structured = _structured(record)
        if structured is None:
            body = f"msg={field(self.message(record))}"
        else:
            event, fields = structured
            if isinstance(record.msg, Message) and not BASE_KEYS.intersection(fields):
                body = f"event={record.msg}"
            else:
                body = "event=" + render(event, {_key(k): v for k, v in fields.items()})
        tail = "".join(f" {key}={field(text)}" for key, text in self.extras(record))
        return f"{head} {body}{tail}"


class TextFormatter(_Formatter):
    """For a person at a terminal: `16:05:34.123 WARN  delivery.failed source=orders key=42 ...`
    (local time). Still one line per record, every value escaped."""

    def line(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        level = _SHORT_LEVELS.get(record.levelno) or f"{_str(record.levelname):5.5}"
        head = f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{int(record.msecs):03d} {level}"
        structured = _structured(record)
        if structured is None:
            body = f"{escape(_str(record.name))}: {escape(self.message(record))}"
        elif isinstance(record.msg, Message):
            body = str(record.msg)
        else:
            body = render(*structured)
        tail = "".join(f" {key}={field(text)}" for key, text in self.extras(record))
        return f"{head} {body}{tail}"


# Characters JSON allows raw inside strings but that Python's str.splitlines() and some log
# viewers take as line breaks, or terminals as controls: written as \u escapes (still JSON).
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _json_default(value: object) -> str:
    return _str(value)


def _dumps(value: object) -> bytes:
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS)


def _json_value(value: object) -> object:
    """One value of a record orjson refused: as it is if orjson takes it alone."""
    try:
        _dumps(value)
    except TypeError:
        return _json_safe(value)
    return value


def _json_safe(value: object) -> object:
    """A value orjson refused (an int past 64 bits, a string with a lone surrogate, a nested
    value it could not take) as something it cannot refuse."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int) and -(2**63) <= value < 2**64:
        return value
    return _str(value).encode("utf-8", "backslashreplace").decode("utf-8")


class JsonFormatter(_Formatter):
    """`{"time": "...Z", "level": "warning", "logger": "...", "event": "...", <fields>}`, one
    object per line; a value that is no JSON type becomes its text."""

    def line(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": _utc(record),
            "level": _level(record),
            "logger": record.name,
        }
        structured = _structured(record)
        if structured is None:
            out["msg"] = self.message(record)
        else:
            event, fields = structured
            out["event"] = event
            for key, value in fields.items():
                out[_key(key)] = value
        out.update(self.extras(record))
        try:
            data = _dumps(out)
        except TypeError:  # orjson.JSONEncodeError is one
            data = _dumps({_str(k): _json_value(v) for k, v in out.items()})
        text = data.decode("utf-8")
        if _JSON_UNSAFE.search(text):
            text = _JSON_UNSAFE.sub(_json_escape, text)
        return text


def formatter(kind: str) -> logging.Formatter:
    """The formatter for one of FORMATS."""
    if kind == "json":
        return JsonFormatter()
    if kind == "logfmt":
        return LogfmtFormatter()
    if kind == "text":
        return TextFormatter()
    raise ValueError(f"log format: expected one of {', '.join(FORMATS)}, got {kind!r}")


def default_format(stream: TextIO | None) -> str:
    """text for a person at a terminal; logfmt for a file, a pipe or a service manager."""
    try:
        return "text" if stream is not None and stream.isatty() else "logfmt"
    except (AttributeError, ValueError, OSError):  # closed, or no stream at all
        return "logfmt"


def setup(level: str, kind: str | None = None) -> None:
    """Log to stderr at `level` (one of LEVELS) in `kind` (one of FORMATS; by default text on
    a terminal, logfmt otherwise). Python's warnings are logged too (`py.warnings`), so that
    a JSON log holds nothing but JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind or default_format(sys.stderr)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
