"""Hostile documents: bounded cost per page and per document, failures that stay
with the document (issue #8 items 11, 12, 17, 18).

The budget and JSON tests run the extract stage in this process; the child
process tests call :func:`workers.parse.parse_in_child` directly; the poison
and amplification tests run real ``python -m workers`` processes and watch
their PID and RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import time
from pathlib import Path

import msgspec
import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix

from app.core.embedding import LocalEmbedder, OpenAIEmbedder, model_dir
from app.core.errors import PermanentError
from app.core.queue import QUEUE_NAME, Priority
from app.gateway.services import Services
from app.jobs.service import request_cancel
from app.jobs.transitions import job_snapshot
from tests.fixtures_hostile import json_bomb, shared_stream_pdf, text_stream
from tests.fixtures_pipeline import (
    TOPIC_PAGES,
    EmbeddingEndpoint,
    MakeJob,
    WorkerProcs,
    make_pdf,
    page_sentence,
    stream_events,
    wait_for_status,
)
from workers.context import WorkerContext
from workers.parse import ParseChildren, ParseJob, ParseReporter, parse_in_child
from workers.run import JobRun, Outcome, RetryLater
from workers.stages.budget import ExtractLimits
from workers.stages.extract import extract_text_file
from workers.stages.formats import json_to_text
from workers.stages.pdf import PdfPages
from workers.stages.validate import check_json

MB = 1024 * 1024


def _too_large(call: object) -> PermanentError:
    assert callable(call)
    with pytest.raises(PermanentError) as err:
        call()
    assert err.value.code == "too_large_extracted", err.value
    return err.value


# --- budgets in the extract stage (item 11) ---------------------------------------------


def test_pages_sharing_one_stream_are_extracted_once_and_charged_every_time(
    tmp_path: Path,
) -> None:
    path = tmp_path / "shared.pdf"
    content = text_stream(MB, string_length=100_000)
    path.write_bytes(shared_stream_pdf(400, content))
    limits = ExtractLimits(
        document_content_bytes=32 * MB, page_chars=10 * MB, document_chars=10**9, page_seconds=0
    )
    one = PdfPages(path, limits=limits)
    started = time.perf_counter()
    text, warning = one.extract(0)
    first_page = time.perf_counter() - started
    one.close()
    assert warning is None and "lorem ipsum" in text

    pdf = PdfPages(path, limits=limits)
    started = time.perf_counter()
    with pytest.raises(PermanentError) as err:
        for index in range(pdf.count):
            pdf.extract(index)
    elapsed = time.perf_counter() - started
    pdf.close()
    assert err.value.code == "too_large_extracted"
    # ~1 MiB of decoded content per page against a 32 MiB document budget.
    assert err.value.details["page"] == 32 * MB // len(content) + 1, err.value.details
    assert "MAX_DOCUMENT_CONTENT_MB" in err.value.message
    # The shared stream was extracted once, not once per page (~32 times).
    assert elapsed < 8 * first_page + 1.0, (elapsed, first_page)


def test_a_page_over_the_decoded_budget_fails_before_it_is_extracted(tmp_path: Path) -> None:
    path = tmp_path / "poison.pdf"
    path.write_bytes(shared_stream_pdf(1, text_stream(70 * MB, string_length=1_000_000)))
    assert path.stat().st_size < 400_000  # ~70 MiB decoded from a small file
    pdf = PdfPages(path, limits=ExtractLimits())  # the defaults: 32 MiB a page
    error = _too_large(lambda: pdf.extract(0))
    pdf.close()
    assert error.details["page"] == 1 and error.details["limit_bytes"] == 32 * MB
    assert "MAX_PAGE_CONTENT_MB" in error.message


def test_page_and_document_character_budgets(tmp_path: Path) -> None:
    path = tmp_path / "book.pdf"
    path.write_bytes(make_pdf([[page_sentence(p, i) for i in range(8)] for p in range(1, 6)]))
    pdf = PdfPages(path, limits=ExtractLimits(page_chars=100))
    error = _too_large(lambda: pdf.extract(0))
    pdf.close()
    assert error.details == {"page": 1, "limit_chars": 100}
    pdf = PdfPages(path)
    sizes = [len(pdf.extract(i)[0]) for i in range(pdf.count)]
    pdf.close()
    limit = sizes[0] + sizes[1] + sizes[2] // 2  # runs out in the middle of page 3
    pdf = PdfPages(path, limits=ExtractLimits(document_chars=limit))
    error = _too_large(lambda: [pdf.extract(i) for i in range(pdf.count)])
    pdf.close()
    assert error.details["page"] == 3 and "MAX_DOCUMENT_CHARS" in error.message
    text = tmp_path / "notes.txt"
    text.write_text("word " * 500)
    error = _too_large(lambda: extract_text_file(text, "txt", ExtractLimits(document_chars=2000)))
    assert error.details["limit_chars"] == 2000
    assert extract_text_file(text, "txt", ExtractLimits(page_chars=10)).pages[0].text


# The alarm may land in pytest's own gc callback, where Python swallows it and
# reports it as unraisable; page_deadline re-raises it (that is what this test
# checks), so the report is expected here.  The parse child has no such hook.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_page_past_its_time_budget_fails(tmp_path: Path) -> None:
    path = tmp_path / "slow.pdf"
    path.write_bytes(shared_stream_pdf(1, text_stream(4 * MB, string_length=100)))
    pdf = PdfPages(path, limits=ExtractLimits(page_chars=10 * MB, page_seconds=0.2))
    started = time.perf_counter()
    gc.disable()  # nor may it land in pytest's gc callback at all, if it can help it
    try:
        error = _too_large(lambda: pdf.extract(0))
    finally:
        gc.enable()
        pdf.close()
    assert error.details == {"page": 1, "limit_seconds": 0.2}
    assert time.perf_counter() - started < 5  # extracting it takes several seconds


# --- JSON bombs (item 12) ---------------------------------------------------------------


def test_json_nested_50000_deep_is_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "bomb.json"
    path.write_bytes(json_bomb(50_000))
    for call in (lambda: check_json(path), lambda: json_to_text(path.read_bytes())):
        with pytest.raises(PermanentError) as err:
            call()
        assert err.value.code == "corrupt_file" and "nested too deeply" in err.value.message
    # Deep but decodable JSON flattens without recursion.
    deep = json_to_text(json_bomb(500))
    assert deep == "a" + ".a" * 499 + ": 1"


async def test_json_bomb_job_fails_corrupt_file_on_its_first_attempt(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    job = await make_job(json_bomb(50_000), "json")
    assert await JobRun(worker_ctx, job.job_id).run() == Outcome.FAILED
    row = await services.db.fetchrow(
        "SELECT status, attempts, error_code FROM jobs WHERE id = $1::uuid", job.job_id
    )
    assert dict(row or {}) == {"status": "failed", "attempts": 1, "error_code": "corrupt_file"}


async def test_large_json_is_decoded_only_in_the_parse_child(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    """A JSON file over JSON_CHECKED_IN_WORKER_BYTES is never decoded in the worker
    (its objects could take many times its size there): the parse child finds it
    malformed, under its memory limit, and the job fails corrupt_file in extract."""
    job = await make_job(b'{"notes": "' + b"x" * (9 * 1024 * 1024), "json")
    assert await JobRun(worker_ctx, job.job_id).run() == Outcome.FAILED
    row = await services.db.fetchrow(
        "SELECT status, attempts, error_code, stage FROM jobs WHERE id = $1::uuid", job.job_id
    )
    assert dict(row or {}) == {
        "status": "failed",
        "attempts": 1,
        "error_code": "corrupt_file",
        "stage": "extract",
    }


# --- the parse child (item 17) ----------------------------------------------------------


def _children() -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with open(task / "children") as fh:
            found.update(int(pid) for pid in fh.read().split())
    return found


async def test_parse_child_is_killed_at_its_time_limit_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    path = tmp_path / "slow.pdf"
    path.write_bytes(shared_stream_pdf(3, text_stream(8 * MB, string_length=100)))
    before = _children()
    boundaries = 0

    async def progress(stage: str, fraction: float, message: str) -> None:
        return None

    async def boundary() -> None:
        nonlocal boundaries
        boundaries += 1

    async def extracted(seconds: float) -> None:
        return None

    job = ParseJob(
        path=str(path),
        document_type="pdf",
        chunk_size=256,
        chunk_overlap=32,
        tokenizer_path=str(model_dir() / "tokenizer.json"),
        limits=ExtractLimits(page_chars=100 * MB, page_seconds=600),
        memory_bytes=1024 * MB,
        time_seconds=2.0,
    )
    started = time.monotonic()
    with pytest.raises(PermanentError) as err:
        await parse_in_child(job, ParseReporter(progress, boundary, extracted))
    assert err.value.code == "resource_limit"
    assert "PARSE_TIME_LIMIT_SECONDS" in err.value.message
    assert time.monotonic() - started < 10
    assert boundaries >= 2  # the parent kept checking for cancellation meanwhile
    assert _children() <= before  # the child is gone, not orphaned


async def test_parses_wait_for_a_slot_so_parse_memory_stays_bounded(tmp_path: Path) -> None:
    """MAX_CONCURRENT_PARSES: with one slot, two jobs' parse children never run at
    the same time (the second starts only after the first has finished)."""
    children = ParseChildren(max_parses=1)
    spans: dict[str, list[float]] = {}

    async def parse(name: str) -> None:
        path = tmp_path / f"{name}.txt"
        path.write_text(" ".join(f"Sentence {i} of {name}." for i in range(40_000)))

        async def progress(stage: str, fraction: float, message: str) -> None:
            spans.setdefault(name, [time.monotonic()])

        async def nothing(*_: object) -> None:
            return None

        job = ParseJob(
            path=str(path),
            document_type="txt",
            chunk_size=256,
            chunk_overlap=32,
            tokenizer_path=str(model_dir() / "tokenizer.json"),
            limits=ExtractLimits(),
            memory_bytes=1024 * MB,
            time_seconds=120.0,
        )
        parsed = await parse_in_child(
            job, ParseReporter(progress, nothing, nothing), children=children
        )
        assert parsed.chunks
        spans[name].append(time.monotonic())

    try:
        await asyncio.gather(parse("first"), parse("second"))
    finally:
        await children.aclose()
    (_, first_end), (second_start, _) = sorted(spans.values())
    assert second_start >= first_end, spans


# --- progress and timings across attempts (item 18) -------------------------------------


async def test_progress_never_goes_back_and_timings_keep_every_attempt(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob, embedder: LocalEmbedder
) -> None:
    async with EmbeddingEndpoint(embedder, [503]) as endpoint:
        remote = OpenAIEmbedder(endpoint.url, model="all-MiniLM-L6-v2")
        ctx = dataclasses.replace(worker_ctx, embedder=remote)
        job = await make_job(make_pdf(TOPIC_PAGES))
        with pytest.raises(RetryLater):  # embedding answered 503: attempt 1 ends retrying
            await JobRun(ctx, job.job_id).run()
        assert await JobRun(ctx, job.job_id).run() == Outcome.COMPLETED
        await remote.aclose()
    events = await stream_events(services.redis, job.job_id)
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    progress = [e.overall_progress for e in events]
    assert progress == sorted(progress), progress
    assert any(e.message.startswith("started (attempt 2") for e in events)
    timings = await services.db.fetchval(
        "SELECT stage_timings FROM jobs WHERE id = $1::uuid", job.job_id
    )
    # Attempt 1 ran validate, extract and chunk (checkpointed) and failed in embed;
    # attempt 2 resumed at embed and went on to index.
    assert {stage: len(runs) for stage, runs in timings.items()} == {
        "validate": 1,
        "extract": 1,
        "chunk": 1,
        "embed": 2,
        "index": 1,
    }
    assert all(s >= 0 for runs in timings.values() for s in runs)


# --- real workers: amplification and poison (items 11 and 17) ---------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_text_amplification_pdf_fails_fast_without_growing_the_worker(
    services: Services, worker_procs: WorkerProcs, make_job: MakeJob
) -> None:
    # 2,000 pages, all pointing at one FlateDecode stream of ~10 MB decoded text.
    data = shared_stream_pdf(2000, text_stream(10 * MB))
    assert len(data) < 400_000
    proc, port = worker_procs.start()
    await worker_procs.wait_ready(port, proc)
    baseline = peak = _rss_mb(proc.pid)
    job = await make_job(data)
    await services.queue.enqueue(job.job_id, Priority.NORMAL)
    started = time.monotonic()
    while True:
        peak = max(peak, _rss_mb(proc.pid))
        snap = await job_snapshot(services.db, job.job_id)
        if snap is not None and snap.status in {"failed", "completed"}:
            break
        assert time.monotonic() - started < 60, snap
        await asyncio.sleep(0.1)
    assert snap.status == "failed" and snap.error_code == "too_large_extracted", snap
    assert peak - baseline < 300, (baseline, peak)
    attempts = await services.db.fetchval(
        "SELECT attempts FROM jobs WHERE id = $1::uuid", job.job_id
    )
    assert attempts == 1  # permanent: not retried
    assert proc.poll() is None


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_poison_pdf_fails_alone_with_resource_limit(
    services: Services, worker_procs: WorkerProcs, make_job: MakeJob
) -> None:
    # One page whose content stream decodes to 24 MiB of text (the 107 KB file
    # decodes to 70 MB and fails the same way, only slower), within budgets raised for
    # this test, so that only the parse child's memory limit can stop it.
    poison = shared_stream_pdf(1, text_stream(24 * MB, string_length=1_000_000))
    assert len(poison) < 100_000
    proc, port = worker_procs.start(
        MAX_CONCURRENT_TASKS="2",
        MAX_PAGE_CONTENT_MB="128",
        MAX_DOCUMENT_CONTENT_MB="128",
        MAX_PAGE_CHARS="200000000",
        MAX_DOCUMENT_CHARS="200000000",
        PAGE_TIME_BUDGET_SECONDS="600",
        PARSE_MEMORY_LIMIT_MB="384",
    )
    await worker_procs.wait_ready(port, proc)
    bad = await make_job(poison)
    pages = [[" ".join(page_sentence(p, i) for i in range(12))] for p in range(1, 21)]
    bystander = await make_job(make_pdf(pages))
    for job in (bad, bystander):
        await services.queue.enqueue(job.job_id, Priority.NORMAL)
    snap = await wait_for_status(services.db, bad.job_id, {"failed", "completed"}, timeout=150)
    assert snap.status == "failed" and snap.error_code == "resource_limit", snap
    done = await wait_for_status(
        services.db, bystander.job_id, {"failed", "completed"}, timeout=120
    )
    assert done.status == "completed", done
    rows = await services.db.fetch(
        "SELECT id::text AS id, attempts FROM jobs WHERE id = ANY($1::uuid[])",
        [bad.job_id, bystander.job_id],
    )
    assert {r["id"]: r["attempts"] for r in rows} == {bad.job_id: 1, bystander.job_id: 1}
    assert proc.poll() is None  # the same worker process, never restarted
    await worker_procs.wait_ready(port, proc, timeout=10)  # and still answers /health
    events = await stream_events(services.redis, bystander.job_id)
    assert sum(e.message.startswith("started") for e in events) == 1


def _child_pids(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError), open(task / "children") as fh:
            found.update(int(p) for p in fh.read().split())
    return found


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_parse_child_dies_with_a_sigkilled_worker(
    services: Services, worker_procs: WorkerProcs, make_job: MakeJob
) -> None:
    proc, port = worker_procs.start(PAGE_TIME_BUDGET_SECONDS="600", MAX_PAGE_CHARS="100000000")
    await worker_procs.wait_ready(port, proc)
    job = await make_job(shared_stream_pdf(20, text_stream(8 * MB, string_length=100)))
    await services.queue.enqueue(job.job_id, Priority.NORMAL)
    deadline = time.monotonic() + 60
    children: set[int] = set()
    while not children:  # the parse child, busy on page 1
        assert time.monotonic() < deadline, await job_snapshot(services.db, job.job_id)
        await asyncio.sleep(0.1)
        children = {
            pid
            for pid in _child_pids(proc.pid)
            if b"workers.parse" in Path(f"/proc/{pid}/cmdline").read_bytes()
        }
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    try:
        deadline = time.monotonic() + 10
        while alive := [pid for pid in children if Path(f"/proc/{pid}").exists()]:
            status = Path(f"/proc/{alive[0]}/status").read_text()
            if "State:\tZ" in status:  # exited, waiting for init to reap it
                break
            assert time.monotonic() < deadline, f"parse child {alive} outlived its worker"
            await asyncio.sleep(0.1)
    finally:  # nobody will finish the dead worker's job: take it out of the queue
        await services.db.execute(
            "UPDATE jobs SET status = 'cancelled', lease_owner = NULL, lease_expires_at = NULL "
            "WHERE id = $1::uuid",
            job.job_id,
        )
        await services.redis.delete(
            in_progress_key_prefix + job.job_id, job_key_prefix + job.job_id
        )
        await services.redis.zrem(QUEUE_NAME, job.job_id)


def _parse_children() -> set[int]:
    return {
        pid for pid in _children() if b"workers.parse" in Path(f"/proc/{pid}/cmdline").read_bytes()
    }


async def test_cancelling_a_job_kills_its_busy_parse_child(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    settings = msgspec.structs.replace(
        worker_ctx.settings,
        page_time_budget_seconds=600,
        max_page_chars=10**8,
        max_document_chars=10**8,
    )
    ctx = dataclasses.replace(worker_ctx, settings=settings)
    job = await make_job(shared_stream_pdf(1, text_stream(24 * MB, string_length=100)))
    run = asyncio.create_task(JobRun(ctx, job.job_id).run())
    deadline = time.monotonic() + 60
    while True:  # busy on page 1 (it needs many seconds)
        snap = await job_snapshot(services.db, job.job_id)
        if snap is not None and snap.stage == "extract":
            break
        assert time.monotonic() < deadline, snap
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    # The job's child is the one burning CPU (the other is the idle spare).
    busy = max(_parse_children(), key=_cpu_ticks)
    assert _cpu_ticks(busy) > 0
    await request_cancel(services.db, services.redis, job.job_id, job.owner_id)
    started = time.monotonic()
    assert await asyncio.wait_for(run, 30) == Outcome.CANCELLED
    assert time.monotonic() - started < 5
    assert busy not in _parse_children()


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime
