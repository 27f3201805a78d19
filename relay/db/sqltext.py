"""SQL text: the loader of named queries (`sql/queries/*.sql`), and the small pieces every kind
of source composes its statements from (psycopg.sql quotes identifiers and literals), rendered to
text once per source so the hot path only binds parameters."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql


def sql_dir() -> Path:
    """`relay/sql` in an installed wheel; the repository's `sql/` in a checkout."""
    here = Path(__file__).resolve().parent.parent  # relay/
    for candidate in (here / "sql", here.parent / "sql"):
        if (candidate / "triggers").is_dir():
            return candidate
    raise FileNotFoundError(f"relay's SQL files are missing: looked in {here / 'sql'}")


_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(path: Path) -> dict[str, str]:
    """Split a file of `-- name: x` sections into {name: sql}."""
    text = path.read_text()
    parts = _NAME_LINE.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        queries[name] = body.strip().rstrip(";")
    return queries


class Catalog(sql.SQL):
    """SQL text taken from the catalog (a type name, a constraint): quoted already but, unlike
    the query files' text, it may hold a `%` that a query with parameters must escape."""


def now(due_type: str) -> sql.Composable:
    # timestamp-without-time-zone columns hold UTC by convention (Prisma, Documenso); compare
    # and write them in UTC whatever the session's TimeZone is.
    if "without" in due_type:
        return sql.SQL("(now() AT TIME ZONE 'UTC')")
    return sql.SQL("now()")


def fingerprint(*parts: object) -> str:
    """What an installed function was made from, stored as its comment: `relay check` compares
    it with what `relay install` would install now, to find stale triggers."""
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:32]
    return f"relay install {digest}"


def fill(text: str, names: dict[str, sql.Composable]) -> sql.Composed:
    return sql.SQL(text).format(**{k: v for k, v in names.items() if "{" + k + "}" in text})


def seconds(value: float) -> sql.Composable:
    return sql.SQL("make_interval(secs => {})").format(sql.Literal(float(value)))


def bounded(limits: dict[str, int]) -> sql.Composable:
    """The claim's values (`c.url`, `c.payload`, ...), each NULL if its text is longer than its
    limit in bytes, then one more: which were, and how large ('payload 20971520', NULL if none).
    Measured in the claim statement, so relay never loads a value it will not send."""
    values = [
        sql.SQL("CASE WHEN octet_length(c.{v}) <= {n} THEN c.{v} END").format(
            v=sql.Identifier(name), n=sql.Literal(limit)
        )
        for name, limit in limits.items()
    ]
    checks = [
        sql.SQL(
            "CASE WHEN octet_length(c.{v}) > {n} THEN {name} || ' ' || octet_length(c.{v}) END"
        ).format(v=sql.Identifier(name), n=sql.Literal(limit), name=sql.Literal(name))
        for name, limit in limits.items()
    ]
    oversize = sql.SQL("NULLIF(concat_ws(', ', {}), '')").format(sql.SQL(", ").join(checks))
    return sql.SQL(", ").join([*values, oversize])


def render(query: sql.Composable, conn: psycopg.AsyncConnection[Any], escape: bool) -> str:
    """A composed query as SQL text. Where it will run with parameters, a `%` in a quoted name,
    a literal or catalog text is doubled, so that psycopg reads it as the character `%`, not as
    a placeholder (the query files' own `%(name)s` stay placeholders)."""
    if isinstance(query, sql.Composed):
        return "".join(render(part, conn, escape) for part in query)
    text = query.as_string(conn)
    if escape and (not isinstance(query, sql.SQL) or isinstance(query, Catalog)):
        return text.replace("%", "%%")
    return text


def has_params(query: sql.Composable) -> bool:
    if isinstance(query, sql.Composed):
        return any(has_params(part) for part in query)
    own_text = isinstance(query, sql.SQL) and not isinstance(query, Catalog)
    return own_text and "%(" in query.as_string()


Query = sql.SQL | sql.Composed  # a compiled query, composed or already rendered


def rendered(query: Query, conn: psycopg.AsyncConnection[Any]) -> sql.SQL:
    """A query rendered to SQL text once: psycopg would otherwise compose it again on every
    execute (about a tenth of relay's CPU on the hot path, measured)."""
    return sql.SQL(render(query, conn, has_params(query)))


def literal_list(values: Any) -> sql.Composable:
    return sql.SQL(", ").join(sql.Literal(v) for v in values)


# Statements written by users (a filter, a write-back expression, a functions source's claim)
# name their parameters `:name`; psycopg wants `%(name)s`, and a `%` of theirs must be doubled.
# A `:` inside quoted text, a quoted name or a comment, and `::` casts, are no parameters.
_TOKENS = re.compile(
    r"(?P<skip>'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/|::)"
    r"|:(?P<param>[a-z_][a-z0-9_]*)|(?P<pct>%)",
    re.DOTALL,
)


def named_params(text: str, allowed: frozenset[str]) -> tuple[str, frozenset[str]]:
    """A user's statement with `:name` parameters as psycopg's `%(name)s`, and the names it
    uses. ValueError naming a parameter that is not in `allowed`."""
    used: set[str] = set()

    def swap(m: re.Match[str]) -> str:
        if m.group("skip"):
            # psycopg reads every `%` as a placeholder, quoted or not.
            return m.group("skip").replace("%", "%%")
        if m.group("pct"):
            return "%%"
        name = m.group("param")
        if name not in allowed:
            raise ValueError(
                f"unknown parameter :{name}; the parameters here are "
                + ", ".join(":" + a for a in sorted(allowed))
            )
        used.add(name)
        return f"%({name})s"

    return _TOKENS.sub(swap, text), frozenset(used)


_CONTEXT_REF = re.compile(
    r"(?P<skip>'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/)"
    r"|(?<![\w.$])(?P<name>response|attempt|request)\.(?=[a-z_])",
    re.DOTALL | re.IGNORECASE,
)


_CONTEXT_FIELD = re.compile(
    _CONTEXT_REF.pattern.replace(r"\.(?=[a-z_])", r'\.(?P<field>"(?:[^"]|"")*"|[a-z_][\w$]*)'),
    re.DOTALL | re.IGNORECASE,
)


def context_fields(text: str) -> frozenset[tuple[str, str]]:
    """The fields of relay's context values that a write-back expression reads, as (value,
    field) pairs: `response.json` is ("response", "json"). The settle computes only these."""
    found = set()
    for m in _CONTEXT_FIELD.finditer(text):
        if m.group("name"):
            field = m.group("field")
            field = field[1:-1].replace('""', '"') if field.startswith('"') else field.lower()
            found.add((m.group("name").lower(), field))
    return frozenset(found)


def context_refs(text: str, alias: str) -> str:
    """A write-back expression's `response.json`, `attempt.error`, `request.url` as field
    selections from relay's composite values, `(r.response).json`: PostgreSQL reads `a.b` as a
    table's column, and relay's context values are columns of the relation `alias`, so that a
    user's column of the same name stays the row's."""

    def swap(m: re.Match[str]) -> str:
        if m.group("skip"):
            return m.group("skip")
        return f"({alias}.{m.group('name').lower()})."

    return _CONTEXT_REF.sub(swap, text)
