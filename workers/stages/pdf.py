"""PDF pages, one at a time, within the document's :class:`~workers.stages.budget.Budget`.

PDFs are read with pypdf one page at a time, keeping page numbers; a page that
fails is a warning, not a failure, and a page whose content streams are
absurdly large (encoded) is skipped with a warning before pypdf tries to decode
it.  Every page is charged for the decoded size of its content streams, also
when the streams are shared with other pages, whose text is extracted once
(:class:`PdfPages` caches it by object id), so 2,000 pages pointing at one
10 MB stream exhaust the document budget after ~50 pages instead of decoding
20 GB.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pypdf import PdfReader
from pypdf.generic import ArrayObject, IndirectObject, NameObject, StreamObject

from workers.stages.budget import Budget, ExtractLimits, PageTimeout, page_deadline, too_large
from workers.stages.formats import normalize_text

MAX_CONTENT_STREAM_BYTES = 16 * 1024 * 1024
"""Encoded content-stream size above which a page is skipped (decoded it can be 100x)."""
TEXT_CACHE_ENTRIES = 16
"""Texts of pages with shared content streams kept by :class:`PdfPages`."""
_INFLATE_STEP = 1024 * 1024
LETTER_SQUARE_INCHES = 8.5 * 11


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
            return "", failed_page(number, exc)
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
            return "", failed_page(number, exc)
        budget.charge_content(number, size)
        try:
            with page_deadline(budget.limits.page_seconds):
                text, warning = extract_pdf_page(self._reader, index)
        except PageTimeout:
            raise too_large(
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

    def square_inches(self, index: int) -> float:
        """Area of page ``index``'s crop box (a Letter page when it cannot be read)."""
        try:
            box = self._reader.pages[index].cropbox
            area = abs(float(box.width) * float(box.height)) / (72.0 * 72.0)
        except Exception:
            return LETTER_SQUARE_INCHES
        return area if area > 0 else LETTER_SQUARE_INCHES

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
        return "", failed_page(number, exc)


def failed_page(number: int, exc: BaseException) -> dict[str, Any]:
    return {
        "code": "page_extract_failed",
        "page": number,
        "message": f"{type(exc).__name__}: {str(exc)[:200]}",
    }
