"""What extracting one document may cost, and the running totals that enforce it.

:class:`ExtractLimits` comes from the ``MAX_PAGE_CONTENT_MB``/``MAX_DOCUMENT_CONTENT_MB``/
``MAX_PAGE_CHARS``/``MAX_DOCUMENT_CHARS``/``PAGE_TIME_BUDGET_SECONDS`` settings;
:class:`Budget` charges each page against it (decoded content-stream bytes,
extracted characters) and :func:`page_deadline` bounds the time one page may
take.  Exceeding any of them is the permanent error ``too_large_extracted``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import msgspec

from app.core.errors import PermanentError
from workers.stages.ocr import OcrOptions

TOO_LARGE = "too_large_extracted"
MB = 1024 * 1024


class ExtractLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What extracting one document may cost (see the module docstring)."""

    page_content_bytes: int = 32 * MB
    document_content_bytes: int = 512 * MB
    page_chars: int = 200_000
    document_chars: int = 20_000_000
    page_seconds: float = 10.0
    ocr: OcrOptions = msgspec.field(default_factory=OcrOptions)
    """How pages without text are OCR'd (``workers/stages/ocr.py``)."""


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
            raise too_large(
                f"page {page} has {_mb(size)} of decoded content, above the "
                f"{_mb(limits.page_content_bytes)} page limit (MAX_PAGE_CONTENT_MB)",
                page=page,
                limit_bytes=limits.page_content_bytes,
            )
        self.content_bytes += size
        if self.content_bytes > limits.document_content_bytes:
            raise too_large(
                f"the document's decoded content passed the "
                f"{_mb(limits.document_content_bytes)} limit at page {page} "
                "(MAX_DOCUMENT_CONTENT_MB)",
                page=page,
                limit_bytes=limits.document_content_bytes,
            )

    def charge_chars(self, page: int, count: int, *, paged: bool = True) -> None:
        limits = self.limits
        if paged and count > limits.page_chars:
            raise too_large(
                f"page {page} yields {count} characters, above the {limits.page_chars} "
                "page limit (MAX_PAGE_CHARS)",
                page=page,
                limit_chars=limits.page_chars,
            )
        self.chars += count
        if self.chars > limits.document_chars:
            raise too_large(
                f"the document's text passed the {limits.document_chars} character limit"
                + (f" at page {page}" if paged else "")
                + " (MAX_DOCUMENT_CHARS)",
                page=page,
                limit_chars=limits.document_chars,
            )


def _mb(size: int) -> str:
    return f"{size / MB:.1f} MiB"


def too_large(message: str, **details: Any) -> PermanentError:
    """The permanent error of a document over one of its :class:`ExtractLimits`."""
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
