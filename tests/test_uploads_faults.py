"""Uploads under failure: expiry, crashes, restarts, storage and queue outages."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import aioboto3
import httpx
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from botocore.config import Config

from app.core.queue import JobQueue
from app.gateway.routes.uploads import upload_context
from app.gateway.services import Services
from app.jobs.events import decode_event, stream_key
from app.jobs.service import request_cancel
from app.uploads import sweeper
from tests.fixtures_uploads import (
    PART,
    app_client,
    free_port,
    initiate,
    md5_b64,
    payload,
    put_part,
    s3_object,
    s3_upload_ids,
)
from workers.context import WorkerContext
from workers.fleet import resync_queue

BASE = "/api/v1/documents/upload"


async def _s3_id(svc: Services, upload_id: str) -> str:
    value = await svc.db.fetchval(
        "SELECT s3_upload_id FROM upload_sessions WHERE id = $1::uuid", upload_id
    )
    assert isinstance(value, str)
    return value


async def test_sweeper_expires_overdue_sessions_once(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 1, seed=20)
    init = await initiate(uploads, auth_headers, len(data))
    uid = init["upload_id"]
    await put_part(uploads, auth_headers, uid, 1, data[:PART])
    fresh = await initiate(uploads, auth_headers, 10)  # not overdue: must survive
    key = f"documents/{init['document_id']}/original"
    s3_id = await _s3_id(upload_services, uid)
    await upload_services.db.execute(
        "UPDATE upload_sessions SET expires_at = now() - interval '1 minute' WHERE id = $1::uuid",
        uid,
    )
    # before the sweeper runs, the session already reads as expired
    r = await put_part(uploads, auth_headers, uid, 2, data[PART:])
    assert (r.status_code, r.json()["error"]) == (404, "upload_expired")

    ctx = upload_context(upload_services)
    lock_key = sweeper.SWEEP_LOCK_KEY
    await upload_services.redis.delete(lock_key)
    reports = await asyncio.gather(
        *[
            sweeper.sweep_once_across_replicas(ctx, upload_services.redis, interval_seconds=30)
            for _ in range(3)
        ]
    )
    ran = [r for r in reports if r is not None]
    assert len(ran) == 1 and ran[0].expired >= 1  # one replica swept
    await upload_services.redis.delete(lock_key)

    assert s3_id not in await s3_upload_ids(upload_services, key)
    status = (await uploads.get(f"{BASE}/status/{uid}", headers=auth_headers)).json()
    assert status["status"] == "expired"
    job = await upload_services.db.fetchrow(
        "SELECT status, error_code FROM jobs WHERE id = $1::uuid", init["job_id"]
    )
    assert (job["status"], job["error_code"]) == ("failed", "upload_expired")
    r = await uploads.post(f"{BASE}/complete/{uid}", headers=auth_headers)
    assert (r.status_code, r.json()["error"]) == (404, "upload_expired")
    fresh_status = (
        await uploads.get(f"{BASE}/status/{fresh['upload_id']}", headers=auth_headers)
    ).json()
    assert fresh_status["status"] == "initiated"
    assert (await sweeper.sweep(ctx)).expired == 0  # nothing left to do


async def test_sweeper_aborts_uploads_whose_job_was_cancelled_elsewhere(
    uploads: httpx.AsyncClient,
    auth_headers: dict[str, str],
    upload_services: Services,
    user: str,
) -> None:
    data = payload(PART + 1, seed=21)
    init = await initiate(uploads, auth_headers, len(data))
    uid = init["upload_id"]
    await put_part(uploads, auth_headers, uid, 1, data[:PART])
    s3_id = await _s3_id(upload_services, uid)
    # e.g. a WebSocket cancel_job: the one cancel path, which knows nothing of S3
    await request_cancel(upload_services.db, upload_services.redis, init["job_id"], user)
    r = await put_part(uploads, auth_headers, uid, 2, data[PART:])
    assert (r.status_code, r.json()["error"]) == (409, "upload_cancelled")
    report = await sweeper.sweep(upload_context(upload_services))
    assert report.cancelled >= 1
    key = f"documents/{init['document_id']}/original"
    assert s3_id not in await s3_upload_ids(upload_services, key)
    status = (await uploads.get(f"{BASE}/status/{uid}", headers=auth_headers)).json()
    assert status["status"] == "cancelled"


async def test_status_reconciles_a_part_s3_took_before_a_crash(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(2 * PART + 7, seed=22)
    init = await initiate(uploads, auth_headers, len(data))
    uid = init["upload_id"]
    await put_part(uploads, auth_headers, uid, 1, data[:PART])
    # S3 accepts part 2, then the gateway dies before Postgres records it
    await upload_services.s3.upload_part(
        Bucket=upload_services.settings.minio_bucket_name,
        Key=f"documents/{init['document_id']}/original",
        UploadId=await _s3_id(upload_services, uid),
        PartNumber=2,
        Body=data[PART : 2 * PART],
        ContentMD5=md5_b64(data[PART : 2 * PART]),
    )
    status = (await uploads.get(f"{BASE}/status/{uid}", headers=auth_headers)).json()
    assert status["missing_parts"] == [3]
    assert status["bytes_received"] == 2 * PART
    part2 = next(p for p in status["parts"] if p["part_number"] == 2)
    assert part2["etag"] == hashlib.md5(data[PART : 2 * PART]).hexdigest()
    assert (await put_part(uploads, auth_headers, uid, 3, data[2 * PART :])).is_success
    r = await uploads.post(f"{BASE}/complete/{uid}", headers=auth_headers)
    assert r.status_code == 200, r.text
    assert await s3_object(upload_services, init["document_id"]) == data


async def test_storage_outage_is_503_and_stores_nothing(
    upload_services: Services, auth_headers: dict[str, str], user: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=dead,
        aws_access_key_id="x",
        aws_secret_access_key="y",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    ) as s3:
        svc = dataclasses.replace(upload_services, s3=s3, s3_public=s3)
        async with app_client(svc) as c:
            r = await c.post(
                f"{BASE}/initiate",
                headers=auth_headers,
                json={"filename": "a.txt", "file_size": 10},
            )
            assert r.status_code == 503
            assert r.json()["error"] == "storage_unavailable"
            assert "Traceback" not in r.text
            r = await c.post(
                f"{BASE}/simple",
                headers=auth_headers,
                files={"file": ("a.txt", b"hello", "text/plain")},
            )
            assert (r.status_code, r.json()["error"]) == (503, "storage_unavailable")
    count = await upload_services.db.fetchval(
        "SELECT count(*) FROM documents WHERE owner_id = $1", user
    )
    assert count == 0


async def test_lost_enqueue_is_recovered_by_the_sweeper(
    upload_services: Services, auth_headers: dict[str, str]
) -> None:
    dead_redis = ArqRedis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        svc = dataclasses.replace(upload_services, queue=JobQueue(dead_redis))
        async with app_client(svc) as c:
            data = payload(100, seed=23)
            init = await initiate(c, auth_headers, len(data))
            assert (await put_part(c, auth_headers, init["upload_id"], 1, data)).is_success
            r = await c.post(f"{BASE}/complete/{init['upload_id']}", headers=auth_headers)
            assert r.status_code == 200 and r.json()["status"] == "queued"  # upload is safe
    finally:
        await dead_redis.aclose()
    uid = init["upload_id"]
    job_status = await upload_services.db.fetchval(
        "SELECT status FROM jobs WHERE id = $1::uuid", init["job_id"]
    )
    assert job_status == "queued"
    assert (
        await upload_services.db.fetchval(
            "SELECT enqueued_at FROM upload_sessions WHERE id = $1::uuid", uid
        )
        is None
    )
    assert not await upload_services.redis.exists(job_key_prefix + init["job_id"])
    await upload_services.db.execute(
        "UPDATE upload_sessions SET completed_at = now() - interval '1 minute' WHERE id = $1::uuid",
        uid,
    )
    report = await sweeper.sweep(upload_context(upload_services))
    assert report.reenqueued >= 1
    assert await upload_services.redis.exists(job_key_prefix + init["job_id"])
    assert (await sweeper.sweep(upload_context(upload_services))).reenqueued == 0


async def test_simple_upload_during_a_queue_outage_is_queued_and_resync_enqueues_it(
    upload_services: Services, auth_headers: dict[str, str]
) -> None:
    """The one enqueue-failure policy: the job is committed ``queued`` before the enqueue,
    so an unreachable queue neither fails the upload (no 503, no failed job) nor loses
    the job: the workers' resync enqueues it."""
    dead_redis = ArqRedis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        svc = dataclasses.replace(upload_services, queue=JobQueue(dead_redis))
        async with app_client(svc) as c:
            r = await c.post(
                f"{BASE}/simple",
                headers=auth_headers,
                files={"file": ("outage.txt", b"stored while the queue was down", "text/plain")},
            )
    finally:
        await dead_redis.aclose()
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "queued"
    job_id = body["job_id"]
    job = await upload_services.db.fetchrow(
        "SELECT j.status, j.stage, j.stage_progress, j.message, j.error_code, j.seq, "
        "j.queued_at, d.status AS document_status "
        "FROM jobs j JOIN documents d ON d.id = j.document_id WHERE j.id = $1::uuid",
        job_id,
    )
    assert job is not None
    assert (job["status"], job["error_code"], job["document_status"]) == (
        "queued",
        None,
        "stored",
    )
    assert (job["stage"], job["stage_progress"], job["seq"]) == ("upload", 1.0, 1)
    assert job["message"] == "upload complete; queued for processing"
    assert job["queued_at"] is not None
    # the queued change was published (after the commit), like a resumable upload's
    published = [
        decode_event(fields[b"e"])
        for _, fields in await upload_services.redis.xrange(stream_key(job_id))
    ]
    assert [(e.seq, e.status) for e in published] == [(1, "queued")]
    assert published[0].details == {"bytes_received": 31, "file_size": 31}
    assert not await upload_services.redis.exists(job_key_prefix + job_id)
    worker = cast(
        WorkerContext, SimpleNamespace(db=upload_services.db, queue=upload_services.queue)
    )
    assert job_id in await resync_queue(worker, grace_seconds=0)
    assert await upload_services.redis.exists(job_key_prefix + job_id)


async def _slow_body(data: bytes, started: asyncio.Event) -> AsyncIterator[bytes]:
    yield data[: len(data) // 2]
    started.set()
    await asyncio.sleep(2)  # the gateway dies while this part is in flight
    yield data[len(data) // 2 :]


async def test_gateway_killed_mid_upload_then_restarted(
    gateway_factory: Callable[..., Any],
    auth_headers: dict[str, str],
    upload_services: Services,
) -> None:
    gw = gateway_factory()
    data = payload(2 * PART + 99, seed=24)
    chunks = [data[:PART], data[PART : 2 * PART], data[2 * PART :]]
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        init = await initiate(c, auth_headers, len(data))
        uid = init["upload_id"]
        assert (await put_part(c, auth_headers, uid, 1, chunks[0])).is_success
        started = asyncio.Event()
        in_flight = asyncio.create_task(
            c.put(
                f"{BASE}/{uid}/parts/2",
                content=_slow_body(chunks[1], started),
                headers={
                    **auth_headers,
                    "Content-MD5": md5_b64(chunks[1]),
                    "Content-Length": str(len(chunks[1])),
                },
            )
        )
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.3)
        gw.kill()  # SIGKILL: no graceful shutdown
        try:
            await asyncio.wait_for(in_flight, 10)
            raise AssertionError("the in-flight part should have failed")
        except httpx.TransportError:
            pass
    gw2 = gateway_factory(port=gw.port)
    started_at = time.monotonic()
    async with httpx.AsyncClient(base_url=gw2.url, timeout=30) as c:
        status = (await c.get(f"{BASE}/status/{uid}", headers=auth_headers)).json()
        assert status["status"] == "uploading"
        assert status["missing_parts"] == [2, 3]
        for n in (2, 3):
            r = await put_part(c, auth_headers, uid, n, chunks[n - 1])
            assert r.status_code == 200, r.text
        r = await c.post(f"{BASE}/complete/{uid}", headers=auth_headers)
        assert r.status_code == 200, r.text
    assert time.monotonic() - started_at < 60
    assert await s3_object(upload_services, init["document_id"]) == data
