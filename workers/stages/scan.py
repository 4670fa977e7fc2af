"""Which pages are OCR'd, and what the job is told about them.

The rule (:func:`needs_ocr`): a PDF page needs OCR when its text layer has
fewer than :data:`MIN_CHARS_PER_SQUARE_INCH` letters and digits per square inch
of page (about 19 on a Letter or A4 page: a page number, a scanner's stamp,
nothing a reader would call text).  Its OCR text replaces the text layer only
when it has more letters and digits; pages with text keep pypdf's extraction
and are never OCR'd.  Uploaded images have no text layer: every frame is OCR'd.

:class:`Scanner` OCRs the pages, at most ``OCR_MAX_PAGES`` per document, each
within ``OCR_PAGE_TIME_SECONDS``, and says what happened as one record per page
on the job's warnings (the extract stage's one channel for per-page notes):

* ``page_ocr`` -- the page was read by OCR (``lines``, mean ``confidence``,
  ``rotated`` quarter turns); counted into the job result's ``ocr_pages``;
* ``ocr_page_limit`` -- once, on the first page past ``OCR_MAX_PAGES``; it and
  the later pages without text are skipped;
* ``page_ocr_failed`` / ``page_ocr_timeout`` -- the engine could not read that
  page, or took too long: the page is skipped;
* ``ocr_disabled`` -- once, when a page needed OCR and ``OCR_ENABLED`` is off.

A document still empty after all this fails ``no_text`` as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workers.stages.budget import Budget, PageTimeout, page_deadline
from workers.stages.formats import normalize_text
from workers.stages.images import PageImageError
from workers.stages.ocr import OcrEngine, OcrFailed, OcrOptions, quiet_native_threads

if TYPE_CHECKING:
    from PIL import Image

MIN_CHARS_PER_SQUARE_INCH = 0.2
OCR_RECORD = "page_ocr"
"""The code of the per-page record of a page read by OCR (not a problem)."""


def letters(text: str) -> int:
    return sum(1 for ch in text if ch.isalnum())


def needs_ocr(text: str, square_inches: float) -> bool:
    """Whether a page with this text layer is a scan (see the module docstring)."""
    return letters(text) < MIN_CHARS_PER_SQUARE_INCH * square_inches


def ocr_pages(warnings: list[dict[str, Any]]) -> int:
    """How many pages of a job's warnings were read by OCR."""
    return sum(1 for w in warnings if w.get("code") == OCR_RECORD)


class Scanner:
    """OCRs the pages of one document that need it (see the module docstring)."""

    def __init__(self, options: OcrOptions, *, engine: OcrEngine | None = None) -> None:
        self.options = options
        self.engine = engine or OcrEngine(options)
        self.pages = 0
        """Pages OCR'd so far (attempted, within ``OCR_MAX_PAGES``)."""
        self._told: set[str] = set()

    def _once(self, code: str, number: int, message: str) -> dict[str, Any] | None:
        if code in self._told:
            return None
        self._told.add(code)
        return {"code": code, "page": number, "message": message}

    def read(
        self,
        number: int,
        image: Callable[[], Image.Image | None],
        budget: Budget,
        *,
        text_layer: str = "",
    ) -> tuple[str, dict[str, Any] | None]:
        """(text, record) of page ``number``; ``image`` produces its page image
        (raising :class:`PageImageError`, or None when it already failed)."""
        options = self.options
        if not options.enabled:
            return text_layer, self._once(
                "ocr_disabled", number, "pages without text were not OCR'd (OCR_ENABLED is off)"
            )
        if self.pages >= options.max_pages:
            return text_layer, self._once(
                "ocr_page_limit",
                number,
                f"{options.max_pages} pages were OCR'd (OCR_MAX_PAGES); this and later "
                "pages without text were skipped",
            )
        self.pages += 1
        quiet_native_threads()  # before the renderer or the engine loads numpy
        try:
            with page_deadline(options.page_seconds):
                page = image()
                if page is None:
                    return text_layer, None
                read = self.engine.read(page)
                del page
        except PageImageError as exc:
            return text_layer, exc.warning
        except PageTimeout:
            return text_layer, {
                "code": "page_ocr_timeout",
                "page": number,
                "message": f"OCR took longer than {options.page_seconds:g} s "
                "(OCR_PAGE_TIME_SECONDS); page skipped",
            }
        except OcrFailed as exc:
            return text_layer, {"code": "page_ocr_failed", "page": number, "message": str(exc)}
        text = normalize_text(read.text)
        if letters(text) <= letters(text_layer):
            return text_layer, None
        budget.charge_chars(number, len(text))
        return text, {
            "code": OCR_RECORD,
            "page": number,
            "lines": read.lines,
            "confidence": read.confidence,
            "rotated": read.rotated,
            "message": "read by OCR",
        }
