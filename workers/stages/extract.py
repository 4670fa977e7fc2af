"""Stage 2, extract: text out of the validated file, page by page.

PDFs are read with pypdf one page at a time, keeping page numbers; a page that
fails is a warning, not a failure, and a page whose content streams are
absurdly large (encoded) is skipped with a warning before pypdf tries to decode
it.  Plain text, Markdown, CSV, JSON and HTML (text only: no scripts or styles)
are one page.  All text is normalised: NUL bytes dropped, words hyphenated
across line ends joined, runs of spaces collapsed, at most one blank line in a
row.

What one document may cost is bounded (:class:`ExtractLimits`, from the
``MAX_PAGE_CONTENT_MB``/``MAX_DOCUMENT_CONTENT_MB``/``MAX_PAGE_CHARS``/
``MAX_DOCUMENT_CHARS``/``PAGE_TIME_BUDGET_SECONDS`` settings): decoded
content-stream bytes and extracted characters per page and per document, and
the time one page may take.  Every page is charged for the decoded size of its
content streams, also when the streams are shared with other pages, whose text
is extracted once (:class:`PdfPages` caches it by object id), so 2,000 pages
pointing at one 10 MB stream exhaust the document budget after ~50 pages
instead of decoding 20 GB.  Exceeding a budget is the permanent error
``too_large_extracted``.  A document nested too deeply (JSON) is
``corrupt_file``.  In the worker this stage runs in a child process with
memory and time limits (``workers/parse.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import re
import signal
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
from pypdf import PdfReader
from pypdf.generic import ArrayObject, IndirectObject, NameObject, StreamObject

from app.core.errors import PermanentError
from workers.stages.common import Extracted, Page, StageReporter

MAX_CONTENT_STREAM_BYTES = 16 * 1024 * 1024
"""Encoded content-stream size above which a page is skipped (decoded it can be 100x)."""
TOO_LARGE = "too_large_extracted"
TEXT_CACHE_ENTRIES = 16
"""Texts of pages with shared content streams kept by :class:`PdfPages`."""
_INFLATE_STEP = 1024 * 1024
MB = 1024 * 1024


class ExtractLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What extracting one document may cost (see the module docstring)."""

    page_content_bytes: int = 32 * MB
    document_content_bytes: int = 512 * MB
    page_chars: int = 200_000
    document_chars: int = 20_000_000
    page_seconds: float = 10.0


class PageTimeout(BaseException):
    """Raised (from SIGALRM) inside a page that ran past its time budget.

    A ``BaseException`` so that the per-page ``except Exception`` does not turn
    it into a skipped-page warning."""


class Budget:
    """Running totals of one document against its :class:`ExtractLimits`.

    Invariant: after every successful ``charge_*`` call the document is within
    its limits; a call that would exceed one raises ``too_large_extracted``."""

    def __init__(self, limits: ExtractLimits) -> None:
        self.limits = limits
        self.content_bytes = 0
        self.chars = 0

    def charge_content(self, page: int, size: int) -> None:
        limits = self.limits
        if size > limits.page_content_bytes:
            raise _too_large(
                f"page {page} has {_mb(size)} of decoded content, above the "
                f"{_mb(limits.page_content_bytes)} page limit (MAX_PAGE_CONTENT_MB)",
                page=page,
                limit_bytes=limits.page_content_bytes,
            )
        self.content_bytes += size
        if self.content_bytes > limits.document_content_bytes:
            raise _too_large(
                f"the document's decoded content passed the "
                f"{_mb(limits.document_content_bytes)} limit at page {page} "
                "(MAX_DOCUMENT_CONTENT_MB)",
                page=page,
                limit_bytes=limits.document_content_bytes,
            )

    def charge_chars(self, page: int, count: int, *, paged: bool = True) -> None:
        limits = self.limits
        if paged and count > limits.page_chars:
            raise _too_large(
                f"page {page} yields {count} characters, above the {limits.page_chars} "
                "page limit (MAX_PAGE_CHARS)",
                page=page,
                limit_chars=limits.page_chars,
            )
        self.chars += count
        if self.chars > limits.document_chars:
            raise _too_large(
                f"the document's text passed the {limits.document_chars} character limit"
                + (f" at page {page}" if paged else "")
                + " (MAX_DOCUMENT_CHARS)",
                page=page,
                limit_chars=limits.document_chars,
            )


def _mb(size: int) -> str:
    return f"{size / MB:.1f} MiB"


def _too_large(message: str, **details: Any) -> PermanentError:
    return PermanentError(message, code=TOO_LARGE, details=details)


@contextlib.contextmanager
def page_deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`PageTimeout` in the block once ``seconds`` have passed.

    Uses SIGALRM, so it only works on the main thread (the parse child process);
    elsewhere (a thread of the worker, tests) the block runs unbounded."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    expired = False

    def expire(signum: int, frame: object) -> None:
        nonlocal expired
        expired = True
        raise PageTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    # After the deadline the alarm repeats every 50 ms: one raised where Python
    # swallows exceptions (a gc callback, a __del__) is raised again at the next.
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if expired:
        raise PageTimeout  # the block ended normally, but past its deadline


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


def _streams(obj: Any) -> Iterator[StreamObject]:
    obj = obj.get_object() if isinstance(obj, IndirectObject) else obj
    if isinstance(obj, ArrayObject):
        for item in obj:
            yield from _streams(item)
    elif isinstance(obj, StreamObject):
        yield obj


def decoded_size(obj: Any, limit: int) -> int:
    """Decoded bytes of the content stream(s) ``obj``; stops counting past ``limit``.

    FlateDecode streams (nearly all) are inflated in steps without keeping the
    output, so a bomb costs time bounded by ``limit``, never memory; other
    filters are decoded by pypdf."""
    total = 0
    for stream in _streams(obj):
        filters = stream.get("/Filter")
        first = filters[0] if isinstance(filters, ArrayObject) and filters else filters
        raw = stream._data or b""
        if first == NameObject("/FlateDecode") and not isinstance(stream.get("/DecodeParms"), list):
            total += _inflated_size(raw, limit - total + 1)
        else:
            total += len(stream.get_data() or b"")
        if total > limit:
            break
    return total


def _inflated_size(raw: bytes, limit: int) -> int:
    inflater = zlib.decompressobj()
    size = 0
    data = raw
    try:
        while data and size <= limit:
            size += len(inflater.decompress(data, _INFLATE_STEP))
            data = inflater.unconsumed_tail
        if size <= limit:
            size += len(inflater.flush())
    except zlib.error:
        pass  # pypdf recovers what it can from a damaged stream; count what inflated
    return size


def _ref(obj: Any) -> tuple[int, int] | None:
    if isinstance(obj, IndirectObject):
        return (obj.idnum, obj.generation)
    return None


def _text_key(page: Any) -> tuple[Any, ...] | None:
    """What a page's text depends on, as object ids; None if not all indirect.

    Pages with the same key have the same text, whatever their number."""
    contents = page.get("/Contents")
    refs: list[tuple[int, int] | None]
    if isinstance(contents, ArrayObject):
        refs = [_ref(c) for c in contents]
    else:
        refs = [_ref(page.raw_get("/Contents")) if "/Contents" in page else None]
    resources = _ref(page.raw_get("/Resources")) if "/Resources" in page else ("inherited",)
    if not refs or None in refs or resources is None:
        return None
    return (tuple(refs), resources, int(page.get("/Rotate", 0) or 0))


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

    def __init__(
        self, path: Path, *, reopen_every: int = 32, limits: ExtractLimits | None = None
    ) -> None:
        self._fh = path.open("rb")
        self._every = reopen_every
        self.budget = Budget(limits or ExtractLimits())
        self._texts: OrderedDict[tuple[Any, ...], tuple[int, str, dict[str, Any] | None]] = (
            OrderedDict()
        )
        """Recent (decoded size, text, warning) by :func:`_text_key`."""
        try:
            self._reader = open_pdf(self._fh)
            self.count = len(self._reader.pages)
        except BaseException:
            self._fh.close()
            raise

    def extract(self, index: int) -> tuple[str, dict[str, Any] | None]:
        """Text of page ``index`` (or a warning), charged to the document budget."""
        if index and index % self._every == 0:
            self._reader = open_pdf(self._fh)
        number = index + 1
        budget = self.budget
        try:
            page = self._reader.pages[index]
            key = _text_key(page)
        except Exception as exc:  # a broken page tree entry: that page only
            return "", _failed_page(number, exc)
        cached = self._texts.get(key) if key is not None else None
        if cached is not None:  # shared streams: decoded once, charged every time
            self._texts.move_to_end(key)  # type: ignore[arg-type]
            size, text, warning = cached
            budget.charge_content(number, size)
            budget.charge_chars(number, len(text))
            return text, None if warning is None else {**warning, "page": number}
        try:
            size = decoded_size(page.get("/Contents"), budget.limits.page_content_bytes)
        except Exception as exc:
            return "", _failed_page(number, exc)
        budget.charge_content(number, size)
        try:
            with page_deadline(budget.limits.page_seconds):
                text, warning = extract_pdf_page(self._reader, index)
        except PageTimeout:
            raise _too_large(
                f"page {number} took longer than {budget.limits.page_seconds:g} s to extract "
                "(PAGE_TIME_BUDGET_SECONDS)",
                page=number,
                limit_seconds=budget.limits.page_seconds,
            ) from None
        budget.charge_chars(number, len(text))
        if key is not None:  # failures too: a broken shared stream is parsed once
            self._texts[key] = (size, text, warning)
            if len(self._texts) > TEXT_CACHE_ENTRIES:
                self._texts.popitem(last=False)
        return text, warning

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
        raise  # the parse child's address-space limit: the document fails resource_limit
    except Exception as exc:  # one broken page must not fail the document
        return "", _failed_page(number, exc)


def _failed_page(number: int, exc: BaseException) -> dict[str, Any]:
    return {
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


def _flatten_json(value: Any, out: list[str]) -> None:
    """``path: value`` lines of a decoded JSON document, depth first, in order.

    Iterative (an explicit stack), so no nesting depth can exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
        elif item is not None:
            out.append(f"{path}: {item}" if path else str(item))


def decode_json(raw: bytes) -> Any:
    """Decode a JSON document; malformed or nested too deeply is ``corrupt_file``."""
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise PermanentError(f"JSON does not parse: {exc}", code="corrupt_file") from exc
    except RecursionError:
        raise PermanentError(
            "JSON is nested too deeply to process", code="corrupt_file", details={"nesting": True}
        ) from None


def json_to_text(raw: bytes) -> str:
    lines: list[str] = []
    _flatten_json(decode_json(raw), lines)
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
    return Extracted(pages=[Page(1, text)], warnings=[warning] if warning else [])


def iter_pages(
    path: Path, document_type: str, limits: ExtractLimits
) -> Iterator[tuple[int, Page, dict[str, Any] | None]]:
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
            yield pdf.count, Page(index + 1, text), warning
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
