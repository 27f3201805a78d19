"""relay.retry: the kinds of delay, the retry-or-dead decision and the [retry] reader."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from relay import retry
from relay.readers import ConfigError
from relay.retry import Dead, Retry, RetryPolicy, decide, parse

EXACT = RetryPolicy(base=1.0, factor=2.0, max_delay=60.0, jitter=0.0)
SCHEDULE = RetryPolicy(schedule=(60.0, 120.0, 240.0), jitter=0.0)
MID = 0.5  # rand at which jitter adds nothing
DEFAULT = RetryPolicy()


def error(data: Any, where: str = "retry", default: RetryPolicy = DEFAULT) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(where, data, default)
    return str(caught.value)


# -- delays ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 60.0), (1, 60.0), (2, 120.0), (3, 240.0), (4, 240.0), (10**9, 240.0)],
)
def test_schedule_walks_its_entries_then_stays_on_the_last(attempt: int, expected: float) -> None:
    assert retry.delay(SCHEDULE, attempt, MID) == expected


def test_a_schedule_need_not_grow() -> None:
    policy = RetryPolicy(schedule=(5.0, 300.0, 10.0), jitter=0.0)
    assert [retry.delay(policy, n, MID) for n in (1, 2, 3, 4)] == [5.0, 300.0, 10.0, 10.0]
    assert policy.cap == 300.0


def test_exponential_is_still_the_default_kind() -> None:
    assert RetryPolicy().schedule == ()
    assert RetryPolicy().cap == 3600.0
    assert [retry.delay(EXACT, n, MID) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_a_factor_too_large_for_a_float_waits_the_cap() -> None:
    policy = RetryPolicy(base=1.0, factor=1e300, max_delay=60.0, jitter=0.0)
    assert retry.delay(policy, 1, MID) == 1.0
    assert retry.delay(policy, 3, MID) == 60.0


@pytest.mark.parametrize(
    "policy", [RetryPolicy(jitter=0.25), RetryPolicy(schedule=(8.0, 40.0, 80.0), jitter=0.25)]
)
@pytest.mark.parametrize("rand", [0.0, 0.1, 0.5, 0.9, 0.999999])
def test_jitter_stays_within_its_fraction(policy: RetryPolicy, rand: float) -> None:
    exact = dataclasses.replace(policy, jitter=0.0)
    for attempt in (1, 2):  # below the cap
        plain = retry.delay(exact, attempt, MID)
        spread = retry.delay(policy, attempt, rand)
        assert plain * 0.75 <= spread <= plain * 1.25
        assert spread == pytest.approx(plain * (1 + 0.25 * (2 * rand - 1)))


def test_jitter_never_takes_a_schedule_past_its_longest_entry() -> None:
    policy = RetryPolicy(schedule=(10.0, 40.0), jitter=0.5)
    assert retry.delay(policy, 1, 0.999) == pytest.approx(15.0, rel=1e-3)  # below the cap
    assert retry.delay(policy, 2, 0.999) == 40.0
    assert retry.delay(policy, 2, 0.0) == 20.0


# -- decide: which answers are final ----------------------------------------------------------

DEFAULT_FINAL = sorted(set(range(400, 500)) - {408, 409, 425, 429})


@pytest.mark.parametrize("status", DEFAULT_FINAL)
def test_by_default_a_4xx_is_final(status: int) -> None:
    assert decide(RetryPolicy(), 1, 5, status, None, MID) == Dead(
        f"HTTP {status} is final (retry.final_statuses)"
    )


@pytest.mark.parametrize("status", [408, 409, 425, 429])
def test_by_default_these_4xx_are_retried(status: int) -> None:
    assert decide(EXACT, 1, 5, status, None, MID) == Retry(1.0)


@pytest.mark.parametrize("status", [None, 300, 302, 308, *range(500, 600)])
def test_by_default_5xx_redirects_and_no_answer_are_retried(status: int | None) -> None:
    assert decide(EXACT, 2, 5, status, None, MID) == Retry(2.0)


def test_a_final_answer_is_final_on_the_last_attempt_too() -> None:
    assert decide(RetryPolicy(), 5, 5, 422, None, MID) == Dead(
        "HTTP 422 is final (retry.final_statuses)"
    )


def test_the_reason_names_the_table_whose_statuses_apply() -> None:
    policy = parse("sources.sms.retry", {"final_statuses": ["4xx", 500]}, RetryPolicy())
    assert decide(policy, 1, 5, 500, None, MID) == Dead(
        "HTTP 500 is final (sources.sms.retry.final_statuses)"
    )
    assert decide(policy, 1, 5, 429, None, MID) == Retry(1.0)  # default exceptions kept
    assert isinstance(decide(policy, 1, 5, 501, None, MID), Retry)


def test_no_final_statuses_retries_every_failure() -> None:
    policy = parse("retry", {"final_statuses": []}, EXACT)
    assert decide(policy, 1, 5, 400, None, MID) == Retry(1.0)


def test_retried_statuses_make_exceptions_to_a_final_class() -> None:
    policy = parse("retry", {"final_statuses": ["5xx"], "retried_statuses": [503]}, EXACT)
    assert isinstance(decide(policy, 1, 5, 500, None, MID), Dead)
    assert decide(policy, 1, 5, 503, None, MID) == Retry(1.0)
    assert decide(policy, 1, 5, 422, None, MID) == Retry(1.0)  # 4xx no longer final


# -- decide: attempts --------------------------------------------------------------------------


def test_the_last_attempt_is_dead() -> None:
    assert decide(EXACT, 4, 5, 500, None, MID) == Retry(8.0)
    assert decide(EXACT, 5, 5, 500, None, MID) == Dead("attempt 5 of 5")
    assert decide(EXACT, 7, 5, None, None, MID) == Dead("attempt 7 of 5")


def test_the_rows_own_limit_wins_over_the_policys() -> None:
    policy = dataclasses.replace(EXACT, max_attempts=2)
    assert decide(policy, 2, 3, 500, None, MID) == Retry(2.0)
    assert decide(policy, 2, None, 500, None, MID) == Dead("attempt 2 of 2")


def test_without_any_limit_five_attempts() -> None:
    assert retry.DEFAULT_MAX_ATTEMPTS == 5
    assert decide(EXACT, 4, None, 500, None, MID) == Retry(8.0)
    assert decide(EXACT, 5, None, 500, None, MID) == Dead("attempt 5 of 5")


def test_a_single_attempt_is_never_retried() -> None:
    assert decide(EXACT, 1, 1, 503, 1.0, MID) == Dead("attempt 1 of 1")


# -- decide: Retry-After -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_lengthens_the_wait_on_429_and_503(status: int) -> None:
    assert decide(EXACT, 1, 5, status, 30.0, MID) == Retry(30.0)
    assert decide(SCHEDULE, 1, 5, status, 90.0, MID) == Retry(90.0)


@pytest.mark.parametrize("status", [None, 408, 500, 502, 504, 301])
def test_retry_after_is_ignored_on_other_answers(status: int | None) -> None:
    assert decide(EXACT, 1, 5, status, 30.0, MID) == Retry(1.0)
    assert decide(SCHEDULE, 1, 5, status, 90.0, MID) == Retry(60.0)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_never_shortens_the_wait(status: int) -> None:
    assert decide(EXACT, 5, 9, status, 1.0, MID) == Retry(16.0)
    assert decide(SCHEDULE, 2, 5, status, 0.0, MID) == Retry(120.0)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_stops_at_the_cap(status: int) -> None:
    assert decide(EXACT, 1, 5, status, 86400.0, MID) == Retry(60.0)
    assert decide(SCHEDULE, 1, 5, status, 86400.0, MID) == Retry(240.0)  # the longest entry
    assert decide(EXACT, 1, 5, status, float("inf"), MID) == Retry(60.0)


# -- parse: values -------------------------------------------------------------------------------


def test_an_empty_table_is_the_default() -> None:
    assert parse("retry", {}, RetryPolicy()) == RetryPolicy()
    top = RetryPolicy(schedule=(1.0,), max_attempts=3)
    assert parse("sources.q.retry", {}, top) == top


def test_every_key_is_read() -> None:
    policy = parse(
        "retry",
        {
            "base": "250ms",
            "factor": 3,
            "max_delay": "5m",
            "jitter": 0.1,
            "max_attempts": 8,
            "final_statuses": ["4xx", "5XX", 302],
            "retried_statuses": [429, 503],
        },
        RetryPolicy(),
    )
    assert policy == RetryPolicy(
        base=0.25,
        factor=3.0,
        max_delay=300.0,
        jitter=0.1,
        max_attempts=8,
        final_statuses=frozenset({*range(400, 600), 302}),
        retried_statuses=frozenset({429, 503}),
    )


def test_a_schedule_is_exact_unless_the_same_table_sets_jitter() -> None:
    top = RetryPolicy(jitter=0.3)
    exact = parse("sources.q.retry", {"schedule": ["1m", "2m", 240, "0.5h"]}, top)
    assert exact.schedule == (60.0, 120.0, 240.0, 1800.0)
    assert exact.jitter == 0.0
    assert exact.cap == 1800.0
    spread = parse("sources.q.retry", {"schedule": ["1m"], "jitter": 0.1}, top)
    assert spread.jitter == 0.1


def test_a_source_overrides_the_top_level_key_by_key() -> None:
    top = parse(
        "retry",
        {"schedule": ["1m", "2m"], "max_attempts": 4, "final_statuses": ["4xx", "5xx"]},
        RetryPolicy(),
    )
    source = parse("sources.q.retry", {"max_attempts": 9}, top)
    assert source == dataclasses.replace(top, max_attempts=9)
    assert source.statuses_from == "retry"
    assert parse("sources.q.retry", {"retried_statuses": []}, top).statuses_from == (
        "sources.q.retry"
    )


def test_exponential_keys_in_a_source_replace_a_top_level_schedule() -> None:
    top = parse("retry", {"schedule": ["1m", "2m"]}, RetryPolicy())
    source = parse("sources.q.retry", {"base": "5s", "max_delay": "10m"}, top)
    assert source.schedule == ()
    assert (source.base, source.factor, source.max_delay) == (5.0, 2.0, 600.0)
    assert retry.delay(source, 2, MID) == 10.0


def test_a_schedule_in_a_source_replaces_top_level_backoff() -> None:
    top = parse("retry", {"base": "2s", "max_delay": "1m"}, RetryPolicy())
    source = parse("sources.q.retry", {"schedule": ["5m"]}, top)
    assert retry.delay(source, 3, MID) == 300.0  # past the top-level max_delay: the schedule's
    assert source.cap == 300.0


def test_the_keys_table_lists_every_setting() -> None:
    fields = {f.name for f in dataclasses.fields(RetryPolicy)} - {"statuses_from"}
    assert set(retry.KEYS) == fields
    assert error({"nope": 1}).endswith("allowed here: " + ", ".join(sorted(fields)))


# -- parse: errors ---------------------------------------------------------------------------------


def test_unknown_keys_are_refused() -> None:
    assert error({"retries": 3}, "sources.q.retry").startswith(
        "sources.q.retry.retries: unknown key; allowed here: base, factor, "
    )


@pytest.mark.parametrize("data", [5, "1m", ["1m"]])
def test_the_table_must_be_a_table(data: Any) -> None:
    assert error(data, "sources.q.retry") == (
        "sources.q.retry: expected a table of retry settings like [sources.q.retry] "
        f"max_attempts = 5, got {data!r}"
    )


@pytest.mark.parametrize("value", [[], "1m", 60, {"a": "1m"}])
def test_a_schedule_is_a_non_empty_list(value: Any) -> None:
    assert error({"schedule": value}) == (
        'retry.schedule: expected a list of one or more delays like ["1m", "5m", "30m"], '
        f"got {value!r}"
    )


def test_schedule_entries_are_durations() -> None:
    assert error({"schedule": ["1m", "soon"]}) == (
        "retry.schedule[1]: expected a duration like 30, '250ms', '30s' or '5m', got 'soon'"
    )
    assert error({"schedule": [True]}).startswith("retry.schedule[0]: expected a duration")
    assert error({"schedule": [-1]}) == "retry.schedule[0]: must not be negative, got -1"


@pytest.mark.parametrize("value", ["9ms", 0, 0.005, "0s"])
def test_schedule_entries_below_10ms_are_refused(value: Any) -> None:
    assert error({"schedule": ["1s", value]}) == (
        f"retry.schedule[1]: must be at least 10ms, got {value!r}"
    )


def test_10ms_is_enough() -> None:
    assert parse("retry", {"schedule": ["10ms"]}, RetryPolicy()).schedule == (0.01,)
    assert parse("retry", {"base": "10ms"}, RetryPolicy()).base == 0.01


@pytest.mark.parametrize("key", ["base", "factor"])
def test_a_schedule_does_not_take_base_or_factor(key: str) -> None:
    assert error({"schedule": ["1m"], key: 2}, "sources.q.retry") == (
        f"sources.q.retry.{key}: does not apply with a schedule, which gives every delay "
        "itself; remove one of them"
    )


def test_a_schedule_does_not_take_max_delay() -> None:
    assert error({"schedule": ["1m"], "max_delay": "1h"}) == (
        "retry.max_delay: does not apply with a schedule: its longest delay is the cap (for "
        "Retry-After too); remove max_delay, or make it the schedule's last entry"
    )


def test_max_delay_cannot_be_below_base() -> None:
    assert error({"base": "10s", "max_delay": "1s"}) == (
        "retry.max_delay (1s) must be at least retry.base (10s): raise retry.max_delay or "
        "lower retry.base"
    )


def test_max_delay_cannot_be_below_an_inherited_base() -> None:
    top = RetryPolicy(base=30.0, max_delay=60.0)
    assert error({"max_delay": "10s"}, "sources.q.retry", top).startswith(
        "sources.q.retry.max_delay (10s) must be at least sources.q.retry.base (30s)"
    )


@pytest.mark.parametrize("key", ["base", "max_delay"])
def test_exponential_durations_below_10ms_are_refused(key: str) -> None:
    assert error({key: "5ms"}) == f"retry.{key}: must be at least 10ms, got '5ms'"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.5, "retry.factor: must be at least 1, got 0.5"),
        ("2", "retry.factor: expected a number like 2 or 1.5, got '2'"),
        (True, "retry.factor: expected a number like 2 or 1.5, got True"),
        (float("inf"), "retry.factor: expected a number like 2 or 1.5, got inf"),
    ],
)
def test_factor_is_a_number_of_at_least_one(value: Any, message: str) -> None:
    assert error({"factor": value}) == message


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.2", True])
def test_jitter_is_a_fraction(value: Any) -> None:
    assert error({"jitter": value}) == (
        f"retry.jitter: expected a number between 0 and 1, got {value!r}"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "sources.q.retry.max_attempts: must be at least 1, got 0"),
        ("5", "sources.q.retry.max_attempts: expected a whole number, got '5'"),
        (True, "sources.q.retry.max_attempts: expected a whole number, got True"),
        (2.5, "sources.q.retry.max_attempts: expected a whole number, got 2.5"),
    ],
)
def test_max_attempts_is_a_whole_number_of_at_least_one(value: Any, message: str) -> None:
    assert error({"max_attempts": value}, "sources.q.retry") == message


@pytest.mark.parametrize("key", ["final_statuses", "retried_statuses"])
@pytest.mark.parametrize("value", ["4xx", 422, {"4xx": True}])
def test_statuses_are_a_list(key: str, value: Any) -> None:
    assert error({key: value}) == (
        f'retry.{key}: expected a list of HTTP status codes and classes like [422, "5xx"] '
        f"([] for none), got {value!r}"
    )


@pytest.mark.parametrize("key", ["final_statuses", "retried_statuses"])
@pytest.mark.parametrize("value", [99, 600, "2xx", "6xx", "42x", "422", True, 4.5, None])
def test_statuses_are_codes_or_classes(key: str, value: Any) -> None:
    assert error({key: [500, value]}) == (
        f'retry.{key}[1]: expected a status code like 422 (100-199, 300-599) or a class "1xx", '
        f'"3xx", "4xx" or "5xx", got {value!r}'
    )


@pytest.mark.parametrize("key", ["final_statuses", "retried_statuses"])
@pytest.mark.parametrize("value", [200, 204, 299])
def test_a_success_is_not_a_status_to_list(key: str, value: int) -> None:
    assert error({key: [value]}) == (
        f"retry.{key}[0]: {value} is a success, never retried; list failures (100-199, "
        '300-599) or classes like "4xx"'
    )


def test_classes_expand_to_their_hundred_codes() -> None:
    policy = parse("retry", {"final_statuses": ["1xx", " 3XX "]}, RetryPolicy())
    assert policy.final_statuses == frozenset({*range(100, 200), *range(300, 400)})


def test_a_final_status_the_default_retries_is_refused() -> None:
    # 429 is retried by default: `final_statuses = [429]` alone would change nothing.
    assert error({"final_statuses": [429]}, "sources.q.retry") == (
        "sources.q.retry.final_statuses: 429 is also in retried_statuses, which wins; set "
        "sources.q.retry.retried_statuses without it (default [408, 409, 425, 429])"
    )
    policy = parse(
        "sources.q.retry", {"final_statuses": [429], "retried_statuses": [408]}, RetryPolicy()
    )
    assert decide(policy, 1, 5, 429, 1.0, MID) == Dead(
        "HTTP 429 is final (sources.q.retry.final_statuses)"
    )


def test_a_final_status_inside_a_retried_class_is_refused() -> None:
    assert error({"final_statuses": [422], "retried_statuses": ["4xx"]}).startswith(
        "retry.final_statuses: 422 is also in retried_statuses, which wins;"
    )
