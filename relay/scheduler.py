"""Runs the scheduled jobs ([jobs.NAME], relay.jobs): one task per job, which sleeps until the
job's next occurrence and asks the store to run it. Store.run_job decides, in the database,
whether this relay is the one: several relays may wake for the same occurrence, exactly one
runs it and records it.

A job's statement failing is recorded as that run's error and tried again at the next
occurrence. The database being unreachable is retried within the occurrence every few seconds.
Neither stops relay."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg_pool

from relay import logs
from relay.db.store import Store
from relay.jobs import Job, JobRun

log = logs.get("relay.scheduler")

RETRY_UNREACHABLE = 5.0  # seconds between attempts at a due occurrence while the database is away


class Scheduler:
    def __init__(self, store: Store, jobs: tuple[Job, ...]) -> None:
        self.store = store
        self.jobs = {job.name: job for job in jobs}
        self.last: dict[str, JobRun] = {}  # each job's newest run by this relay
        self.next: dict[str, datetime] = {}
        self.runs = 0  # occurrences this relay ran
        # Runs by job and by outcome ("ok", "failed"), for /metrics.
        self.outcomes: dict[tuple[str, str], int] = {}
        self._wake = {name: asyncio.Event() for name in self.jobs}
        self._now: set[str] = set()  # jobs asked to run now (run_now)
        self._changed = asyncio.Condition()

    def run_now(self, name: str) -> None:
        """Run the job once now, as an occurrence of its own (the current time)."""
        self._now.add(name)
        self._wake[name].set()

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            for job in self.jobs.values():
                if not job.on_demand:  # those run when asked (Store.run_job), not here
                    tg.create_task(self._loop(job, stop), name=f"job:{job.name}")
            # Every loop sleeps on its own event: the stop wakes them all.
            tg.create_task(self._wake_on(stop), name="jobs:stop")

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        for event in self._wake.values():
            event.set()

    async def _loop(self, job: Job, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = datetime.now(UTC)
            if job.name in self._now:
                self._now.discard(job.name)
                occurrence = now
            else:
                occurrence = job.latest(now)
            self.next[job.name] = job.following(now)
            try:
                run = await self.store.run_job(job, occurrence)
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                if stop.is_set():
                    return
                log.warning(
                    "job.not_run",
                    job=job.name,
                    scheduled_for=occurrence.isoformat(),
                    error=logs.first_line(exc),
                    next=f"again in {RETRY_UNREACHABLE:g}s",
                )
                wait = min(RETRY_UNREACHABLE, (self.next[job.name] - now).total_seconds())
                await self._sleep(job, wait)
                continue
            if run is not None:
                await self._ran(run)
            await self._sleep(job, (self.next[job.name] - datetime.now(UTC)).total_seconds())

    async def _sleep(self, job: Job, seconds: float) -> None:
        wake = self._wake[job.name]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), max(seconds, 0.0))
        wake.clear()

    async def _ran(self, run: JobRun) -> None:
        self.last[run.job] = run
        self.runs += 1
        outcome = (run.job, "ok" if run.error is None else "failed")
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if run.error is None:
            # What it did, those of the counts that are known (as `relay jobs` shows them).
            counts: dict[str, Any] = {
                "rows": run.rows_affected,
                "processed": run.processed,
                "succeeded": run.succeeded,
                "failed": run.failed,
            }
            log.info(
                "job.ran",
                job=run.job,
                scheduled_for=run.scheduled_for.isoformat(),
                duration_ms=round(run.duration_ms, 1),
                **{key: value for key, value in counts.items() if value is not None},
            )
        else:
            log.warning(
                "job.failed",
                job=run.job,
                scheduled_for=run.scheduled_for.isoformat(),
                duration_ms=round(run.duration_ms, 1),
                error=run.error,
                next="the next occurrence",
            )
        async with self._changed:
            self._changed.notify_all()

    async def wait_runs(self, n: int) -> None:
        """Until this relay has run `n` occurrences (for tests and the CLI)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.runs >= n)

    def status(self) -> dict[str, Any]:
        return {
            name: {
                "schedule": job.describe(),
                "next": self.next[name].isoformat() if name in self.next else None,
                "last": self.last[name].summary() if name in self.last else None,
            }
            for name, job in self.jobs.items()
        }
