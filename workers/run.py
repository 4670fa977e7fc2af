"""The job function: one document through validate -> extract -> chunk -> embed -> index.

:func:`process_document` is what ARQ runs.  For one attempt it

1. takes the job's lease (``workers/lease.py``); a job that is no longer
   waiting (cancelled, finished, or running under a live lease elsewhere) is
   skipped, so a duplicate delivery never runs a job twice;
2. renews the lease in the background and runs the stages under the
   ``MAX_PROCESSING_TIME_MINUTES`` bound, recording each state change with
   :func:`app.jobs.transitions.record_progress` (throttled progress, stage ends,
   the final state);
3. runs the parse stages (extract, chunk) in a child process with memory and
   time limits (``workers/parse.py``), so a poison document fails alone with
   ``resource_limit`` and the worker carries on;
4. checkpoints stage outputs (the chunk plan with the extraction's warnings,
   each batch of embeddings) in ``job_checkpoints``, so a retry or a recovered
   job skips what is stored and resumes embedding at the next batch;
5. checks for cancellation (and for a lost lease) at every stage, page and
   batch boundary and once more under a row lock right before the index
   commit: a cancelled job removes its partial outputs and ends ``cancelled``;
6. on :class:`~app.core.errors.TransientError` retries with exponential
   backoff (ARQ ``Retry``, the priority offset re-applied) up to
   ``TASK_RETRY_MAX_ATTEMPTS``; on :class:`~app.core.errors.PermanentError`
   fails at once;
6. rides out a Postgres outage without spending an attempt: the job waits
   (backoff with jitter) until the database answers, renews its lease and runs
   the stages again from its checkpoints; a final state that could not be
   written is written once the database is back.  The reaper leaves the job
   alone meanwhile, because this worker's heartbeat (in Redis) shows it alive.

A document whose sha256 this user already has indexed (with the same
processing options) completes at once as deduplicated, pointing at it.

Invariants: a job's ``overall_progress`` never decreases while it runs, also
across attempts (a resumed attempt starts from where the last one got to);
``stage_timings`` keeps every run of every stage, ``{stage: [seconds, ...]}``
oldest first (a stage skipped thanks to a checkpoint adds nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec
import numpy as np
import structlog
from arq import Retry
from asyncpg.pool import PoolConnectionProxy

from app.core.embedding import model_dir
from app.core.errors import JobCancelled, PermanentError, SluiceError, TransientError
from app.core.logging import get_logger
from app.core.outage import is_database_outage, is_redis_outage, is_storage_outage
from app.core.queue import JobQueue
from app.core.settings import Settings
from app.jobs.events import publish_event
from app.jobs.model import JobStatus, ProgressEvent, Stage
from app.jobs.transitions import record_progress
from workers import lease
from workers.context import WorkerContext
from workers.lease import LeaseLost
from workers.parse import Parsed, ParseJob, ParseReporter, parse_in_child
from workers.stages.chunk import resolve_options
from workers.stages.common import Chunk, DocumentInfo
from workers.stages.embed import embed_chunks
from workers.stages.extract import ExtractLimits
from workers.stages.index import write_chunks
from workers.stages.validate import validate_document

log = get_logger("sluice.worker.pipeline")
T = TypeVar("T")
Conn = asyncpg.Connection | PoolConnectionProxy

# Share of overall progress per stage (sums to 1).
STAGE_WEIGHTS: dict[Stage, tuple[float, float]] = {
    Stage.VALIDATE: (0.0, 0.05),
    Stage.EXTRACT: (0.05, 0.20),
    Stage.CHUNK: (0.25, 0.05),
    Stage.EMBED: (0.30, 0.60),
    Stage.INDEX: (0.90, 0.10),
}
ACTIVE = (JobStatus.RUNNING,)
BOUNDARY_CHECK_SECONDS = 0.2
"""How stale a page/batch boundary's view of ``cancel_requested`` may be."""
DATABASE_WAIT = (0.2, 5.0)
"""First and largest wait (seconds, jittered) between probes of a lost Postgres."""
OUTAGE_RETRY_SECONDS = 5.0
"""Postgres unreachable before the job was taken: ARQ retries it this much later."""
DOCUMENT_FIELDS = tuple(f.name for f in msgspec.structs.fields(DocumentInfo))
MB = 1024 * 1024


def append_timings(param: str) -> str:
    """SQL ``SET`` item appending ``{stage: [seconds, ...]}`` (the parameter ``param``)
    to each stage's list of runs in ``stage_timings`` (a number left by an older
    version becomes a one-item list)."""
    return f"""stage_timings = stage_timings || (
        SELECT COALESCE(jsonb_object_agg(n.key,
                   CASE jsonb_typeof(stage_timings -> n.key)
                        WHEN 'array' THEN stage_timings -> n.key
                        WHEN 'number' THEN jsonb_build_array(stage_timings -> n.key)
                        ELSE '[]'::jsonb END || n.value), '{{}}'::jsonb)
        FROM jsonb_each({param}::jsonb) AS n)"""


class Outcome(StrEnum):
    COMPLETED = "completed"
    DEDUPLICATED = "deduplicated"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRYING = "retrying"
    SKIPPED = "skipped"
    LEASE_LOST = "lease_lost"
    REQUEUED = "requeued"


class RetryLater(Exception):
    """Internal: the attempt ended with a transient error; retry after ``delay_ms``."""

    def __init__(self, defer_ms: int) -> None:
        super().__init__(defer_ms)
        self.defer_ms = defer_ms


class _Reporter:
    """A stage's :class:`~workers.stages.common.StageReporter`, throttled."""

    def __init__(self, run: JobRun, stage: Stage) -> None:
        self._run = run
        self._stage = stage
        self._base, self._weight = STAGE_WEIGHTS[stage]
        self._last = 0.0

    async def progress(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last < self._run.ctx.progress_interval_seconds:
            return
        self._last = now
        await self._run.record(
            stage=self._stage,
            stage_progress=fraction,
            overall_progress=self._base + self._weight * fraction,
            message=message,
        )

    async def boundary(self) -> None:
        await self._run.check(force=False)


_pack = msgspec.msgpack.Encoder().encode
_unpack_parsed = msgspec.msgpack.Decoder(Parsed).decode


def extract_limits(settings: Settings) -> ExtractLimits:
    """The :class:`ExtractLimits` of ``settings`` (the ``MAX_PAGE_*``/``MAX_DOCUMENT_*``
    and ``PAGE_TIME_BUDGET_SECONDS`` settings)."""
    return ExtractLimits(
        page_content_bytes=settings.max_page_content_mb * MB,
        document_content_bytes=settings.max_document_content_mb * MB,
        page_chars=settings.max_page_chars,
        document_chars=settings.max_document_chars,
        page_seconds=float(settings.page_time_budget_seconds),
    )


class JobRun:
    """One attempt at one job."""

    def __init__(self, ctx: WorkerContext, job_id: str) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.token = f"{ctx.worker_id}:{uuid.uuid4().hex[:8]}"
        self.attempt = 0
        self.priority = "normal"
        self.doc: DocumentInfo | None = None
        self.lease_lost = False
        self.warnings: list[dict[str, Any]] = []
        self.timings: dict[str, list[float]] = {}
        """Stage runs of this attempt not yet written to ``stage_timings``."""
        self.progress_floor = 0.0
        """The job's ``overall_progress`` so far: nothing recorded goes below it."""
        self._last_check = 0.0
        self._storage_delay = DATABASE_WAIT[0]
        """Backoff between S3 probes; it keeps growing across outages of one run, so
        an object S3 keeps failing with 5xx is asked for at most every few seconds."""

    # -- state ---------------------------------------------------------------------------

    async def record(self, **fields: Any) -> ProgressEvent:
        overall = fields.get("overall_progress")
        if overall is not None:  # progress never goes back, also on a resumed attempt
            fields["overall_progress"] = self.progress_floor = max(self.progress_floor, overall)
        event = await record_progress(
            self.ctx.db, self.ctx.redis, self.job_id, only_if_status=ACTIVE, **fields
        )
        if event is None:  # no longer running: the reaper or a cancel got it
            self.lease_lost = True
            raise LeaseLost(self.job_id)
        return event

    async def check(self, *, force: bool = True) -> None:
        """Stage/batch boundary: stop if cancelled or if our lease is gone.

        Page and batch boundaries (``force=False``) look at the table at most
        every :data:`BOUNDARY_CHECK_SECONDS`; stage boundaries always do.
        """
        if self.lease_lost:
            raise LeaseLost(self.job_id)
        now = time.monotonic()
        if not force and now - self._last_check < BOUNDARY_CHECK_SECONDS:
            return
        self._last_check = now
        await self._verify(self.ctx.db, lock=False)

    async def _verify(self, db: Conn | asyncpg.Pool, *, lock: bool) -> None:
        """Raise unless this worker still holds the lease and nobody asked to cancel;
        with ``lock``, also hold the job row until ``db``'s transaction ends."""
        row = await db.fetchrow(
            "SELECT cancel_requested, lease_owner, status FROM jobs WHERE id = $1::uuid"
            + (" FOR UPDATE" if lock else ""),
            self.job_id,
        )
        if row is None or row["lease_owner"] != self.token or row["status"] != "running":
            self.lease_lost = True
            raise LeaseLost(self.job_id)
        if row["cancel_requested"]:
            raise JobCancelled("cancelled by request")

    async def _await_database(self, exc: BaseException) -> None:
        """Wait (backoff with jitter, as long as it takes) until Postgres answers."""
        self.ctx.set_database_up(False)
        log.warning(
            "database_unavailable_job_waiting", job_id=self.job_id, error=type(exc).__name__
        )
        delay = DATABASE_WAIT[0]
        while True:
            # Pooled connections that lived through the outage are broken in ways
            # asyncpg does not always notice (a stale reply confuses the protocol):
            # replace them all.
            await self.ctx.db.expire_connections()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311
            delay = min(delay * 2, DATABASE_WAIT[1])
            try:
                await self.ctx.db.fetchval("SELECT 1")
            except Exception as probe:  # not back yet, whatever it says
                log.info("database_still_unavailable", error=type(probe).__name__)
                continue
            break
        await self.ctx.db.expire_connections()
        self.ctx.set_database_up(True)
        log.info("database_back_job_resuming", job_id=self.job_id)

    async def _await_storage(self, exc: BaseException) -> None:
        """Wait (backoff with jitter, as long as it takes, while the lease is renewed
        and cancellation is honoured) until S3 answers again."""
        log.warning("storage_unavailable_job_waiting", job_id=self.job_id, error=_cause(exc))
        while True:
            await asyncio.sleep(self._storage_delay * random.uniform(0.5, 1.0))  # noqa: S311
            self._storage_delay = min(self._storage_delay * 2, DATABASE_WAIT[1])
            try:
                await self.check()  # a cancel or a lost lease ends the wait
            except Exception as down:
                if not is_database_outage(down):
                    raise  # JobCancelled, LeaseLost
            try:
                await self.ctx.s3.head_bucket(Bucket=self.ctx.settings.minio_bucket_name)
            except Exception as probe:
                if not is_storage_outage(probe):
                    break  # S3 answers (if with an error, the stage will say which)
                log.info("storage_still_unavailable", error=_cause(probe))
                continue
            break
        log.info("storage_back_job_resuming", job_id=self.job_id)

    async def _transition(
        self, fn: Callable[[Conn], Awaitable[ProgressEvent | None]], *, ride: bool = True
    ) -> ProgressEvent | None:
        """Run ``fn`` in a transaction, publish its event after the commit.  With
        ``ride``, a lost Postgres is waited out and ``fn`` run again (it is one
        transaction: it either committed or did not, and each ``fn`` re-checks
        the job's state under it)."""
        while True:
            try:
                async with self.ctx.db.acquire() as conn, conn.transaction():
                    event = await fn(conn)
                break
            except Exception as exc:
                if not (ride and is_database_outage(exc)):
                    raise
                await self._await_database(exc)
        if event is not None:
            try:
                await publish_event(self.ctx.redis, event)
            except Exception as exc:
                log.warning(
                    "event_publish_failed", job_id=self.job_id, exc_info=not is_redis_outage(exc)
                )
        return event

    # -- checkpoints ---------------------------------------------------------------------

    async def _save(self, stage: Stage, part: int, data: bytes) -> None:
        await self.ctx.db.execute(
            """
            INSERT INTO job_checkpoints (job_id, stage, part, data)
            SELECT $1::uuid, $2, $3, $4 FROM jobs
            WHERE id = $1::uuid AND lease_owner = $5
            ON CONFLICT (job_id, stage, part) DO UPDATE SET data = EXCLUDED.data
            """,
            self.job_id,
            str(stage),
            part,
            data,
            self.token,
        )

    async def _load(self, stage: Stage) -> dict[int, bytes]:
        rows = await self.ctx.db.fetch(
            "SELECT part, data FROM job_checkpoints WHERE job_id = $1::uuid AND stage = $2",
            self.job_id,
            str(stage),
        )
        return {r["part"]: r["data"] for r in rows}

    async def _stage_done(self, stage: Stage, seconds: float) -> None:
        self.ctx.metrics.stage_seconds.labels(str(stage)).observe(seconds)
        await self.ctx.db.execute(
            f"UPDATE jobs SET {append_timings('$2')} WHERE id = $1::uuid",
            self.job_id,
            {str(stage): [round(seconds, 4)]},
        )

    def _stage_failed(self, stage: Stage, seconds: float) -> None:
        """A stage run that ended in an error still counts: kept until the attempt's
        ending (failed, retrying, cancelled) writes it with the rest."""
        self.timings.setdefault(str(stage), []).append(round(seconds, 4))

    async def _timed(self, stage: Stage, work: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            result = await work
        except Exception:
            self._stage_failed(stage, time.perf_counter() - started)
            raise
        await self._stage_done(stage, time.perf_counter() - started)
        return result

    # -- the attempt ---------------------------------------------------------------------

    async def run(self) -> Outcome:
        row = await lease.acquire(self.ctx.db, self.job_id, self.token, self.ctx.lease_seconds)
        if row is None:
            log.info("job_not_runnable", job_id=self.job_id)
            return Outcome.SKIPPED
        self.attempt, self.priority = row["attempts"], row["priority"]
        self.progress_floor = float(row["overall_progress"])
        structlog.contextvars.bind_contextvars(job_id=self.job_id, attempt=self.attempt)
        self.doc = msgspec.convert({k: row[k] for k in DOCUMENT_FIELDS}, DocumentInfo)
        if row["cancel_requested"]:
            return await self._finish_cancelled("cancelled before processing started")
        max_attempts = self.ctx.settings.task_retry_max_attempts
        started = await record_progress(
            self.ctx.db,
            self.ctx.redis,
            self.job_id,
            status=JobStatus.RUNNING,
            stage=Stage.VALIDATE,
            stage_progress=0.0,
            overall_progress=self.progress_floor,
            message=f"started (attempt {self.attempt} of {max_attempts})",
            only_if_status=[JobStatus.QUEUED, JobStatus.RETRYING, JobStatus.RUNNING],
        )
        if started is None:
            return Outcome.SKIPPED
        self.ctx.running.add(self.job_id)
        self.ctx.metrics.running.inc()
        work = asyncio.create_task(self._ride_outages(), name=f"job-{self.job_id}")
        renewer = asyncio.create_task(self._renew(work), name=f"lease-{self.job_id}")
        try:
            try:
                async with asyncio.timeout(self.ctx.max_processing_seconds) as deadline:
                    return await work
            except TimeoutError:
                if not deadline.expired():
                    raise
                limit = self.ctx.max_processing_seconds
                raise PermanentError(
                    f"processing took longer than {limit:g} s (MAX_PROCESSING_TIME_MINUTES)",
                    code="processing_timeout",
                    details={"limit_seconds": limit},
                ) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.lease_lost and current is not None and not current.cancelling():
                log.warning("lease_lost", job_id=self.job_id)
                return Outcome.LEASE_LOST
            await asyncio.shield(self._release_for_shutdown())
            raise
        except LeaseLost:
            log.warning("lease_lost", job_id=self.job_id)
            return Outcome.LEASE_LOST
        except JobCancelled:
            return await self._finish_cancelled("cancelled")
        except PermanentError as exc:
            return await self._finish_failed(exc)
        except TransientError as exc:
            return await self._retry_or_fail(exc)
        except Exception as exc:  # a bug or an unforeseen dependency failure
            log.exception("job_crashed", job_id=self.job_id)
            return await self._retry_or_fail(
                TransientError(f"{type(exc).__name__}: {str(exc)[:300]}", code="internal_error")
            )
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            self.ctx.running.discard(self.job_id)
            self.ctx.metrics.running.dec()
            self._cleanup_files()
            structlog.contextvars.unbind_contextvars("job_id", "attempt")

    async def _ride_outages(self) -> Outcome:
        """The stages; a lost Postgres or S3 pauses them instead of failing the attempt.

        Once the database is back the lease is renewed (still ours: the reaper
        spared a worker whose heartbeat it saw) and the stages run again from
        their checkpoints, so nothing done is redone or written twice.
        """
        resumed = False
        while True:
            try:
                if resumed:
                    if not await lease.renew(
                        self.ctx.db, self.job_id, self.token, self.ctx.lease_seconds
                    ):
                        self.lease_lost = True
                        raise LeaseLost(self.job_id)
                    await self.check()
                return await self._stages()
            except Exception as exc:
                if is_database_outage(exc):
                    await self._await_database(exc)
                elif is_storage_outage(exc):
                    await self._await_storage(exc)
                else:
                    raise
                resumed = True

    async def _renew(self, work: asyncio.Task[Outcome]) -> None:
        interval = self.ctx.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                ok = await lease.renew(self.ctx.db, self.job_id, self.token, self.ctx.lease_seconds)
            except Exception as exc:  # Postgres briefly away: try again next tick
                outage = is_database_outage(exc)
                log.warning("lease_renew_failed", job_id=self.job_id, exc_info=not outage)
                continue
            if not ok:
                self.lease_lost = True
                work.cancel()
                return

    def _tmp_path(self) -> Path:
        return self.ctx.tmp_dir / f"{self.job_id}-{self.token.rsplit(':', 1)[-1]}.bin"

    def _cleanup_files(self) -> None:
        with contextlib.suppress(OSError):
            self._tmp_path().unlink(missing_ok=True)

    # -- stages --------------------------------------------------------------------------

    async def _stages(self) -> Outcome:
        ctx, doc = self.ctx, self.doc
        assert doc is not None
        stored = await self._load(Stage.CHUNK)
        parsed = _checkpointed(stored.get(0))
        if parsed is not None:
            await self.record(
                stage=Stage.CHUNK,
                stage_progress=1.0,
                overall_progress=sum(STAGE_WEIGHTS[Stage.CHUNK]),
                message="validate, extract and chunk already done; resuming",
            )
        else:
            path = self._tmp_path()
            validated = await self._timed(
                Stage.VALIDATE,
                validate_document(
                    ctx.s3,
                    ctx.settings.minio_bucket_name,
                    doc,
                    path,
                    max_bytes=ctx.settings.max_upload_size_bytes,
                    max_pdf_pages=ctx.settings.max_pdf_pages,
                    report=_Reporter(self, Stage.VALIDATE),
                ),
            )
            await ctx.db.execute(
                "UPDATE documents SET sha256 = $2, page_count = $3, updated_at = now() "
                "WHERE id = $1::uuid",
                doc.id,
                validated.sha256,
                validated.page_count,
            )
            original = await self._find_duplicate(validated.sha256)
            if original is not None:
                return await self._finish_deduplicated(original)
            await self.check()
            parsed = await self._parse(path)
            self._cleanup_files()
            if parsed.chars:
                await self._save(Stage.CHUNK, 0, _pack(parsed))
        self.warnings = list(parsed.warnings)
        if not parsed.chars:
            raise PermanentError(
                "no text could be extracted (a scanned PDF needs OCR, which is not supported)",
                code="no_text",
                details={"warnings": self.warnings[:20]},
            )
        chunks = parsed.chunks
        del parsed
        await self.check()

        done = {
            part: np.frombuffer(data, dtype=np.float32).reshape(-1, ctx.embedder.dim)
            for part, data in (await self._load(Stage.EMBED)).items()
        }

        async def keep(index: int, vectors: np.ndarray[Any, Any]) -> None:
            await self._save(
                Stage.EMBED, index, np.ascontiguousarray(vectors, np.float32).tobytes()
            )

        vectors = await self._timed(
            Stage.EMBED,
            embed_chunks(
                ctx.embedder,
                chunks,
                batch_size=ctx.settings.embedding_batch_size,
                report=_Reporter(self, Stage.EMBED),
                done=done,
                on_batch=keep,
            ),
        )
        await self.check()
        await self.record(
            stage=Stage.INDEX,
            stage_progress=0.0,
            overall_progress=STAGE_WEIGHTS[Stage.INDEX][0],
            message=f"indexing {len(chunks)} chunks",
        )
        started = time.perf_counter()
        index_seconds: list[float] = []

        async def commit(conn: Conn) -> ProgressEvent | None:
            await self._fence(conn)
            written = await write_chunks(conn, doc.id, doc.owner_id, chunks, vectors)
            index_seconds.append(time.perf_counter() - started)
            self.timings[str(Stage.INDEX)] = [round(index_seconds[0], 4)]
            await conn.execute(
                "UPDATE documents SET status = 'indexed', deduplicated_of = NULL, "
                "updated_at = now() WHERE id = $1::uuid",
                doc.id,
            )
            return await self._complete(
                conn,
                result={
                    "chunks": written,
                    "pages": _page_count(chunks),
                    "warnings": len(self.warnings),
                    "worker": self.ctx.worker_id,
                },
                message=f"indexed {written} chunks",
            )

        await self._transition(commit)
        self.ctx.metrics.stage_seconds.labels(str(Stage.INDEX)).observe(index_seconds[0])
        return Outcome.COMPLETED

    async def _parse(self, path: Path) -> Parsed:
        """Extract and chunk ``path`` in a limited child process (``workers/parse.py``),
        recording both stages' progress and timings."""
        ctx, doc = self.ctx, self.doc
        assert doc is not None
        settings = ctx.settings
        size, overlap = resolve_options(doc.processing_options, ctx.embedder.max_seq_length)
        reporters = {
            str(Stage.EXTRACT): _Reporter(self, Stage.EXTRACT),
            str(Stage.CHUNK): _Reporter(self, Stage.CHUNK),
        }
        started = time.perf_counter()
        extract_seconds: list[float] = []

        async def progress(stage: str, fraction: float, message: str) -> None:
            await reporters[stage].progress(fraction, message)

        async def extracted(seconds: float) -> None:
            extract_seconds.append(seconds)
            await reporters[str(Stage.EXTRACT)].progress(1.0, "extracted")
            await self._stage_done(Stage.EXTRACT, seconds)

        job = ParseJob(
            path=str(path),
            document_type=doc.document_type,
            chunk_size=size,
            chunk_overlap=overlap,
            tokenizer_path=str(model_dir() / "tokenizer.json"),
            limits=extract_limits(settings),
            memory_bytes=settings.parse_memory_limit_mb * MB,
            time_seconds=float(settings.parse_time_limit_seconds),
        )
        await reporters[str(Stage.EXTRACT)].progress(0.0, "extracting")
        try:
            parsed = await parse_in_child(
                job,
                ParseReporter(progress, reporters[str(Stage.EXTRACT)].boundary, extracted),
                children=ctx.parse_children,
            )
        except Exception:
            elapsed = time.perf_counter() - started - sum(extract_seconds)
            self._stage_failed(Stage.CHUNK if extract_seconds else Stage.EXTRACT, elapsed)
            raise
        if parsed.chars:
            await reporters[str(Stage.CHUNK)].progress(1.0, f"{len(parsed.chunks)} chunks")
            chunk_seconds = time.perf_counter() - started - sum(extract_seconds)
            await self._stage_done(Stage.CHUNK, chunk_seconds)
        return parsed

    async def _fence(self, conn: Conn) -> None:
        """Inside the final transaction: lock the job row, re-check lease and cancel."""
        await self._verify(conn, lock=True)

    async def _release(
        self,
        conn: Conn,
        *,
        warnings: list[Any] | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        """End this run inside the final transaction: free the lease, add the stage
        timings, write ``warnings``/``result`` where given, drop the checkpoints."""
        await conn.execute(
            f"""
            UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL,
                   {append_timings("$2")},
                   warnings = COALESCE($3::jsonb, warnings),
                   result = COALESCE($4::jsonb, result)
            WHERE id = $1::uuid
            """,
            self.job_id,
            self.timings,
            warnings,
            result,
        )
        await conn.execute("DELETE FROM job_checkpoints WHERE job_id = $1::uuid", self.job_id)

    async def _complete(
        self,
        conn: Conn,
        *,
        result: dict[str, Any],
        message: str,
        details: dict[str, Any] | None = None,
    ) -> ProgressEvent | None:
        await self._release(conn, warnings=self.warnings, result=result)
        return await record_progress(
            conn,
            None,
            self.job_id,
            status=JobStatus.COMPLETED,
            stage=Stage.INDEX,
            stage_progress=1.0,
            overall_progress=1.0,
            message=message,
            details={**result, **(details or {})},
            only_if_status=ACTIVE,
        )

    async def _find_duplicate(self, sha256: str) -> str | None:
        assert self.doc is not None
        found = await self.ctx.db.fetchval(
            """
            SELECT COALESCE(deduplicated_of, id)::text FROM documents
            WHERE owner_id = $1 AND sha256 = $2 AND status = 'indexed' AND id <> $3::uuid
              AND processing_options = $4::jsonb
            ORDER BY created_at LIMIT 1
            """,
            self.doc.owner_id,
            sha256,
            self.doc.id,
            self.doc.processing_options,
        )
        return str(found) if found is not None else None

    async def _finish_deduplicated(self, original: str) -> Outcome:
        doc = self.doc
        assert doc is not None

        async def commit(conn: Conn) -> ProgressEvent | None:
            await self._fence(conn)
            await conn.execute("DELETE FROM chunks WHERE document_id = $1::uuid", doc.id)
            await conn.execute(
                "UPDATE documents SET status = 'indexed', deduplicated_of = $2::uuid, "
                "updated_at = now() WHERE id = $1::uuid",
                doc.id,
                original,
            )
            return await self._complete(
                conn,
                result={
                    "deduplicated": True,
                    "document_id": original,
                    "worker": self.ctx.worker_id,
                },
                message=f"deduplicated: identical to document {original}",
                details={"deduplicated_of": original},
            )

        await self._transition(commit)
        return Outcome.DEDUPLICATED

    # -- endings -------------------------------------------------------------------------

    async def _finish_cancelled(self, message: str) -> Outcome:
        async def commit(conn: Conn) -> ProgressEvent | None:
            await self._release(conn)
            event = await record_progress(
                conn,
                None,
                self.job_id,
                status=JobStatus.CANCELLED,
                message=message,
                only_if_status=[JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.RETRYING],
            )
            if event is not None and self.doc is not None:
                await lease.settle_document(conn, uuid.UUID(self.doc.id), "cancelled")
            return event

        await self._transition(commit)
        return Outcome.CANCELLED

    async def _finish_failed(self, exc: SluiceError) -> Outcome:
        async def commit(conn: Conn) -> ProgressEvent | None:
            await self._release(conn, warnings=self.warnings)
            event = await record_progress(
                conn,
                None,
                self.job_id,
                status=JobStatus.FAILED,
                error_code=exc.code,
                error_message=exc.message,
                message=f"failed: {exc.message}",
                details=exc.details,
                only_if_status=ACTIVE,
            )
            if event is not None and self.doc is not None:
                await lease.settle_document(conn, uuid.UUID(self.doc.id), "failed")
            return event

        log.info("job_failed", job_id=self.job_id, code=exc.code, error=exc.message)
        await self._transition(commit)
        return Outcome.FAILED

    async def _retry_or_fail(self, exc: TransientError) -> Outcome:
        max_attempts = self.ctx.settings.task_retry_max_attempts
        if self.attempt >= max_attempts:
            exc.message = f"{exc.message} (gave up after {self.attempt} attempts)"
            return await self._finish_failed(exc)
        delay = min(
            self.ctx.retry_base_seconds * 2 ** (self.attempt - 1), self.ctx.retry_max_seconds
        )
        delay *= random.uniform(0.8, 1.2)  # noqa: S311  (jitter, not crypto)

        async def commit(conn: Conn) -> ProgressEvent | None:
            await conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL, "
                f"{append_timings('$2')} WHERE id = $1::uuid",
                self.job_id,
                self.timings,
            )
            return await record_progress(
                conn,
                None,
                self.job_id,
                status=JobStatus.RETRYING,
                message=f"{exc.message}; retry {self.attempt + 1} of {max_attempts} "
                f"in {delay:.1f} s",
                details={"error_code": exc.code, "retry_in_seconds": round(delay, 2)},
                only_if_status=ACTIVE,
            )

        if await self._transition(commit) is None:
            return Outcome.LEASE_LOST
        log.info("job_retrying", job_id=self.job_id, code=exc.code, delay_s=round(delay, 2))
        raise RetryLater(JobQueue.retry_defer_ms(self.priority, delay))

    async def _release_for_shutdown(self) -> None:
        """The worker is stopping: hand the job back without spending an attempt."""

        async def commit(conn: Conn) -> ProgressEvent | None:
            released = await conn.fetchval(
                "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL, "
                "attempts = greatest(attempts - 1, 0) "
                "WHERE id = $1::uuid AND lease_owner = $2 AND status = 'running' RETURNING true",
                self.job_id,
                self.token,
            )
            if not released:
                return None
            return await record_progress(
                conn,
                None,
                self.job_id,
                status=JobStatus.QUEUED,
                message="worker shutting down; job requeued",
                only_if_status=ACTIVE,
            )

        try:
            await self._transition(commit, ride=False)  # never hold up a shutdown
        except Exception:
            log.warning("release_failed", job_id=self.job_id, exc_info=True)


def _checkpointed(data: bytes | None) -> Parsed | None:
    """The stored parse of an earlier attempt, if any (one of an older format: None)."""
    if data is None:
        return None
    try:
        return _unpack_parsed(data)
    except msgspec.DecodeError:
        return None


def _page_count(chunks: list[Chunk]) -> int:
    return len({p for c in chunks for p in range(c.page_start, c.page_end + 1)})


async def process_document(ctx: dict[str, Any], job_id: str) -> str:
    """The ARQ job function (registered as :data:`~app.core.queue.PROCESS_FUNCTION`)."""
    wctx: WorkerContext = ctx["sluice"]
    try:
        outcome = await JobRun(wctx, job_id).run()
    except RetryLater as retry:
        wctx.metrics.jobs.labels(Outcome.RETRYING).inc()
        raise Retry(defer=retry.defer_ms / 1000) from None
    except Exception as exc:
        if not is_database_outage(exc):
            raise
        # Postgres was away before the job was taken (or its start recorded):
        # leave it queued in ARQ; the table still says it is waiting.
        log.warning("database_unavailable_job_deferred", job_id=job_id, error=type(exc).__name__)
        wctx.metrics.jobs.labels(Outcome.REQUEUED).inc()
        raise Retry(defer=OUTAGE_RETRY_SECONDS) from None
    wctx.metrics.jobs.labels(outcome).inc()
    return str(outcome)


def _cause(exc: BaseException) -> str:
    """The innermost exception's type name (what a log line says went wrong)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return type(exc).__name__
