"""A real tus client (tuspy) against a real gateway process: interrupted, resumed from
a new client instance through the URL it stored, with and without ``Upload-Checksum``,
and the job it started runs to ``completed``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fpdf import FPDF
from tusclient.client import TusClient
from tusclient.storage.filestorage import FileStorage

from app.gateway.services import Services
from tests.fixtures_uploads import PART, MiB, s3_object
from workers.context import WorkerContext
from workers.run import JobRun, Outcome

CHUNK = 2 * MiB + 123
"""tuspy's PATCH size: not a divisor of the 5 MiB part, so incomplete parts are kept."""


def report_pdf(seed: int) -> bytes:
    """A two-page text PDF made large (2 parts and more) by an attached binary file."""
    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    for page in range(2):
        pdf.add_page()
        pdf.multi_cell(190, 6, f"Page {page + 1}: sent with tuspy, resumed from its stored URL.")
    noise = random.Random(seed).randbytes(2 * PART + 321)
    pdf.embed_file(bytes=noise, basename="noise.bin", compress=False)
    return bytes(pdf.output())


class KeptOpen(io.BytesIO):
    """The file as tuspy reads it: tuspy opens a path anew for every request and never
    closes it (a ResourceWarning each time), and closes a stream it is given after
    fingerprinting it; so, a stream it cannot close."""

    def close(self) -> None:
        pass

    def really_close(self) -> None:
        super().close()


def _uploader(url: str, token: str, file: KeptOpen, urls: FileStorage, checksum: bool) -> Any:
    client = TusClient(f"{url}/api/v1/tus/", headers={"Authorization": f"Bearer {token}"})
    return client.uploader(
        file_stream=file,
        chunk_size=CHUNK,
        metadata={"filename": "report.pdf", "filetype": "application/pdf", "priority": "high"},
        store_url=True,
        url_storage=urls,
        upload_checksum=checksum,
    )


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "upload-checksum"])
async def test_tuspy_resumes_through_the_stored_url_and_the_job_completes(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    worker_ctx: WorkerContext,
    tokens: Any,
    user: str,
    tmp_path: Path,
    checksum: bool,
) -> None:
    gw = gateway_factory()
    token = tokens.mint(user)
    data = report_pdf(seed=7 + checksum)
    stop_at = 3 * CHUNK  # mid-way, inside the second S3 part

    def first_run() -> tuple[str, int]:
        urls, file = FileStorage(str(tmp_path / "tus-urls.json")), KeptOpen(data)
        try:
            uploader = _uploader(gw.url, token, file, urls, checksum)
            uploader.upload(stop_at=stop_at)  # then the process "stops"
            return str(uploader.url), int(uploader.offset)
        finally:
            urls._db.close()
            file.really_close()

    def second_run() -> tuple[str, int]:
        urls, file = FileStorage(str(tmp_path / "tus-urls.json")), KeptOpen(data)
        try:
            uploader = _uploader(gw.url, token, file, urls, checksum)
            resumed = (str(uploader.url), int(uploader.offset))  # found, and HEAD asked
            uploader.upload()
            return resumed
        finally:
            urls._db.close()
            file.really_close()

    url, offset = await asyncio.to_thread(first_run)
    assert offset == stop_at
    resumed_url, resumed_offset = await asyncio.to_thread(second_run)
    assert (resumed_url, resumed_offset) == (url, stop_at)

    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.head(
            url, headers={"Authorization": f"Bearer {token}", "Tus-Resumable": "1.0.0"}
        )
    assert r.status_code == 200, r.text
    assert r.headers["upload-offset"] == r.headers["upload-length"] == str(len(data))
    stored = await s3_object(upload_services, r.headers["sluice-document-id"])
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()
    job_id = r.headers["sluice-job-id"]
    assert await JobRun(worker_ctx, job_id).run() == Outcome.COMPLETED
    job = await upload_services.db.fetchrow(
        "SELECT status, priority FROM jobs WHERE id = $1::uuid", job_id
    )
    assert (job["status"], job["priority"]) == ("completed", "high")
    chunks = await upload_services.db.fetchval(
        "SELECT count(*) FROM chunks WHERE document_id = $1::uuid", r.headers["sluice-document-id"]
    )
    assert chunks >= 1
