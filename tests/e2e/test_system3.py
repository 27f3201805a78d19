"""System 3 of shared/MISSION.md, a job worker with claim/complete/heartbeat functions, replaced
by relay on the application's own table and functions (examples/system3/schema.sql): with
examples/system3/relay.toml (kind = "functions", the functions called as they are) and with
examples/system3/relay.table.toml (kind = "table", the same behaviour through a filter and
write-backs). `relay run` as a process, the job services on loopback.

What the worker did and these tests hold relay to: jobs claimed by worker id, only of the job
types and lane it serves (a 'gpu' job or a 'thumbnail' job is never sent), not before their
scheduled time; each job POSTed to its job type's service with its payload; a heartbeat while
the request runs; completion with the service's JSON answer as job_result; failure with
structured JSON error_details, retried until max_retries, then failed; only the owning worker
completes a job (a job taken over by another worker is left to it); many jobs at once; a health
port; and the application's own functions still right afterwards."""

from __future__ import annotations

import asyncio
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest
from aiohttp import web
from psycopg.types.json import Jsonb

from tests import systems
from tests.conftest import Server
from tests.support import Receiver, RelayProcess
from tests.systems import header

SOURCE = "jobs"  # [sources.jobs] in both examples
WORKER = "relay-jobs-1"  # relay.worker_id in both examples
HELD = 3  # jobs the OCR service holds at once in the concurrency test
HEALTH = re.compile(r"health\.listening host=\S+ port=(\d+)")
NAMED = re.compile(r"(?<![:\w]):(\w+)")  # :name, as relay reads statements (not a ::cast)


@pytest.fixture
def app_db(server: Server) -> Iterator[str]:
    with systems.application_database(server.admin_url, server.url, "system3") as url:
        yield url


class Services:
    """The job services, by path. /ocr answers {"text", "pages"}, after `release` is set if the
    payload says "hold"; /summary answers {"summary"}, or 500 {"error": "model overloaded"} to
    the first `fail` requests of a job."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, request: web.Request, count: int) -> web.StreamResponse:
        job = orjson.loads(await request.read())
        if request.path == "/ocr":
            if job.get("hold"):
                await self.release.wait()
            return web.json_response({"text": f"text of {job['doc']}", "pages": 2})
        if request.path == "/summary":
            if count <= job.get("fail", 0):
                return web.json_response({"error": "model overloaded"}, status=500)
            return web.json_response({"summary": f"summary of {job['doc']}"})
        return web.json_response({"error": "no such service"}, status=404)


async def add_job(
    db: str, job_type: str, payload: dict[str, Any], lane: str = "default", **columns: Any
) -> int:
    names = ["job_type", "lane", "job_payload", *columns]
    values = [job_type, lane, orjson.dumps(payload).decode(), *columns.values()]
    return int(
        await systems.value(
            db,
            f"INSERT INTO job_queue ({', '.join(names)}) "
            f"VALUES ({', '.join(['%s'] * len(names))}) RETURNING id",
            values,
        )
    )


async def job(db: str, job_id: int) -> dict[str, Any]:
    [row] = await systems.rows(db, "SELECT * FROM job_queue WHERE id = %s", (job_id,))
    return row


async def wait_jobs(db: str, ids: list[int], done: Any) -> dict[int, dict[str, Any]]:
    """Wait until `done(row)` holds for every one of these jobs; them, by id."""
    found = await systems.wait_rows(
        db,
        "SELECT * FROM job_queue WHERE id = ANY(%s) ORDER BY id",
        (ids,),
        lambda rs: len(rs) == len(ids) and all(done(r) for r in rs),
    )
    return {r["id"]: r for r in found}


async def prepared(
    tmp_path: Path, example: str, db: str, receiver: Receiver
) -> tuple[Path, Services]:
    """The example's config for this test, installed and checked; the services answering."""
    services = Services()
    receiver.behaviour = services
    base = f"http://{receiver.host}:{receiver.port}"
    path = tmp_path / "relay.toml"
    systems.example_config(
        path,
        example,
        db,
        relay={
            # Claims short, requests long: heartbeats keep a running job's claim (and write
            # heartbeat_at) long past claim_timeout.
            "claim_timeout": 3,
            "sweep_interval": 1,
            "shutdown_grace": 5,
        },
        http={"timeout": 20},
        retry={"jitter": 0.0},
        sources={
            SOURCE: {
                "route": {"targets": {"ocr": f"{base}/ocr", "summary": f"{base}/summary"}},
                "retry_policy": {"schedule": ["200ms", "200ms", "200ms"]},
            }
        },
    )
    await systems.install(path, db, "job_queue")
    return path, services


async def health_port(proc: RelayProcess) -> int:
    await proc.wait_line("health.listening")
    [port] = [int(m[1]) for line in proc.lines if (m := HEALTH.search(line))]
    return port


# -- the application's own SQL, without relay -------------------------------------------------


async def test_system3_functions_as_the_application_uses_them(app_db: str) -> None:
    ocr = await add_job(app_db, "ocr", {"doc": "a"})
    summary = await add_job(app_db, "summary", {"doc": "b"})
    gpu = await add_job(app_db, "ocr", {"doc": "c"}, lane="gpu")
    later = await add_job(app_db, "ocr", {"doc": "d"}, scheduled_at="2999-01-01T00:00:00Z")
    claim = "SELECT * FROM claim_next_job_v3(%s, %s, %s)"

    # Nothing of another type or lane, nothing before its time.
    assert await systems.rows(app_db, claim, ("w0", ["thumbnail"], ["default"])) == []
    # Two workers at once, in open transactions: the second skips the first's locked row.
    async with (
        await psycopg.AsyncConnection.connect(app_db) as one,
        await psycopg.AsyncConnection.connect(app_db) as two,
    ):
        first = await (await one.execute(claim, ("w1", ["ocr", "summary"], ["default"]))).fetchall()
        second = await (
            await two.execute(claim, ("w2", ["ocr", "summary"], ["default"]))
        ).fetchall()
        await one.commit()
        await two.commit()
    assert [r[0] for r in first] == [ocr] and [r[0] for r in second] == [summary]
    assert await systems.rows(app_db, claim, ("w3", ["ocr", "summary"], ["default"])) == []
    [claimed] = await systems.rows(app_db, claim, ("gpu-1", None, ["gpu"]))
    assert claimed["id"] == gpu and claimed["status"] == "processing"
    assert claimed["worker_id"] == "gpu-1"
    assert claimed["started_at"] is not None and claimed["heartbeat_at"] == claimed["started_at"]
    row = await job(app_db, ocr)
    assert (row["status"], row["worker_id"]) == ("processing", "w1")

    # Only the owner heartbeats and completes.
    assert await systems.value(app_db, "SELECT update_job_heartbeat(%s, 'w2')", (ocr,)) is False
    assert (await job(app_db, ocr))["heartbeat_at"] == row["heartbeat_at"]
    assert await systems.value(app_db, "SELECT update_job_heartbeat(%s, 'w1')", (ocr,)) is True
    assert (await job(app_db, ocr))["heartbeat_at"] > row["heartbeat_at"]
    done = "SELECT complete_job(%s, %s, %s)"
    assert await systems.value(app_db, done, (ocr, "w2", '{"by": "w2"}')) is False
    assert (await job(app_db, ocr))["status"] == "processing"
    assert await systems.value(app_db, done, (ocr, "w1", '{"text": "x"}')) is True
    row = await job(app_db, ocr)
    assert (row["status"], row["job_result"]) == ("completed", {"text": "x"})
    assert row["completed_at"] is not None
    # Completed is final: not again, not by its owner either.
    assert await systems.value(app_db, done, (ocr, "w1", '{"text": "y"}')) is False
    assert await systems.value(app_db, "SELECT update_job_heartbeat(%s, 'w1')", (ocr,)) is False
    assert (await job(app_db, later))["status"] == "pending"


async def test_system3_example_statements_do_what_the_worker_did(app_db: str) -> None:
    """The claim, complete, heartbeat and fail statements of examples/system3/relay.toml, run
    with named parameters as relay runs them: the claim filters, the fail statement records
    structured details and retries until max_retries, and only the owner completes or fails."""
    statements = tomllib.loads((systems.EXAMPLES / "system3" / "relay.toml").read_text())
    source = statements["sources"][SOURCE]

    async def run(statement: str, **params: Any) -> list[dict[str, Any]]:
        text = NAMED.sub(lambda m: f"%({m[1]})s", source[statement])
        return await systems.rows(app_db, text, params)

    def failure(job_id: int, worker: str, attempt: int, final: bool = False) -> dict[str, Any]:
        error = {"error": "HTTP 500: model overloaded", "status": 500, "attempt": attempt}
        return {
            "key": job_id,
            "worker": worker,
            "error_json": Jsonb(error),
            "final": final,
            "retry_in": None if final else 60.0,
        }

    gpu = await add_job(app_db, "ocr", {"doc": "c"}, lane="gpu")
    await add_job(app_db, "thumbnail", {"doc": "e"})
    flaky = await add_job(app_db, "summary", {"doc": "b"}, max_retries=2)
    [claimed] = await run("claim", worker=WORKER, limit=1)
    assert (claimed["id"], claimed["worker_id"], claimed["status"]) == (
        flaky,
        WORKER,
        "processing",
    )
    assert await run("claim", worker=WORKER, limit=1) == []  # not gpu, not thumbnail
    assert await run("heartbeat", key=flaky, worker=WORKER) == [{"update_job_heartbeat": True}]
    assert await run("heartbeat", key=flaky, worker="other") == [{"update_job_heartbeat": False}]

    # Not the owner: nothing changes.
    await run("fail", **failure(flaky, "other", 1))
    assert (await job(app_db, flaky))["status"] == "processing"
    # A failure below max_retries: back to pending, put off by :retry_in, details recorded.
    await run("fail", **failure(flaky, WORKER, 1))
    row = await job(app_db, flaky)
    assert (row["status"], row["retry_count"], row["completed_at"]) == ("pending", 1, None)
    assert row["error_details"] == failure(flaky, WORKER, 1)["error_json"].obj
    assert row["scheduled_at"] > row["started_at"]
    assert await run("claim", worker=WORKER, limit=1) == []  # not before its new time
    await systems.rows(app_db, "UPDATE job_queue SET scheduled_at = now() WHERE id = %s", (flaky,))
    [again] = await run("claim", worker=WORKER, limit=1)
    assert again["id"] == flaky
    # The last one allowed: failed for good.
    await run("fail", **failure(flaky, WORKER, 2))
    row = await job(app_db, flaky)
    assert (row["status"], row["retry_count"]) == ("failed", 2)
    assert row["completed_at"] is not None and row["error_details"]["attempt"] == 2

    # relay's own verdict (:final, a 4xx that is not retried) fails the job at once.
    final = await add_job(app_db, "ocr", {"doc": "f"})
    [claimed] = await run("claim", worker=WORKER, limit=1)
    assert claimed["id"] == final
    await run("fail", **failure(final, WORKER, 1, final=True))
    row = await job(app_db, final)
    assert (row["status"], row["retry_count"]) == ("failed", 1)

    # Completion with the response's JSON, by the owner only.
    done = await add_job(app_db, "ocr", {"doc": "g"})
    [claimed] = await run("claim", worker=WORKER, limit=1)
    assert claimed["id"] == done
    result = Jsonb({"text": "g", "pages": 1})
    assert await run("complete", key=done, worker="other", response_json=result) == [
        {"complete_job": False}
    ]
    assert await run("complete", key=done, worker=WORKER, response_json=result) == [
        {"complete_job": True}
    ]
    row = await job(app_db, done)
    assert (row["status"], row["job_result"]) == ("completed", {"text": "g", "pages": 1})
    assert (await job(app_db, gpu))["status"] == "pending"


# -- relay in its place ------------------------------------------------------------------------


async def test_system3_functions_kind_end_to_end(
    app_db: str, receiver: Receiver, tmp_path: Path
) -> None:
    config, services = await prepared(tmp_path, "system3/relay.toml", app_db, receiver)

    try:
        async with systems.relays(config) as procs:
            # The orchestrator's health check.
            port = await health_port(procs[0])
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/healthz") as answer,
            ):
                assert answer.status == 200

            jobs = await add_jobs(app_db)
            rows = await finished(app_db, receiver, jobs)
            # The function's retry_count counted the failures; :retry_in put them off.
            assert rows[jobs.flaky]["retry_count"] == 1
            assert rows[jobs.broken]["retry_count"] == 2
            assert rows[jobs.broken]["completed_at"] is not None

            # Many jobs at once, each kept alive by heartbeats while its request runs.
            held = [
                await add_job(app_db, "ocr", {"doc": f"big-{n}", "hold": True}) for n in range(HELD)
            ]
            await receiver.wait_for(
                lambda got: sum(bool(orjson.loads(r.body).get("hold")) for r in got) == HELD
            )
            running = await wait_jobs(
                app_db,
                held,
                lambda r: r["status"] == "processing" and r["heartbeat_at"] > r["started_at"],
            )
            assert {r["worker_id"] for r in running.values()} == {WORKER}
            # Only the owner: another worker can neither heartbeat nor complete these.
            mine, taken = held[0], held[1]
            before = await job(app_db, mine)
            assert (
                await systems.value(app_db, "SELECT complete_job(%s, 'intruder', '{}')", (mine,))
                is False
            )
            assert (
                await systems.value(app_db, "SELECT update_job_heartbeat(%s, 'intruder')", (mine,))
                is False
            )
            after = await job(app_db, mine)
            assert (after["status"], after["job_result"]) == ("processing", None)
            assert after["heartbeat_at"] >= before["heartbeat_at"]
            # One job is taken over by another worker while relay's request still runs: relay's
            # completion must leave it to its new owner.
            await systems.rows(
                app_db, "UPDATE job_queue SET worker_id = 'other-worker' WHERE id = %s", (taken,)
            )
            services.release.set()
            completed = await wait_jobs(
                app_db, [h for h in held if h != taken], lambda r: r["status"] == "completed"
            )
            for row in completed.values():
                assert row["job_result"] == {
                    "text": f"text of {row['job_payload']['doc']}",
                    "pages": 2,
                }
                assert row["worker_id"] == WORKER
            # SIGTERM: relay finishes and settles what it has in flight, then exits 0.
            await systems.stop(procs)
    finally:
        services.release.set()
    assert "Traceback" not in procs[0].output()

    stolen = await job(app_db, taken)
    assert (stolen["status"], stolen["worker_id"], stolen["job_result"]) == (
        "processing",
        "other-worker",
        None,
    )
    assert len([r for r in receiver.received if orjson.loads(r.body)["doc"] == "big-1"]) == 1
    await check_left_alone(app_db, receiver, jobs)
    # The application's functions afterwards: its new owner completes the job taken over.
    assert (
        await systems.value(
            app_db, "SELECT complete_job(%s, 'other-worker', '{\"by\": \"other\"}')", (taken,)
        )
        is True
    )


async def test_system3_table_kind_end_to_end(
    app_db: str, receiver: Receiver, tmp_path: Path
) -> None:
    config, services = await prepared(tmp_path, "system3/relay.table.toml", app_db, receiver)

    try:
        async with systems.relays(config) as procs:
            jobs = await add_jobs(app_db)
            rows = await finished(app_db, receiver, jobs)
            # retry_count = attempt.number on each failure; completed_at on success and on dead.
            assert rows[jobs.ocr]["retry_count"] == 0 and rows[jobs.flaky]["retry_count"] == 1
            assert rows[jobs.broken]["retry_count"] == 2
            assert rows[jobs.broken]["completed_at"] is not None
            for row in rows.values():
                # on_claim wrote the worker and the start; relay's claim bookkeeping stays in
                # relay.leases, so scheduled_at still holds the application's schedule.
                assert row["worker_id"] == WORKER and row["started_at"] is not None
                assert row["heartbeat_at"] is not None

            # A long request: heartbeat_at moves while it runs.
            slow = await add_job(app_db, "ocr", {"doc": "big-0", "hold": True})
            await receiver.wait_for(
                lambda got: any(orjson.loads(r.body)["doc"] == "big-0" for r in got)
            )
            [first] = (
                await wait_jobs(app_db, [slow], lambda r: r["status"] == "processing")
            ).values()
            await wait_jobs(app_db, [slow], lambda r: r["heartbeat_at"] > first["heartbeat_at"])
            services.release.set()
            [done] = (
                await wait_jobs(app_db, [slow], lambda r: r["status"] == "completed")
            ).values()
            assert done["job_result"] == {"text": "text of big-0", "pages": 2}
            await systems.stop(procs)
    finally:
        services.release.set()
    assert "Traceback" not in procs[0].output()
    await check_left_alone(app_db, receiver, jobs)


@dataclass(frozen=True)
class Jobs:
    ocr: int  # completes at once
    summary: int  # completes at once
    flaky: int  # fails once, then completes
    broken: int  # fails until its max_retries (2): failed
    gpu: int  # another lane: never relay's
    thumbnail: int  # another job type: never relay's
    later: int  # not due for centuries


async def add_jobs(db: str) -> Jobs:
    return Jobs(
        ocr=await add_job(db, "ocr", {"doc": "invoice-1"}),
        summary=await add_job(db, "summary", {"doc": "report-1"}),
        flaky=await add_job(db, "summary", {"doc": "report-2", "fail": 1}),
        broken=await add_job(db, "summary", {"doc": "report-3", "fail": 99}, max_retries=2),
        gpu=await add_job(db, "ocr", {"doc": "scan-1"}, lane="gpu"),
        thumbnail=await add_job(db, "thumbnail", {"doc": "photo-1"}),
        later=await add_job(db, "ocr", {"doc": "invoice-2"}, scheduled_at="2999-01-01T00:00:00Z"),
    )


async def finished(db: str, receiver: Receiver, jobs: Jobs) -> dict[int, dict[str, Any]]:
    """Wait until relay's four jobs are completed or failed, and check what both
    configurations must have done with them; their rows, by id."""
    ocr, summary, flaky, broken = jobs.ocr, jobs.summary, jobs.flaky, jobs.broken
    rows = await wait_jobs(
        db, [ocr, summary, flaky, broken], lambda r: r["status"] in ("completed", "failed")
    )

    def sent(job_id: int) -> list[Any]:
        return [r for r in receiver.received if r.id == f"{SOURCE}_{job_id}"]

    # Each to its job type's service, with the job's payload as the body.
    for job_id, path, times in (
        (ocr, "/ocr", 1),
        (summary, "/summary", 1),
        (flaky, "/summary", 2),
        (broken, "/summary", 2),
    ):
        requests = sent(job_id)
        assert len(requests) == times, (job_id, [r.path for r in requests])
        for request in requests:
            assert request.path == path
            assert orjson.loads(request.body) == rows[job_id]["job_payload"]
            assert (header(request, "Content-Type") or "").startswith("application/json")
    # Completion: the service's JSON answer is the result.
    assert rows[jobs.ocr]["job_result"] == {"text": "text of invoice-1", "pages": 2}
    assert rows[jobs.summary]["job_result"] == {"summary": "summary of report-1"}
    assert rows[jobs.flaky]["job_result"] == {"summary": "summary of report-2"}
    for job_id in (ocr, summary, flaky):
        row = rows[job_id]
        assert row["status"] == "completed"
        assert row["worker_id"] == WORKER
        assert row["started_at"] is not None and row["completed_at"] >= row["started_at"]
    assert rows[jobs.ocr]["error_details"] is None
    # Failure: structured details of the last failure; after max_retries, failed.
    broken_row = rows[jobs.broken]
    assert broken_row["status"] == "failed" and broken_row["job_result"] is None
    details = broken_row["error_details"]
    assert isinstance(details, dict), details
    assert details["status"] == 500 and details["attempt"] >= 1
    assert "500" in details["error"] and "model overloaded" in details["error"]
    # The flaky job's failure is on record too, though it then completed.
    assert rows[jobs.flaky]["error_details"]["status"] == 500
    return rows


async def check_left_alone(db: str, receiver: Receiver, jobs: Jobs) -> None:
    """Jobs outside relay's types and lane, or not yet due, were never sent or touched; the
    application's own GPU worker still claims and completes its job with its functions."""
    docs = {orjson.loads(r.body)["doc"] for r in receiver.received}
    assert not docs & {"scan-1", "photo-1", "invoice-2"}, docs
    gpu = jobs.gpu
    for job_id in (gpu, jobs.thumbnail, jobs.later):
        row = await job(db, job_id)
        assert (row["status"], row["worker_id"], row["started_at"]) == ("pending", None, None)
        assert row["retry_count"] == 0 and row["error_details"] is None
    [claimed] = await systems.rows(
        db, "SELECT * FROM claim_next_job_v3('gpu-worker-1', ARRAY['ocr'], ARRAY['gpu'])"
    )
    assert claimed["id"] == gpu and claimed["worker_id"] == "gpu-worker-1"
    assert (
        await systems.value(db, "SELECT update_job_heartbeat(%s, 'gpu-worker-1')", (gpu,)) is True
    )
    assert (
        await systems.value(
            db, "SELECT complete_job(%s, 'gpu-worker-1', '{\"text\": \"gpu\"}')", (gpu,)
        )
        is True
    )
    # Nothing else is due for relay's types and lane.
    assert (
        await systems.rows(
            db, "SELECT * FROM claim_next_job_v3('w', ARRAY['ocr', 'summary'], ARRAY['default'])"
        )
        == []
    )
