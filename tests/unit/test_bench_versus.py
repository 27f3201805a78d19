"""bench/versus.py's pure parts: Graphile Worker "not measured" without node or with a failing
npm, and the summary's per-round ratios. Nothing here runs node or measures anything."""

from __future__ import annotations

from typing import Any

import pytest

from bench import versus

SETTINGS = {
    "versus_rounds": 2,
    "versus_latency_rows": 10,
    "versus_drain_rows": 1000,
    "versus_live_rows": 1000,
    "pace_s": 0.02,
}


def test_without_node_graphile_is_not_measured_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(versus.shutil, "which", lambda name: None)
    version, why = versus.install()
    assert version is None
    assert why == "node and npm are needed: node and npm not found on PATH"


def test_a_failing_npm_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(versus.shutil, "which", lambda name: "/bin/false")
    monkeypatch.setattr(versus, "installed_version", lambda: None)
    version, why = versus.install()
    assert version is None
    assert why.startswith("npm ci exited 1") or why.startswith("npm install exited 1")


def drain(rows_per_s: float, worker: float, pg: float) -> dict[str, Any]:
    return {
        "rows_per_s": rows_per_s,
        "worker_cpu_s_per_1k": worker,
        "pg_cpu_s_per_1k": pg,
        "receiver_cpu_s_per_1k": 0.05,
        "worker_pg_cpu_s_per_1k": worker + pg,
        "peak_rss_mb": 50.0,
        "statements_per_1k": 100.0,
    }


def test_ratios_are_taken_within_each_round_and_a_failed_run_is_left_out() -> None:
    rounds: dict[str, list[dict[str, Any]]] = {
        "latency": [
            {"relay": {"p50_ms": 2.0, "p99_ms": 4.0}, "graphile": {"p50_ms": 1.0, "p99_ms": 4.0}}
        ],
        # Round 2 ran at half the speed for both: the per-round ratio stays 1.5.
        "drain": [
            {"relay": drain(6000, 0.1, 0.05), "graphile": drain(4000, 0.2, 0.02)},
            {"relay": drain(3000, 0.1, 0.05), "graphile": drain(2000, 0.2, 0.02)},
            {"relay": drain(9000, 0.1, 0.05)},  # Graphile's run failed
        ],
        "live": [],
    }
    latencies = {"relay": [2.0] * 99 + [4.0], "graphile": [1.0] * 99 + [4.0]}
    summary = versus.summarise(rounds, latencies, ["relay", "graphile"])
    r = summary["ratios"]["relay_over_graphile"]
    assert r["drain_rows_per_s"] == {"median": 1.5, "per_round": [1.5, 1.5]}
    assert r["drain_worker_cpu_s_per_1k"]["median"] == pytest.approx(0.5)
    assert r["latency_p50_ms_pooled"] == 2.0
    assert summary["peers"]["relay"]["drain"]["rows_per_s"] == 6000
    assert summary["peers"]["graphile"]["drain"]["rows_per_s"] == 3000
    lines = "\n".join(
        versus.markdown(
            {
                "graphile_version": "0.17.3",
                "graphile_settings": versus.GRAPHILE_SETTINGS,
                "peers": ["relay", "graphile"],
                "summary": summary,
            },
            SETTINGS,
        )
    )
    assert "| relay, your table / Graphile Worker | 2.00 / 2.00 | 1.50 |" in lines


def test_not_measured_is_said_in_the_report() -> None:
    lines = versus.markdown(
        {"graphile_version": None, "not_measured": "node and npm are needed", "peers": []},
        SETTINGS,
    )
    assert "Graphile Worker: **not measured** (node and npm are needed)." in lines
