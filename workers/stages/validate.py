"""Stage 1, validate: fetch the object, prove it is what the client said it is.

The object is streamed from S3 to a temp file (aiofiles) while its sha256 is
computed, then checked: not empty, within the size limit, the declared
checksum, magic bytes against the declared type, and for PDFs that the file
opens, is not password-protected and has at most ``MAX_PDF_PAGES`` pages (for
PNG, JPEG and TIFF images: that the image opens, with at most that many frames).  A
PDF encrypted with an empty user password (permissions only, RC4 or AES) is
accepted: extract decrypts it.  Every failure here is permanent (a retry
cannot fix the file) except storage outages, which are transient.

Error codes: ``empty_file``, ``file_too_large``, ``checksum_mismatch``,
``type_mismatch``, ``corrupt_file``, ``encrypted_pdf``, ``too_many_pages``,
``object_missing``; transient ``storage_unavailable``.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import BinaryIO

import aiofiles
import msgspec
from botocore.exceptions import BotoCoreError, ClientError
from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError, PdfReadError, PyPdfError

from app.core.errors import PermanentError, TransientError
from app.core.storage import S3Client, client_error_code
from workers.stages.common import DocumentInfo, StageReporter
from workers.stages.formats import decode_json

READ_SIZE = 1024 * 1024
PDF_MAGIC_WINDOW = 1024
"""Readers accept ``%PDF-`` anywhere in the first KiB (PDF 32000-1, 7.5.2 note)."""

_BINARY_SIGNATURES: dict[bytes, str] = {
    b"%PDF-": "pdf",
    b"PK\x03\x04": "zip",
    b"\x89PNG": "png",
    b"\xff\xd8\xff": "jpeg",
    b"GIF8": "gif",
    b"\x1f\x8b": "gzip",
    b"\x7fELF": "elf",
    b"MZ": "exe",
    b"\xd0\xcf\x11\xe0": "ole",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
}
IMAGE_TYPES = frozenset({"png", "jpeg", "tiff"})
"""Document types that are page images: the sniffed format must be the declared one."""


class Validated(msgspec.Struct, kw_only=True):
    sha256: str
    size: int
    page_count: int | None = None
    encrypted: bool = False
    """True for a PDF with an empty user password (decrypted on read)."""


def sniff_type(head: bytes) -> str | None:
    """A binary format recognised from its first bytes, if any."""
    if b"%PDF-" in head[:PDF_MAGIC_WINDOW]:
        return "pdf"
    for magic, name in _BINARY_SIGNATURES.items():
        if head.startswith(magic):
            return name
    return None


def check_magic(document_type: str, head: bytes) -> None:
    """Raise ``type_mismatch`` when the bytes do not fit the declared type."""
    found = sniff_type(head)
    if document_type == "pdf":
        if found != "pdf":
            raise PermanentError(
                "file is not a PDF (no %PDF- header)",
                code="type_mismatch",
                details={"declared": "pdf", "detected": found or "unknown"},
            )
        return
    if document_type in IMAGE_TYPES:
        if found != document_type:
            raise PermanentError(
                f"file is not a {document_type.upper()} image",
                code="type_mismatch",
                details={"declared": document_type, "detected": found or "unknown"},
            )
        return
    utf16 = head.startswith((b"\xff\xfe", b"\xfe\xff"))
    if found is not None or (b"\x00" in head and not utf16):
        raise PermanentError(
            f"file declared as {document_type} is binary ({found or 'contains NUL bytes'})",
            code="type_mismatch",
            details={"declared": document_type, "detected": found or "binary"},
        )


async def download(
    s3: S3Client,
    bucket: str,
    key: str,
    dest: Path,
    *,
    max_bytes: int,
    report: StageReporter,
    expected_size: int = 0,
) -> tuple[str, int, bytes]:
    """Stream ``key`` into ``dest``; return (sha256, size, first KiB)."""
    digest = hashlib.sha256()
    size = 0
    head = b""
    try:
        resp = await s3.get_object(Bucket=bucket, Key=key)
        body = resp["Body"]
        total = int(resp.get("ContentLength") or expected_size or 0)
        if total > max_bytes:
            raise PermanentError(
                f"file is {total} bytes, above the {max_bytes} byte limit",
                code="file_too_large",
                details={"size": total, "limit": max_bytes},
            )
        async with aiofiles.open(dest, "wb") as out, body:
            while True:
                data = await body.read(READ_SIZE)
                if not data:
                    break
                if len(head) < PDF_MAGIC_WINDOW:
                    head += data[: PDF_MAGIC_WINDOW - len(head)]
                digest.update(data)
                size += len(data)
                if size > max_bytes:
                    raise PermanentError(
                        f"file exceeds the {max_bytes} byte limit",
                        code="file_too_large",
                        details={"limit": max_bytes},
                    )
                await out.write(data)
                if total:
                    await report.progress(min(size / total, 1.0) * 0.8, "downloading")
    except ClientError as exc:
        if client_error_code(exc) in {"NoSuchKey", "404", "NotFound"}:
            raise PermanentError("the uploaded object is missing", code="object_missing") from exc
        raise TransientError(
            f"object storage error: {client_error_code(exc)}", code="storage_unavailable"
        ) from exc
    except (BotoCoreError, OSError, TimeoutError) as exc:
        raise TransientError(
            f"object storage unreachable: {type(exc).__name__}", code="storage_unavailable"
        ) from exc
    return digest.hexdigest(), size, head


def inspect_pdf(path: Path, max_pages: int) -> tuple[int, bool]:
    """(page count, encrypted-with-empty-password) or a permanent error."""
    with path.open("rb") as fh:  # read through the file, not a copy of it in memory
        return _inspect_pdf(fh, max_pages)


def _inspect_pdf(fh: BinaryIO, max_pages: int) -> tuple[int, bool]:
    try:
        reader = PdfReader(fh)
        encrypted = reader.is_encrypted
        if encrypted:
            try:
                outcome = reader.decrypt("")
            except (DependencyError, NotImplementedError) as exc:
                raise PermanentError(
                    f"PDF uses an unsupported encryption: {exc}", code="encrypted_pdf"
                ) from exc
            if outcome == PasswordType.NOT_DECRYPTED:
                raise PermanentError("PDF is password-protected", code="encrypted_pdf")
        pages = len(reader.pages)
    except PermanentError:
        raise
    except (
        PyPdfError,
        PdfReadError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        RecursionError,
        AssertionError,
    ) as exc:
        raise PermanentError(
            f"PDF cannot be read: {type(exc).__name__}: {str(exc)[:200]}", code="corrupt_file"
        ) from exc
    if pages == 0:
        raise PermanentError("PDF has no pages", code="empty_file")
    if pages > max_pages:
        raise PermanentError(
            f"PDF has {pages} pages, above the limit of {max_pages}",
            code="too_many_pages",
            details={"pages": pages, "limit": max_pages},
        )
    return pages, encrypted


def inspect_image(path: Path, max_pages: int) -> int:
    """The frame count of a PNG, JPEG or TIFF (its pages), or a permanent error.

    Only headers are read (frames are decoded by extract, one at a time)."""
    from PIL import UnidentifiedImageError

    from workers.stages.images import frame_count, open_image

    try:
        with open_image(path) as image:
            pages = frame_count(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise PermanentError(
            f"image cannot be read: {type(exc).__name__}: {str(exc)[:200]}", code="corrupt_file"
        ) from exc
    if pages > max_pages:
        raise PermanentError(
            f"image has {pages} pages, above the limit of {max_pages}",
            code="too_many_pages",
            details={"pages": pages, "limit": max_pages},
        )
    return pages


JSON_CHECKED_IN_WORKER_BYTES = 8 * 1024 * 1024
"""JSON up to this size is decoded here, in the worker, for an early answer.  A
larger file is decoded only by the parse child, under ``PARSE_MEMORY_LIMIT_MB``:
its Python objects can take many times its size, which must never be the
worker's memory (a malformed one then fails ``corrupt_file`` in extract)."""


def check_json(path: Path) -> None:
    """Malformed JSON, or JSON nested too deeply to process, is ``corrupt_file``
    (checked here only up to :data:`JSON_CHECKED_IN_WORKER_BYTES`)."""
    if path.stat().st_size <= JSON_CHECKED_IN_WORKER_BYTES:
        decode_json(path.read_bytes())


async def validate_document(
    s3: S3Client,
    bucket: str,
    doc: DocumentInfo,
    dest: Path,
    *,
    max_bytes: int,
    max_pdf_pages: int,
    report: StageReporter,
) -> Validated:
    """Download ``doc`` to ``dest`` and validate it; see the module docstring."""
    sha256, size, head = await download(
        s3,
        bucket,
        doc.object_key,
        dest,
        max_bytes=max_bytes,
        report=report,
        expected_size=doc.size_bytes,
    )
    if size == 0:
        raise PermanentError("file is empty", code="empty_file")
    declared = (doc.checksum_sha256 or "").strip().lower()
    if declared and declared != sha256:
        raise PermanentError(
            "file content does not match the declared sha256",
            code="checksum_mismatch",
            details={"declared": declared, "actual": sha256},
        )
    check_magic(doc.document_type, head)
    await report.progress(0.85, "checking contents")
    result = Validated(sha256=sha256, size=size)
    if doc.document_type == "pdf":
        pages, encrypted = await asyncio.to_thread(inspect_pdf, dest, max_pdf_pages)
        result.page_count, result.encrypted = pages, encrypted
    elif doc.document_type in IMAGE_TYPES:
        result.page_count = await asyncio.to_thread(inspect_image, dest, max_pdf_pages)
    elif doc.document_type == "json":
        await asyncio.to_thread(check_json, dest)
    await report.progress(1.0, "valid")
    return result
