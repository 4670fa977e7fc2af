"""Worker memory on a long document: the streaming parse against the code before it.

    python bench/longdoc.py [--pages 2000] [--small-pages 20] [--baseline-ref REF]
                            [--no-baseline] [--report FILE]

Starts its own embedded stack (Postgres+pgvector, Redis, S3 API server), writes
a ``--pages`` text PDF (about 2,700 characters a page, like a book) and
a ``--small-pages`` one, and runs each through a real worker process
(``python -m workers``, ``MAX_CONCURRENT_TASKS=1``) twice in the same run:

* **baseline**: the tree of ``--baseline-ref`` (default: the commit before
  pages were streamed into the chunker), exported with ``git archive`` and run
  with the same Python and packages;
* **streaming**: this checkout.

For each, after the worker is ready (model loaded) it runs the small document
once as a warm-up, then takes the worker's **idle RSS** (``VmRSS``), resets
its peak (``/proc/PID/clear_refs``) and measures the peak RSS (``VmHWM``) of
the worker while it runs the small document, then the long one, each above
idle; and the peak RSS of the parse child (sampled every 5 ms: its
``VmHWM``, which only grows, until it exits).  Target: the worker within 300 MB
above idle on the long document.  It also checks that both trees stored the
same chunks (offsets, pages, hashes) for the long document.

Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from app.core.db import create_pool, migrate_dsn  # noqa: E402
from app.core.queue import JobQueue, Priority, connect_redis  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from app.core.storage import ensure_bucket, open_s3  # noqa: E402
from app.jobs.documents import create_document, create_job, object_key_for  # noqa: E402
from app.jobs.model import JobStatus  # noqa: E402
from devstack.process import free_port  # noqa: E402
from devstack.stack import EmbeddedStack  # noqa: E402

BASELINE_REF = "a1f6fbdd9bbe0dc3e60dc829122f9ee08003a42d"
"""The last commit whose parse child joined every page before chunking."""
SECRET = "bench-secret-" + "x" * 32
MB = 1024 * 1024
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
    """A text PDF of ``pages`` pages, 6 paragraphs of 4 sentences (~2,700 characters)
    each, written directly (fpdf2 needs minutes for 2,000 pages): one Helvetica
    line a sentence, a gap between paragraphs."""
    rng = random.Random(seed)
    count = 3 + 2 * pages
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids ["
        + b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(pages))
        + b"] /Count %d >>" % pages,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for p in range(1, pages + 1):
        lines = [b"BT /F1 7 Tf 9 TL 20 820 Td"]
        for para in range(6):
            for s in range(4):
                words = " ".join(rng.choice(WORDS) for _ in range(14))
                sentence = f"Page {p} paragraph {para} sentence {s}: {words}."
                lines.append(b"(" + sentence.encode() + b") Tj T*")
            lines.append(b"T* T*")
        lines.append(b"ET")
        stream = b"\n".join(lines)
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (5 + 2 * (p - 1))
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    assert len(objects) == count
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (count + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (count + 1, xref)
    return bytes(out)


# --- /proc ---------------------------------------------------------------------------


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (0 once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> None:
    """Set the process's ``VmHWM`` back to its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def children_of(pid: int) -> set[int]:
    """The parse children of ``pid`` (``python -m workers.parse``; a child still
    between fork and exec is the worker's copy, not counted)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    parse = set()
    for child in found:
        try:
            if b"workers.parse" in Path(f"/proc/{child}/cmdline").read_bytes():
                parse.add(child)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return parse


class ChildPeaks:
    """Samples the peak RSS (``VmHWM``) of every child of ``pid`` until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChildPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for child in children_of(self.pid):
                hwm = status_kb(child, "VmHWM")
                if hwm > self.peaks.get(child, 0):
                    self.peaks[child] = hwm
            time.sleep(0.005)

    def max_mb(self) -> float:
        return max(self.peaks.values(), default=0) / 1024


# --- one document through the worker -------------------------------------------------


@dataclass
class Run:
    pages: int
    seconds: float
    chunks: int
    worker_peak_mb: float
    """Worker VmHWM above its idle VmRSS."""
    child_peak_mb: float
    """The largest parse child's VmHWM (absolute: it is a separate process)."""
    document_id: str


async def run_document(settings: Settings, pid: int, pdf: bytes, pages: int, idle_kb: int) -> Run:
    """Store ``pdf``, enqueue its job and wait for it; peaks measured while it runs."""
    pool = await create_pool(settings.database_url.reveal(), max_size=2)
    redis = await connect_redis(settings.redis_url.reveal())
    owner = f"longdoc-{uuid.uuid4().hex[:8]}"
    try:
        async with open_s3(settings) as s3:
            async with pool.acquire() as conn, conn.transaction():
                doc_id = await create_document(
                    conn,
                    owner_id=owner,
                    filename="long.pdf",
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
        reset_peak_rss(pid)
        with ChildPeaks(pid) as children:
            t0 = time.perf_counter()
            await JobQueue(redis).enqueue(job_id, Priority.NORMAL)
            while True:
                row = await pool.fetchrow(
                    "SELECT status, result, error_message FROM jobs WHERE id = $1::uuid", job_id
                )
                assert row is not None
                if row["status"] in ("completed", "failed"):
                    break
                await asyncio.sleep(0.05)
            seconds = time.perf_counter() - t0
        if row["status"] != "completed":
            raise SystemExit(f"job failed: {row['error_message']}")
        return Run(
            pages=pages,
            seconds=seconds,
            chunks=int(row["result"]["chunks"]),
            worker_peak_mb=(status_kb(pid, "VmHWM") - idle_kb) / 1024,
            child_peak_mb=children.max_mb(),
            document_id=doc_id,
        )
    finally:
        await redis.aclose()
        await pool.close()


async def chunk_plan(settings: Settings, document_id: str) -> list[tuple[Any, ...]]:
    pool = await create_pool(settings.database_url.reveal(), max_size=1)
    try:
        rows = await pool.fetch(
            "SELECT seq, char_start, char_end, page_start, page_end, token_count, sha256 "
            "FROM chunks WHERE document_id = $1::uuid ORDER BY seq",
            document_id,
        )
    finally:
        await pool.close()
    return [tuple(r) for r in rows]


@dataclass
class Variant:
    name: str
    tree: Path
    idle_start_mb: float = 0.0
    idle_mb: float = 0.0
    spare_child_mb: float = 0.0
    runs: list[Run] = field(default_factory=list)


async def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(1500):
            if proc.poll() is not None:
                raise SystemExit(f"worker exited with {proc.returncode}")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health", timeout=1)).is_success:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("worker not ready")


async def measure(
    variant: Variant, env: dict[str, str], settings: Settings, docs: list[tuple[int, bytes]]
) -> None:
    """Start a worker from ``variant.tree``, warm it up, run ``docs`` (small, long)."""
    port = free_port()
    log_path = Path(env["BENCH_TMP"]) / f"worker-{variant.name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "workers"],
            cwd=variant.tree,
            env={**env, "PYTHONPATH": str(variant.tree), "WORKER_METRICS_PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await wait_ready(port, proc)
            await asyncio.sleep(1)
            variant.idle_start_mb = status_kb(proc.pid, "VmRSS") / 1024
            small_pages, small = docs[0]
            await run_document(settings, proc.pid, small, small_pages, 0)  # warm-up
            await asyncio.sleep(1)
            idle_kb = status_kb(proc.pid, "VmRSS")
            variant.idle_mb = idle_kb / 1024
            variant.spare_child_mb = max(
                (status_kb(c, "VmRSS") / 1024 for c in children_of(proc.pid)), default=0.0
            )
            for pages, pdf in docs:
                variant.runs.append(await run_document(settings, proc.pid, pdf, pages, idle_kb))
                print(
                    f"  {variant.name}: {pages} pages in {variant.runs[-1].seconds:.1f} s, "
                    f"worker +{variant.runs[-1].worker_peak_mb:.0f} MB, "
                    f"parse child {variant.runs[-1].child_peak_mb:.0f} MB",
                    flush=True,
                )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def export_tree(ref: str, into: Path) -> Path:
    """The source tree of ``ref`` (``git archive``), for the baseline worker."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


async def main_async(args: argparse.Namespace) -> list[str]:
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory(prefix="sluice-longdoc-") as tmpdir:
        tmp = Path(tmpdir)
        variants = [Variant("streaming", ROOT)]
        if not args.no_baseline:
            variants.insert(0, Variant("baseline", export_tree(args.baseline_ref, tmp / "base")))
        t = time.perf_counter()
        docs = [
            (args.small_pages, make_pdf(args.small_pages, 1)),
            (args.pages, make_pdf(args.pages, 2)),
        ]
        print(
            f"PDFs written in {time.perf_counter() - t:.1f} s "
            f"({len(docs[1][1]) / MB:.1f} MB for {args.pages} pages)",
            flush=True,
        )
        with EmbeddedStack.in_dir(tmp / "stack", durable=False) as stack:
            env = {
                **stack.environ(bucket="bench"),
                "JWT_SECRET": SECRET,
                "LOG_LEVEL": "WARNING",
                "LOG_FORMAT": "json",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PATH": os.environ["PATH"],
                "MAX_CONCURRENT_TASKS": "1",
                "MAX_PROCESSING_TIME_MINUTES": "120",
                "PARSE_TIME_LIMIT_SECONDS": "3600",
                "BENCH_TMP": str(tmp),
            }
            settings = Settings.from_environ(env)
            await migrate_dsn(settings.database_url.reveal())
            async with open_s3(settings) as s3:
                await ensure_bucket(s3, settings.minio_bucket_name)
            for variant in variants:
                await measure(variant, env, settings, docs)
            plans = [await chunk_plan(settings, v.runs[-1].document_id) for v in variants]
        load = os.getloadavg()
        say(
            f"## Long document: {args.pages}-page text PDF ({len(docs[1][1]) / MB:.1f} MB), "
            f"one worker, MAX_CONCURRENT_TASKS=1, load average {load[0]:.1f}"
        )
        say("")
        say(
            "| code | worker idle (model loaded) | worker peak above idle, "
            f"{args.small_pages} p | worker peak above idle, {args.pages} p | parse child peak, "
            f"{args.small_pages} p | parse child peak, {args.pages} p | {args.pages} p time |"
        )
        say("|---|---|---|---|---|---|---|")
        for v in variants:
            small, long = v.runs
            say(
                f"| {v.name} | {v.idle_mb:.0f} MB ({v.idle_start_mb:.0f} MB before any job) | "
                f"+{small.worker_peak_mb:.0f} MB | +{long.worker_peak_mb:.0f} MB | "
                f"{small.child_peak_mb:.0f} MB | {long.child_peak_mb:.0f} MB "
                f"(idle spare {v.spare_child_mb:.0f} MB) | {long.seconds:.1f} s, "
                f"{long.chunks} chunks |"
            )
        say("")
        after = variants[-1].runs[-1]
        say(
            f"streaming: worker +{after.worker_peak_mb:.0f} MB above idle on {args.pages} pages "
            f"(target <= 300 MB): {'met' if after.worker_peak_mb <= 300 else 'NOT met'}"
        )
        if len(variants) == 2:
            before = variants[0].runs[-1]
            say(
                f"ratios streaming/baseline on {args.pages} pages: worker peak above idle "
                f"{after.worker_peak_mb / max(before.worker_peak_mb, 1):.2f}, parse child peak "
                f"{after.child_peak_mb / max(before.child_peak_mb, 1):.2f}, time "
                f"{after.seconds / before.seconds:.2f}"
            )
            say(f"chunks identical in both trees: {'yes' if plans[0] == plans[1] else 'NO'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--small-pages", type=int, default=20)
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    lines = asyncio.run(main_async(args))
    if args.report:
        cmd = "python bench/longdoc.py " + " ".join(sys.argv[1:])
        args.report.write_text(
            f"# Long document benchmark\n\nCommand: `{cmd}`\n\n" + "\n".join(lines) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
