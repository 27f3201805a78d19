"""relay.endpoints on its own: admission, deferral pace, the breaker, the config. Times are
given explicitly (the loop's clock in relay)."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from yarl import URL

from relay import endpoints
from relay.endpoints import Breaker, Endpoint, Endpoints, Gate, Limits, Settings, State
from relay.readers import ConfigError

BREAKER = Breaker(window=10.0, min_requests=4, failure_rate=0.5, pause=5.0, max_pause=12.0)


def endpoint(cap: int = 2, rate: float | None = None, breaker: Breaker = BREAKER) -> Endpoint:
    return Endpoint("hooks.example:443", Limits(cap, rate), breaker, probe_wait=3.0)


def go(e: Endpoint, now: float) -> float:
    gate, ticket = e.admit(now, 0)
    assert gate is Gate.go
    return ticket


def test_a_busy_endpoint_makes_rows_wait_when_a_slot_is_near_and_defers_them_otherwise() -> None:
    e = endpoint(cap=2)
    first, _ = go(e, 0.0), go(e, 0.0)
    e.finish(first, 0.5, answered=0.5, failed=False)  # answers take 0.5 s
    go(e, 0.5)
    # Two in flight: the next row's slot is about half an answer away; waits in relay.
    gate, wait = e.admit(0.5, 0)
    assert gate is Gate.wait and 0 < wait <= endpoints.PARK_WITHIN
    # With four rows waiting before it, its turn is more than a second away: handed back.
    gate, wait = e.admit(0.5, 4)
    assert gate is Gate.defer and wait > endpoints.PARK_WITHIN
    assert e.defer(0.5, wait) >= wait


def test_deferred_rows_come_back_at_the_endpoints_pace_not_all_at_once() -> None:
    e = endpoint(cap=2)
    go(e, 0.0), go(e, 0.0)
    e.latency = 2.0  # answers take 2 s: two slots serve a row a second
    delays = [e.defer(0.0, e.admit(0.0, 10)[1]) for _ in range(5)]
    assert all(b - a == pytest.approx(1.0) for a, b in itertools.pairwise(delays))
    assert e.deferred == 5


def test_a_hanging_request_counts_as_slow_while_it_hangs() -> None:
    e = endpoint(cap=1)
    go(e, 0.0)
    assert e.service_time(0.1) == pytest.approx(0.1)
    gate, _ = e.admit(0.1, 0)
    assert gate is Gate.wait  # it may answer soon
    gate, delay = e.admit(30.0, 0)  # 30 s without an answer: not soon
    assert gate is Gate.defer and delay >= 30.0


def test_an_endpoint_that_ends_no_request_with_every_slot_taken_is_stalled() -> None:
    # A hang's first moments: its requests are young, so their age says a slot may be near;
    # but with every slot taken and none ending for STALL_AFTER, its rows are handed back
    # rather than holding the claim budget in its line.
    e = endpoint(cap=2)
    e.latency = 0.001  # it answered in a millisecond until now
    go(e, 10.0), go(e, 10.0)
    soon = 10.0 + endpoints.STALL_AFTER / 2
    assert not e.stalled(soon)
    assert e.admit(soon, 0)[0] is Gate.wait
    later = 10.0 + endpoints.STALL_AFTER * 1.5
    assert e.stalled(later)
    gate, wait = e.admit(later, 0)
    assert gate is Gate.defer and wait >= endpoints.STALLED_WAIT
    assert e.blocked(later)
    # /status says so, and for how long.
    assert "stalled_s" not in e.status(soon)
    assert e.status(later)["stalled_s"] == pytest.approx(endpoints.STALL_AFTER * 1.5)


def test_an_endpoint_whose_requests_keep_ending_is_not_stalled() -> None:
    e = endpoint(cap=2)
    first, _ = go(e, 0.0), go(e, 0.0)
    e.finish(first, 0.09, answered=0.001, failed=False)  # one slot busy all along
    go(e, 0.09)
    # Both slots taken again, the last end less than STALL_AFTER ago: moving.
    assert not e.stalled(0.09 + endpoints.STALL_AFTER * 0.9)
    assert e.stalled(0.09 + endpoints.STALL_AFTER * 1.1)
    # A slow endpoint (2 s answers) is stalled only after ten of them without an end.
    slow = endpoint(cap=1)
    ticket = go(slow, 0.0)
    slow.finish(ticket, 2.0, answered=2.0, failed=False)
    go(slow, 2.0)
    assert not slow.stalled(2.0 + 19.9)
    assert slow.stalled(2.0 + 20.1)
    # A free slot: never stalled, whatever its age.
    idle = endpoint(cap=2)
    go(idle, 0.0)
    assert not idle.stalled(100.0)


def test_skipped_values_hold_until_their_row_is_due_or_the_endpoint_frees() -> None:
    e = endpoint(cap=1)
    ticket = go(e, 0.0)
    skips = endpoints.Skips()
    assert not e.blocked(0.1)  # one in flight that may answer soon: a row would wait
    assert e.blocked(30.0)  # 30 s without an answer: a row would be deferred
    url = "http://user:secret@hooks.example/a"
    skips.add(url, e, until=40.0)
    skips.add(url, e, until=90.0)  # the first row's due time stands
    # What the claim gets: the URL's digest (compared with md5(url) in SQL), never the URL
    # and its credentials, which PostgreSQL may write to its log as a parameter.
    assert skips.current(30.0) == [hashlib.md5(url.encode()).hexdigest()]
    assert skips.current(40.0) == []  # its deferred row is due: claimed again
    skips.add(url, e, until=100.0)
    e.finish(ticket, 50.0, answered=None, failed=True)  # the slot is free: rows go again
    assert skips.current(50.0) == []


def test_a_paused_endpoint_is_blocked_until_its_probe() -> None:
    e = endpoint(cap=4, breaker=Breaker(window=10.0, min_requests=1, pause=5.0))
    e.finish(go(e, 0.0), 0.0, answered=None, failed=True)
    assert e.state is State.paused
    assert e.blocked(4.9) and not e.blocked(5.0)


def test_skipped_values_are_bounded() -> None:
    e = endpoint(cap=1)
    go(e, 0.0)
    skips = endpoints.Skips()
    for n in range(endpoints.MAX_SKIPS + 5):
        skips.add(f"topic-{n}", e, until=100.0)
    assert len(skips.current(30.0)) == endpoints.MAX_SKIPS


def test_a_rate_spaces_the_requests() -> None:
    e = endpoint(cap=10, rate=10.0)
    go(e, 0.0)
    gate, wait = e.admit(0.0, 0)
    assert gate is Gate.wait and wait == pytest.approx(0.1)
    assert e.admit(0.1, 0)[0] is Gate.go
    gate, delay = e.admit(0.1, 30)  # 30 rows ahead at 10/s: 3 s away
    assert gate is Gate.defer and delay == pytest.approx(3.1)


def fail(e: Endpoint, now: float, n: int = 1) -> str | None:
    change = None
    for _ in range(n):
        change = e.finish(go(e, now), now, answered=None, failed=True)
    return change


def test_the_breaker_pauses_probes_and_resumes() -> None:
    e = endpoint(cap=5)
    assert fail(e, 0.0, 3) is None  # under min_requests
    assert fail(e, 1.0) == "paused"
    assert e.state is State.paused and e.reason == "4 of 4 requests failed in 10s"
    # Paused: every row is deferred to after the pause, none attempted.
    gate, delay = e.admit(2.0, 0)
    assert gate is Gate.defer and delay >= 4.0
    # After the pause one request probes; the others wait for its answer.
    probe = go(e, 6.0)
    assert e.state is State.probing
    gate, delay = e.admit(6.0, 0)
    assert gate is Gate.defer and delay >= e.probe_wait
    # The probe fails: paused again, twice as long.
    assert e.finish(probe, 6.5, answered=0.5, failed=True) == "paused"
    assert e.until == pytest.approx(16.5)
    assert e.admit(16.0, 0)[0] is Gate.defer
    # It fails again: the pause doubles to max_pause at most.
    assert e.finish(go(e, 16.5), 16.6, answered=None, failed=True) == "paused"
    assert e.until == pytest.approx(16.6 + 12.0)
    # The next probe succeeds: open again, with the first pause next time.
    assert e.finish(go(e, 29.0), 29.1, answered=0.1, failed=False) == "resumed"
    assert e.state is State.open and e.pause == 5.0
    assert e.admit(29.1, 0)[0] is Gate.go


def test_the_breaker_counts_only_the_window_and_the_failure_rate() -> None:
    e = endpoint(cap=5)
    assert fail(e, 0.0, 3) is None
    # Eleven seconds later those failures are out of the 10 s window.
    assert fail(e, 11.0) is None
    # Successes keep the rate under half.
    for _ in range(4):
        e.finish(go(e, 11.5), 11.5, answered=0.01, failed=False)
    assert fail(e, 12.0, 2) is None  # 3 of 7
    assert e.state is State.open
    assert fail(e, 12.0) == "paused"
    assert e.reason == "4 of 8 requests failed in 10s"


def test_a_probe_handed_back_unsent_lets_the_next_row_probe() -> None:
    e = endpoint(cap=5)
    fail(e, 0.0, 4)
    probe = go(e, 10.0)
    e.cancel(probe)
    assert e.in_flight == 0 and e.state is State.paused
    assert e.admit(10.0, 0)[0] is Gate.go
    assert e.state is State.probing


def test_without_the_breaker_failures_only_fail() -> None:
    e = endpoint(cap=5, breaker=Breaker(enabled=False))
    assert fail(e, 0.0, 50) is None
    assert e.state is State.open


@pytest.mark.parametrize(
    ("status", "final", "failure"),
    [
        (None, False, True),  # refused, reset, timed out
        (None, True, False),  # relay refused the target: says nothing of the endpoint
        (500, False, True),
        (503, False, True),
        (429, False, True),
        (408, False, True),
        (404, False, False),  # the row's problem
        (422, False, False),
        (200, False, False),
    ],
)
def test_what_counts_against_an_endpoint(status: int | None, final: bool, failure: bool) -> None:
    assert endpoints.is_failure(status, final) is failure


def test_endpoints_are_kept_by_host_and_port_with_their_limits() -> None:
    settings = Settings(
        Limits(4),
        {"hooks.example": Limits(2), "hooks.example:8443": Limits(1, 5.0)},
    )
    found = Endpoints(settings, probe_wait=10.0)
    a = found.get(URL("https://HOOKS.example/a"))
    assert found.get(URL("https://hooks.example/b?x=1")) is a
    assert (a.key, a.cap, a.rate) == ("hooks.example:443", 2, None)
    b = found.get(URL("https://hooks.example:8443/"))
    assert (b.cap, b.rate) == (1, 5.0)
    c = found.get(URL("http://[::1]:9000/"))
    assert (c.key, c.cap) == ("[::1]:9000", 4)


def test_idle_endpoints_are_forgotten_beyond_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoints, "MAX_ENDPOINTS", 3)
    found = Endpoints(Settings(Limits(2)), probe_wait=10.0, clock=lambda: 100.0)
    busy = found.get(URL("https://a.example/"))
    busy.admit(100.0, 0)  # in flight: kept
    for host in ("b", "c", "d", "e"):
        found.get(URL(f"https://{host}.example/"))
    assert len(list(found)) <= 3
    assert busy in list(found)


def test_disabled_targets_are_kept_without_userinfo_or_query() -> None:
    found = Endpoints(Settings(), probe_wait=10.0)
    url = URL("https://user:pw@hooks.example/x?token=1#f")
    assert Endpoints.target(url) == "https://hooks.example/x"
    assert found.disabled_reason("s", url) is None
    found.disabled[("s", "https://hooks.example/x")] = endpoints.Disabled("gone", 0.0)
    assert found.disabled_reason("s", URL("https://hooks.example/x?other=2")) == "gone"
    assert found.disabled_reason("t", url) is None


def test_the_config() -> None:
    default = endpoints.parse(None, 40)
    assert default.default == Limits(20)
    parsed = endpoints.parse(
        {
            "max_in_flight": 8,
            "rate": 50,
            "disable_on": [410, 404],
            "breaker": {"pause": "10s", "max_pause": "5m", "failure_rate": 0.8},
            "hosts": {"Hooks.Example:8443": {"max_in_flight": 2}, "slow.example": {"rate": 0}},
        },
        40,
    )
    assert parsed.default == Limits(8, 50.0)
    assert parsed.limits("hooks.example", 8443) == Limits(2, 50.0)
    assert parsed.limits("slow.example", 443) == Limits(8, None)
    assert parsed.limits("other.example", 443) == Limits(8, 50.0)
    assert parsed.disable_on == {410, 404}
    assert (parsed.breaker.pause, parsed.breaker.max_pause) == (10.0, 300.0)
    assert parsed.breaker.failure_rate == 0.8


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"max_in_flight": 50}, "more than relay.max_in_flight (40)"),
        ({"max_in_flight": 0}, "endpoints.max_in_flight: must be at least 1"),
        ({"rate": -1}, "endpoints.rate: must be at least 0"),
        ({"hosts": {"https://x.example/": {}}}, "not a URL"),
        ({"hosts": {"x.example": {"timeout": 1}}}, "timeout"),
        ({"disable_on": [200]}, "endpoints.disable_on: expected a list of HTTP statuses"),
        ({"breaker": {"pause": 0.1}}, "endpoints.breaker.pause: must be at least 1s"),
        ({"breaker": {"failure_rate": 2}}, "endpoints.breaker.failure_rate"),
        ({"cap": 1}, "cap"),
    ],
)
def test_config_errors_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        endpoints.parse(raw, 40)
    assert message in str(info.value)


def test_disabled_targets_in_memory_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoints, "MAX_DISABLED", 3)
    found = Endpoints(Settings(), probe_wait=10.0)
    for n in range(5):
        found.disable("s", f"https://h{n}.example/", "gone", float(n))
    assert [t for _, t in found.disabled] == [f"https://h{n}.example/" for n in (2, 3, 4)]
