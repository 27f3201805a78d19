"""Sign, POST, classify the outcome, settle.

Delivery happens outside any transaction: the claim committed before the request starts and the
settle is a separate statement after it ends. Settles from concurrent deliveries are batched into
one statement per source (the `Settler`), which also keeps the pool small under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import orjson
import psycopg
from yarl import URL

from relay import guard, logs, retry, signing, store
from relay.claimer import Slots
from relay.config import EXECUTE_WEBHOOK, BodyFormat, Config, Source
from relay.store import RETRYABLE, Claimed, Outcome, Settlement, WebhookCall

log = logging.getLogger("relay.deliverer")

SETTLE_BATCH = 500


class SettleStore(Protocol):
    async def settle(self, source: str, settlements: list[Settlement]) -> set[Any]: ...
    async def record_calls(self, source: str, calls: list[WebhookCall]) -> None: ...


# Told, after each write, which settlements it covered and which keys were still ours (None when
# the write failed and the rows are left to their claim expiry).
OnSettled = Callable[[str, list[Settlement], set[Any] | None], None]


class Settler:
    """Collects settlements and writes each source's pending ones in one statement.

    Nothing waits on a single row's settle: deliveries hand their outcome over and move on, and
    `on_settled` hears about whole batches once they are written (that is where their claim
    budget is given back, so the rows held stay bounded however slow the writes are).
    """

    def __init__(self, store: SettleStore, on_settled: OnSettled) -> None:
        self.store = store
        self.on_settled = on_settled
        self._queue: dict[str, list[Settlement]] = defaultdict(list)
        self._ready = asyncio.Event()
        self._closing = False
        self.lost = 0  # settles that found the row no longer ours

    def add(self, source: str, settlement: Settlement) -> None:
        self._queue[source].append(settlement)
        self._ready.set()

    def close(self) -> None:
        self._closing = True
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._queue = self._queue, defaultdict(list)
            for source, items in batch.items():
                for start in range(0, len(items), SETTLE_BATCH):
                    chunk = items[start : start + SETTLE_BATCH]
                    self.on_settled(source, chunk, await self._write(source, chunk))
            if self._closing and not self._queue:
                return

    async def _write(self, source: str, items: list[Settlement]) -> set[Any] | None:
        calls_written = False
        try:
            calls = [s.call for s in items if s.call is not None]
            if calls:
                await self.store.record_calls(source, calls)
            calls_written = True
            settled = await self.store.settle(source, items)
        except RETRYABLE as exc:
            # The database stayed away longer than the store retries for. These rows keep
            # their claim until it expires; then a sweep returns them and they are delivered
            # again (at-least-once), with the same id.
            _log_failed(source, items, exc)
            return None
        except psycopg.Error as exc:
            if _structural(exc):
                # The table itself changed (a column renamed, the table dropped, a privilege
                # revoked): no row would do better alone. The rows keep their claims until
                # these expire; the claimer finds the source failing and the sweeps re-check it.
                log.error(
                    "settle.rejected source=%s rows=%d error=%s next=%s",
                    source,
                    len(items),
                    logs.first_line(exc),
                    "the rows keep their claims until these expire",
                )
                return None
            # Not a lost connection: the database refused a write of one row or more (a
            # "WebhookCall" whose webhook was deleted, a value a column or a trigger of the
            # user's refuses). One statement is all or nothing, so each row is written alone,
            # and the others settle as they would have.
            log.warning(
                "settle.batch_rejected source=%s rows=%d error=%s next=%s",
                source,
                len(items),
                logs.first_line(exc),
                "settling the rows one by one",
            )
            written = await self._write_each(source, items, with_calls=not calls_written)
            if written is None:
                return None
            settled, rejected = written
            items = [s for s in items if s.key not in rejected]
        if len(settled) < len(items):
            for settlement in items:
                if settlement.key not in settled:
                    self.lost += 1
                    log.warning(
                        "settle.lost source=%s key=%s outcome=%s reason=%s",
                        source,
                        settlement.key,
                        settlement.outcome,
                        "claim no longer held (expired and taken over, or the row was deleted "
                        "or changed)",
                    )
        return settled

    async def _write_each(
        self, source: str, items: list[Settlement], with_calls: bool
    ) -> tuple[set[Any], set[Any]] | None:
        """Each row on its own: the keys settled and the keys the database refused outright;
        None if the database went away meanwhile."""
        settled: set[Any] = set()
        rejected: set[Any] = set()
        for item in items:
            try:
                one = await self._write_one(source, item, with_calls)
            except RETRYABLE as exc:
                _log_failed(source, items, exc)
                return None
            if one is None:
                rejected.add(item.key)
            else:
                settled |= one
        return settled, rejected

    async def _write_one(self, source: str, item: Settlement, with_call: bool) -> set[Any] | None:
        """One row's settle, with less of it each time the database refuses: its attempt record,
        then its error text and HTTP status; what is left is the outcome itself. None if even
        that is refused."""
        if with_call and item.call is not None:
            try:
                await self.store.record_calls(source, [item.call])
            except RETRYABLE:
                raise
            except psycopg.Error as exc:
                log.error(
                    "settle.call_not_recorded source=%s key=%s error=%s",
                    source,
                    item.key,
                    logs.first_line(exc),
                )
        try:
            return await self.store.settle(source, [item])
        except RETRYABLE:
            raise
        except psycopg.Error as exc:
            log.error(
                "settle.details_refused source=%s key=%s outcome=%s error=%s next=%s",
                source,
                item.key,
                item.outcome,
                logs.first_line(exc),
                "settling without the error text and HTTP status",
            )
        try:
            return await self.store.settle(source, [replace(item, error=None, http_status=None)])
        except RETRYABLE:
            raise
        except psycopg.Error as exc:
            # Nothing of it can be written (a trigger of the user's refuses the row, say): it
            # keeps its claim until that expires, and is then delivered again.
            log.error(
                "settle.rejected source=%s key=%s outcome=%s error=%s",
                source,
                item.key,
                item.outcome,
                logs.first_line(exc),
            )
            return None


# SQLSTATE classes that say the statement no longer fits the table (undefined column or table,
# insufficient privilege: 42; invalid schema: 3F; feature not supported: 0A), as opposed to a
# value of one row that was refused.
_STRUCTURAL = ("42", "3F", "0A")


def _structural(exc: psycopg.Error) -> bool:
    return (exc.sqlstate or "")[:2] in _STRUCTURAL


def _log_failed(source: str, items: list[Settlement], exc: BaseException) -> None:
    log.error("settle.failed source=%s rows=%d error=%s", source, len(items), logs.first_line(exc))


@dataclass(slots=True)
class Attempt:
    """What one HTTP attempt came to."""

    ok: bool
    http_status: int | None
    error: str | None
    retry_after: float | None = None
    headers: dict[str, str] | None = None
    body: bytes = b""
    ms: float = 0.0  # how long it took
    # No request was or will be made (a refused or invalid target): dead at once, no retries.
    final: bool = False


def documenso_body(event: str, payload: bytes, url: str, now: datetime) -> bytes:
    """Documenso's webhook envelope, keys in Documenso's order; createdAt is the send time."""
    created = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    return b"".join(
        (
            b'{"event":',
            orjson.dumps(event),
            b',"payload":',
            payload,
            b',"createdAt":',
            orjson.dumps(created),
            b',"webhookEndpoint":',
            orjson.dumps(url),
            b"}",
        )
    )


def _json_text(body: bytes) -> str:
    """A response body as Documenso stores it: parsed JSON, or the raw text as a JSON string.

    PostgreSQL's jsonb refuses the NUL character (`\\u0000`); a body that has one is stored as
    its raw text without NULs instead, so one odd response cannot fail the settle it rides in."""
    try:
        text = orjson.dumps(orjson.loads(body)).decode()
        if "\\u0000" not in text:
            return text
    except orjson.JSONDecodeError:
        pass
    return orjson.dumps(body.decode("utf-8", "replace").replace("\x00", "")).decode()


def excerpt(body: bytes, limit: int) -> str:
    """At most `limit` characters from the start of a response body, for last_error and the
    log: decoded leniently, NUL dropped (PostgreSQL text cannot hold it, and one NUL would fail
    the whole settle batch), other control characters escaped so that a body can neither forge
    a log line nor drive a terminal that shows it."""
    if limit <= 0:
        return ""
    text = body[: limit * 4].decode("utf-8", "replace").replace("\x00", "").strip()
    return logs.escape(text)[:limit]


def _header_text(text: str) -> str:
    """A response header as valid text: aiohttp keeps bytes that are not UTF-8 as surrogates,
    which neither JSON nor PostgreSQL accept; they become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _client_error(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.InvalidURL):
        # Its text is the whole URL, password and query string included.
        return f"invalid URL {guard.display_url(str(exc.url))!r}"
    return f"{type(exc).__name__}: {exc}"


class Deliverer:
    """`max_in_flight` workers that take claimed rows in order, deliver each and hand its
    settlement to the Settler. Rows claimed ahead of a free worker wait in `_queue` (the claim
    budget bounds it to `claim_ahead` rows)."""

    def __init__(
        self,
        config: Config,
        settler: Settler,
        slots: Slots,
        *,
        rand: Callable[[], float] = random.random,
        network: guard.Network | None = None,
    ) -> None:
        self.config = config
        self.settler = settler
        self.slots = slots
        self.rand = rand
        self.network = network or guard.Network()
        self._guard: guard.Guard | None = None
        self._queue: asyncio.Queue[tuple[Source, Claimed, float]] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._finish = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        # Validated at config load, so decoding cannot fail here.
        self._keys = {
            s.name: tuple(signing.config_key(secret) for secret in s.signing_secrets)
            for s in config.sources
            if s.signing_secrets and s.secret_header is None
        }
        # A claimed row starts its request only if its claim outlives the request's timeout
        # and its settle, so no delivery is still running when another worker may take the row.
        self._start_within = {s.name: config.start_within(s) for s in config.sources}
        # Where a source's targets come from, for the error of an invalid one (built once).
        self._origins = {
            s.name: f" in column {s.url_column!r}" if s.url_column else f" of sources.{s.name}"
            for s in config.sources
        }
        self.busy = 0
        self.delivered = 0
        self.failed = 0

    async def open(self) -> None:
        allowed = self.config.http_allow
        self._guard = guard.Guard(
            allowed, self.network.resolver or aiohttp.DefaultResolver(), self.network.make_socket
        )
        if allowed.networks or allowed.hosts:
            log.info(
                "guard.allowing networks=%s hosts=%s key=http.allow",
                ",".join(str(n) for n in allowed.networks) or "-",
                ",".join(sorted(allowed.hosts)) or "-",
            )
        # Addresses are checked per connection, not per request (connections are kept alive,
        # and the resolver's checked answers are cached for ttl_dns_cache); a request costs
        # one cached lookup of its URL in the guard.
        connector = aiohttp.TCPConnector(
            limit=self.config.max_in_flight,
            limit_per_host=0,
            keepalive_timeout=30,
            ttl_dns_cache=60,
            resolver=self._guard.resolver,
            socket_factory=self._guard.socket_factory,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.config.http_timeout),
            headers={"User-Agent": self.config.user_agent},
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            # Receivers' cookies must not travel to other receivers (or back): none are kept.
            # It also spares a cookie filter and update per request.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def in_flight(self) -> int:
        return self.busy

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        """The workers, until `drain` has finished with them. A worker that dies of a bug takes
        the relay down with the reason, as every other part does; none dies silently."""
        async with asyncio.TaskGroup() as tg:
            workers = [
                tg.create_task(self._work(), name=f"deliver:{n}")
                for n in range(self.config.max_in_flight)
            ]
            await self._finish.wait()
            # Cancelled mid-request, a worker hands its row back (see `_work`).
            for worker in workers:
                worker.cancel()

    def start(self, source: Source, row: Claimed, claimed_at: float) -> None:
        """Queue a claimed row; `claimed_at` (loop time) is when its claim's clock started."""
        self._queue.put_nowait((source, row, claimed_at))

    async def drain(self, grace: float) -> None:
        """Hand back the rows no request has started for, let the requests in flight finish
        for up to `grace` seconds, then end `run` (which hands back the rest)."""
        try:
            await self._wait_idle(grace)
        finally:
            self._finish.set()

    async def _wait_idle(self, grace: float) -> None:
        released = self._release_queued()
        if released:
            log.info("shutdown.released_unstarted rows=%d", released)
        if not self.busy:
            return
        log.info("shutdown.draining in_flight=%d grace=%.1fs", self.busy, grace)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self.busy:
                    self._idle.clear()
                    await self._idle.wait()
        if self.busy:
            log.warning("shutdown.releasing unfinished=%d", self.busy)

    def _release_queued(self) -> int:
        n = 0
        while not self._queue.empty():
            source, row, _ = self._queue.get_nowait()
            self._hand_over(source, Settlement(row.key, row.lease, Outcome.release))
            n += 1
        return n

    def _hand_over(self, source: Source, settlement: Settlement) -> None:
        self.settler.add(source.name, settlement)
        self.slots.delivered(1)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            source, row, claimed_at = await self._queue.get()
            if loop.time() - claimed_at > self._start_within[source.name]:
                # It waited so long for a slot that its claim could expire mid-request.
                log.warning(
                    "delivery.released source=%s key=%s reason=%s",
                    source.name,
                    row.key,
                    "claim too close to expiry to start a request (raise relay.claim_timeout "
                    "or lower relay.claim_ahead)",
                )
                self._hand_over(source, Settlement(row.key, row.lease, Outcome.release))
                continue
            self.busy += 1
            try:
                settlement = await self._deliver(source, row)
            except asyncio.CancelledError:
                # Shutdown ran out of grace: hand the row back without counting the attempt.
                self._hand_over(source, Settlement(row.key, row.lease, Outcome.release))
                raise
            except Exception as exc:  # a bug here must not lose the row or kill the relay
                log.exception("delivery.crashed source=%s key=%s", source.name, row.key)
                settlement = self._failure(source, row, f"relay error: {exc!r}", None, None)
            finally:
                self.busy -= 1
                if not self.busy:
                    self._idle.set()
            self._hand_over(source, settlement)

    # -- one attempt -----------------------------------------------------------------------

    def _failure(
        self,
        source: Source,
        row: Claimed,
        error: str,
        http_status: int | None,
        retry_after: float | None,
        final: bool = False,
    ) -> Settlement:
        self.failed += 1
        if final or row.attempt >= row.max_attempts:
            log.error(
                "delivery.dead source=%s key=%s attempt=%d status=%s error=%s",
                source.name,
                row.key,
                row.attempt,
                http_status,
                error,
            )
            return Settlement(row.key, row.lease, Outcome.dead, 0.0, error, http_status)
        wait = retry.delay(self.config.retry, row.attempt, self.rand(), retry_after)
        log.warning(
            "delivery.failed source=%s key=%s attempt=%d status=%s retry_in=%.1fs error=%s",
            source.name,
            row.key,
            row.attempt,
            http_status,
            wait,
            error,
        )
        return Settlement(row.key, row.lease, Outcome.retry, wait, error, http_status)

    def _dead(self, source: Source, row: Claimed, reason: str) -> Settlement:
        self.failed += 1
        log.error("delivery.dead source=%s key=%s reason=%s", source.name, row.key, reason)
        return Settlement(row.key, row.lease, Outcome.dead, 0.0, reason, None)

    def _target(self, source: Source, row: Claimed) -> str | None:
        if source.url_column is not None:
            return row.url
        if source.topic_column is not None:
            return source.target_for_topic(row.topic or "")
        return source.url

    async def _deliver(self, source: Source, row: Claimed) -> Settlement:
        if row.oversize is not None:
            return self._dead(
                source, row, store.oversize_reason(source.name, row.oversize, self.config)
            )
        if source.body is BodyFormat.documenso_job and row.attempt <= row.max_attempts:
            return await self._deliver_job(source, row)
        if row.attempt > row.max_attempts:
            return self._dead(
                source,
                row,
                f"claimed {row.attempt} times with at most {row.max_attempts} attempts allowed: "
                f"earlier claims expired without a settle (the relay crashed or lost the "
                f"database while delivering this row)",
            )
        url = self._target(source, row)
        if url is None and source.topic_column is not None:
            return self._dead(
                source,
                row,
                f"no target for topic {row.topic!r}: add it (or '*') under "
                f"[sources.{source.name}.topics], then `relay retry-dead {source.name}`",
            )
        target = self._checked(url, self._origins[source.name])
        if isinstance(target, Attempt):
            return self._settle_attempt(source, row, target, None)
        assert url is not None
        body = (row.payload if row.payload is not None else "null").encode()
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return self._dead(
                source,
                row,
                f"payload in column {source.payload_column!r} is not valid JSON ({exc}); "
                f"store JSON text there",
            )
        if source.body is BodyFormat.documenso:
            body = documenso_body(row.topic or "", body, url, datetime.now(UTC))
        try:
            headers = self._headers(source, row, body)
        except ValueError as exc:
            return self._dead(source, row, f"cannot sign: {exc}")
        result = await self._post(target, body, headers)
        return self._settle_attempt(source, row, result, None)

    async def _deliver_job(self, source: Source, row: Claimed) -> Settlement:
        """A Documenso "BackgroundJob": a webhook job goes to the Webhook it names, in
        Documenso's shape, with a "WebhookCall" row per attempt; other jobs are forwarded."""
        try:
            job = orjson.loads(row.payload or "null")
        except orjson.JSONDecodeError as exc:
            return self._dead(source, row, f'job "payload" is not JSON: {exc}')
        headers = {
            "Content-Type": "application/json",
            # relay's stable id, the same on every attempt, as on every source.
            "webhook-id": f"{source.name}_{row.key}",
            "relay-attempt": str(row.attempt),
            **source.headers,
        }
        if row.topic != EXECUTE_WEBHOOK:
            url = source.target_for_topic(row.topic or "")
            if url is None:
                return self._dead(source, row, f"no target for job {row.topic!r}")
            body = orjson.dumps({"name": row.topic, "payload": job})
            headers["X-Job-Id"] = str(row.key)
            if row.attempt > 1:
                headers["X-Job-Retry"] = "1"
            forward = self._checked(url, f" for job {row.topic!r}")
            result = (
                forward
                if isinstance(forward, Attempt)
                else await self._post(forward, body, headers)
            )
            return self._settle_attempt(source, row, result, None)
        if not isinstance(job, dict) or "event" not in job or "webhookId" not in job:
            return self._dead(source, row, 'webhook job "payload" lacks "event" or "webhookId"')
        if row.url is None:
            # Documenso does not call a disabled or deleted Webhook: nothing to deliver.
            log.info(
                "delivery.skipped source=%s key=%s webhook=%s reason=%s",
                source.name,
                row.key,
                job["webhookId"],
                "the Webhook is disabled or deleted",
            )
            return Settlement(row.key, row.lease, Outcome.done)
        event = str(job["event"])
        body = documenso_body(event, orjson.dumps(job.get("data")), row.url, datetime.now(UTC))
        headers["X-Documenso-Secret"] = row.secret or ""
        target = self._checked(row.url, f' in "Webhook" {job["webhookId"]}')
        if isinstance(target, Attempt):
            result = target
        else:
            result = await self._post(target, body, headers, keep_headers=True)
        if result.final:
            # As Documenso records a call its own guard refused: code 0 and the reason.
            stored: str | None = orjson.dumps(result.error).decode()
        elif result.http_status is not None and not _redirect(result.http_status):
            stored = _json_text(result.body)
        else:
            stored = None  # no answer, or a redirect: nothing of it is kept
        call = WebhookCall(
            status="SUCCESS" if result.ok else "FAILED",
            url=row.url,
            request=body.decode(),
            code=result.http_status or 0,
            headers=orjson.dumps(result.headers).decode() if result.headers is not None else None,
            body=stored,
            webhook_id=str(job["webhookId"]),
            event=event,
        )
        return self._settle_attempt(source, row, result, call)

    def _checked(self, url: str | None, origin: str) -> URL | Attempt:
        """The URL to request, or, for a target the guard refuses or that is no http(s) URL,
        the failed attempt it comes to without any request. `origin` says where it came from."""
        assert self._guard is not None, "Deliverer.open() was not called"
        try:
            return self._guard.target(url or "")
        except guard.Refused as exc:
            return Attempt(False, None, exc.reason, final=True)
        except guard.InvalidTarget:
            shown = guard.display_url(url) if url is not None else None
            return Attempt(
                False,
                None,
                f"invalid target URL {shown!r}{origin}: it must be an http:// or https:// URL "
                f"with a host",
                final=True,
            )

    def _settle_attempt(
        self, source: Source, row: Claimed, result: Attempt, call: WebhookCall | None
    ) -> Settlement:
        if result.ok:
            self.delivered += 1
            # DEBUG: one line per success costs a fifth of relay's CPU at thousands a second;
            # INFO gets the `delivery.progress` summary instead (failures are always logged).
            log.debug(
                "delivery.succeeded source=%s key=%s attempt=%d status=%s ms=%.1f",
                source.name,
                row.key,
                row.attempt,
                result.http_status,
                result.ms,
            )
            return Settlement(
                row.key, row.lease, Outcome.done, http_status=result.http_status, call=call
            )
        failure = self._failure(
            source,
            row,
            result.error or "failed",
            result.http_status,
            result.retry_after,
            result.final,
        )
        return failure if call is None else replace(failure, call=call)

    def _headers(self, source: Source, row: Claimed, body: bytes) -> dict[str, str]:
        # The id is the same on every attempt of this row, so receivers can drop duplicates.
        msg_id = f"{source.name}_{row.key}"
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "relay-attempt": str(row.attempt),
            **source.headers,
        }
        if row.topic is not None:
            headers["relay-topic"] = row.topic
        if source.secret_header is not None:
            # The receiver's own convention: the shared secret as it is, no signature.
            headers[source.secret_header] = row.secret or source.secret or ""
            return headers
        keys = (signing.secret_key(row.secret),) if row.secret else self._keys.get(source.name)
        if keys:
            headers["webhook-signature"] = signing.signatures(keys, msg_id, timestamp, body)
        return headers

    async def _post(
        self, url: URL, body: bytes, headers: dict[str, str], keep_headers: bool = False
    ) -> Attempt:
        started = time.perf_counter()
        attempt = await self._request(url, body, headers, keep_headers)
        attempt.ms = (time.perf_counter() - started) * 1000
        return attempt

    async def _request(
        self, url: URL, body: bytes, headers: dict[str, str], keep_headers: bool
    ) -> Attempt:
        assert self._session is not None, "Deliverer.open() was not called"
        cap = self.config.max_response_bytes
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                # Read at most `cap` bytes: a huge or endless response cannot grow memory.
                # (A body left unread past the cap closes the connection instead of reusing it.)
                received = bytearray()
                while len(received) < cap:
                    chunk = await resp.content.read(cap - len(received))
                    if not chunk:
                        break
                    received += chunk
                headers_seen = (
                    {_header_text(k): _header_text(v) for k, v in resp.headers.items()}
                    if keep_headers
                    else None
                )
                if 200 <= resp.status < 300:
                    return Attempt(True, resp.status, None, None, headers_seen, bytes(received))
                retry_after = retry.parse_retry_after(
                    resp.headers.get("Retry-After"), datetime.now(UTC)
                )
                if _redirect(resp.status):
                    # Never followed (it could lead anywhere, the guard's refusals included),
                    # and nothing of its body is kept.
                    error = f"HTTP {resp.status}: redirect not followed; set the final URL"
                    return Attempt(False, resp.status, error, retry_after, headers_seen)
                snippet = excerpt(bytes(received), self.config.error_body_chars)
                error = f"HTTP {resp.status}" + (f": {snippet}" if snippet else "")
                return Attempt(
                    False, resp.status, error, retry_after, headers_seen, bytes(received)
                )
        except TimeoutError:
            return Attempt(
                False, None, f"no response within {self.config.http_timeout:g}s (http.timeout)"
            )
        except aiohttp.ClientError as exc:
            refused = guard.refusal(exc)
            if refused is not None:
                return Attempt(False, None, refused.reason, final=True)
            return Attempt(False, None, _client_error(exc))


def _redirect(status: int) -> bool:
    return 300 <= status < 400
