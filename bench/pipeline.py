"""Pipeline and queue benchmarks, each against a baseline in the same run.

    python bench/pipeline.py [--pages 200] [--reps 2] [--latency-jobs 50]
                             [--noop-jobs 2000] [--report FILE]

Starts its own embedded stack (Postgres+pgvector, Redis, S3 API server) and a
real worker process (``python -m workers``), then measures:

1. **Document throughput.**  A generated ``--pages`` text PDF goes through the
   worker (enqueue -> completed: download + sha256, validate, extract, chunk,
   embed, index, progress events, checkpoints, leases).  The baseline does the
   same work directly in this process: pypdf page by page, the same chunker,
   ``model.encode`` with the same batch size, one binary COPY in one
   transaction.  Runs alternate (``--reps`` each) and the best of each is
   compared; target ratio >= 0.9.
2. **Enqueue-to-start latency** on an idle worker: tiny jobs one at a time,
   from ``JobQueue.enqueue`` to the worker's ``running`` event (p50 < 20 ms).
3. **No-op jobs per second** through the priority queue (``JobQueue`` +
   the production worker settings) against plain ARQ (``enqueue_job`` +
   ``Worker`` defaults) on the same Redis, same ``max_jobs`` and poll delay
   (target ratio >= 0.8).

Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from arq.worker import Worker, func  # noqa: E402
from fpdf import FPDF  # noqa: E402

from app.core.db import create_pool, migrate_dsn  # noqa: E402
from app.core.embedding import LocalEmbedder, load_tokenizer  # noqa: E402
from app.core.queue import PROCESS_FUNCTION, JobQueue, Priority, connect_redis  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from app.core.storage import ensure_bucket, open_s3  # noqa: E402
from app.jobs.documents import create_document, create_job, object_key_for  # noqa: E402
from app.jobs.events import decode_event, job_channel  # noqa: E402
from app.jobs.model import JobStatus  # noqa: E402
from devstack.process import free_port  # noqa: E402
from devstack.stack import EmbeddedStack  # noqa: E402
from workers.stages.chunk import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE, chunk_pages  # noqa: E402
from workers.stages.common import PageText  # noqa: E402
from workers.stages.index import write_chunks  # noqa: E402
from workers.stages.pdf import extract_pdf_page, open_pdf  # noqa: E402

SECRET = "bench-secret-" + "x" * 32
WORDS = [
    "river",
    "stone",
    "market",
    "engine",
    "garden",
    "signal",
    "harbor",
    "lantern",
    "meadow",
    "circuit",
    "valley",
    "copper",
    "theory",
    "window",
    "planet",
    "orchard",
    "silver",
    "bridge",
    "canvas",
    "thunder",
]


def make_pdf(pages: int, seed: int) -> bytes:
    rng = random.Random(seed)
    pdf = FPDF()
    pdf.set_auto_page_break(auto=False)
    pdf.set_font("helvetica", size=10)
    for p in range(1, pages + 1):
        pdf.add_page()
        pdf.set_xy(10, 10)
        for para in range(6):
            sentences = [
                f"Page {p} paragraph {para} sentence {s}: "
                + " ".join(rng.choice(WORDS) for _ in range(12))
                + "."
                for s in range(4)
            ]
            pdf.multi_cell(190, 5, " ".join(sentences))
            pdf.ln(2)
    return bytes(pdf.output())


# --- 1. document throughput --------------------------------------------------------


async def baseline(
    pdf: bytes, model: LocalEmbedder, settings: Settings, owner: str, tmp: Path
) -> dict[str, float]:
    """The same work, directly: pypdf, the chunker, model.encode, one COPY."""
    times: dict[str, float] = {}
    path = tmp / f"baseline-{uuid.uuid4().hex}.pdf"
    path.write_bytes(pdf)
    t0 = time.perf_counter()
    reader = open_pdf(path)
    pages = [PageText(i + 1, extract_pdf_page(reader, i)[0]) for i in range(len(reader.pages))]
    times["extract"] = time.perf_counter() - t0
    t = time.perf_counter()
    chunks = chunk_pages(
        pages, load_tokenizer(), chunk_size=DEFAULT_CHUNK_SIZE, chunk_overlap=DEFAULT_CHUNK_OVERLAP
    )
    times["chunk"] = time.perf_counter() - t
    t = time.perf_counter()
    vectors = model.encode_sync([c.text for c in chunks])
    times["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    pool = await create_pool(settings.database_url.reveal(), max_size=2)
    try:
        doc_id = await create_document(
            pool,
            owner_id=owner,
            filename="b.pdf",
            content_type="application/pdf",
            document_type="pdf",
            size_bytes=len(pdf),
            status="stored",
        )
        t = time.perf_counter()
        async with pool.acquire() as conn, conn.transaction():
            await write_chunks(conn, doc_id, owner, chunks, vectors)
        times["index"] = time.perf_counter() - t
    finally:
        await pool.close()
    times["total"] = time.perf_counter() - t0
    times["chunks"] = len(chunks)
    path.unlink()
    return times


async def through_worker(pdf: bytes, settings: Settings, owner: str) -> dict[str, float]:
    pool = await create_pool(settings.database_url.reveal(), max_size=2)
    redis = await connect_redis(settings.redis_url.reveal())
    try:
        async with open_s3(settings) as s3:
            async with pool.acquire() as conn, conn.transaction():
                doc_id = await create_document(
                    conn,
                    owner_id=owner,
                    filename="w.pdf",
                    content_type="application/pdf",
                    document_type="pdf",
                    size_bytes=len(pdf),
                    status="stored",
                )
                job_id = await create_job(
                    conn, owner_id=owner, document_id=doc_id, status=JobStatus.QUEUED
                )
            await s3.put_object(
                Bucket=settings.minio_bucket_name, Key=object_key_for(doc_id), Body=pdf
            )
        t0 = time.perf_counter()
        await JobQueue(redis).enqueue(job_id, Priority.NORMAL)
        while True:
            row = await pool.fetchrow(
                "SELECT status, stage_timings, result, error_message FROM jobs WHERE id = $1::uuid",
                job_id,
            )
            assert row is not None
            if row["status"] in ("completed", "failed"):
                break
            await asyncio.sleep(0.02)
        total = time.perf_counter() - t0
        if row["status"] != "completed":
            raise SystemExit(f"pipeline job failed: {row['error_message']}")
        return {
            **{k: float(sum(v)) for k, v in row["stage_timings"].items()},
            "total": total,
            "chunks": float(row["result"]["chunks"]),
        }
    finally:
        await redis.aclose()
        await pool.close()


# --- 2. enqueue-to-start latency ---------------------------------------------------


async def latency(settings: Settings, jobs: int) -> list[float]:
    pool = await create_pool(settings.database_url.reveal(), max_size=2)
    redis = await connect_redis(settings.redis_url.reveal())
    queue = JobQueue(redis)
    out: list[float] = []
    try:
        async with open_s3(settings) as s3:
            for i in range(jobs):
                owner = f"lat-{uuid.uuid4().hex[:6]}"
                doc_id = await create_document(
                    pool,
                    owner_id=owner,
                    filename="t.txt",
                    content_type="text/plain",
                    document_type="txt",
                    size_bytes=20,
                    status="stored",
                )
                job_id = await create_job(
                    pool, owner_id=owner, document_id=doc_id, status=JobStatus.QUEUED
                )
                await s3.put_object(
                    Bucket=settings.minio_bucket_name,
                    Key=object_key_for(doc_id),
                    Body=f"tiny note {i}".encode(),
                )
                pubsub = redis.pubsub()
                await pubsub.subscribe(job_channel(job_id))
                t0 = time.time()
                await queue.enqueue(job_id, Priority.NORMAL)
                started = None
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if msg is None:  # nothing yet (or the subscribe confirmation)
                        continue
                    event = decode_event(msg["data"])
                    if started is None and event.status == "running":
                        started = event.ts
                    if event.terminal:
                        break
                if started is None:
                    raise SystemExit("no running event within 10 s")
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                out.append((started - t0) * 1000)
    finally:
        await redis.aclose()
        await pool.close()
    return out


# --- 3. no-op jobs per second ------------------------------------------------------


async def _noop(ctx: dict[str, Any], job_id: str) -> None:
    return None


async def noop_rate(settings: Settings, jobs: int, *, ours: bool) -> tuple[float, float, float]:
    """(enqueue jobs/s, drain jobs/s, end-to-end jobs/s)."""
    redis = await connect_redis(settings.redis_url.reveal())
    qname = f"bench:{'prio' if ours else 'plain'}:{uuid.uuid4().hex[:6]}"
    queue = JobQueue(redis, queue_name=qname)
    prios = list(Priority)
    try:
        t0 = time.perf_counter()
        for i in range(jobs):
            job_id = f"{qname}:{i}"
            if ours:
                await queue.enqueue(job_id, prios[i % 4])
            else:
                await redis.enqueue_job(PROCESS_FUNCTION, job_id, _job_id=job_id, _queue_name=qname)
        t1 = time.perf_counter()
        options: dict[str, Any] = {
            "queue_name": qname,
            "redis_pool": redis,
            "burst": True,
            "max_jobs": 10,
            # ARQ's own poll loop on both sides, at the 10 ms it ran before wake-ups
            # (bench/wake.py compares the production worker's wake-ups with it).
            "poll_delay": 0.01,
            "handle_signals": False,
        }
        if ours:  # the production settings (workers/runtime.py)
            options.update(
                keep_result=0,
                allow_abort_jobs=True,
                max_tries=1000,
                queue_read_limit=100,
                health_check_interval=10,
            )
        worker = Worker(functions=[func(_noop, name=PROCESS_FUNCTION)], **options)
        await worker.async_run()
        t2 = time.perf_counter()
        assert worker.jobs_complete == jobs, worker
    finally:
        await redis.aclose()
    return jobs / (t1 - t0), jobs / (t2 - t1), jobs / (t2 - t0)


# --- orchestration -----------------------------------------------------------------


async def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"worker exited with {proc.returncode}")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health", timeout=1)).is_success:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("worker not ready")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main_async(args: argparse.Namespace) -> list[str]:
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmpdir:
        tmp = Path(tmpdir)
        with EmbeddedStack.in_dir(tmp / "stack", durable=False) as stack:
            env = {
                **stack.environ(bucket="bench"),
                "JWT_SECRET": SECRET,
                "LOG_LEVEL": "WARNING",
                "LOG_FORMAT": "json",
                "HF_HUB_OFFLINE": "1",
                "PATH": os.environ["PATH"],
                "MAX_CONCURRENT_TASKS": "1",
            }
            settings = Settings.from_environ(env)
            await migrate_dsn(settings.database_url.reveal())
            async with open_s3(settings) as s3:
                await ensure_bucket(s3, settings.minio_bucket_name)
            port = free_port()
            log = (tmp / "worker.log").open("wb")
            proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "workers"],
                cwd=ROOT,
                env={**env, "WORKER_METRICS_PORT": str(port)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                model = await LocalEmbedder.load_async(batch_size=settings.embedding_batch_size)
                await wait_ready(port, proc)
                say(
                    f"## Pipeline: {args.pages}-page text PDF, chunk 256/32 tokens, "
                    f"batch {settings.embedding_batch_size}, MAX_CONCURRENT_TASKS=1"
                )
                base_runs, work_runs = [], []
                for rep in range(args.reps):
                    pdf = make_pdf(args.pages, seed=rep)
                    owner = f"bench-{uuid.uuid4().hex[:6]}"
                    work_runs.append(await through_worker(pdf, settings, owner))
                    base_runs.append(await baseline(pdf, model, settings, owner + "-b", tmp))
                    say(
                        f"rep {rep + 1}: worker {work_runs[-1]['total']:.2f} s, "
                        f"baseline {base_runs[-1]['total']:.2f} s"
                    )
                b = min(base_runs, key=lambda r: r["total"])
                w = min(work_runs, key=lambda r: r["total"])
                say("")
                say("| stage | worker (s) | baseline (s) |")
                say("|---|---|---|")
                for stage in ("validate", "extract", "chunk", "embed", "index"):
                    say(
                        f"| {stage} | {w.get(stage, 0):.3f} | "
                        f"{b.get(stage, 0) if stage != 'validate' else 0:.3f} |"
                    )
                say(f"| **total** | {w['total']:.3f} | {b['total']:.3f} |")
                say("")
                say(f"chunks: worker {int(w['chunks'])}, baseline {int(b['chunks'])}")
                say(
                    f"throughput: worker {args.pages / w['total']:.1f} pages/s, "
                    f"baseline {args.pages / b['total']:.1f} pages/s; "
                    f"ratio {b['total'] / w['total']:.3f} (target >= 0.9)"
                )

                say("")
                say(f"## Enqueue-to-start latency, idle worker ({args.latency_jobs} jobs)")
                lat = await latency(settings, args.latency_jobs)
                say(
                    f"p50 {statistics.median(lat):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, "
                    f"max {max(lat):.1f} ms (target p50 < 20 ms)"
                )
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()

            say("")
            say(
                f"## No-op jobs/s, priority queue vs plain ARQ ({args.noop_jobs} jobs, "
                "max_jobs 10, same Redis)"
            )
            say("| queue | enqueue/s | drain/s | end-to-end/s |")
            say("|---|---|---|---|")
            results: dict[str, tuple[float, float, float]] = {}
            for name, ours in (
                ("plain ARQ", False),
                ("priority", True),
                ("plain ARQ", False),
                ("priority", True),
            ):
                rate = await noop_rate(settings, args.noop_jobs, ours=ours)
                best = results.get(name)
                results[name] = rate if best is None or rate[2] > best[2] else best
            for name, (enq, drain, e2e) in results.items():
                say(f"| {name} (best of 2) | {enq:.0f} | {drain:.0f} | {e2e:.0f} |")
            say(
                f"ratio (end-to-end) {results['priority'][2] / results['plain ARQ'][2]:.3f} "
                "(target >= 0.8)"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--latency-jobs", type=int, default=50)
    parser.add_argument("--noop-jobs", type=int, default=2000)
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    lines = asyncio.run(main_async(args))
    if args.report:
        cmd = "python bench/pipeline.py " + " ".join(sys.argv[1:])
        args.report.write_text(
            f"# Pipeline benchmark\n\nCommand: `{cmd}`\n\n" + "\n".join(lines) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
