"""Outages of Redis and Postgres, against a real worker process.

These tests stop, kill and flush the servers, so they run on a stack of their
own (``fault_stack``), never on the session stack other tests share.  One
worker process serves the whole module; each test checks that it is still the
same process afterwards.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from app.core.auth import TokenService
from app.core.db import migrate_dsn
from app.core.embedding import load_tokenizer
from app.core.queue import Priority
from app.core.settings import Settings
from app.core.storage import ensure_bucket, open_s3
from app.gateway.app import create_app
from app.gateway.services import Services, open_services
from app.jobs.documents import create_document, create_job, object_key_for
from app.jobs.model import JobStatus
from devstack.stack import EmbeddedStack
from tests.conftest import JWT_SECRET
from tests.fixtures_pipeline import (
    MadeJob,
    WorkerProcs,
    make_pdf,
    page_sentence,
    stream_events,
)
from tests.fixtures_uploads import GatewayProcess
from workers.stages.chunk import chunk_pages
from workers.stages.common import NullReporter
from workers.stages.extract import extract_document

pytestmark = pytest.mark.slow
T = TypeVar("T")
LEASE = "6"


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    with EmbeddedStack.in_dir(tmp_path_factory.mktemp("fault-stack"), durable=False) as s:
        yield s


@pytest.fixture(scope="module")
def fault_env(fault_stack: EmbeddedStack) -> dict[str, str]:
    return {
        **fault_stack.environ(bucket="sluice-faults"),
        "JWT_SECRET": JWT_SECRET,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "RATE_LIMIT_REQUESTS_PER_MINUTE": "100000",
        "PATH": os.environ.get("PATH", ""),
    }


@pytest_asyncio.fixture(scope="module")
async def fault_services(fault_env: dict[str, str]) -> AsyncIterator[Services]:
    settings = Settings.from_environ(fault_env)
    await migrate_dsn(settings.database_url.reveal())
    async with open_s3(settings) as s3:
        await ensure_bucket(s3, settings.minio_bucket_name)
    async with open_services(settings) as svc:
        yield svc


@pytest_asyncio.fixture(scope="module")
async def fault_worker(
    fault_env: dict[str, str],
    fault_services: Services,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[subprocess.Popen[bytes], int, WorkerProcs]]:
    procs = WorkerProcs(fault_env, tmp_path_factory.mktemp("fault-worker"))
    # Short leases (a 15 s Postgres outage outlasts one), one chunk per embedding
    # batch (so that a job lasts long enough to be hit three times).
    proc, port = procs.start(JOB_LEASE_SECONDS=LEASE, EMBEDDING_BATCH_SIZE="1")
    try:
        await procs.wait_ready(port, proc, timeout=150)
        yield proc, port, procs
    finally:
        procs.stop_all()


async def _eventually(probe: Callable[[], Awaitable[T]], timeout: float) -> T:
    """``probe()``'s first result that does not raise, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await probe()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _health(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{port}/health", timeout=3)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def _health_becomes(port: int, status: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = await _health(port)
        if seen["status"] == status:
            return seen
        await asyncio.sleep(0.2)
    raise AssertionError(f"/health never said {status!r}; last: {seen}")


def _gateway(svc: Services) -> httpx.AsyncClient:
    """An in-process gateway on ``svc``, authenticated as the tests' user."""
    transport = httpx.ASGITransport(
        app=create_app(svc.settings, services=svc), raise_app_exceptions=False
    )
    token = TokenService(JWT_SECRET).mint("fault-user")
    return httpx.AsyncClient(
        transport=transport,
        base_url="http://gateway",
        headers={"Authorization": f"Bearer {token}"},
    )


async def _make_job(svc: Services, data: bytes, document_type: str, **kw: Any) -> MadeJob:
    async with svc.db.acquire() as conn, conn.transaction():
        doc_id = await create_document(
            conn,
            owner_id="fault-user",
            filename=f"doc.{document_type}",
            content_type="application/octet-stream",
            document_type=document_type,
            size_bytes=len(data),
            processing_options=kw.get("options"),
            status="stored",
        )
        job_id = await create_job(
            conn,
            owner_id="fault-user",
            document_id=doc_id,
            priority=Priority.NORMAL,
            status=JobStatus.QUEUED,
        )
    await svc.s3.put_object(
        Bucket=svc.settings.minio_bucket_name, Key=object_key_for(doc_id), Body=data
    )
    return MadeJob(doc_id, job_id, "fault-user")


async def _status(svc: Services, job_id: str) -> tuple[str, int]:
    row = await svc.db.fetchrow("SELECT status, attempts FROM jobs WHERE id = $1::uuid", job_id)
    assert row is not None
    return row["status"], row["attempts"]


async def _wait_done(svc: Services, job_id: str, timeout: float) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        status, attempts = await _eventually(lambda: _status(svc, job_id), timeout)
        if status in {"completed", "failed"}:
            return status, attempts
        assert time.monotonic() < deadline, (status, attempts)
        await asyncio.sleep(0.1)


@pytest.mark.timeout(300)
async def test_worker_rides_out_a_redis_kill_and_a_restart_then_runs_a_new_job(
    fault_stack: EmbeddedStack,
    fault_services: Services,
    fault_worker: tuple[subprocess.Popen[bytes], int, WorkerProcs],
) -> None:
    proc, port, procs = fault_worker
    pid = proc.pid
    assert (await _health(port))["status"] == "ok"
    failed = await _make_job(fault_services, b"Retried during the outage. " * 20, "txt")
    await fault_services.db.execute(
        "UPDATE jobs SET status = 'failed' WHERE id = $1::uuid", failed.job_id
    )

    pages = [[" ".join(page_sentence(p, i) for i in range(12))] for p in range(1, 31)]
    running = await _make_job(fault_services, make_pdf(pages), "pdf")
    await fault_services.queue.enqueue(running.job_id, Priority.NORMAL)
    deadline = time.monotonic() + 60
    while (await _status(fault_services, running.job_id))[0] != "running":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)

    fault_stack.redis.kill()  # SIGKILL, as a crash or an OOM kill would
    killed = time.monotonic()
    degraded = await _health_becomes(port, "degraded", timeout=10)
    assert degraded["redis"] == "down"
    async with _gateway(fault_services) as gateway:
        # A retry needs Redis only to enqueue after commit: it is accepted, queued.
        r = await gateway.post(f"/api/v1/jobs/{failed.job_id}/retry")
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
        # What cannot be answered without Redis is 503, not 500.
        r = await gateway.get("/api/v1/documents/processing/metrics")
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "redis_unavailable" and int(r.headers["Retry-After"]) > 0
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=3)).text
    assert "sluice_worker_redis_up 0.0" in metrics
    await asyncio.sleep(max(0.0, 10 - (time.monotonic() - killed)))
    assert proc.poll() is None, procs.log_of(proc)
    fault_stack.redis.start()  # same port
    await _health_becomes(port, "ok", timeout=30)

    fault_stack.redis.stop()  # graceful: SHUTDOWN on SIGTERM, then straight back
    fault_stack.redis.start()
    await asyncio.sleep(2)
    await _health_becomes(port, "ok", timeout=30)
    assert proc.poll() is None and proc.pid == pid, procs.log_of(proc)

    job = await _make_job(fault_services, b"After the outage. " * 20, "txt")
    await _eventually(lambda: fault_services.queue.enqueue(job.job_id, Priority.NORMAL), 20)
    assert await _wait_done(fault_services, job.job_id, timeout=60) == ("completed", 1)
    # The job that was running carried on through it all, on its first attempt.
    assert await _wait_done(fault_services, running.job_id, timeout=60) == ("completed", 1)
    # The retry accepted during the outage is not lost: the job row said "queued",
    # and the worker's resync enqueued it once Redis was back.
    assert await _wait_done(fault_services, failed.job_id, timeout=30) == ("completed", 1)
    assert proc.poll() is None and proc.pid == pid


@pytest.mark.timeout(120)
async def test_waiting_jobs_run_within_15_s_of_redis_losing_its_data_each_exactly_once(
    fault_stack: EmbeddedStack,
    fault_services: Services,
    fault_worker: tuple[subprocess.Popen[bytes], int, WorkerProcs],
) -> None:
    proc, port, _ = fault_worker
    await _health_becomes(port, "ok", timeout=30)
    jobs = [
        await _make_job(fault_services, f"Waiting job {i}. ".encode() * 10, "txt") for i in range(4)
    ]
    for job in jobs:  # waiting in ARQ (deferred for hours), as behind a busy fleet
        assert await fault_services.queue.enqueue(job.job_id, Priority.NORMAL, delay_s=6 * 3600)
    await asyncio.sleep(1)
    assert {(await _status(fault_services, j.job_id))[0] for j in jobs} == {"queued"}

    client = aioredis.from_url(fault_stack.redis.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    lost = time.monotonic()
    for job in jobs:
        status, attempts = await _wait_done(
            fault_services, job.job_id, timeout=max(0.1, 15 - (time.monotonic() - lost))
        )
        assert (status, attempts) == ("completed", 1), job
    assert time.monotonic() - lost < 15
    await asyncio.sleep(2)  # nothing runs a second time
    for job in jobs:
        assert await _status(fault_services, job.job_id) == ("completed", 1)
        events = await stream_events(fault_services.redis, job.job_id)
        assert sum(e.message.startswith("started") for e in events) == 1
    assert proc.poll() is None


@pytest.mark.timeout(700)
async def test_three_postgres_outages_during_one_job_cost_no_attempt(
    fault_stack: EmbeddedStack,
    fault_services: Services,
    fault_worker: tuple[subprocess.Popen[bytes], int, WorkerProcs],
    tmp_path: Path,
) -> None:
    proc, port, procs = fault_worker
    svc = fault_services
    pages = [[" ".join(page_sentence(p, i) for i in range(12))] for p in range(1, 61)]
    data = make_pdf(pages)
    job = await _make_job(svc, data, "pdf", options={"chunk_size": 24, "chunk_overlap": 4})
    gateway = _gateway(svc)
    await svc.queue.enqueue(job.job_id, Priority.NORMAL)

    async def seq() -> tuple[str, int]:
        row = await svc.db.fetchrow("SELECT status, seq FROM jobs WHERE id = $1::uuid", job.job_id)
        assert row is not None
        return row["status"], row["seq"]

    last_seq = 0
    async with gateway:
        for outage in range(3):
            deadline = time.monotonic() + 240  # patient under load: the work is real
            while True:  # the job moved on since the last outage (or started)
                status, now_seq = await _eventually(seq, 60)
                assert status in {"queued", "running"}, (outage, status)
                if status == "running" and now_seq > last_seq:
                    break
                assert time.monotonic() < deadline, (outage, status, now_seq)
                await asyncio.sleep(0.05)
            fault_stack.postgres.stop()
            stopped = time.monotonic()
            if outage == 0:
                r = await gateway.get(f"/api/v1/jobs/{job.job_id}")
                assert r.status_code == 503, r.text
                assert r.json()["error"] == "database_unavailable"
                assert int(r.headers["Retry-After"]) > 0
                waiting = await _health_becomes(port, "degraded", timeout=12)
                assert waiting["database"] == "down"
            await asyncio.sleep(max(0.0, 15 - (time.monotonic() - stopped)))
            assert proc.poll() is None, procs.log_of(proc)
            fault_stack.postgres.start()
            _, last_seq = await _eventually(seq, 30)
            if outage == 0:
                back = time.monotonic()
                r = await gateway.get(f"/api/v1/jobs/{job.job_id}")
                while r.status_code == 503 and time.monotonic() - back < 30:
                    await asyncio.sleep(0.2)  # the pool may still be reconnecting
                    r = await gateway.get(f"/api/v1/jobs/{job.job_id}")
                assert r.status_code == 200, r.text

    status, attempts = await _wait_done(svc, job.job_id, timeout=300)
    assert (status, attempts) == ("completed", 1), procs.log_of(proc)
    rows = await svc.db.fetch(
        "SELECT seq, text FROM chunks WHERE document_id = $1::uuid ORDER BY seq", job.document_id
    )
    pdf_path = tmp_path / "doc.pdf"
    pdf_path.write_bytes(data)
    extracted = await extract_document(pdf_path, "pdf", report=NullReporter())
    expected = chunk_pages(extracted.pages, load_tokenizer(), chunk_size=24, chunk_overlap=4)
    assert [r["seq"] for r in rows] == list(range(len(expected)))
    assert [r["text"] for r in rows] == [c.text for c in expected]
    events = await stream_events(svc.redis, job.job_id)
    assert not any(e.status in {"retrying", "failed"} for e in events)
    assert proc.poll() is None


@pytest.mark.timeout(300)
async def test_processes_started_during_an_outage_wait_for_it_then_serve(
    fault_stack: EmbeddedStack,
    fault_env: dict[str, str],
    fault_services: Services,
    fault_worker: tuple[subprocess.Popen[bytes], int, WorkerProcs],
    tmp_path: Path,
) -> None:
    """A worker and a gateway started while Postgres and Redis are down do not
    exit: they wait (saying so), then serve once both are back."""
    _, _, procs = fault_worker
    fault_stack.postgres.stop()
    fault_stack.redis.stop()
    gateway = GatewayProcess(fault_env, tmp_path / "gateway.log")
    try:
        worker, port = procs.start()
        gateway_up = asyncio.create_task(asyncio.to_thread(gateway.start, 180))
        await asyncio.sleep(8)  # longer than ARQ's own five connection retries
        assert worker.poll() is None, procs.log_of(worker)
        assert not gateway_up.done() and gateway.proc is not None
        assert gateway.proc.poll() is None, gateway.log_path.read_text()[-2000:]
        assert "waiting_for_dependency" in procs.log_of(worker)
    finally:
        fault_stack.postgres.start()
        fault_stack.redis.start()
    try:
        await gateway_up
        await procs.wait_ready(port, worker, timeout=150)
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"{gateway.url}/health/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        await fault_services.db.expire_connections()
        job = await _eventually(
            lambda: _make_job(fault_services, b"Started in an outage. " * 20, "txt"), 30
        )
        await _eventually(lambda: fault_services.queue.enqueue(job.job_id, Priority.NORMAL), 30)
        assert await _wait_done(fault_services, job.job_id, timeout=90) == ("completed", 1)
        assert worker.poll() is None
    finally:
        gateway.stop()
