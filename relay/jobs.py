"""Scheduled jobs (`[jobs.NAME]`): a SQL statement of the user's, run every so often by exactly
one of the relays sharing the database, each run recorded in relay.job_runs.

Occurrences are computed, not remembered: every N seconds from the Unix epoch (`every`), or a
cron expression in UTC (`cron`), so every relay agrees on which occurrence is due. The scheduler
(relay.scheduler) runs the latest occurrence that is not yet recorded: after downtime, the one
missed occurrence runs once, not once per occurrence missed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from croniter import croniter

from relay import readers
from relay.readers import ConfigError

KEYS = frozenset({"every", "cron", "sql", "timeout"})
MIN_EVERY = 1.0
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    statement: str
    every: float | None  # seconds; or
    cron: str | None  # a cron expression, in UTC; neither: only when asked (on_demand)
    timeout: float  # the statement's statement_timeout

    @property
    def on_demand(self) -> bool:
        return self.every is None and self.cron is None

    def latest(self, now: datetime) -> datetime:
        """The latest occurrence at or before `now`."""
        if self.every is not None:
            epoch = now.timestamp()
            return datetime.fromtimestamp(math.floor(epoch / self.every) * self.every, UTC)
        assert self.cron is not None
        following = self.following(now)
        previous: datetime = croniter(self.cron, following).get_prev(datetime)
        return previous

    def following(self, now: datetime) -> datetime:
        """The first occurrence after `now`."""
        if self.every is not None:
            return self.latest(now) + timedelta(seconds=self.every)
        assert self.cron is not None
        nxt: datetime = croniter(self.cron, now).get_next(datetime)
        return nxt

    def describe(self) -> str:
        if self.on_demand:
            return "on demand"
        if self.every is not None:
            for unit, size in (("h", 3600), ("m", 60)):
                if self.every >= size and self.every % size == 0:
                    return f"every {int(self.every // size)}{unit}"
            return f"every {readers.show_seconds(self.every)}"
        return f"cron {self.cron!r} (UTC)"


def parse(raw: Any) -> tuple[Job, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError("jobs: expected tables [jobs.NAME] with every or cron, and sql")
    return tuple(_job(name, data) for name, data in raw.items())


def _job(name: str, data: Any) -> Job:
    where = f"jobs.{name}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table with every or cron, and sql")
    readers.ident(where, name)
    readers.unknown(where, data, set(KEYS))
    statement = data.get("sql")
    if not isinstance(statement, str) or not statement.strip():
        raise ConfigError(
            f"{where}.sql: required: the statement to run, e.g. "
            f'"SELECT * FROM release_expired_reservations()"'
        )
    if "every" in data and "cron" in data:
        raise ConfigError(
            f'{where}: set one of every (e.g. "5m") and cron (e.g. "*/5 * * * *"), not both '
            f"(neither: the job runs only when asked, by the admin API or `relay jobs --run`)"
        )
    every = cron = None
    if "every" in data:
        every = readers.duration(f"{where}.every", data["every"], minimum=MIN_EVERY)
    elif "cron" in data:
        cron = readers.string(f"{where}.cron", data["cron"])
        if not croniter.is_valid(cron):
            raise ConfigError(
                f"{where}.cron: {cron!r} is not a cron expression; five fields, minute hour "
                f'day-of-month month day-of-week, e.g. "*/5 * * * *"'
            )
    timeout = readers.duration(
        f"{where}.timeout", data.get("timeout", DEFAULT_TIMEOUT), minimum=0.1
    )
    return Job(name=name, statement=statement, every=every, cron=cron, timeout=timeout)


@dataclass(frozen=True, slots=True)
class JobRun:
    """One recorded run of a job (a row of relay.job_runs)."""

    job: str
    scheduled_for: datetime
    started_at: datetime
    duration_ms: float
    worker: str
    rows_affected: int | None = None
    processed: int | None = None
    succeeded: int | None = None
    failed: int | None = None
    error: str | None = None

    def counted(self) -> str:
        """What it did, as `rows=3 processed=3 succeeded=2 failed=1` (those known)."""
        return " ".join(
            f"{key}={value}"
            for key, value in (
                ("rows", self.rows_affected),
                ("processed", self.processed),
                ("succeeded", self.succeeded),
                ("failed", self.failed),
            )
            if value is not None
        )

    def summary(self) -> dict[str, Any]:
        return {
            "scheduled_for": self.scheduled_for.isoformat(),
            "started_at": self.started_at.isoformat(),
            "duration_ms": round(self.duration_ms, 1),
            "worker": self.worker,
            "rows_affected": self.rows_affected,
            "processed": self.processed,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "error": self.error,
        }


COUNTS = ("processed", "succeeded", "failed")


def counts(row: Mapping[str, Any] | None) -> dict[str, int | None]:
    """`{processed, succeeded, failed}` from a statement's first row: as columns of those names,
    or as keys of its one JSON column (a function returning json). None where absent."""
    found: dict[str, int | None] = dict.fromkeys(COUNTS)
    if not row:
        return found
    values: Mapping[str, Any] = row
    if len(row) == 1 and isinstance(next(iter(row.values())), Mapping):
        values = next(iter(row.values()))
    for key in COUNTS:
        value = values.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            found[key] = value
    return found
