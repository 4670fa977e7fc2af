"""Stage 2, extract: text out of the validated file, page by page.

The stage's entry points; the formats live beside it:

* PDF (``workers/stages/pdf.py``): pypdf, one page at a time, page numbers
  kept; a page that fails is a warning, not a failure;
* plain text, Markdown, CSV, JSON and HTML (``workers/stages/formats.py``): one
  page each; every text, PDF pages included, is normalised there;
* scans: PDF pages without a usable text layer (the rule is in
  ``workers/stages/scan.py``) and every frame of a PNG, JPEG or TIFF upload
  are OCR'd one page image at a time (``workers/stages/images.py`` makes the
  image, ``workers/stages/ocr.py`` reads it).

What one document may cost is bounded (``workers/stages/budget.py``,
:class:`~workers.stages.budget.ExtractLimits`): decoded content-stream bytes and
extracted characters per page and per document, and the time one page may
take.  Exceeding a budget is the permanent error ``too_large_extracted``; a
document nested too deeply (JSON) is ``corrupt_file``.  In the worker this
stage runs in a child process with memory and time limits (``workers/parse.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

from workers.stages.budget import Budget, ExtractLimits
from workers.stages.common import Extracted, PageText, StageReporter
from workers.stages.formats import (
    csv_to_text,
    decode_text,
    html_to_text,
    json_to_text,
    normalize_text,
)
from workers.stages.images import IMAGE_TYPES, PdfRenderer, iter_image_pages
from workers.stages.pdf import PdfPages
from workers.stages.scan import Scanner, needs_ocr


def extract_text_file(
    path: Path, document_type: str, limits: ExtractLimits | None = None
) -> Extracted:
    """The one page of a text format, within ``limits.document_chars``."""
    raw = path.read_bytes()
    if document_type == "json":
        text, warning = json_to_text(raw), None
    else:
        text, warning = decode_text(raw)
        if document_type == "html":
            text = html_to_text(text)
        elif document_type == "csv":
            text = csv_to_text(text)
    del raw
    text = normalize_text(text)
    Budget(limits or ExtractLimits()).charge_chars(1, len(text), paged=False)
    return Extracted(pages=[PageText(1, text)], warnings=[warning] if warning else [])


PageItem = tuple[int, PageText, dict[str, Any] | None]
"""(page count, page, warning)."""


def iter_pages(
    path: Path, document_type: str, limits: ExtractLimits
) -> Generator[PageItem, None, None]:
    """(page count, page, warning) for each page in order, synchronously, within
    ``limits``; the caller decides what to keep (the parse child streams them).

    PDF pages without a usable text layer, and every page of an image, are OCR'd
    here, one at a time (``workers/stages/scan.py``)."""
    if document_type in IMAGE_TYPES:
        yield from _image_pages(path, limits)
        return
    if document_type != "pdf":
        extracted = extract_text_file(path, document_type, limits)
        yield 1, extracted.pages[0], extracted.warnings[0] if extracted.warnings else None
        return
    pdf = PdfPages(path, limits=limits)
    scanner = Scanner(limits.ocr)
    renderer = PdfRenderer(path, limits.ocr)
    try:
        for index in range(pdf.count):
            text, warning = pdf.extract(index)
            if warning is None and needs_ocr(text, pdf.square_inches(index)):
                text, warning = scanner.read(
                    index + 1, partial(renderer.render, index), pdf.budget, text_layer=text
                )
            yield pdf.count, PageText(index + 1, text), warning
    finally:
        renderer.close()
        pdf.close()


def _image_pages(path: Path, limits: ExtractLimits) -> Generator[PageItem, None, None]:
    """Each frame of a PNG, JPEG or TIFF, OCR'd (a frame that fails is a warning)."""
    scanner = Scanner(limits.ocr)
    budget = Budget(limits)
    frames = iter_image_pages(path, limits.ocr)
    try:
        for number, (count, frame, failed) in enumerate(frames, start=1):
            text, warning = "", failed
            if frame is not None:
                text, warning = scanner.read(number, partial(_same, frame), budget)
            del frame
            yield count, PageText(number, text), warning
    finally:
        frames.close()


def _same(image: Image.Image) -> Image.Image:
    return image


async def extract_document(
    path: Path,
    document_type: str,
    *,
    report: StageReporter,
    limits: ExtractLimits | None = None,
) -> Extracted:
    """Pages of text from a validated file, in this process (tests, benchmarks;
    the worker extracts in a child process: ``workers/parse.py``), page by page
    on a thread, checking for cancellation between pages."""
    pages = iter_pages(path, document_type, limits or ExtractLimits())
    kept: list[PageText] = []
    warnings: list[dict[str, Any]] = []
    try:
        while True:
            await report.boundary()
            item = await asyncio.to_thread(next, pages, None)
            if item is None:
                break
            total, page, warning = item
            if warning:
                warnings.append(warning)
            kept.append(page)
            await report.progress(page.number / total, f"page {page.number}/{total}")
    finally:
        await asyncio.to_thread(pages.close)
    return Extracted(pages=kept, warnings=warnings)
