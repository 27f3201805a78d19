"""Settlements as the JSON one settle statement reads with json_to_recordset."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from relay.sources.base import Settlement, json_default


def _detail(s: Settlement) -> dict[str, Any]:
    d = s.detail
    if d is None:
        return {}
    return {
        "method": d.method,
        "url": d.url,
        "request_headers": d.request_headers,
        "request_body": d.request_body,
        "response_headers": d.response_headers,
        "response_body": d.response_body,
        # The answer's JSON as JSON, not as a string of it (the text is checked JSON already).
        "response_json": orjson.Fragment(d.response_json) if d.response_json else None,
        "started_at": d.started_at,
        "finished_at": d.finished_at,
        "ms": d.ms,
        "worker": d.worker,
    }


def settle_batch_json(settlements: Iterable[Settlement], detail: bool = False) -> str:
    """A settle batch as the JSON that the settle queries read with json_to_recordset.

    Leases are the claim's token and must round-trip exactly: orjson writes datetimes as
    RFC 3339 with microseconds and, for aware ones, their offset, so PostgreSQL reads back the
    same instant (timestamptz) or the same wall time (timestamp). Response and request details
    ride along only for the kinds whose write-backs or attempt logs read them."""
    return orjson.dumps(
        [
            {
                "key": s.key,
                "lease": s.lease,
                "outcome": s.outcome,
                "delay": s.delay,
                # PostgreSQL text cannot hold NUL; an error quoting a response might.
                "error": s.error.replace("\x00", "") if s.error else s.error,
                "http_status": s.http_status,
                "attempt": s.attempt,
                **(_detail(s) if detail else {}),
            }
            for s in settlements
        ],
        default=json_default,
    ).decode()
