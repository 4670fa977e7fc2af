"""The jobs and documents API on the gateway (in-process), against the real stack."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import msgspec
from arq.connections import ArqRedis

from app.core.queue import QUEUE_NAME, JobQueue, Priority
from app.core.storage import open_s3
from app.gateway.services import Services
from devstack.process import free_port
from tests.fixtures_pipeline import (
    TOPIC_PAGES,
    MakeJob,
    make_pdf,
    stream_events,
)
from tests.fixtures_uploads import app_client
from workers.context import WorkerContext
from workers.fleet import resync_queue
from workers.run import JobRun, Outcome

Headers = Callable[[str], dict[str, str]]


async def test_job_status_and_foreign_jobs_are_404(
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
    headers_for: Headers,
) -> None:
    job = await make_job(b"hello", "txt", priority=Priority.HIGH)
    r = await client.get(f"/api/v1/jobs/{job.job_id}", headers=auth_headers)
    assert r.status_code == 200
    body = r.json()
    assert body["job_id"] == job.job_id and body["document_id"] == job.document_id
    assert body["status"] == "queued" and body["priority"] == "high"
    assert body["attempts"] == 0 and body["lease_expired"] is False
    for path in (
        f"/api/v1/jobs/{job.job_id}",
        f"/api/v1/jobs/{uuid.uuid4()}",
        "/api/v1/jobs/not-a-uuid",
    ):
        r = await client.get(path, headers=headers_for("someone-else"))
        assert r.status_code == 404 and r.json()["error"] == "job_not_found"


async def test_list_jobs_filters_and_paginates(
    client: httpx.AsyncClient, make_job: MakeJob, auth_headers: dict[str, str]
) -> None:
    made = [
        await make_job(b"x", "txt", priority=p)
        for p in (Priority.LOW, Priority.HIGH, Priority.LOW, Priority.HIGH, Priority.LOW)
    ]
    r = await client.get("/api/v1/jobs?priority=high", headers=auth_headers)
    assert {j["job_id"] for j in r.json()["items"]} == {made[1].job_id, made[3].job_id}
    seen: list[str] = []
    cursor = None
    while True:
        url = "/api/v1/jobs?limit=2&status=queued" + (f"&cursor={cursor}" if cursor else "")
        page = (await client.get(url, headers=auth_headers)).json()
        seen += [j["job_id"] for j in page["items"]]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert seen == [j.job_id for j in reversed(made)]
    r = await client.get("/api/v1/jobs?status=bogus", headers=auth_headers)
    assert r.status_code == 422


async def test_cancel_a_queued_job(
    services: Services,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
    headers_for: Headers,
) -> None:
    job = await make_job(b"x", "txt")
    await services.queue.enqueue(job.job_id, Priority.NORMAL)
    r = await client.post(f"/api/v1/jobs/{job.job_id}/cancel", headers=headers_for("intruder"))
    assert r.status_code == 404
    r = await client.post(f"/api/v1/jobs/{job.job_id}/cancel", headers=auth_headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert await services.redis.zscore("arq:abort", job.job_id) is not None
    again = await client.post(f"/api/v1/jobs/{job.job_id}/cancel", headers=auth_headers)
    assert again.status_code == 200 and again.json()["seq"] == r.json()["seq"]


async def test_retry_only_failed_or_cancelled_jobs(
    services: Services,
    worker_ctx: WorkerContext,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
) -> None:
    bad = await make_job(b"", "txt")
    assert await JobRun(worker_ctx, bad.job_id).run() == Outcome.FAILED
    failed = (await client.get(f"/api/v1/jobs/{bad.job_id}", headers=auth_headers)).json()
    assert failed["error_code"] == "empty_file"
    r = await client.post(f"/api/v1/jobs/{bad.job_id}/retry", headers=auth_headers)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and body["attempts"] == 0
    assert body["error_code"] is None and body["finished_at"] is None
    assert await services.queue.is_queued(bad.job_id)
    r = await client.post(f"/api/v1/jobs/{bad.job_id}/retry", headers=auth_headers)
    assert r.status_code == 409 and r.json()["error"] == "job_not_retryable"

    never_uploaded = await make_job(b"abc", "txt", store=False)
    await client.post(f"/api/v1/jobs/{never_uploaded.job_id}/cancel", headers=auth_headers)
    r = await client.post(f"/api/v1/jobs/{never_uploaded.job_id}/retry", headers=auth_headers)
    assert r.status_code == 409 and r.json()["error"] == "upload_incomplete"


async def test_retry_never_takes_a_jobs_progress_back(
    services: Services,
    worker_ctx: WorkerContext,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
) -> None:
    job = await make_job(make_pdf([[], []]))  # pages without text: fails no_text in extract
    assert await JobRun(worker_ctx, job.job_id).run() == Outcome.FAILED
    failed = (await client.get(f"/api/v1/jobs/{job.job_id}", headers=auth_headers)).json()
    assert failed["error_code"] == "no_text" and failed["overall_progress"] > 0
    r = await client.post(f"/api/v1/jobs/{job.job_id}/retry", headers=auth_headers)
    assert r.status_code == 202, r.text
    assert r.json()["overall_progress"] == failed["overall_progress"]
    assert await JobRun(worker_ctx, job.job_id).run() == Outcome.FAILED
    progress = [e.overall_progress for e in await stream_events(services.redis, job.job_id)]
    assert progress == sorted(progress), progress


async def test_completed_job_cannot_be_cancelled_or_retried(
    worker_ctx: WorkerContext,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
) -> None:
    job = await make_job(b"Some words worth indexing.", "txt")
    assert await JobRun(worker_ctx, job.job_id).run() == Outcome.COMPLETED
    r = await client.post(f"/api/v1/jobs/{job.job_id}/cancel", headers=auth_headers)
    assert r.status_code == 409 and r.json()["error"] == "job_finished"
    r = await client.post(f"/api/v1/jobs/{job.job_id}/retry", headers=auth_headers)
    assert r.status_code == 409


async def test_documents_list_show_chunks_download_and_delete(
    services: Services,
    worker_ctx: WorkerContext,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
    headers_for: Headers,
) -> None:
    data = make_pdf(TOPIC_PAGES)
    job = await make_job(
        data, options={"chunk_size": 32, "chunk_overlap": 0}, filename="topics.pdf"
    )
    assert await JobRun(worker_ctx, job.job_id).run() == Outcome.COMPLETED
    doc_url = f"/api/v1/documents/{job.document_id}"

    listing = (await client.get("/api/v1/documents", headers=auth_headers)).json()
    assert [d["document_id"] for d in listing["items"]] == [job.document_id]
    doc = (await client.get(doc_url, headers=auth_headers)).json()
    assert doc["filename"] == "topics.pdf" and doc["status"] == "indexed"
    assert doc["latest_job"]["job_id"] == job.job_id and doc["page_count"] == 4
    assert (await client.get(doc_url, headers=headers_for("intruder"))).status_code == 404

    seqs: list[int] = []
    cursor = None
    while True:
        url = f"{doc_url}/chunks?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = (await client.get(url, headers=auth_headers)).json()
        seqs += [c["seq"] for c in page["items"]]
        assert all(c["page_start"] >= 1 for c in page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert seqs == list(range(doc["chunk_count"]))

    link = (await client.get(f"{doc_url}/download", headers=auth_headers)).json()
    async with httpx.AsyncClient() as raw:
        fetched = await raw.get(link["url"])
    assert fetched.status_code == 200 and fetched.content == data

    r = await client.delete(doc_url, headers=headers_for("intruder"))
    assert r.status_code == 404
    r = await client.delete(doc_url, headers=auth_headers)
    assert r.status_code == 204
    assert (await client.get(doc_url, headers=auth_headers)).status_code == 404
    assert (
        await services.db.fetchval(
            "SELECT count(*) FROM chunks WHERE document_id = $1::uuid", job.document_id
        )
        == 0
    )
    assert (
        await services.db.fetchval("SELECT count(*) FROM jobs WHERE id = $1::uuid", job.job_id) == 0
    )
    objects = await services.s3.list_objects_v2(
        Bucket=services.settings.minio_bucket_name, Prefix=f"documents/{job.document_id}/"
    )
    assert objects.get("KeyCount", 0) == 0


async def test_reprocess_with_new_options_makes_a_new_job(
    services: Services,
    worker_ctx: WorkerContext,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
) -> None:
    job = await make_job(make_pdf(TOPIC_PAGES))
    assert await JobRun(worker_ctx, job.job_id).run() == Outcome.COMPLETED
    url = f"/api/v1/documents/{job.document_id}/reprocess"
    before = (
        await client.get(f"/api/v1/documents/{job.document_id}", headers=auth_headers)
    ).json()["chunk_count"]
    r = await client.post(
        url,
        headers=auth_headers,
        json={"processing_options": {"chunk_size": 24, "chunk_overlap": 0}, "priority": "high"},
    )
    assert r.status_code == 202, r.text
    new_job = r.json()["job_id"]
    assert new_job != job.job_id and await services.queue.is_queued(new_job)
    busy = await client.post(url, headers=auth_headers, json={})
    assert busy.status_code == 409 and busy.json()["error"] == "job_active"
    bad = await client.post(
        url, headers=auth_headers, json={"processing_options": {"chunk_size": 2}}
    )
    assert bad.status_code == 422
    assert await JobRun(worker_ctx, new_job).run() == Outcome.COMPLETED
    doc = (await client.get(f"/api/v1/documents/{job.document_id}", headers=auth_headers)).json()
    assert doc["processing_options"] == {"chunk_size": 24, "chunk_overlap": 0}
    assert doc["chunk_count"] > before and doc["latest_job"]["job_id"] == new_job


async def test_processing_metrics(
    worker_ctx: WorkerContext,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
) -> None:
    done = await make_job(b"Metrics are measured.", "txt")
    assert await JobRun(worker_ctx, done.job_id).run() == Outcome.COMPLETED
    await make_job(b"waiting", "txt", priority=Priority.CRITICAL)
    r = await client.get("/api/v1/documents/processing/metrics", headers=auth_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["jobs_by_status"] == {"completed": 1, "queued": 1}
    assert {"validate", "extract", "chunk", "embed", "index"} <= set(body["stage_timings"])
    assert set(body["queue_depth"]) == {"low", "normal", "high", "critical"}
    assert body["queue_depth"]["critical"] >= 1
    assert isinstance(body["workers_alive"], int)


async def test_openapi_lists_the_pipeline_routes(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in (
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}",
        "/api/v1/jobs/{job_id}/cancel",
        "/api/v1/jobs/{job_id}/retry",
        "/api/v1/documents",
        "/api/v1/documents/{document_id}",
        "/api/v1/documents/{document_id}/chunks",
        "/api/v1/documents/{document_id}/download",
        "/api/v1/documents/{document_id}/reprocess",
        "/api/v1/search",
        "/api/v1/documents/processing/metrics",
    ):
        assert path in paths, path
    assert "delete" in paths["/api/v1/documents/{document_id}"]


async def test_deleting_an_original_reprocesses_its_duplicates(
    services: Services,
    worker_ctx: WorkerContext,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
) -> None:
    data = make_pdf(TOPIC_PAGES[:2])
    original = await make_job(data)
    duplicate = await make_job(data)
    assert await JobRun(worker_ctx, original.job_id).run() == Outcome.COMPLETED
    assert await JobRun(worker_ctx, duplicate.job_id).run() == Outcome.DEDUPLICATED
    r = await client.delete(f"/api/v1/documents/{original.document_id}", headers=auth_headers)
    assert r.status_code == 204
    doc = (
        await client.get(f"/api/v1/documents/{duplicate.document_id}", headers=auth_headers)
    ).json()
    assert doc["deduplicated_of"] is None and doc["status"] == "stored"
    new_job = doc["latest_job"]["job_id"]
    assert new_job != duplicate.job_id and await services.queue.is_queued(new_job)
    assert await JobRun(worker_ctx, new_job).run() == Outcome.COMPLETED
    doc = (
        await client.get(f"/api/v1/documents/{duplicate.document_id}", headers=auth_headers)
    ).json()
    assert doc["status"] == "indexed" and doc["chunk_count"] > 0


async def _resync_only(services: Services, ctx: WorkerContext, job_ids: set[str]) -> list[str]:
    """``resync_queue`` as a worker runs it after Redis lost its data (no grace);
    what it enqueued of other tests' waiting jobs is taken out again."""
    enqueued = await resync_queue(ctx, grace_seconds=0)
    others = [j for j in enqueued if j not in job_ids]
    if others:
        await services.redis.zrem(QUEUE_NAME, *others)
        await services.redis.delete(*(f"arq:job:{j}" for j in others))
    return [j for j in enqueued if j in job_ids]


@contextlib.asynccontextmanager
async def _queue_unreachable(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway on the same database and S3 whose queue is a real Redis client aimed at a
    port where nothing listens: every enqueue is a refused connection."""
    dead_redis = ArqRedis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        svc = dataclasses.replace(services, queue=JobQueue(dead_redis))
        async with app_client(svc) as c:
            yield c
    finally:
        await dead_redis.aclose()


@contextlib.asynccontextmanager
async def _storage_unreachable(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway whose S3 client is a real one aimed at a port where nothing listens."""
    dead = msgspec.structs.replace(
        services.settings,
        minio_endpoint=f"http://127.0.0.1:{free_port()}",
        minio_public_endpoint="",
    )
    async with open_s3(dead) as s3:
        svc = dataclasses.replace(services, s3=s3, s3_public=s3)
        async with app_client(svc) as c:
            yield c


async def test_retry_and_reprocess_stay_queued_when_redis_refuses_the_enqueue(
    services: Services,
    worker_ctx: WorkerContext,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
) -> None:
    """The job is committed ``queued`` and the answer says so; the workers'
    resync enqueues it once Redis is back (no 500, no 503)."""
    bad = await make_job(b"", "txt")
    assert await JobRun(worker_ctx, bad.job_id).run() == Outcome.FAILED
    done = await make_job(b"Words to index again.", "txt")
    assert await JobRun(worker_ctx, done.job_id).run() == Outcome.COMPLETED

    async with _queue_unreachable(services) as down:
        r = await down.post(f"/api/v1/jobs/{bad.job_id}/retry", headers=auth_headers)
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
        r = await down.post(
            f"/api/v1/documents/{done.document_id}/reprocess", headers=auth_headers, json={}
        )
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
        reprocessed = r.json()["job_id"]

    waiting = {bad.job_id, reprocessed}
    for job_id in waiting:
        assert not await services.queue.is_queued(job_id)
        got = (await client.get(f"/api/v1/jobs/{job_id}", headers=auth_headers)).json()
        assert got["status"] == "queued"
    assert set(await _resync_only(services, worker_ctx, waiting)) == waiting
    for job_id in waiting:
        assert await services.queue.is_queued(job_id)


async def test_deleting_an_original_requeues_its_duplicates_even_when_redis_refuses(
    services: Services,
    worker_ctx: WorkerContext,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
) -> None:
    data = b"The same words twice, in two documents."
    original = await make_job(data, "txt")
    duplicate = await make_job(data, "txt")
    assert await JobRun(worker_ctx, original.job_id).run() == Outcome.COMPLETED
    assert await JobRun(worker_ctx, duplicate.job_id).run() == Outcome.DEDUPLICATED
    async with _queue_unreachable(services) as down:
        r = await down.delete(f"/api/v1/documents/{original.document_id}", headers=auth_headers)
        assert r.status_code == 204, r.text
    doc = (
        await client.get(f"/api/v1/documents/{duplicate.document_id}", headers=auth_headers)
    ).json()
    new_job = doc["latest_job"]["job_id"]
    assert doc["latest_job"]["status"] == "queued"
    assert not await services.queue.is_queued(new_job)
    assert await _resync_only(services, worker_ctx, {new_job}) == [new_job]


async def test_storage_failures_are_503_storage_unavailable(
    services: Services,
    worker_ctx: WorkerContext,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
) -> None:
    bad = await make_job(b"", "txt")
    assert await JobRun(worker_ctx, bad.job_id).run() == Outcome.FAILED

    async with _storage_unreachable(services) as down:
        r = await down.get(f"/api/v1/documents/{bad.document_id}/download", headers=auth_headers)
        assert r.status_code == 503 and r.json()["error"] == "storage_unavailable", r.text
        r = await down.post(f"/api/v1/jobs/{bad.job_id}/retry", headers=auth_headers)
        assert r.status_code == 503 and r.json()["error"] == "storage_unavailable", r.text
    job = (await client.get(f"/api/v1/jobs/{bad.job_id}", headers=auth_headers)).json()
    assert job["status"] == "failed"  # the retry rolled back
    r = await client.post(f"/api/v1/jobs/{bad.job_id}/retry", headers=auth_headers)
    assert r.status_code == 202, r.text


async def test_a_bad_chunk_cursor_is_400_whichever_document_it_names(
    client: httpx.AsyncClient, make_job: MakeJob, auth_headers: dict[str, str], headers_for: Headers
) -> None:
    """The query is parsed before the document is looked up: a malformed cursor is
    400 ``invalid_cursor`` for a missing or foreign document too, never a 404."""
    job = await make_job(b"x", "txt")
    for doc_id, headers in (
        (job.document_id, auth_headers),
        (job.document_id, headers_for("intruder")),
        (str(uuid.uuid4()), auth_headers),
        ("not-a-uuid", auth_headers),
    ):
        r = await client.get(
            f"/api/v1/documents/{doc_id}/chunks", params={"cursor": "abc"}, headers=headers
        )
        assert r.status_code == 400 and r.json()["error"] == "invalid_cursor", r.text
    r = await client.get(f"/api/v1/documents/{uuid.uuid4()}/chunks", headers=auth_headers)
    assert r.status_code == 404 and r.json()["error"] == "document_not_found"
