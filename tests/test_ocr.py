"""OCR of scanned pages and image uploads (issue 13), with the real engine.

Fixtures are made here (``tests/fixtures_scans.py``): known paragraphs rendered
with Pillow, degraded, and wrapped as scanners wrap them.  Word accuracy is the
share of the expected words recognised in order: at least 95% on clean pages,
85% on degraded ones (turned a quarter, faint gray, 1-bit CCITT G4, CMYK JPEG).
End to end, documents go through a real in-process ARQ worker and its parse
child (``workers/parse.py``), the embedding model and search.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio
from PIL import Image
from pypdf import PdfReader

from app.core.embedding import LocalEmbedder, model_dir
from app.core.errors import CancelRequested, PermanentError, UnsupportedMediaType
from app.core.queue import Priority
from app.core.settings import Settings
from app.gateway.services import Services
from app.uploads.rules import classify
from tests.fixtures_pipeline import MakeJob, make_pdf
from tests.fixtures_scans import (
    BAKERY,
    GLACIER,
    HARBOUR,
    LIBRARY,
    MONO,
    OBSERVATORY,
    ORCHARD,
    RAILWAY,
    SANS,
    SANS_BOLD,
    SERIF,
    faint,
    fax,
    font_path_ok,
    image_bytes,
    merge_pdfs,
    render,
    scanner_pdf,
    word_accuracy,
)
from workers.context import WorkerContext
from workers.parse import ParseJob, ParseReporter, parse_in_child
from workers.runtime import build_worker, open_worker_context
from workers.stages.budget import ExtractLimits
from workers.stages.common import NullReporter
from workers.stages.extract import extract_document
from workers.stages.ocr import OcrOptions
from workers.stages.scan import needs_ocr
from workers.stages.validate import check_magic

pytestmark = [
    pytest.mark.timeout(900),  # OCR is seconds a page, more on a loaded machine
    pytest.mark.skipif(not font_path_ok(), reason="the DejaVu/Liberation fonts are needed"),
]
MB = 1024 * 1024
DEFAULT_PARSE_MB = 1024
"""PARSE_MEMORY_LIMIT_MB's default: OCR must fit in it."""
PARAGRAPHS4 = [HARBOUR, GLACIER, BAKERY, LIBRARY]
SLOW_OK = ExtractLimits(page_seconds=600, ocr=OcrOptions(page_seconds=600))
"""Limits that never time a page out (the machine may be loaded)."""


@functools.cache
def scanned_pdf() -> bytes:
    """Five scanned pages: clean (two fonts), turned, faint, fax (G4), CMYK JPEG."""
    return scanner_pdf(
        [
            render([(HARBOUR, SERIF, 12), (ORCHARD, SANS, 10)]),
            render([(LIBRARY, MONO, 11)]).rotate(90, expand=True),
            faint(render([(GLACIER, SANS_BOLD, 11)])),
            fax(render([(RAILWAY, SERIF, 11)])),
            render([(BAKERY, SANS, 11)]).convert("CMYK"),
        ]
    )


def _image_filter(pdf: bytes, index: int) -> tuple[Any, Any]:
    page = PdfReader(io.BytesIO(pdf)).pages[index]
    (image,) = [x.get_object() for x in page["/Resources"]["/XObject"].values()]
    return image["/Filter"], image["/ColorSpace"]


async def _extract(path: Path, data: bytes, kind: str, limits: ExtractLimits = SLOW_OK) -> Any:
    path.write_bytes(data)
    return await extract_document(path, kind, report=NullReporter(), limits=limits)


def _records(warnings: list[dict[str, Any]], code: str) -> list[dict[str, Any]]:
    return [w for w in warnings if w["code"] == code]


async def test_scanned_pdf_pages_are_read_in_order_on_their_pages(tmp_path: Path) -> None:
    pdf = scanned_pdf()
    assert _image_filter(pdf, 3)[0] == ["/CCITTFaxDecode"]  # the fixture is what it claims
    assert _image_filter(pdf, 4) == ("/DCTDecode", "/DeviceCMYK")

    extracted = await _extract(tmp_path / "scan.pdf", pdf, "pdf")

    pages = {p.number: p.text for p in extracted.pages}
    assert sorted(pages) == [1, 2, 3, 4, 5]
    first, second = pages[1].split("\n\n")  # two paragraphs, in reading order
    assert word_accuracy(HARBOUR, first) >= 0.95, first
    assert word_accuracy(ORCHARD, second) >= 0.95, second
    for number, expected in [(2, LIBRARY), (3, GLACIER), (4, RAILWAY), (5, BAKERY)]:
        assert word_accuracy(expected, pages[number]) >= 0.85, (number, pages[number])
    read = _records(extracted.warnings, "page_ocr")
    assert [r["page"] for r in read] == [1, 2, 3, 4, 5]
    assert read[1]["rotated"] in (1, 3) and read[0]["rotated"] == 0
    assert all(r["confidence"] >= 0.8 for r in read)


async def test_text_pages_are_never_ocrd_and_scans_between_them_are(tmp_path: Path) -> None:
    text = make_pdf([["Page one has a text layer about volcanoes and basalt lava."]] * 2)
    scan = scanner_pdf([render([(OBSERVATORY, SERIF, 12)])])
    mixed = merge_pdfs([text, scan])  # pages 1, 2: text; page 3: scan

    extracted = await _extract(tmp_path / "mixed.pdf", mixed, "pdf")

    assert [r["page"] for r in _records(extracted.warnings, "page_ocr")] == [3]
    texts = [p.text for p in extracted.pages]
    assert texts[0] == texts[1] == "Page one has a text layer about volcanoes and basalt lava."
    assert word_accuracy(OBSERVATORY, texts[2]) >= 0.95


async def test_ocr_page_limit_skips_the_rest_with_one_warning(tmp_path: Path) -> None:
    pages = [render([(text, SANS, 12)], width_in=6) for text in (HARBOUR, GLACIER, BAKERY)]
    limits = msgspec.structs.replace(SLOW_OK, ocr=OcrOptions(max_pages=1, page_seconds=600))

    extracted = await _extract(tmp_path / "three.pdf", scanner_pdf(pages), "pdf", limits)

    assert word_accuracy(HARBOUR, extracted.pages[0].text) >= 0.95
    assert [p.text for p in extracted.pages[1:]] == ["", ""]
    (limit,) = _records(extracted.warnings, "ocr_page_limit")
    assert limit["page"] == 2 and "OCR_MAX_PAGES" in limit["message"]


async def test_with_ocr_disabled_a_scan_has_no_text(tmp_path: Path) -> None:
    limits = msgspec.structs.replace(SLOW_OK, ocr=OcrOptions(enabled=False))
    pdf = scanner_pdf([render([(HARBOUR, SANS, 12)], width_in=6)] * 2)

    extracted = await _extract(tmp_path / "off.pdf", pdf, "pdf", limits)

    assert [p.text for p in extracted.pages] == ["", ""]
    assert [w["code"] for w in extracted.warnings] == ["ocr_disabled"]


async def test_undecodable_and_oversized_frames_are_skipped_with_warnings(tmp_path: Path) -> None:
    page = render([(GLACIER, SERIF, 12)], width_in=6)
    png = image_bytes([page], "PNG")
    truncated = await _extract(tmp_path / "cut.png", png[: len(png) // 2], "png")
    assert truncated.pages[0].text == ""
    assert [w["code"] for w in truncated.warnings] == ["page_decode_failed"]

    big = Image.new("1", (3000, 2500), 1)
    tiff = image_bytes([fax(page), big], "TIFF", compression="group4")
    limits = msgspec.structs.replace(
        SLOW_OK, ocr=OcrOptions(max_image_pixels=5_000_000, page_seconds=600)
    )
    extracted = await _extract(tmp_path / "two.tiff", tiff, "tiff", limits)
    assert word_accuracy(GLACIER, extracted.pages[0].text) >= 0.95
    assert extracted.pages[1].text == ""
    (skipped,) = _records(extracted.warnings, "page_too_large")
    assert skipped["page"] == 2 and "OCR_MAX_IMAGE_PIXELS" in skipped["message"]


async def test_a_high_resolution_jpeg_is_read_at_the_ocr_resolution(tmp_path: Path) -> None:
    page = render([(RAILWAY, SANS, 12)], width_in=6)
    big = page.resize((page.width * 3, page.height * 3), Image.Resampling.BICUBIC)
    data = image_bytes([big], "JPEG", dpi=600, quality=85)
    with Image.open(io.BytesIO(data)) as im:
        assert im.info["dpi"] == (600, 600)  # 3x the OCR resolution: decoded at 1/2 size

    extracted = await _extract(tmp_path / "big.jpg", data, "jpeg")

    assert word_accuracy(RAILWAY, extracted.pages[0].text) >= 0.95


def test_the_rule_for_a_usable_text_layer() -> None:
    letter = 8.5 * 11
    assert needs_ocr("", letter)
    assert needs_ocr("  12 \n Scanned by ACME ", letter)  # a page number and a stamp
    assert not needs_ocr("A short page of real text with a few more words.", letter)
    assert not needs_ocr("Page 4", 2.0)  # a label-sized page


def test_image_uploads_are_accepted_types_checked_by_their_bytes() -> None:
    assert classify("scan.TIF", "image/tiff", None) == ("tiff", "image/tiff")
    assert classify("photo.jpg", "application/octet-stream", None) == ("jpeg", "image/jpeg")
    assert classify("page.png", "", "png") == ("png", "image/png")
    with pytest.raises(UnsupportedMediaType) as refused:
        classify("photo.jpg", "image/png", None)
    assert refused.value.code == "unsupported_content_type"
    check_magic("png", b"\x89PNG\r\n\x1a\n")
    check_magic("tiff", b"II*\x00\x08\x00")
    check_magic("tiff", b"MM\x00*\x00\x00")
    with pytest.raises(PermanentError) as mismatch:
        check_magic("jpeg", b"\x89PNG\r\n\x1a\n")
    assert mismatch.value.code == "type_mismatch"
    assert mismatch.value.details == {"declared": "jpeg", "detected": "png"}


async def test_the_gateway_accepts_image_uploads(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = image_bytes([fax(render([(GLACIER, SERIF, 12)], width_in=4))] * 2, "TIFF")
    r = await uploads.post(
        "/api/v1/documents/upload/simple",
        headers=auth_headers,
        files={"file": ("fax.TIFF", data, "image/tiff")},
    )
    assert r.status_code == 201, r.text
    row = await upload_services.db.fetchrow(
        "SELECT document_type, content_type FROM documents WHERE id = $1::uuid",
        r.json()["document_id"],
    )
    assert dict(row) == {"document_type": "tiff", "content_type": "image/tiff"}
    r = await uploads.post(
        "/api/v1/documents/upload/simple",
        headers=auth_headers,
        files={"file": ("scan.png", data, "image/tiff")},
    )
    assert r.status_code == 415 and r.json()["details"]["field"] == "content_type"


def test_ocr_settings_are_read_from_the_environment(settings_env: dict[str, str]) -> None:
    env = {**settings_env, "OCR_ENABLED": "off", "OCR_MIN_CONFIDENCE": "0.7", "OCR_DPI": "300"}
    settings = Settings.from_environ(env)
    assert (settings.ocr_enabled, settings.ocr_min_confidence, settings.ocr_dpi) == (
        False,
        0.7,
        300,
    )
    defaults = Settings.from_environ(settings_env)
    assert defaults.ocr_enabled is True
    assert defaults.parse_memory_limit_mb == DEFAULT_PARSE_MB  # what the OCR tests run under
    from app.core.errors import ConfigError

    with pytest.raises(ConfigError, match="OCR_MIN_CONFIDENCE"):
        Settings.from_environ({**settings_env, "OCR_MIN_CONFIDENCE": "1.5"})


def _children() -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with open(task / "children") as fh:
            found.update(int(pid) for pid in fh.read().split())
    return found


async def test_a_cancelled_scan_stops_between_pages_and_its_child_is_gone(tmp_path: Path) -> None:
    """The parse child reports each OCR'd page; the parent checks for cancellation
    at each report and kills the child (OCR runs under PARSE_MEMORY_LIMIT_MB)."""
    path = tmp_path / "four.pdf"
    path.write_bytes(scanner_pdf([render([(text, SANS, 12)], width_in=6) for text in PARAGRAPHS4]))
    seen: list[str] = []

    async def progress(stage: str, fraction: float, message: str) -> None:
        seen.append(message)

    async def boundary() -> None:
        if any(m.startswith("page ") for m in seen):
            raise CancelRequested("cancelled by request")

    async def nothing(*_: object) -> None:
        return None

    job = ParseJob(
        path=str(path),
        document_type="pdf",
        chunk_size=256,
        chunk_overlap=0,
        tokenizer_path=str(model_dir() / "tokenizer.json"),
        limits=SLOW_OK,
        memory_bytes=DEFAULT_PARSE_MB * MB,
        time_seconds=600.0,
    )
    before = _children()
    with pytest.raises(CancelRequested):
        await parse_in_child(job, ParseReporter(progress, boundary, nothing))
    pages = [m for m in seen if m.startswith("page ")]
    assert pages and pages[0] == "page 1/4" and "page 4/4" not in pages
    assert _children() <= before


# -- through the real worker ------------------------------------------------------------


@pytest_asyncio.fixture
async def ocr_worker(migrated: Settings, embedder: LocalEmbedder) -> AsyncIterator[WorkerContext]:
    """A worker with the default OCR settings but time for a loaded machine."""
    settings = msgspec.structs.replace(migrated, ocr_page_time_seconds=600)
    async with open_worker_context(
        settings, embedder=embedder, worker_id="ocr-test-worker", progress_interval_seconds=0.0
    ) as ctx:
        yield ctx


async def _run(services: Services, ctx: WorkerContext, job_id: str) -> None:
    assert await services.queue.enqueue(job_id, Priority.NORMAL)
    worker = build_worker(ctx, burst=True, handle_signals=False)
    await asyncio.wait_for(worker.async_run(), 800)


async def _search_top(client: httpx.AsyncClient, headers: dict[str, str], query: str) -> Any:
    r = await client.post("/api/v1/search", headers=headers, json={"query": query, "top_k": 3})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


@pytest.mark.usefixtures("search_embedder")
async def test_mixed_pdf_is_indexed_and_search_finds_the_scanned_page(
    services: Services,
    ocr_worker: WorkerContext,
    make_job: MakeJob,
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
) -> None:
    text = make_pdf([["Sourdough bread rises thanks to wild yeast and lactic acid bacteria."]])
    scan = scanner_pdf([fax(render([(GLACIER, SERIF, 12)], width_in=7))])
    more = make_pdf([["The French Revolution began in 1789 with the storming of the Bastille."]])
    job = await make_job(
        merge_pdfs([text, scan, more]), options={"chunk_size": 24, "chunk_overlap": 0}
    )

    await _run(services, ocr_worker, job.job_id)

    body = (await client.get(f"/api/v1/jobs/{job.job_id}", headers=auth_headers)).json()
    assert body["status"] == "completed", body
    assert body["result"]["ocr_pages"] == 1 and body["result"]["pages"] == 3
    assert [w["page"] for w in body["warnings"] if w["code"] == "page_ocr"] == [2]
    top = await _search_top(
        client, auth_headers, "how far the front of the glacier retreated since the last survey"
    )
    assert top["document_id"] == job.document_id
    assert top["page_start"] <= 2 <= top["page_end"] and "glacier" in top["text"]
    rows = await services.db.fetch(
        "SELECT page_start, page_end, text FROM chunks WHERE document_id = $1::uuid ORDER BY seq",
        job.document_id,
    )
    scanned = " ".join(r["text"] for r in rows if r["page_start"] == r["page_end"] == 2)
    assert word_accuracy("front had retreated by nearly sixty metres", scanned) == 1.0
    assert all("Bastille" not in r["text"] or r["page_end"] == 3 for r in rows)


@pytest.mark.usefixtures("search_embedder")
async def test_png_and_multipage_tiff_uploads_are_indexed_page_by_page(
    services: Services,
    ocr_worker: WorkerContext,
    make_job: MakeJob,
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
) -> None:
    png = await make_job(
        image_bytes([render([(ORCHARD, SANS, 12)], width_in=7)], "PNG"), "png", filename="a.png"
    )
    tiff_pages = [
        fax(render([(LIBRARY, SERIF, 12)], width_in=7)),
        fax(render([(OBSERVATORY, SERIF, 12)], width_in=7)),
    ]
    tiff = await make_job(
        image_bytes(tiff_pages, "TIFF", compression="group4"), "tiff", filename="fax.tif"
    )

    await _run(services, ocr_worker, png.job_id)
    await _run(services, ocr_worker, tiff.job_id)

    for made, pages in [(png, 1), (tiff, 2)]:
        body = (await client.get(f"/api/v1/jobs/{made.job_id}", headers=auth_headers)).json()
        assert body["status"] == "completed", body
        assert body["result"]["ocr_pages"] == pages and body["result"]["warnings"] == 0
        doc = await client.get(f"/api/v1/documents/{made.document_id}", headers=auth_headers)
        assert doc.json()["page_count"] == pages
    top = await _search_top(client, auth_headers, "apple harvest in the valley and frost on pears")
    assert top["document_id"] == png.document_id and top["page_start"] == 1
    top = await _search_top(client, auth_headers, "a comet photographed from the observatory")
    assert top["document_id"] == tiff.document_id
    assert top["page_start"] <= 2 <= top["page_end"] and "comet" in top["text"]
    assert word_accuracy(OBSERVATORY, top["text"]) >= 0.85


async def test_a_scan_without_any_text_still_fails_no_text(
    services: Services, ocr_worker: WorkerContext, make_job: MakeJob
) -> None:
    blank = await make_job(image_bytes([Image.new("L", (1200, 800), 255)], "PNG"), "png")

    await _run(services, ocr_worker, blank.job_id)

    row = await services.db.fetchrow(
        "SELECT status, error_code FROM jobs WHERE id = $1::uuid", blank.job_id
    )
    assert (row["status"], row["error_code"]) == ("failed", "no_text")
