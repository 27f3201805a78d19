"""Log lines and terminal output that a value from a row or a response cannot forge.

relay's log lines are logfmt: `event key=value key=value`. Values come from rows, receivers'
answers and the database's errors, so any of them may hold a newline (a forged second line), a
terminal escape sequence, or a space (which a logfmt parser would read as the end of the value).
The formatter escapes every string argument and quotes those that need it, so the call sites
write plain `key=%s` and stay readable.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators and bidi overrides that
# terminals and log viewers treat as line breaks or reorder text with.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NEEDS_QUOTES = re.compile(r'[\s"=]')
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every control character written as an escape: one line, nothing hidden."""
    return _CONTROL.sub(_escape_char, text)


def field(text: str) -> str:
    """A logfmt value: as it is when that is unambiguous, otherwise quoted, with backslashes,
    quotes and control characters escaped inside the quotes."""
    if text and not _NEEDS_QUOTES.search(text) and not _CONTROL.search(text):
        return text
    return '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def first_line(exc: BaseException) -> str:
    """An error's message on one line (PostgreSQL's details and hints follow on others)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _safe(arg: Any) -> Any:
    if isinstance(arg, str):
        return field(arg)
    if isinstance(arg, BaseException):
        return field(str(arg))
    return arg


class LogfmtFormatter(logging.Formatter):
    """Formats every string (and exception) argument of a record as a logfmt value."""

    def format(self, record: logging.LogRecord) -> str:
        args = record.args
        if isinstance(args, tuple) and args:
            record = logging.makeLogRecord(record.__dict__)
            record.args = tuple(_safe(a) for a in args)
        return super().format(record)


def setup(level: str) -> None:
    """Log to stderr as `time LEVEL logger event key=value ...` at `level` (one of LEVELS)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
