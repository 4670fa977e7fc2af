"""The stages of one attempt, one step each: validate -> extract + chunk -> embed -> index.

:func:`run_stages` runs the steps in order for an
:class:`~workers.attempt.Attempt`.  Each step calls its stage
(``workers/stages/``) with the worker's collaborators, reports through a
:class:`~workers.progress.StageProgress`, is timed into ``stage_timings``, and
keeps what it produced in ``job_checkpoints`` (``workers/checkpoints.py``), so
a retry or a resumed attempt skips what is stored:

* :func:`validate` downloads and checks the file; a document whose sha256 this
  user already has indexed (with the same processing options) completes at
  once as deduplicated, pointing at it, and one that an identical document's
  job is processing right now waits for it (``workers/dedup.py``);
* :func:`parse` extracts and chunks in a limited child process
  (``workers/parse.py``); validate, extract and chunk are one checkpoint, the
  chunk plan with the extraction's warnings;
* :func:`embed` stores each batch of vectors as it goes and resumes at the
  next one;
* :func:`index` writes the chunks and completes the job in one transaction,
  fenced by the lease and the cancel flag.

The attempt is checked for cancellation (and a lost lease) between steps, and
by the stages at page and batch boundaries.
"""

from __future__ import annotations

import time

from app.core.embedding import Vectors
from app.core.errors import PermanentError
from app.core.settings import Settings
from app.jobs.model import ProgressEvent, RunOutcome, Stage
from app.jobs.transitions import JobChanges
from workers.attempt import Attempt, Conn, Outcome
from workers.checkpoints import checkpointed, load_batches, save_batch
from workers.dedup import claim_content, indexed_twin
from workers.endings import DuplicateRunning, complete, transition
from workers.parse import Parsed, ParseJob, ParseReporter, parse_in_child
from workers.progress import StageProgress, stage_start
from workers.stages.budget import ExtractLimits
from workers.stages.chunk import resolve_options
from workers.stages.common import Chunk
from workers.stages.embed import embed_chunks
from workers.stages.index import write_chunks
from workers.stages.ocr import OcrOptions
from workers.stages.scan import OCR_RECORD, ocr_pages
from workers.stages.validate import Validated, validate_document

MB = 1024 * 1024


async def run_stages(attempt: Attempt) -> Outcome:
    """Every step of the attempt, in order, from the checkpoints stored."""
    parsed = await checkpointed(
        attempt,
        Stage.CHUNK,
        Parsed,
        lambda: _validate_and_parse(attempt),
        resumed="validate, extract and chunk already done; resuming",
    )
    if parsed is None:  # an identical document is indexed: the job completed as its duplicate
        return Outcome.DEDUPLICATED
    attempt.warnings = list(parsed.warnings)
    chunks = parsed.chunks
    del parsed
    await attempt.check()
    vectors = await embed(attempt, chunks)
    await attempt.check()
    return await index(attempt, chunks, vectors)


async def _validate_and_parse(attempt: Attempt) -> Parsed | None:
    """Validate, then extract and chunk; None once a duplicate completed the job."""
    validated = await validate(attempt)
    claim = await claim_content(attempt, validated.sha256)
    if claim.running_job is not None:
        raise DuplicateRunning(claim.running_job)
    if claim.original is not None:
        await finish_deduplicated(attempt, claim.original)
        return None
    await attempt.check()
    parsed = await parse(attempt)
    attempt.cleanup_files()
    if not parsed.chars:
        attempt.warnings = list(parsed.warnings)
        raise PermanentError(
            "no text could be extracted (no text layer, and OCR found none)",
            code="no_text",
            details={"warnings": attempt.warnings[:20]},
        )
    return parsed


# -- validate ----------------------------------------------------------------------------


async def validate(attempt: Attempt) -> Validated:
    """Download the document to the attempt's file and validate it; its page
    count goes on the document row (its sha256 with the claim, ``workers/dedup.py``)."""
    ctx, doc = attempt.ctx, attempt.document
    validated = await attempt.timed(
        Stage.VALIDATE,
        validate_document(
            ctx.s3,
            ctx.settings.minio_bucket_name,
            doc,
            attempt.tmp_path(),
            max_bytes=ctx.settings.max_upload_size_bytes,
            max_pdf_pages=ctx.settings.max_pdf_pages,
            report=StageProgress(attempt, Stage.VALIDATE),
        ),
    )
    await ctx.db.execute(
        "UPDATE documents SET page_count = $2, updated_at = now() WHERE id = $1::uuid",
        doc.id,
        validated.page_count,
    )
    return validated


async def finish_deduplicated(attempt: Attempt, original: str) -> None:
    """Complete the job as a duplicate of document ``original`` (its own chunks go)."""

    async def commit(conn: Conn, changes: JobChanges) -> ProgressEvent | None:
        await attempt.verify(conn, lock=True)
        return await _complete_as_duplicate(conn, changes, attempt, original)

    await transition(attempt, commit)


async def _complete_as_duplicate(
    conn: Conn, changes: JobChanges, attempt: Attempt, original: str
) -> ProgressEvent | None:
    doc = attempt.document
    await conn.execute("DELETE FROM chunks WHERE document_id = $1::uuid", doc.id)
    await conn.execute(
        "UPDATE documents SET status = 'indexed', deduplicated_of = $2::uuid, "
        "updated_at = now() WHERE id = $1::uuid",
        doc.id,
        original,
    )
    return await complete(
        conn,
        changes,
        attempt,
        result={"deduplicated": True, "document_id": original, "worker": attempt.ctx.worker_id},
        message=f"deduplicated: identical to document {original}",
        details={"deduplicated_of": original},
        outcome=RunOutcome.DEDUPLICATED,
    )


# -- extract and chunk -------------------------------------------------------------------


def extract_limits(settings: Settings) -> ExtractLimits:
    """The :class:`ExtractLimits` of ``settings`` (the ``MAX_PAGE_*``/``MAX_DOCUMENT_*``
    and ``PAGE_TIME_BUDGET_SECONDS`` settings)."""
    return ExtractLimits(
        page_content_bytes=settings.max_page_content_mb * MB,
        document_content_bytes=settings.max_document_content_mb * MB,
        page_chars=settings.max_page_chars,
        document_chars=settings.max_document_chars,
        page_seconds=float(settings.page_time_budget_seconds),
        ocr=OcrOptions(
            enabled=settings.ocr_enabled,
            max_pages=settings.ocr_max_pages,
            min_confidence=settings.ocr_min_confidence,
            dpi=settings.ocr_dpi,
            max_pixels=settings.ocr_max_pixels,
            max_image_pixels=settings.ocr_max_image_pixels,
            threads=settings.ocr_threads,
            page_seconds=float(settings.ocr_page_time_seconds),
        ),
    )


class _ParseProgress:
    """Where the parse child reports: the extract and chunk stages' progress, and
    their timings (extract's measured by the child, chunk's the rest)."""

    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt
        self._stages = {
            str(Stage.EXTRACT): StageProgress(attempt, Stage.EXTRACT),
            str(Stage.CHUNK): StageProgress(attempt, Stage.CHUNK),
        }
        self._started = time.perf_counter()
        self.extract_seconds: float | None = None
        """Set once extraction has ended."""

    def reporter(self) -> ParseReporter:
        return ParseReporter(self.progress, self.boundary, self.extracted)

    async def progress(self, stage: str, fraction: float, message: str) -> None:
        await self._stages[stage].progress(fraction, message)

    async def boundary(self) -> None:
        await self._attempt.check(force=False)

    async def extracted(self, seconds: float) -> None:
        self.extract_seconds = seconds
        await self.progress(str(Stage.EXTRACT), 1.0, "extracted")
        await self._attempt.stage_done(Stage.EXTRACT, seconds)

    def current_stage_seconds(self) -> float:
        """Time spent so far in the stage now running (extract, then chunk)."""
        return time.perf_counter() - self._started - (self.extract_seconds or 0.0)


async def parse(attempt: Attempt) -> Parsed:
    """Extract and chunk the downloaded file in a limited child process
    (``workers/parse.py``), recording both stages' progress and timings."""
    ctx, doc = attempt.ctx, attempt.document
    settings = ctx.settings
    size, overlap = resolve_options(doc.processing_options, ctx.embedder.max_seq_length)
    report = _ParseProgress(attempt)
    job = ParseJob(
        path=str(attempt.tmp_path()),
        document_type=doc.document_type,
        chunk_size=size,
        chunk_overlap=overlap,
        tokenizer_path=str(ctx.tokenizer_path),
        limits=extract_limits(settings),
        memory_bytes=settings.parse_memory_limit_mb * MB,
        time_seconds=float(settings.parse_time_limit_seconds),
    )
    await report.progress(str(Stage.EXTRACT), 0.0, "extracting")
    try:
        parsed = await parse_in_child(job, report.reporter(), children=ctx.parse_children)
    except Exception:
        stage = Stage.CHUNK if report.extract_seconds is not None else Stage.EXTRACT
        attempt.stage_failed(stage, report.current_stage_seconds())
        raise
    if parsed.chars:
        await report.progress(str(Stage.CHUNK), 1.0, f"{len(parsed.chunks)} chunks")
        await attempt.stage_done(Stage.CHUNK, report.current_stage_seconds())
    return parsed


# -- embed and index ---------------------------------------------------------------------


async def embed(attempt: Attempt, chunks: list[Chunk]) -> Vectors:
    """Vectors for ``chunks``, resuming after the batches an earlier attempt stored."""
    ctx = attempt.ctx

    async def keep(index: int, vectors: Vectors) -> None:
        await save_batch(attempt, Stage.EMBED, index, vectors)

    return await attempt.timed(
        Stage.EMBED,
        embed_chunks(
            ctx.embedder,
            chunks,
            batch_size=ctx.settings.embedding_batch_size,
            max_call_tokens=ctx.settings.embedding_max_call_tokens,
            report=StageProgress(attempt, Stage.EMBED),
            done=await load_batches(attempt, Stage.EMBED, ctx.embedder.dim),
            on_batch=keep,
        ),
    )


async def index(attempt: Attempt, chunks: list[Chunk], vectors: Vectors) -> Outcome:
    """Write the chunks and complete the job, in one transaction fenced by the lease."""
    await attempt.record(
        stage=Stage.INDEX,
        stage_progress=0.0,
        overall_progress=stage_start(Stage.INDEX),
        message=f"indexing {len(chunks)} chunks",
    )
    started = time.perf_counter()
    doc = attempt.document

    twin: str | None = None

    async def commit(conn: Conn, changes: JobChanges) -> ProgressEvent | None:
        nonlocal twin
        await attempt.verify(conn, lock=True)
        twin = await indexed_twin(conn, doc)
        if twin is not None:  # indexed meanwhile (this run resumed past its claim)
            return await _complete_as_duplicate(conn, changes, attempt, twin)
        written = await write_chunks(conn, doc.id, doc.owner_id, chunks, vectors)
        # Written with the rest of the run's timings by the release below; a
        # transaction run again after an outage keeps the first measurement.
        attempt.timings.setdefault(str(Stage.INDEX), [round(time.perf_counter() - started, 4)])
        await conn.execute(
            "UPDATE documents SET status = 'indexed', deduplicated_of = NULL, "
            "updated_at = now() WHERE id = $1::uuid",
            doc.id,
        )
        return await complete(
            conn,
            changes,
            attempt,
            result={
                "chunks": written,
                "pages": _page_count(chunks),
                "warnings": sum(1 for w in attempt.warnings if w.get("code") != OCR_RECORD),
                "ocr_pages": ocr_pages(attempt.warnings),
                "worker": attempt.ctx.worker_id,
            },
            message=f"indexed {written} chunks",
        )

    await transition(attempt, commit)
    if twin is not None:
        return Outcome.DEDUPLICATED
    attempt.ctx.metrics.stage_seconds.labels(str(Stage.INDEX)).observe(
        attempt.timings[str(Stage.INDEX)][0]
    )
    return Outcome.COMPLETED


def _page_count(chunks: list[Chunk]) -> int:
    return len({p for c in chunks for p in range(c.page_start, c.page_end + 1)})
