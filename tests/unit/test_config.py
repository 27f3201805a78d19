from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from relay import config
from relay.config import ConfigError
from relay.sources.base import Ordering, parse_ordering
from tests.support import queue_source

DB = "postgresql://localhost/app"


def build(**sections: Any) -> config.Config:
    raw: dict[str, Any] = {
        "database": {"url": DB},
        "sources": {"q": queue_source(url_column="url")},
    }
    raw.update(sections)
    return config.from_mapping(raw, {})


def error(raw: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.from_mapping(raw, env or {})
    return str(info.value)


def test_defaults_are_sane() -> None:
    cfg = build()
    assert cfg.max_in_flight == 40
    # Each endpoint takes at most half of the requests at once, with the breaker on and 410
    # disabling its target.
    assert cfg.endpoints.default.max_in_flight == 20
    assert cfg.endpoints.default.rate is None
    assert cfg.endpoints.breaker.enabled
    assert cfg.endpoints.breaker.min_requests == 20
    assert cfg.endpoints.disable_on == {410}
    assert cfg.batch_size == 100
    assert cfg.listen_url == DB
    assert cfg.health_port == 8081
    (source,) = cfg.sources
    assert source.kind_name == "table"
    assert (source.spec.schema, source.spec.table) == ("public", "webhook_delivery_queue")
    assert source.spec.pending == ("pending", "failed")


def test_environment_overrides_the_file() -> None:
    raw = {"database": {"url": DB}, "sources": {"q": queue_source()}}
    cfg = config.from_mapping(
        raw, {"DATABASE_URL": "postgresql://other/db", "RELAY_LISTEN_URL": "postgresql://direct/db"}
    )
    assert cfg.database_url == "postgresql://other/db"
    assert cfg.listen_url == "postgresql://direct/db"


def test_database_url_is_required() -> None:
    assert "database.url" in error({"sources": {"q": queue_source()}})


def test_unknown_top_level_key_is_named() -> None:
    msg = error({"database": {"url": DB}, "sources": {"q": queue_source()}, "relya": {}})
    assert msg.startswith("relya: unknown key")


def test_unknown_key_in_a_section_is_named() -> None:
    msg = error(
        {"database": {"url": DB}, "relay": {"max_inflight": 3}, "sources": {"q": queue_source()}}
    )
    assert msg.startswith("relay.max_inflight: unknown key")
    assert "max_in_flight" in msg  # the allowed keys are listed


def test_unknown_key_in_a_source_is_named() -> None:
    msg = error({"database": {"url": DB}, "sources": {"q": queue_source(colour="blue")}})
    assert msg.startswith("sources.q.colour: unknown key")


def test_wrong_type_is_named() -> None:
    msg = error(
        {
            "database": {"url": DB},
            "relay": {"max_in_flight": "ten"},
            "sources": {"q": queue_source()},
        }
    )
    assert msg.startswith("relay.max_in_flight: expected a whole number")


def test_bad_url_is_named() -> None:
    source = queue_source(url="not a url")
    del source["url_column"]
    msg = error({"database": {"url": DB}, "sources": {"q": source}})
    assert msg.startswith("sources.q.url:") and "not a url" in msg


def test_url_and_url_column_are_exclusive() -> None:
    msg = error({"database": {"url": DB}, "sources": {"q": queue_source(url="http://x.test/")}})
    assert "exactly one of url" in msg


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(5, 5.0), (2.5, 2.5), ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0)],
)
def test_durations(value: Any, seconds: float) -> None:
    assert build(relay={"shutdown_grace": value}).shutdown_grace == seconds


def test_bad_duration_is_named() -> None:
    msg = error(
        {
            "database": {"url": DB},
            "relay": {"claim_timeout": "soon"},
            "sources": {"q": queue_source()},
        }
    )
    assert msg.startswith("relay.claim_timeout: expected a duration")


def test_a_claim_must_outlive_the_request_it_covers_unless_heartbeats_extend_it() -> None:
    short = {"database": {"url": DB}, "relay": {"claim_timeout": "10s"}, "http": {"timeout": "10m"}}
    msg = error({**short, "sources": {"e": {"kind": "outbox", "url": "https://a.example/"}}})
    assert msg.startswith("relay.claim_timeout (10s) must be longer than http.timeout (600s)")
    assert "raise relay.claim_timeout or lower http.timeout" in msg
    # A table source's claims are extended while its request runs: a crashed relay's rows come
    # back within seconds, while a request may take minutes.
    cfg = config.from_mapping({**short, "sources": {"q": queue_source()}}, {})
    assert cfg.claim_timeout == 10.0 and cfg.http_timeout == 600.0
    assert cfg.sources[0].heartbeat


def test_claim_ahead_defaults_to_the_batch_and_may_be_zero() -> None:
    assert build(relay={"batch_size": 30}).claim_ahead == 30
    assert build(relay={"claim_ahead": 0}).claim_ahead == 0


def test_claim_ahead_defaults_to_what_a_hung_receiver_leaves_time_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 60 s claims, 10 s requests: a row may still start 45 s after its claim (10 s for the
    # request, 5 s for the settle). With 5 requests at once all hanging, that is 4.5 rounds of
    # timeouts: 22 rows may wait, not the 50 of a batch.
    events = {"e": {"kind": "outbox", "url": "https://a.example/"}}
    cfg = build(relay={"max_in_flight": 5}, sources=events)
    assert cfg.start_within(cfg.sources[0]) == 45.0
    assert cfg.claim_ahead == 22
    assert not caplog.records
    # A table source's claims heartbeat while its rows wait: a whole batch may wait.
    table = build(relay={"max_in_flight": 5})
    assert table.start_within(table.sources[0]) == float("inf")
    assert table.claim_ahead == 100
    # Asking for more is allowed, with a warning that names the safe figure.
    assert build(relay={"max_in_flight": 5, "claim_ahead": 50}, sources=events).claim_ahead == 50
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("config.claim_ahead claim_ahead=50")
    assert "safe=22" in warning


def test_a_documenso_job_claim_lasts_stuck_after_which_must_outlive_a_request() -> None:
    jobs = {"kind": "documenso_jobs", "stuck_after": "20s"}
    cfg = build(sources={"jobs": jobs})
    assert cfg.claim_lifetime(cfg.sources[0]) == 20.0
    assert cfg.start_within(cfg.sources[0]) == 5.0  # 20 - 10 for the request - 5 for the settle
    msg = error({"database": {"url": DB}, "sources": {"jobs": {**jobs, "stuck_after": "10s"}}})
    assert msg.startswith("sources.jobs.stuck_after (10s) must be longer than http.timeout")


def test_retry_status_must_be_claimable() -> None:
    msg = error({"database": {"url": DB}, "sources": {"q": queue_source(retry="waiting")}})
    assert msg.startswith("sources.q.retry:")


def test_done_status_cannot_also_be_pending() -> None:
    msg = error({"database": {"url": DB}, "sources": {"q": queue_source(done="pending")}})
    assert msg.startswith("sources.q.done:")


def test_required_mapping_keys_are_named() -> None:
    source = queue_source()
    del source["status"]
    assert error({"database": {"url": DB}, "sources": {"q": source}}).startswith(
        "sources.q.status: required"
    )


def test_attempts_and_processing_columns_are_optional() -> None:
    source = queue_source()
    del source["attempts"], source["processing"]
    (mapped,) = config.from_mapping({"database": {"url": DB}, "sources": {"q": source}}, {}).sources
    assert mapped.spec.attempts is None and mapped.spec.processing is None


def test_the_due_column_is_optional() -> None:
    source = queue_source()
    del source["due"]
    (mapped,) = config.from_mapping({"database": {"url": DB}, "sources": {"q": source}}, {}).sources
    assert mapped.spec.due is None


def test_source_names_are_identifiers() -> None:
    assert "source names" in error(
        {"database": {"url": DB}, "sources": {"Bad-Name": queue_source()}}
    )


def test_no_sources_is_an_error() -> None:
    assert error({"database": {"url": DB}}).startswith("sources:")


def test_outbox_topics_match_exact_then_longest_prefix_then_star() -> None:
    cfg = build(
        sources={
            "events": {
                "kind": "outbox",
                "topics": {
                    "order.created": "http://a.test/",
                    "order.*": "http://b.test/",
                    "*": "http://c.test/",
                },
            }
        }
    )
    (outbox,) = cfg.sources
    assert outbox.spec.target_for_topic("order.created") == "http://a.test/"
    assert outbox.spec.target_for_topic("order.paid") == "http://b.test/"
    assert outbox.spec.target_for_topic("user.created") == "http://c.test/"


def test_outbox_without_targets_is_an_error() -> None:
    assert "somewhere to deliver" in error(
        {"database": {"url": DB}, "sources": {"events": {"kind": "outbox"}}}
    )


def test_outbox_topic_urls_are_checked() -> None:
    msg = error(
        {
            "database": {"url": DB},
            "sources": {"events": {"kind": "outbox", "topics": {"a": "ftp://x"}}},
        }
    )
    assert msg.startswith("sources.events.topics.'a':")


def test_only_one_outbox() -> None:
    out = {"kind": "outbox", "url": "http://a.test/"}
    assert "only one outbox" in error({"database": {"url": DB}, "sources": {"a": out, "b": out}})


def test_health_listen_can_be_disabled() -> None:
    assert build(health={"listen": ""}).health_host is None
    assert "health.listen" in error(
        {"database": {"url": DB}, "health": {"listen": "8080"}, "sources": {"q": queue_source()}}
    )


def test_load_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[database]\nurl = "postgresql://x/y"\n[relay]\nbatch_size = 0\n'
        '[sources.events]\nkind = "outbox"\nurl = "http://a.test/"\n'
    )
    with pytest.raises(ConfigError, match=r"relay.toml: relay.batch_size: must be at least 1"):
        config.load(path, {})


def test_load_reports_bad_toml_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[database\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad, {})
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml", {})
    with pytest.raises(ConfigError, match="RELAY_CONFIG"):
        config.load(None, {})


def test_the_documented_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "relay.toml"
    cfg = config.load(example, {})
    assert {s.name for s in cfg.sources} == {"events", "deliveries"}


def test_documenso_documents_preset_needs_only_a_url() -> None:
    cfg = build(sources={"doc": {"kind": "documenso_documents", "url": "https://b.test/hook"}})
    (source,) = cfg.sources
    assert source.spec.table == ("relay", "documenso_events")
    assert source.spec.target_for_topic("DOCUMENT_SENT") == "https://b.test/hook"
    assert error(
        {"database": {"url": DB}, "sources": {"doc": {"kind": "documenso_documents"}}}
    ).startswith("sources.doc.url: required")
    msg = error(
        {
            "database": {"url": DB},
            "sources": {
                "doc": {"kind": "documenso_documents", "url": "https://b.test/", "events": []}
            },
        }
    )
    assert msg.startswith("sources.doc.events: expected a list of Documenso event names")


def test_a_prisma_database_url_works_as_it_is() -> None:
    raw = {
        "database": {
            "url": "postgresql://u:p@db:6432/documenso?pgbouncer=true&schema=public&sslmode=require"
        },
        "sources": {"q": queue_source()},
    }
    cfg = config.from_mapping(raw, {})
    assert cfg.database_url == "postgresql://u:p@db:6432/documenso?sslmode=require"
    assert cfg.pgbouncer is True
    assert cfg.listen_url == cfg.database_url
    assert build().pgbouncer is False


def test_documenso_jobs_preset() -> None:
    cfg = build(sources={"jobs": {"kind": "documenso_jobs", "stuck_after": "10m"}})
    (source,) = cfg.sources
    assert source.spec.job_ids == ("internal.execute-webhook",)
    assert (source.spec.stuck_after, source.lifetime) == (600.0, 600.0)
    both = build(
        sources={"jobs": {"kind": "documenso_jobs", "forward": {"a.job": "https://b.test/j"}}}
    )
    assert both.sources[0].spec.job_ids == ("internal.execute-webhook", "a.job")
    nothing = {"kind": "documenso_jobs", "webhooks": False}
    assert "nothing to run" in error({"database": {"url": DB}, "sources": {"jobs": nothing}})
    webhook_forward = {
        "kind": "documenso_jobs",
        "forward": {"internal.execute-webhook": "https://b.test/"},
    }
    assert error({"database": {"url": DB}, "sources": {"jobs": webhook_forward}}).startswith(
        "sources.jobs.forward:"
    )


def test_statement_timeout_and_heartbeat_defaults_and_minimum() -> None:
    cfg = build()
    assert (cfg.statement_timeout, cfg.heartbeat_interval) == (5.0, 5.0)
    assert build(database={"url": DB, "statement_timeout": "250ms"}).statement_timeout == 0.25
    msg = error({"database": {"url": DB, "statement_timeout": "50ms"}, "sources": {}})
    assert msg.startswith("database.statement_timeout: must be at least 100ms")


def test_ordering_keys() -> None:
    assert parse_ordering("s", {}) is None
    assert parse_ordering("s", {"ordering_key": "doc_id"}) == Ordering("doc_id")
    assert parse_ordering("s", {"ordering_key": "doc_id", "ordering_dead": "hold"}) == Ordering(
        "doc_id", hold_dead=True
    )
    # A preset's default, and "" to turn it off.
    assert parse_ordering("s", {}, "payload->>'id'") == Ordering("payload->>'id'")
    assert parse_ordering("s", {"ordering_key": ""}, "payload->>'id'") is None
    for raw, message in [
        ({"ordering_dead": "hold"}, "s.ordering_dead: set s.ordering_key too"),
        ({"ordering_key": "a", "ordering_dead": "keep"}, "expected 'skip'"),
        ({"ordering_key": "a; DROP TABLE x"}, "s.ordering_key: expected a SQL expression"),
        ({"ordering_key": 3}, "s.ordering_key"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_ordering("s", raw)
