"""Real ``python -m workers`` processes: sharing a backlog, and surviving SIGKILL."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from app.core.embedding import load_tokenizer
from app.core.queue import Priority
from app.gateway.services import Services
from app.jobs.transitions import job_snapshot
from tests.fixtures_pipeline import (
    MakeJob,
    WorkerProcs,
    make_pdf,
    page_sentence,
    stream_events,
    wait_for_status,
)
from workers.stages.chunk import chunk_pages
from workers.stages.common import NullReporter
from workers.stages.extract import extract_document

pytestmark = pytest.mark.slow


async def _metric(port: int, name: str, label: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    match = re.search(rf'^{name}\{{outcome="{label}"\}} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_two_workers_share_a_backlog_and_run_no_job_twice(
    services: Services, worker_procs: WorkerProcs, make_job: MakeJob
) -> None:
    started = [worker_procs.start(MAX_CONCURRENT_TASKS="2") for _ in range(2)]
    await asyncio.gather(*(worker_procs.wait_ready(port, proc) for proc, port in started))
    jobs = [await make_job(f"Note {i}. {page_sentence(i, 1)}".encode(), "txt") for i in range(16)]
    for job in jobs:
        assert await services.queue.enqueue(job.job_id, Priority.NORMAL)
    for job in jobs:
        await wait_for_status(services.db, job.job_id, {"completed", "failed"}, timeout=90)
    rows = await services.db.fetch(
        "SELECT status, attempts, result->>'worker' AS worker FROM jobs WHERE id = ANY($1::uuid[])",
        [j.job_id for j in jobs],
    )
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}
    for job in jobs:
        events = await stream_events(services.redis, job.job_id)
        assert sum(e.message.startswith("started") for e in events) == 1
    assert len({r["worker"] for r in rows}) == 2  # both took a share
    done = [await _metric(port, "sluice_worker_jobs_total", "completed") for _, port in started]
    assert sum(done) >= len(jobs)  # (leftover jobs of other tests may run too)


@pytest.mark.timeout(240)
async def test_sigkilled_worker_job_is_finished_by_another_within_two_minutes(
    services: Services, worker_procs: WorkerProcs, make_job: MakeJob, tmp_path: Path
) -> None:
    env = {"JOB_LEASE_SECONDS": "6", "MAX_PROCESSING_TIME_MINUTES": "120"}
    started = [worker_procs.start(**env) for _ in range(2)]
    health = await asyncio.gather(*(worker_procs.wait_ready(port, proc) for proc, port in started))
    ids = [h["worker_id"] for h in health]
    pages = [[" ".join(page_sentence(p, i) for i in range(12))] for p in range(1, 41)]
    data = make_pdf(pages)
    job = await make_job(data, options={"chunk_size": 24, "chunk_overlap": 4})
    await services.queue.enqueue(job.job_id, Priority.NORMAL)

    deadline = time.monotonic() + 90
    while True:
        snap = await job_snapshot(services.db, job.job_id)
        if snap and snap.stage == "embed" and snap.stage_progress > 0:
            break
        assert time.monotonic() < deadline, snap
        await asyncio.sleep(0.05)
    owner = await services.db.fetchval(
        "SELECT lease_owner FROM jobs WHERE id = $1::uuid", job.job_id
    )
    by_id = dict(zip(ids, started, strict=True))
    victim = by_id[owner.rsplit(":", 1)[0]]
    survivor = next(s for s in started if s is not victim)
    os.kill(victim[0].pid, signal.SIGKILL)
    killed_at = time.monotonic()

    snap = await wait_for_status(services.db, job.job_id, {"completed", "failed"}, timeout=120)
    assert snap.status == "completed", snap
    assert time.monotonic() - killed_at < 120
    assert survivor[0].poll() is None
    rows = await services.db.fetch(
        "SELECT seq, text FROM chunks WHERE document_id = $1::uuid ORDER BY seq", job.document_id
    )
    pdf_path = tmp_path / "doc.pdf"
    pdf_path.write_bytes(data)
    extracted = await extract_document(pdf_path, "pdf", report=NullReporter())
    expected = chunk_pages(extracted.pages, load_tokenizer(), chunk_size=24, chunk_overlap=4)
    assert [r["seq"] for r in rows] == list(range(len(expected)))
    assert [r["text"] for r in rows] == [c.text for c in expected]
    job_row = await services.db.fetchrow(
        "SELECT attempts, lease_owner FROM jobs WHERE id = $1::uuid", job.job_id
    )
    assert job_row is not None
    assert job_row["attempts"] == 2 and job_row["lease_owner"] is None
    events = await stream_events(services.redis, job.job_id)
    assert any(e.status == "retrying" and "lease expired" in e.message for e in events)


@pytest.mark.timeout(240)
async def test_sigterm_hands_the_running_job_back_and_another_worker_resumes_it(
    services: Services, worker_procs: WorkerProcs, make_job: MakeJob
) -> None:
    first, port = worker_procs.start(JOB_LEASE_SECONDS="6")
    await worker_procs.wait_ready(port, first)
    pages = [[" ".join(page_sentence(p, i) for i in range(12))] for p in range(1, 31)]
    job = await make_job(make_pdf(pages), options={"chunk_size": 24, "chunk_overlap": 0})
    await services.queue.enqueue(job.job_id, Priority.NORMAL)
    deadline = time.monotonic() + 90
    while True:
        snap = await job_snapshot(services.db, job.job_id)
        if snap and snap.stage == "embed" and snap.stage_progress > 0:
            break
        assert time.monotonic() < deadline, snap
        await asyncio.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    for _ in range(300):
        if first.poll() is not None:
            break
        await asyncio.sleep(0.1)
    assert first.returncode == 0, worker_procs.log_of(first)
    snap = await job_snapshot(services.db, job.job_id)
    assert snap is not None and snap.status == "queued", snap
    assert "shutting down" in snap.message
    assert (
        await services.db.fetchval("SELECT attempts FROM jobs WHERE id = $1::uuid", job.job_id) == 0
    )  # a graceful stop does not spend an attempt

    second, port2 = worker_procs.start(JOB_LEASE_SECONDS="6")
    await worker_procs.wait_ready(port2, second)
    snap = await wait_for_status(services.db, job.job_id, {"completed", "failed"}, timeout=120)
    assert snap.status == "completed", snap
    events = await stream_events(services.redis, job.job_id)
    assert any("already done" in e.message for e in events)  # resumed from checkpoints
