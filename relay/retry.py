"""Pure retry policy: whether a failed delivery is tried again, and when.

Two kinds of delay: exponential backoff (`base`, `factor`, capped at `max_delay`) or an explicit
`schedule` (failed attempt 1 waits `schedule[0]`, attempt 2 `schedule[1]`, ...; past its end, the
last entry), both spread by +/- `jitter`. Which answers are final: a status in `final_statuses`
and not in `retried_statuses` (by default every 4xx but 408, 409, 425 and 429); every other
failure (5xx, 3xx, no answer, a timeout) is retried until the attempts run out.

A receiver's `Retry-After` on 429 or 503 can lengthen a wait but never shorten it below the
policy's, and never past the policy's cap: `max_delay`, or a schedule's longest entry (a schedule
says in full how long relay may wait; `max_delay` is refused next to it).

Nothing here does I/O: the time and the randomness come in as arguments, so tests pin them.
`parse` reads a `[retry]` or `[sources.NAME.retry]` table over the policy it overrides.
"""

from __future__ import annotations

import dataclasses
import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from relay import readers
from relay.readers import ConfigError

# 4xx answers that say "not now" rather than "never": timeout, conflict, too early, too many.
RETRIED_STATUSES = frozenset({408, 409, 425, 429})
FINAL_STATUSES = frozenset(range(400, 500))
# The answers whose Retry-After relay honours (RFC 9110 defines it for 503 and 3xx, RFC 6585 for
# 429; a redirect is never followed, so its Retry-After has nothing to say about a retry).
RETRY_AFTER_STATUSES = frozenset({429, 503})
DEFAULT_MAX_ATTEMPTS = 5
# The least a delay may be: below it a failing row is retried in a spin.
MIN_DELAY = 0.01


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base: float = 1.0  # seconds after the first failed attempt (exponential kind)
    factor: float = 2.0
    max_delay: float = 3600.0  # the exponential kind's cap
    jitter: float = 0.2  # +/- this fraction of the delay
    # Explicit delays after failed attempts 1, 2, ...; past the end, the last. () = exponential.
    schedule: tuple[float, ...] = ()
    max_attempts: int | None = None  # None: the source's own (its max_attempts, default 5)
    final_statuses: frozenset[int] = FINAL_STATUSES  # not retried ...
    retried_statuses: frozenset[int] = RETRIED_STATUSES  # ... unless listed here too
    # The table whose final_statuses apply, so a dead row's reason names the key to change.
    statuses_from: str = field(default="retry", compare=False)

    @property
    def cap(self) -> float:
        """The longest wait: max_delay, or a schedule's longest entry."""
        return max(self.schedule) if self.schedule else self.max_delay

    def is_final(self, status: int | None) -> bool:
        """True if this answer is not retried; no answer at all (None) always is retried."""
        return (
            status is not None
            and status in self.final_statuses
            and status not in self.retried_statuses
        )

    def limit(self, own: int | None) -> int:
        """Attempts allowed: `own` (a row's or source's limit), else this policy's, else 5."""
        if own is not None:
            return own
        return self.max_attempts if self.max_attempts is not None else DEFAULT_MAX_ATTEMPTS


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float  # seconds from now


@dataclass(frozen=True, slots=True)
class Dead:
    reason: str  # why no further attempt is made, e.g. "attempt 5 of 5"


def decide(
    policy: RetryPolicy,
    attempt: int,
    max_attempts: int | None,
    status: int | None,
    retry_after: float | None,
    rand: float,
) -> Retry | Dead:
    """After failed attempt number `attempt` (1-based): try again after a delay, or give up.

    `max_attempts` is the row's own limit (its column, or its source's), None for the policy's;
    `status` the HTTP status, None if no answer came; `retry_after` seconds from the answer's
    Retry-After (honoured on 429 and 503 only); `rand` is in [0, 1) and sets the jitter.
    """
    if policy.is_final(status):
        return Dead(f"HTTP {status} is final ({policy.statuses_from}.final_statuses)")
    limit = policy.limit(max_attempts)
    if attempt >= limit:
        return Dead(f"attempt {attempt} of {limit}")
    honoured = retry_after if status in RETRY_AFTER_STATUSES else None
    return Retry(delay(policy, attempt, rand, honoured))


def delay(
    policy: RetryPolicy, attempt: int, rand: float, retry_after: float | None = None
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based); `rand` is in [0, 1).
    `retry_after` is taken as given here: `decide` passes it on only for 429 and 503."""
    cap = policy.cap
    if policy.schedule:
        wait = policy.schedule[min(max(attempt, 1), len(policy.schedule)) - 1]
    else:
        # Cap the exponent before computing, so a huge attempt count cannot overflow a float
        # (and a huge factor still might: that is a wait past any cap).
        try:
            growth = policy.factor ** min(max(attempt - 1, 0), 64)
        except OverflowError:
            growth = float("inf")
        wait = min(cap, policy.base * growth)
    wait *= 1.0 + policy.jitter * (2.0 * rand - 1.0)
    if retry_after is not None:
        wait = max(wait, min(retry_after, cap))
    return max(0.0, min(wait, cap))


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    text = value.strip()
    # ASCII digits only: str.isdigit() also accepts "²" and other digits float() refuses.
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


# -- configuration ---------------------------------------------------------------------------

# Every key of a [retry] / [sources.NAME.retry] table: its default as written in TOML, and what
# it does. The reader refuses any other key; the README's table can be rendered from this one.
KEYS: dict[str, tuple[str, str]] = {
    "base": ('"1s"', "delay after the first failed attempt; doubles (factor) each time"),
    "factor": ("2", "growth of the delay from one attempt to the next, at least 1"),
    "max_delay": ('"1h"', "the longest delay, Retry-After included"),
    "jitter": ("0.2", "+/- this fraction of each delay (0 with a schedule, unless set)"),
    "schedule": (
        "(none)",
        'explicit delays instead of base/factor/max_delay: ["1m", "2m", "4m"]; past its end, '
        "the last; its longest entry is the cap",
    ),
    "max_attempts": ("5", "attempts in all, the first included"),
    "final_statuses": ('["4xx"]', 'answers not retried: codes and classes, [422, "5xx"]'),
    "retried_statuses": (
        "[408, 409, 425, 429]",
        "answers retried though final_statuses names them (a class with exceptions)",
    ),
}
_EXPONENTIAL = ("base", "factor", "max_delay")
_CLASS = re.compile(r"^([1345])xx$", re.IGNORECASE)


def parse(where: str, data: Mapping[str, Any], default: RetryPolicy) -> RetryPolicy:
    """The policy of a `[retry]` table (`where` = "retry") or a `[sources.NAME.retry]` table:
    each key it sets replaces that of `default` (the top-level policy, or RetryPolicy()).

    A table with `schedule` uses explicit delays (and no jitter unless it sets `jitter`); a table
    with base, factor or max_delay uses exponential backoff; a table with neither keeps the kind
    of `default`.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}: expected a table of retry settings like [{where}] max_attempts = 5, "
            f"got {data!r}"
        )
    readers.unknown(where, data, set(KEYS))
    changes: dict[str, Any] = {}
    if "schedule" in data:
        for key in _EXPONENTIAL:
            if key in data:
                raise ConfigError(f"{where}.{key}: {_BESIDE_SCHEDULE[key]}")
        changes["schedule"] = _schedule(f"{where}.schedule", data["schedule"])
        changes["jitter"] = 0.0
    elif any(key in data for key in _EXPONENTIAL):
        changes["schedule"] = ()
    if "base" in data:
        changes["base"] = readers.duration(f"{where}.base", data["base"], minimum=MIN_DELAY)
    if "factor" in data:
        changes["factor"] = readers.number(f"{where}.factor", data["factor"], minimum=1)
    if "max_delay" in data:
        changes["max_delay"] = readers.duration(
            f"{where}.max_delay", data["max_delay"], minimum=MIN_DELAY
        )
    if "jitter" in data:
        changes["jitter"] = readers.fraction(f"{where}.jitter", data["jitter"])
    if "max_attempts" in data:
        changes["max_attempts"] = readers.integer(f"{where}.max_attempts", data["max_attempts"])
    final: frozenset[int] = frozenset()  # the codes this table lists as final, by number
    if "final_statuses" in data:
        final, changes["final_statuses"] = _statuses(
            f"{where}.final_statuses", data["final_statuses"]
        )
    if "retried_statuses" in data:
        _, changes["retried_statuses"] = _statuses(
            f"{where}.retried_statuses", data["retried_statuses"]
        )
    if "final_statuses" in data or "retried_statuses" in data:
        changes["statuses_from"] = where
    policy = dataclasses.replace(default, **changes)
    if clash := sorted(final & policy.retried_statuses):
        # retried_statuses wins (it makes the exceptions to a class), so this listing would do
        # nothing: 429 is retried by default, and `final_statuses = [429]` alone cannot say no.
        raise ConfigError(
            f"{where}.final_statuses: {clash[0]} is also in retried_statuses, which wins; "
            f"set {where}.retried_statuses without it (default [408, 409, 425, 429])"
        )
    if not policy.schedule and policy.max_delay < policy.base:
        raise ConfigError(
            f"{where}.max_delay ({policy.max_delay:g}s) must be at least {where}.base "
            f"({policy.base:g}s): raise {where}.max_delay or lower {where}.base"
        )
    return policy


_BESIDE_SCHEDULE = {
    "base": "does not apply with a schedule, which gives every delay itself; remove one of them",
    "factor": "does not apply with a schedule, which gives every delay itself; remove one of them",
    "max_delay": (
        "does not apply with a schedule: its longest delay is the cap (for Retry-After too); "
        "remove max_delay, or make it the schedule's last entry"
    ),
}


def _schedule(where: str, value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f'{where}: expected a list of one or more delays like ["1m", "5m", "30m"], '
            f"got {value!r}"
        )
    return tuple(
        readers.duration(f"{where}[{i}]", item, minimum=MIN_DELAY) for i, item in enumerate(value)
    )


def _statuses(where: str, value: Any) -> tuple[frozenset[int], frozenset[int]]:
    """The codes listed as numbers, and every code meant (the classes expanded)."""
    if not isinstance(value, list):
        raise ConfigError(
            f'{where}: expected a list of HTTP status codes and classes like [422, "5xx"] '
            f"([] for none), got {value!r}"
        )
    listed: set[int] = set()
    meant: set[int] = set()
    for i, item in enumerate(value):
        key = f"{where}[{i}]"
        if isinstance(item, str) and (m := _CLASS.match(item.strip())):
            first = int(m.group(1)) * 100
            meant.update(range(first, first + 100))
        elif isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
            if 200 <= item <= 299:
                raise ConfigError(
                    f"{key}: {item} is a success, never retried; list failures (100-199, "
                    '300-599) or classes like "4xx"'
                )
            listed.add(item)
            meant.add(item)
        else:
            raise ConfigError(
                f'{key}: expected a status code like 422 (100-199, 300-599) or a class "1xx", '
                f'"3xx", "4xx" or "5xx", got {item!r}'
            )
    return frozenset(listed), frozenset(meant)
