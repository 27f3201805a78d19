"""Helpers for the tests of issue 9's `table` and `functions` kinds on users' own tables: the
table made per test, a relay config around its sources, receivers that hold a request until the
test lets it go, and the methods requests came with."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
from aiohttp import web

from relay import config as config_mod
from relay.config import Config
from tests.support import Receiver, raw_config


def execute(db: str, statements: str, params: Any = None) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(statements, params)


def table_config(
    db: str, sources: dict[str, Any], env: dict[str, str] | None = None, **sections: Any
) -> Config:
    """The tests' usual config (see tests.support.raw_config) with these sources only."""
    return config_mod.from_mapping(raw_config(db, sources=sources, **sections), env or {})


def table_source(table: str, url: str | None = None, **keys: Any) -> dict[str, Any]:
    """A `kind = "table"` source on `table`, keyed by `id`, its status in `status` (unless
    `keys` say otherwise), sending to `url` if given."""
    source: dict[str, Any] = {"kind": "table", "table": table, "key": "id", "status": "status"}
    if url is not None:
        source["url"] = url
    return {**source, **keys}


Answer = Callable[[web.Request, int], web.StreamResponse]


class Gate:
    """A receiver behaviour that holds the `n`th request (1-based, per webhook-id) until
    `release(n)`, then answers as `answer` says; `arrived` records each request's method."""

    def __init__(self, answer: Answer, held: set[int] | None = None) -> None:
        self.answer = answer
        self.held = held if held is not None else set()
        self.methods: list[str] = []
        self._open: dict[int, asyncio.Event] = {}

    def release(self, n: int) -> None:
        self._open.setdefault(n, asyncio.Event()).set()

    async def __call__(self, request: web.Request, count: int) -> web.StreamResponse:
        self.methods.append(request.method)
        if count in self.held:
            await self._open.setdefault(count, asyncio.Event()).wait()
        return self.answer(request, count)


@contextlib.asynccontextmanager
async def another_receiver(behaviour: Any = None) -> AsyncIterator[Receiver]:
    """A second receiver, for sources or routes that send to two places."""
    r = Receiver() if behaviour is None else Receiver(behaviour)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()
