"""Every job belongs to a user; another user's job is indistinguishable from a
missing one."""

from __future__ import annotations

import uuid

import pytest

from app.core.errors import Conflict, NotFound
from app.gateway.services import Services
from app.jobs.documents import create_document, create_job
from app.jobs.events import decode_event, stream_key
from app.jobs.model import JobStatus, Stage
from app.jobs.service import request_cancel
from app.jobs.transitions import change_job, job_snapshot, job_snapshots


async def _job(services: Services, owner: str, status: JobStatus) -> str:
    doc = await create_document(
        services.db,
        owner_id=owner,
        filename="a.txt",
        content_type="text/plain",
        document_type="txt",
        size_bytes=3,
    )
    return await create_job(services.db, owner_id=owner, document_id=doc, status=status)


async def test_foreign_and_unknown_jobs_look_the_same(services: Services, user: str) -> None:
    job = await _job(services, user, JobStatus.QUEUED)
    errors = []
    for owner, job_id in (("someone-else", job), (user, str(uuid.uuid4())), (user, "not-a-uuid")):
        with pytest.raises(NotFound) as info:
            await request_cancel(services.db, services.redis, job_id, owner)
        errors.append((info.value.code, info.value.message))
    assert len(set(errors)) == 1


async def test_cancel_is_recorded_published_and_idempotent(services: Services, user: str) -> None:
    job = await _job(services, user, JobStatus.QUEUED)
    first = await request_cancel(services.db, services.redis, job, user)
    assert first.status == "cancelled" and first.seq == 1
    again = await request_cancel(services.db, services.redis, job, user)
    assert again.status == "cancelled" and again.seq == first.seq
    entries = await services.redis.xrange(stream_key(job))
    assert [decode_event(e[b"e"]).status for _, e in entries] == ["cancelled"]


async def test_progress_never_resurrects_a_finished_job(services: Services, user: str) -> None:
    job = await _job(services, user, JobStatus.QUEUED)
    done = await change_job(services.db, services.redis, job, status=JobStatus.COMPLETED)
    assert done is not None and done.terminal
    late = await change_job(
        services.db,
        services.redis,
        job,
        stage="embed",
        stage_progress=0.5,
        only_if_status=[JobStatus.RUNNING],
    )
    assert late is None
    with pytest.raises(Conflict):
        await request_cancel(services.db, services.redis, job, user)


async def test_snapshots_are_read_in_one_query_typed_and_only_for_existing_jobs(
    services: Services, user: str
) -> None:
    queued = await _job(services, user, JobStatus.QUEUED)
    other = await _job(services, "someone-else", JobStatus.AWAITING_UPLOAD)
    unknown = str(uuid.uuid4())
    found = await job_snapshots(services.db, [queued, other, unknown])
    assert set(found) == {queued, other}  # any owner: the caller checks ownership
    assert found[queued] == await job_snapshot(services.db, queued)
    assert type(found[queued].status) is JobStatus and found[queued].stage is None
    assert found[other].status == JobStatus.AWAITING_UPLOAD
    assert type(found[other].stage) is Stage and found[other].stage == Stage.UPLOAD
    assert await job_snapshots(services.db, []) == {}
