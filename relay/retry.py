"""Pure retry policy: when a failed delivery is tried again.

Exponential backoff with jitter, capped; a receiver's `Retry-After` can lengthen the wait but
never shorten it below the schedule, and never past the cap. Randomness comes in as an argument
so the policy is a pure function and tests can pin it.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base: float = 1.0  # seconds before the second attempt
    factor: float = 2.0
    max_delay: float = 3600.0
    jitter: float = 0.2  # +/- this fraction of the delay


def delay(
    policy: RetryPolicy, attempt: int, rand: float, retry_after: float | None = None
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based); `rand` is in [0, 1)."""
    exponent = max(attempt - 1, 0)
    # Cap the exponent before computing, so a huge attempt count cannot overflow a float.
    base = policy.base * policy.factor ** min(exponent, 64)
    wait = min(policy.max_delay, base)
    wait *= 1.0 + policy.jitter * (2.0 * rand - 1.0)
    if retry_after is not None:
        wait = max(wait, min(retry_after, policy.max_delay))
    return max(0.0, min(wait, policy.max_delay))


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


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float


@dataclass(frozen=True, slots=True)
class Dead:
    reason: str


def decide(
    policy: RetryPolicy,
    attempt: int,
    max_attempts: int,
    status: int | None,
    retry_after: float | None,
    rand: float,
) -> Retry | Dead:
    if attempt >= max_attempts:
        return Dead(f"attempt {attempt} of {max_attempts}")
    return Retry(delay(policy, attempt, rand, retry_after))


def parse(where: str, data: Any, default: RetryPolicy) -> RetryPolicy:
    """Placeholder until the per-source policy reader lands."""
    return default
