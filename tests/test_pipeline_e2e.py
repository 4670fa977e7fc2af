"""Documents through the whole pipeline on the real stack and the real model.

Jobs go through ARQ (``JobQueue.enqueue`` and an in-process ARQ worker built by
``workers.runtime.build_worker``) or, where a test needs to step in between
attempts, through one :class:`~workers.run.JobRun` at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import httpx
import msgspec
import pytest

from app.core.embedding import LocalEmbedder, OpenAIEmbedder, load_tokenizer
from app.core.queue import Priority
from app.core.storage import open_s3
from app.gateway.services import Services
from app.jobs.model import JobStatus, Stage
from app.jobs.service import request_cancel
from app.jobs.transitions import job_snapshot
from devstack.process import free_port
from tests.fixtures_pipeline import (
    TOPIC_PAGES,
    EmbeddingEndpoint,
    MakeJob,
    make_pdf,
    page_sentence,
    stream_events,
    wait_for_status,
)
from workers.context import WorkerContext
from workers.fleet import resync_queue
from workers.lease import reap_expired
from workers.run import JobRun, Outcome
from workers.runtime import build_worker
from workers.stages.chunk import chunk_pages
from workers.stages.common import PageText

STAGES = [str(s) for s in (Stage.VALIDATE, Stage.EXTRACT, Stage.CHUNK, Stage.EMBED, Stage.INDEX)]


async def run_queue(ctx: WorkerContext) -> None:
    """Drain the queue with an in-process ARQ worker (the production settings)."""
    worker = build_worker(ctx, burst=True, handle_signals=False)
    await asyncio.wait_for(worker.async_run(), 100)


def long_pages(n: int, lines: int = 12) -> list[list[str]]:
    return [[" ".join(page_sentence(p, i) for i in range(lines))] for p in range(1, n + 1)]


async def chunk_rows(services: Services, doc_id: str) -> list[dict[str, Any]]:
    rows = await services.db.fetch(
        "SELECT seq, page_start, page_end, token_count, text, sha256 FROM chunks "
        "WHERE document_id = $1::uuid ORDER BY seq",
        doc_id,
    )
    return [dict(r) for r in rows]


@pytest.mark.usefixtures("search_embedder")
async def test_pdf_runs_all_stages_and_search_finds_page_three_first(
    services: Services,
    worker_ctx: WorkerContext,
    make_job: MakeJob,
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
) -> None:
    job = await make_job(make_pdf(TOPIC_PAGES), options={"chunk_size": 32, "chunk_overlap": 4})
    assert await services.queue.enqueue(job.job_id, Priority.NORMAL)
    await run_queue(worker_ctx)

    r = await client.get(f"/api/v1/jobs/{job.job_id}", headers=auth_headers)
    body = r.json()
    assert body["status"] == "completed", body
    assert body["attempts"] == 1 and body["overall_progress"] == 1.0
    assert set(body["stage_timings"]) == set(STAGES)
    events = await stream_events(services.redis, job.job_id)
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    visited = [e.stage for e in events if e.status == "running"]
    assert [s for i, s in enumerate(visited) if s not in visited[:i]] == STAGES
    assert events[-1].status == "completed" and events[-1].details["chunks"] >= 4

    chunks = await chunk_rows(services, job.document_id)
    assert {(c["page_start"], c["page_end"]) for c in chunks} >= {(1, 1), (3, 3)}
    assert all(c["token_count"] <= 30 for c in chunks)
    r = await client.post(
        "/api/v1/search",
        headers=auth_headers,
        json={"query": "Chlorophyll in the chloroplasts absorbs red and blue light", "top_k": 3},
    )
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["document_id"] == job.document_id
    assert top["page_start"] <= 3 <= top["page_end"]
    assert "Chlorophyll" in top["text"]
    doc = (await client.get(f"/api/v1/documents/{job.document_id}", headers=auth_headers)).json()
    assert doc["status"] == "indexed" and doc["page_count"] == 4
    assert doc["chunk_count"] == len(chunks)


async def test_same_file_again_completes_as_deduplicated(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob, user: str
) -> None:
    data = make_pdf(TOPIC_PAGES[:2])
    first = await make_job(data)
    second = await make_job(data)
    other_user = await make_job(data, owner=f"{user}-other")
    for job in (first, second, other_user):
        await services.queue.enqueue(job.job_id, Priority.NORMAL)
        await run_queue(worker_ctx)
    snap = await job_snapshot(services.db, second.job_id)
    assert snap is not None and snap.status == "completed"
    assert "deduplicated" in snap.message
    doc = await services.db.fetchrow(
        "SELECT status, deduplicated_of::text AS d FROM documents WHERE id = $1::uuid",
        second.document_id,
    )
    assert doc is not None
    assert doc["status"] == "indexed" and doc["d"] == first.document_id
    assert await chunk_rows(services, second.document_id) == []
    other = await services.db.fetchval(
        "SELECT deduplicated_of FROM documents WHERE id = $1::uuid", other_user.document_id
    )
    assert other is None  # dedup is per user
    assert await chunk_rows(services, other_user.document_id)


async def test_cancel_while_embedding_removes_partial_output(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob, user: str
) -> None:
    job = await make_job(make_pdf(long_pages(30)), options={"chunk_size": 24, "chunk_overlap": 0})
    run = asyncio.create_task(JobRun(worker_ctx, job.job_id).run())
    for _ in range(1200):
        snap = await job_snapshot(services.db, job.job_id)
        if snap and snap.stage == "embed" and snap.stage_progress > 0:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("never reached embed")
    assert (await request_cancel(services.db, services.redis, job.job_id, user)).status == "running"
    assert await asyncio.wait_for(run, 60) == Outcome.CANCELLED
    snap = await job_snapshot(services.db, job.job_id)
    assert snap is not None and snap.status == "cancelled"
    assert await chunk_rows(services, job.document_id) == []
    assert (
        await services.db.fetchval(
            "SELECT count(*) FROM job_checkpoints WHERE job_id = $1::uuid", job.job_id
        )
        == 0
    )
    assert (
        await services.db.fetchval(
            "SELECT status FROM documents WHERE id = $1::uuid", job.document_id
        )
        == "cancelled"
    )


async def test_cancelled_queued_job_never_runs(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob, user: str
) -> None:
    job = await make_job(make_pdf(TOPIC_PAGES[:1]))
    await services.queue.enqueue(job.job_id, Priority.LOW)
    await request_cancel(services.db, services.redis, job.job_id, user)
    await services.queue.abort(job.job_id)
    await run_queue(worker_ctx)
    snap = await job_snapshot(services.db, job.job_id)
    assert snap is not None and snap.status == "cancelled"
    assert (
        await services.db.fetchval("SELECT attempts FROM jobs WHERE id = $1::uuid", job.job_id) == 0
    )


async def test_transient_embedding_errors_retry_with_backoff_then_succeed(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob, embedder: LocalEmbedder
) -> None:
    async with EmbeddingEndpoint(embedder, [503, 429]) as endpoint:
        remote = OpenAIEmbedder(endpoint.url, model="all-MiniLM-L6-v2")
        ctx = dataclasses.replace(worker_ctx, embedder=remote)
        job = await make_job(make_pdf(TOPIC_PAGES[:2]), priority=Priority.HIGH)
        await services.queue.enqueue(job.job_id, Priority.HIGH)
        await run_queue(ctx)
        await remote.aclose()
    row = await services.db.fetchrow(
        "SELECT status, attempts, error_code FROM jobs WHERE id = $1::uuid", job.job_id
    )
    assert dict(row or {}) == {"status": "completed", "attempts": 3, "error_code": None}
    events = await stream_events(services.redis, job.job_id)
    retries = [e for e in events if e.status == "retrying"]
    assert len(retries) == 2
    assert all(e.details["error_code"] == "embedding_unavailable" for e in retries)
    delays = [e.details["retry_in_seconds"] for e in retries]
    assert delays[1] > delays[0]  # exponential


async def test_exhausted_retries_fail_with_the_last_error(
    services: Services,
    worker_ctx: WorkerContext,
    make_job: MakeJob,
    embedder: LocalEmbedder,
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
) -> None:
    async with EmbeddingEndpoint(embedder, [503] * 10) as endpoint:
        remote = OpenAIEmbedder(endpoint.url, model="all-MiniLM-L6-v2")
        ctx = dataclasses.replace(worker_ctx, embedder=remote)
        job = await make_job(make_pdf(TOPIC_PAGES[:1]))
        await services.queue.enqueue(job.job_id, Priority.NORMAL)
        await run_queue(ctx)
        await remote.aclose()
        assert endpoint.calls == 3
    body = (await client.get(f"/api/v1/jobs/{job.job_id}", headers=auth_headers)).json()
    assert body["status"] == "failed"
    assert body["attempts"] == body["max_attempts"] == 3
    assert body["error_code"] == "embedding_unavailable"
    assert "503" in body["error_message"]


async def test_permanent_error_fails_at_once(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    job = await make_job(b"%PDF-1.4\n" + b"\x00garbage" * 100)
    await services.queue.enqueue(job.job_id, Priority.NORMAL)
    await run_queue(worker_ctx)
    row = await services.db.fetchrow(
        "SELECT status, attempts, error_code FROM jobs WHERE id = $1::uuid", job.job_id
    )
    assert dict(row or {}) == {"status": "failed", "attempts": 1, "error_code": "corrupt_file"}
    assert (
        await services.db.fetchval(
            "SELECT status FROM documents WHERE id = $1::uuid", job.document_id
        )
        == "failed"
    )


async def _forward(port: int, to: str) -> asyncio.Server:
    """A TCP forwarder 127.0.0.1:``port`` -> ``to`` (``host:port``): the network
    between a worker and S3, healed by starting it."""
    host, to_port = to.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(to_port))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def test_storage_outage_is_waited_out_without_costing_an_attempt(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    """S3 unreachable when the job starts: the job waits (running, attempt 1)
    instead of failing its attempt, and completes once S3 answers again."""
    port = free_port()
    real = services.settings.s3_endpoint_url.removeprefix("http://")
    settings = msgspec.structs.replace(worker_ctx.settings, minio_endpoint=f"127.0.0.1:{port}")
    job = await make_job(make_pdf(TOPIC_PAGES[:1]))
    async with open_s3(settings) as s3:
        ctx = dataclasses.replace(worker_ctx, s3=s3, settings=settings)
        run = asyncio.create_task(JobRun(ctx, job.job_id).run())
        await asyncio.sleep(4)  # nothing listens on the port: S3 is down
        assert not run.done()
        snap = await job_snapshot(services.db, job.job_id)
        assert snap is not None and snap.status == "running"
        network = await _forward(port, real)  # S3 is back
        try:
            assert await asyncio.wait_for(run, 120) == Outcome.COMPLETED
        finally:
            network.close()
    attempts = await services.db.fetchval(
        "SELECT attempts FROM jobs WHERE id = $1::uuid", job.job_id
    )
    assert attempts == 1


async def test_a_retried_job_skips_stages_whose_output_is_stored(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    pages = long_pages(12)
    job = await make_job(make_pdf(pages), options={"chunk_size": 24, "chunk_overlap": 0})
    run = asyncio.create_task(JobRun(worker_ctx, job.job_id).run())
    for _ in range(1200):
        parts = await services.db.fetchval(
            "SELECT count(*) FROM job_checkpoints WHERE job_id = $1::uuid AND stage = 'embed'",
            job.job_id,
        )
        if parts >= 1:
            break
        await asyncio.sleep(0.02)
    run.cancel()  # the worker stops: the job is handed back, its checkpoints kept
    with pytest.raises(asyncio.CancelledError):
        await run
    snap = await job_snapshot(services.db, job.job_id)
    assert snap is not None and snap.status == "queued"
    # Without the original file the job can only finish from its checkpoints.
    await services.s3.delete_object(
        Bucket=services.settings.minio_bucket_name, Key=f"documents/{job.document_id}/original"
    )
    assert await JobRun(worker_ctx, job.job_id).run() == Outcome.COMPLETED
    events = await stream_events(services.redis, job.job_id)
    assert any("already done" in e.message for e in events)
    first_embed = next(e for e in events if e.stage == "embed" and e.seq > snap.seq)
    assert first_embed.stage_progress > 0  # resumed after the stored batches
    chunks = await chunk_rows(services, job.document_id)
    text_pages = [PageText(i + 1, p[0]) for i, p in enumerate(pages)]
    assert len(chunks) == len(
        chunk_pages(text_pages, load_tokenizer(), chunk_size=24, chunk_overlap=0)
    )


async def test_max_processing_time_bounds_a_job(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    job = await make_job(make_pdf(long_pages(20)), options={"chunk_size": 16, "chunk_overlap": 0})
    ctx = dataclasses.replace(worker_ctx, max_processing_seconds=0.5)
    assert await JobRun(ctx, job.job_id).run() == Outcome.FAILED
    row = await services.db.fetchrow(
        "SELECT status, error_code FROM jobs WHERE id = $1::uuid", job.job_id
    )
    assert dict(row or {}) == {"status": "failed", "error_code": "processing_timeout"}


async def _orphan(services: Services, job_id: str, attempts: int) -> None:
    """What a SIGKILLed worker leaves: running, lease lapsed, ARQ in-progress key."""
    await services.db.execute(
        "UPDATE jobs SET status = 'running', lease_owner = 'dead-worker:1', attempts = $2, "
        "lease_expires_at = now() - interval '1 second' WHERE id = $1::uuid",
        job_id,
        attempts,
    )
    await services.queue.enqueue(job_id, Priority.NORMAL)
    await services.redis.psetex(f"arq:in-progress:{job_id}", 3_600_000, b"1")


async def test_reaper_requeues_a_job_whose_lease_lapsed(
    services: Services,
    worker_ctx: WorkerContext,
    make_job: MakeJob,
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
) -> None:
    job = await make_job(make_pdf(TOPIC_PAGES[:1]))
    await _orphan(services, job.job_id, attempts=1)
    body = (await client.get(f"/api/v1/jobs/{job.job_id}", headers=auth_headers)).json()
    assert body["status"] == "running" and body["lease_expired"] is True
    assert job.job_id in await reap_expired(worker_ctx)
    snap = await job_snapshot(services.db, job.job_id)
    assert snap is not None and snap.status == "retrying" and "lease expired" in snap.message
    assert not await services.redis.exists(f"arq:in-progress:{job.job_id}")
    await run_queue(worker_ctx)
    row = await services.db.fetchrow(
        "SELECT status, attempts FROM jobs WHERE id = $1::uuid", job.job_id
    )
    assert dict(row or {}) == {"status": "completed", "attempts": 2}


async def test_a_job_that_keeps_killing_workers_fails_as_worker_lost(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    job = await make_job(make_pdf(TOPIC_PAGES[:1]))
    await _orphan(services, job.job_id, attempts=3)
    await reap_expired(worker_ctx)
    row = await services.db.fetchrow(
        "SELECT status, error_code FROM jobs WHERE id = $1::uuid", job.job_id
    )
    assert dict(row or {}) == {"status": "failed", "error_code": "worker_lost"}
    await run_queue(worker_ctx)  # its ARQ entry is released and skipped
    assert not await services.queue.is_queued(job.job_id)


async def test_a_worker_that_lost_its_lease_writes_nothing(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    job = await make_job(make_pdf(long_pages(8)), options={"chunk_size": 24, "chunk_overlap": 0})
    run = asyncio.create_task(JobRun(worker_ctx, job.job_id).run())
    await wait_for_status(services.db, job.job_id, {"running"})
    # Another worker takes over (as after a lapse): the lease owner changes.
    await services.db.execute(
        "UPDATE jobs SET lease_owner = 'other-worker:1' WHERE id = $1::uuid", job.job_id
    )
    assert await asyncio.wait_for(run, 60) == Outcome.LEASE_LOST
    assert await chunk_rows(services, job.document_id) == []
    snap = await job_snapshot(services.db, job.job_id)
    assert snap is not None and snap.status == JobStatus.RUNNING  # left to its new owner


async def test_resync_releases_a_waiting_job_that_arq_still_marks_started(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    """A worker that could not tell ARQ how a run ended (Redis was down when its
    job asked for a retry) leaves the in-progress key: ARQ would hold the job for
    the whole job timeout.  The periodic resync lets it run again at once."""
    job = await make_job(b"Stuck behind an in-progress key. " * 5, "txt")
    await services.queue.enqueue(job.job_id, Priority.NORMAL)
    # as ARQ set it when a worker picked the job up two minutes ago
    ttl_ms = int((worker_ctx.in_progress_seconds - 120) * 1000)
    await services.redis.psetex(f"arq:in-progress:{job.job_id}", ttl_ms, b"1")
    await services.db.execute(
        "UPDATE jobs SET status = 'retrying', updated_at = now() - interval '5 minutes' "
        "WHERE id = $1::uuid",
        job.job_id,
    )
    assert job.job_id not in await resync_queue(worker_ctx)  # ARQ holds it: no new entry
    assert not await services.redis.exists(f"arq:in-progress:{job.job_id}")
    assert await services.queue.is_queued(job.job_id)  # and it kept its place


async def test_resync_leaves_a_long_waiting_job_that_a_worker_just_picked_up(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    """In a crowded queue a job waits long; the worker that picks it up sets ARQ's
    in-progress key a moment before it takes the lease.  A resync in between must
    not release it (that ran the job twice in one worker: arq's ``job_tasks``
    KeyError in the crowded-fleet test)."""
    job = await make_job(b"Waited long, picked up now. " * 5, "txt")
    await services.queue.enqueue(job.job_id, Priority.NORMAL)
    ttl_ms = int(worker_ctx.in_progress_seconds * 1000)  # set just now
    await services.redis.psetex(f"arq:in-progress:{job.job_id}", ttl_ms, b"1")
    await services.db.execute(
        "UPDATE jobs SET updated_at = now() - interval '5 minutes' WHERE id = $1::uuid",
        job.job_id,
    )
    assert job.job_id not in await resync_queue(worker_ctx)
    assert await services.redis.exists(f"arq:in-progress:{job.job_id}")  # still the picker's
