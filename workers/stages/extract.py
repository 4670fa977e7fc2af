"""Stage 2, extract: text out of the validated file, page by page.

PDFs are read with pypdf one page at a time, on a thread, keeping page
numbers; a page that fails is a warning, not a failure, and a page whose
content streams are absurdly large is skipped with a warning before pypdf
tries to decode it (it can need gigabytes for one such page).  Plain text,
Markdown, CSV, JSON and HTML (text only: no scripts or styles) are one page.
All text is normalised: NUL bytes dropped, words hyphenated across line ends
joined, runs of spaces collapsed, at most one blank line in a row.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
from pypdf import PdfReader
from pypdf.generic import ArrayObject, IndirectObject, StreamObject

from app.core.errors import PermanentError
from workers.stages.common import Extracted, Page, StageReporter

MAX_CONTENT_STREAM_BYTES = 16 * 1024 * 1024
"""Encoded content-stream size above which a page is skipped (decoded it can be 100x)."""

_HYPHEN_RE = re.compile(r"(\w)-\n[ \t]*(\w)")
_SPACES_RE = re.compile(r"[ \t\f\v\u00a0]+")
_TRAILING_RE = re.compile(r"[ \t]+\n")
_BLANKS_RE = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    text = text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    text = _HYPHEN_RE.sub(r"\1\2", text)
    text = _SPACES_RE.sub(" ", text)
    text = _TRAILING_RE.sub("\n", text)
    text = _BLANKS_RE.sub("\n\n", text)
    return text.strip()


def _stream_size(obj: Any) -> int:
    obj = obj.get_object() if isinstance(obj, IndirectObject) else obj
    if isinstance(obj, ArrayObject):
        return sum(_stream_size(o) for o in obj)
    if isinstance(obj, StreamObject):
        # pypdf has read the encoded bytes already; decoding is what can explode.
        return len(obj._data or b"")
    return 0


def open_pdf(source: Path | BinaryIO) -> PdfReader:
    reader = PdfReader(source)
    if reader.is_encrypted:
        reader.decrypt("")  # validate admitted only empty user passwords
    return reader


class PdfPages:
    """Page-by-page access that keeps memory bounded by a few pages.

    The reader reads through an open file (``PdfReader(path)`` would load the
    whole file) and is re-created every ``reopen_every`` pages, dropping the
    objects pypdf caches as it resolves them (content streams included).
    """

    def __init__(self, path: Path, *, reopen_every: int = 32) -> None:
        self._fh = path.open("rb")
        self._every = reopen_every
        try:
            self._reader = open_pdf(self._fh)
            self.count = len(self._reader.pages)
        except BaseException:
            self._fh.close()
            raise

    def extract(self, index: int) -> tuple[str, dict[str, Any] | None]:
        if index and index % self._every == 0:
            self._reader = open_pdf(self._fh)
        return extract_pdf_page(self._reader, index)

    def close(self) -> None:
        self._fh.close()


def extract_pdf_page(
    reader: PdfReader, index: int, *, max_stream_bytes: int = MAX_CONTENT_STREAM_BYTES
) -> tuple[str, dict[str, Any] | None]:
    """Text of page ``index`` (0-based) or ("", warning)."""
    number = index + 1
    try:
        page = reader.pages[index]
        size = _stream_size(page.get("/Contents"))
        if size > max_stream_bytes:
            return "", {
                "code": "page_too_large",
                "page": number,
                "message": f"content stream of {size} bytes skipped",
            }
        return normalize_text(page.extract_text() or ""), None
    except MemoryError:
        return "", {
            "code": "page_too_large",
            "page": number,
            "message": "page needed too much memory to extract",
        }
    except Exception as exc:  # one broken page must not fail the document
        return "", {
            "code": "page_extract_failed",
            "page": number,
            "message": f"{type(exc).__name__}: {str(exc)[:200]}",
        }


class _HtmlText(HTMLParser):
    SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head"})
    BLOCK = frozenset(
        {
            "p",
            "div",
            "br",
            "li",
            "tr",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "section",
            "article",
            "header",
            "footer",
            "blockquote",
            "pre",
            "table",
            "ul",
            "ol",
            "title",
            "hr",
            "dd",
            "dt",
        }
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._title = True
        elif tag in self.SKIP:
            self._skip += 1
        if tag in self.BLOCK:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._title = False
        elif tag in self.SKIP and self._skip:
            self._skip -= 1
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._skip == 0 or self._title:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def _flatten_json(value: Any, path: str, out: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_json(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten_json(v, f"{path}[{i}]", out)
    elif value is not None:
        out.append(f"{path}: {value}" if path else str(value))


def json_to_text(raw: bytes) -> str:
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise PermanentError(f"JSON does not parse: {exc}", code="corrupt_file") from exc
    lines: list[str] = []
    _flatten_json(data, "", lines)
    return "\n".join(lines)


def csv_to_text(text: str) -> str:
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None:
        return ""
    lines = []
    for row in rows:
        cells = [f"{h}: {v}" for h, v in zip(header, row, strict=False) if v.strip()]
        if cells:
            lines.append("; ".join(cells) + ".")
    return "\n".join(lines) if lines else ", ".join(header)


def decode_text(raw: bytes) -> tuple[str, dict[str, Any] | None]:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16"), None
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), {
            "code": "invalid_utf8",
            "page": 1,
            "message": "text is not valid UTF-8; undecodable bytes replaced",
        }


def extract_text_file(path: Path, document_type: str) -> Extracted:
    raw = path.read_bytes()
    if document_type == "json":
        text, warning = json_to_text(raw), None
    else:
        text, warning = decode_text(raw)
        if document_type == "html":
            text = html_to_text(text)
        elif document_type == "csv":
            text = csv_to_text(text)
    return Extracted(pages=[Page(1, normalize_text(text))], warnings=[warning] if warning else [])


async def extract_document(path: Path, document_type: str, *, report: StageReporter) -> Extracted:
    """Pages of text from a validated file; memory bounded by one page for PDFs."""
    if document_type != "pdf":
        result = await asyncio.to_thread(extract_text_file, path, document_type)
        await report.progress(1.0, "extracted")
        return result
    pdf = await asyncio.to_thread(PdfPages, path)
    total = pdf.count
    pages: list[Page] = []
    warnings: list[dict[str, Any]] = []
    try:
        for index in range(total):
            await report.boundary()
            text, warning = await asyncio.to_thread(pdf.extract, index)
            if warning:
                warnings.append(warning)
            pages.append(Page(index + 1, text))
            await report.progress((index + 1) / total, f"page {index + 1}/{total}")
    finally:
        pdf.close()
    return Extracted(pages=pages, warnings=warnings)
