"""Stage 2, extract: text out of the validated file, page by page.

The stage's entry points; the formats live beside it:

* PDF (``workers/stages/pdf.py``): pypdf, one page at a time, page numbers
  kept; a page that fails is a warning, not a failure;
* plain text, Markdown, CSV, JSON and HTML (``workers/stages/formats.py``): one
  page each; every text, PDF pages included, is normalised there.

What one document may cost is bounded (``workers/stages/budget.py``,
:class:`~workers.stages.budget.ExtractLimits`): decoded content-stream bytes and
extracted characters per page and per document, and the time one page may
take.  Exceeding a budget is the permanent error ``too_large_extracted``; a
document nested too deeply (JSON) is ``corrupt_file``.  In the worker this
stage runs in a child process with memory and time limits (``workers/parse.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.stages.budget import Budget, ExtractLimits
from workers.stages.common import Extracted, PageText, StageReporter
from workers.stages.formats import (
    csv_to_text,
    decode_text,
    html_to_text,
    json_to_text,
    normalize_text,
)
from workers.stages.pdf import PdfPages


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


def iter_pages(
    path: Path, document_type: str, limits: ExtractLimits
) -> Iterator[tuple[int, PageText, dict[str, Any] | None]]:
    """(page count, page, warning) for each page in order, synchronously, within
    ``limits``; the caller decides what to keep (the parse child streams them)."""
    if document_type != "pdf":
        extracted = extract_text_file(path, document_type, limits)
        yield 1, extracted.pages[0], extracted.warnings[0] if extracted.warnings else None
        return
    pdf = PdfPages(path, limits=limits)
    try:
        for index in range(pdf.count):
            text, warning = pdf.extract(index)
            yield pdf.count, PageText(index + 1, text), warning
    finally:
        pdf.close()


async def extract_document(
    path: Path,
    document_type: str,
    *,
    report: StageReporter,
    limits: ExtractLimits | None = None,
) -> Extracted:
    """Pages of text from a validated file, in this process (tests, benchmarks;
    the worker extracts in a child process: ``workers/parse.py``)."""
    if document_type != "pdf":
        result = await asyncio.to_thread(extract_text_file, path, document_type, limits)
        await report.progress(1.0, "extracted")
        return result
    pdf = await asyncio.to_thread(PdfPages, path, limits=limits)
    total = pdf.count
    pages: list[PageText] = []
    warnings: list[dict[str, Any]] = []
    try:
        for index in range(total):
            await report.boundary()
            text, warning = await asyncio.to_thread(pdf.extract, index)
            if warning:
                warnings.append(warning)
            pages.append(PageText(index + 1, text))
            await report.progress((index + 1) / total, f"page {index + 1}/{total}")
    finally:
        pdf.close()
    return Extracted(pages=pages, warnings=warnings)
