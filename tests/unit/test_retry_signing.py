from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from relay import retry, signing
from relay.retry import RetryPolicy

POLICY = RetryPolicy(base=1.0, factor=2.0, max_delay=60.0, jitter=0.2)


@pytest.mark.parametrize(
    ("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0)]
)
def test_delay_doubles_from_base_and_caps(attempt: int, expected: float) -> None:
    assert retry.delay(POLICY, attempt, rand=0.5) == pytest.approx(expected)


def test_jitter_spreads_the_delay_by_the_configured_fraction() -> None:
    assert retry.delay(POLICY, 3, rand=0.0) == pytest.approx(4.0 * 0.8)
    assert retry.delay(POLICY, 3, rand=0.999999) == pytest.approx(4.0 * 1.2, rel=1e-4)


def test_jitter_never_exceeds_the_cap() -> None:
    assert retry.delay(POLICY, 50, rand=0.999) <= 60.0


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert retry.delay(POLICY, 10**6, rand=0.5) == 60.0


def test_retry_after_lengthens_but_never_shortens_and_is_capped() -> None:
    assert retry.delay(POLICY, 1, rand=0.5, retry_after=30) == 30.0
    assert retry.delay(POLICY, 5, rand=0.5, retry_after=1) == 16.0
    assert retry.delay(POLICY, 1, rand=0.5, retry_after=10_000) == 60.0


def test_parse_retry_after_seconds_and_http_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry.parse_retry_after("120", now) == 120.0
    later = now + timedelta(seconds=90)
    header = later.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert retry.parse_retry_after(header, now) == pytest.approx(90.0)
    assert retry.parse_retry_after("soon", now) is None
    assert retry.parse_retry_after(None, now) is None


def test_standard_webhooks_signature_matches_the_spec_example() -> None:
    # The example from the Standard Webhooks specification.
    key = signing.secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    sig = signing.sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert signing.verify(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, f"v1,bogus {sig}")
    assert not signing.verify(key, "msg_other", 1614265330, body, sig)


def test_a_plain_secret_is_used_as_raw_bytes() -> None:
    assert signing.secret_key("hunter2") == b"hunter2"
    assert signing.secret_key("whsec_" + base64.b64encode(b"k").decode()) == b"k"


def test_a_bad_whsec_secret_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="base64"):
        signing.secret_key("whsec_not base64!")
