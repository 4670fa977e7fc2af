"""Fixtures for the queue and pipeline tests.

* PDF builders (fpdf2 for text pages with known sentences, pypdf to encrypt);
* ``embedder`` -- the real all-MiniLM-L6-v2 model, loaded once per session;
* ``worker_ctx`` -- a worker's collaborators against the test stack, with
  short leases and retry delays so failure tests stay fast;
* ``make_job`` -- a document with its bytes in S3 and a queued job
  (through ``create_document``/``create_job``, not the uploads API);
* ``worker_procs`` -- launches real ``python -m workers`` processes and always
  stops them (SIGKILL at teardown if they linger).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio
from fpdf import FPDF
from pypdf import PdfReader, PdfWriter

from app.core.embedding import LocalEmbedder
from app.core.queue import Priority
from app.core.settings import Settings
from app.gateway.services import Services
from app.jobs.documents import create_document, create_job, object_key_for
from app.jobs.events import decode_event, stream_key
from app.jobs.model import JobStatus, ProgressEvent
from app.jobs.transitions import job_snapshot
from devstack.process import free_port
from workers.context import WorkerContext
from workers.runtime import open_worker_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def page_sentence(page: int, line: int) -> str:
    return f"Page {page} line {line} talks about topic {page * 100 + line}."


def make_pdf(pages: list[list[str]]) -> bytes:
    """A text PDF, one list of paragraphs per page."""
    pdf = FPDF()
    pdf.set_auto_page_break(auto=False)
    pdf.set_font("helvetica", size=11)
    for paragraphs in pages:
        pdf.add_page()
        pdf.set_xy(10, 10)
        for para in paragraphs:
            pdf.multi_cell(190, 6, para)
            pdf.ln(3)
    return bytes(pdf.output())


def encrypt_pdf(
    data: bytes, *, user_password: str, owner_password: str = "owner-pw", algorithm: str = "AES-256"
) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


TOPIC_PAGES = [
    [
        "Volcanoes form where magma rises through the crust. Basalt lava flows are fluid.",
        "Pyroclastic flows are fast clouds of hot gas and ash.",
    ],
    [
        "The French Revolution began in 1789 with the storming of the Bastille.",
        "The monarchy was abolished and a republic proclaimed in 1792.",
    ],
    [
        "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
        "Chlorophyll in the chloroplasts absorbs red and blue light.",
    ],
    [
        "Sourdough bread rises thanks to wild yeast and lactic acid bacteria.",
        "A long cold fermentation develops a sour flavour and an open crumb.",
    ],
]


@pytest_asyncio.fixture(scope="session")
async def embedder() -> LocalEmbedder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return await LocalEmbedder.load_async(batch_size=64)


@pytest_asyncio.fixture(scope="session")
async def worker_ctx(migrated: Settings, embedder: LocalEmbedder) -> AsyncIterator[WorkerContext]:
    async with open_worker_context(
        migrated,
        embedder=embedder,
        worker_id="test-worker",
        lease_seconds=3.0,
        retry_base_seconds=0.05,
        retry_max_seconds=0.2,
        progress_interval_seconds=0.0,
    ) as ctx:
        yield ctx


@dataclass
class MadeJob:
    document_id: str
    job_id: str
    owner_id: str


MakeJob = Callable[..., Awaitable[MadeJob]]


@pytest.fixture
def make_job(services: Services, user: str) -> MakeJob:
    async def make(
        data: bytes,
        document_type: str = "pdf",
        *,
        owner: str | None = None,
        priority: Priority = Priority.NORMAL,
        options: dict[str, Any] | None = None,
        checksum: str | None = None,
        filename: str | None = None,
        store: bool = True,
    ) -> MadeJob:
        owner_id = owner or user
        async with services.db.acquire() as conn, conn.transaction():
            doc_id = await create_document(
                conn,
                owner_id=owner_id,
                filename=filename or f"doc.{document_type}",
                content_type="application/octet-stream",
                document_type=document_type,
                size_bytes=len(data),
                processing_options=options,
                checksum_sha256=checksum,
                status="stored",
            )
            job_id = await create_job(
                conn,
                owner_id=owner_id,
                document_id=doc_id,
                priority=priority,
                status=JobStatus.QUEUED,
            )
        if store:
            await services.s3.put_object(
                Bucket=services.settings.minio_bucket_name, Key=object_key_for(doc_id), Body=data
            )
        return MadeJob(doc_id, job_id, owner_id)

    return make


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def wait_for_status(db: Any, job_id: str, statuses: set[str], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        snap = await job_snapshot(db, job_id)
        if snap is not None and snap.status in statuses:
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {snap.status if snap else None!r}")
        await asyncio.sleep(0.05)


class WorkerProcs:
    """Real worker processes, always stopped at teardown."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self._env = env
        self._log_dir = log_dir
        self.procs: list[tuple[subprocess.Popen[bytes], int]] = []
        self.logs: dict[int, Path] = {}

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")[-3000:]

    def start(self, **extra: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        env = {
            **self._env,
            "WORKER_METRICS_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            **extra,
        }
        log_path = self._log_dir / f"worker-{port}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers"],
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.logs[proc.pid] = log_path
        self.procs.append((proc, port))
        return proc, port

    async def wait_ready(
        self, port: int, proc: subprocess.Popen[bytes], timeout: float = 90
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AssertionError(f"worker exited {proc.returncode}: {self.log_of(proc)}")
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/health", timeout=1)
                    if r.status_code == 200:
                        body: dict[str, Any] = r.json()
                        return body
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError("worker did not become ready")

    def stop_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def worker_procs(
    settings_env: dict[str, str], migrated: Settings, tmp_path: Path
) -> Iterator[WorkerProcs]:
    procs = WorkerProcs(settings_env, tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


class EmbeddingEndpoint:
    """A real OpenAI-compatible ``/v1/embeddings`` HTTP server on loopback, backed
    by the real model, answering with scripted statuses first (503, 429...)."""

    def __init__(self, model: LocalEmbedder, statuses: list[int]) -> None:
        self._model = model
        self.statuses = list(statuses)
        self.calls = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> EmbeddingEndpoint:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.calls += 1
                status = self.statuses.pop(0) if self.statuses else 200
                if status == 200:
                    texts = msgspec.json.decode(body)["input"]
                    vecs = await self._model.embed(texts)
                    payload = msgspec.json.encode(
                        {
                            "data": [
                                {"index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)
                            ]
                        }
                    )
                else:
                    payload = b'{"error": "busy"}'
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def stream_events(redis: Any, job_id: str) -> list[ProgressEvent]:
    entries = await redis.xrange(stream_key(job_id))
    return [decode_event(fields[b"e"]) for _, fields in entries]
