"""The pure rules of uploads: part sizes, accepted file types, limits, checksums.

No I/O here: each function checks one thing and raises the precise
:class:`~app.core.errors.SluiceError` (naming the offending field) when it fails.
"""

from __future__ import annotations

import base64
import math
import re
import unicodedata
from urllib.parse import quote

from app.core.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from app.jobs.documents import DOCUMENT_TYPES

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB
"""S3's minimum size for every part but the last."""
MAX_PARTS = 10_000
# document type -> (canonical content type, accepted declared content types)
CONTENT_TYPES: dict[str, tuple[str, frozenset[str]]] = {
    "pdf": ("application/pdf", frozenset({"application/pdf", "application/x-pdf"})),
    "txt": ("text/plain", frozenset({"text/plain"})),
    "md": ("text/markdown", frozenset({"text/markdown", "text/x-markdown", "text/plain"})),
    "csv": (
        "text/csv",
        frozenset({"text/csv", "application/csv", "text/plain", "application/vnd.ms-excel"}),
    ),
    "json": ("application/json", frozenset({"application/json", "text/json", "text/plain"})),
    "html": ("text/html", frozenset({"text/html", "application/xhtml+xml"})),
    "png": ("image/png", frozenset({"image/png"})),
    "jpeg": ("image/jpeg", frozenset({"image/jpeg", "image/jpg", "image/pjpeg"})),
    "tiff": ("image/tiff", frozenset({"image/tiff", "image/tif", "image/x-tiff"})),
}
EXTENSIONS = {
    "pdf": "pdf",
    "txt": "txt",
    "text": "txt",
    "md": "md",
    "markdown": "md",
    "csv": "csv",
    "json": "json",
    "html": "html",
    "htm": "html",
    "png": "png",
    "jpg": "jpeg",
    "jpeg": "jpeg",
    "tif": "tiff",
    "tiff": "tiff",
}
_UNDECLARED_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
MAX_FILENAME_BYTES = 255
"""Longest filename accepted, in UTF-8 bytes after NFC normalisation (as most file systems)."""
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
"""Bidirectional formatting characters: they make ``evil\u202etxt.exe`` read as ``evilexe.txt``."""
_LINE_SEPARATORS = frozenset("\u2028\u2029")
FILENAME_CHARS = r"[^\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
"""A character :func:`check_filename` accepts, as a regex class (for the API schema)."""
FILENAME_PATTERN = (
    f"^{FILENAME_CHARS}*\\.(?:"
    + "|".join("".join(f"[{c.upper()}{c}]" for c in ext) for ext in EXTENSIONS)
    + ")$"
)
"""What :func:`check_filename` and :func:`classify` accept, as a JSON Schema pattern
(the extension is case-insensitive)."""
FILENAME_JSON_SCHEMA = {"pattern": FILENAME_PATTERN, "maxLength": MAX_FILENAME_BYTES}
"""``maxLength`` counts characters: a non-ASCII name can pass it and still exceed
:data:`MAX_FILENAME_BYTES` (400 ``invalid_filename``)."""
HEX_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")
HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def decide_chunk_size(file_size: int, configured: int) -> tuple[int, int]:
    """``(chunk_size, total_parts)`` for a file: at least 5 MiB, at most 10,000 parts."""
    chunk = max(configured, MIN_PART_SIZE)
    if math.ceil(file_size / chunk) > MAX_PARTS:
        chunk = math.ceil(file_size / MAX_PARTS / MiB) * MiB  # whole MiB keeps parts tidy
    return chunk, max(1, math.ceil(file_size / chunk))


def check_filename(filename: str) -> str:
    """The filename normalised to NFC, or 400 ``invalid_filename``.

    Refused (never silently altered): empty or blank names; control characters
    (C0, DEL, C1) and Unicode line separators; bidirectional controls
    (U+202A-U+202E, U+2066-U+2069, U+200E/U+200F, U+061C); lone surrogates;
    names over :data:`MAX_FILENAME_BYTES` UTF-8 bytes.  Invariant: a name that
    passes is safe to store, to log and to put (encoded by
    :func:`content_disposition`) in an HTTP header.
    """

    def refuse(reason: str, **details: object) -> BadRequest:
        return BadRequest(
            f"filename {reason}",
            code="invalid_filename",
            details={"field": "filename", "reason": reason, **details},
        )

    name = unicodedata.normalize("NFC", filename)
    if not name.strip():
        raise refuse("must not be empty")
    for ch in name:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F or ch in _LINE_SEPARATORS:
            raise refuse("must not contain control characters", character=f"U+{code:04X}")
        if ch in _BIDI_CONTROLS:
            raise refuse(
                "must not contain bidirectional control characters", character=f"U+{code:04X}"
            )
        if 0xD800 <= code <= 0xDFFF:
            raise refuse("must be valid Unicode", character=f"U+{code:04X}")
    size = len(name.encode("utf-8"))
    if size > MAX_FILENAME_BYTES:
        raise refuse(
            f"must be at most {MAX_FILENAME_BYTES} bytes in UTF-8",
            limit=MAX_FILENAME_BYTES,
            size=size,
        )
    return name


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    """An RFC 6266 ``Content-Disposition`` value: an ASCII fallback and ``filename*``.

    ``attachment; filename="resume.pdf"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf``.
    The fallback drops accents (NFKD) and replaces what remains outside
    printable ASCII, quotes and backslashes with ``_``; the header is pure ASCII.
    """
    ascii_name = (
        "".join(
            ch if 0x20 <= ord(ch) < 0x7F and ch not in '"\\' else "_"
            for ch in unicodedata.normalize("NFKD", filename)
            if not unicodedata.combining(ch)
        ).strip()
        or "download"
    )
    encoded = quote(filename, safe="", encoding="utf-8", errors="replace")
    return f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{encoded}"


def classify(filename: str, content_type: str, document_type: str | None) -> tuple[str, str]:
    """``(document_type, content_type)`` for an upload, or 415 saying what is wrong.

    The extension must be one of the allowed types; a declared content type
    (other than the generic ``application/octet-stream``) must fit it, and so
    must a declared ``document_type``.
    """
    base = re.split(r"[/\\]", filename)[-1]
    ext = base.rsplit(".", 1)[1].lower() if "." in base else ""
    allowed = sorted(DOCUMENT_TYPES)
    by_ext = EXTENSIONS.get(ext)
    if by_ext is None:
        raise UnsupportedMediaType(
            f"files of type {('.' + ext) if ext else '(no extension)'} are not accepted; "
            f"allowed: {', '.join(allowed)}",
            code="unsupported_file_type",
            details={"field": "filename", "allowed": allowed},
        )
    if document_type is not None and document_type != by_ext:
        raise UnsupportedMediaType(
            f"document_type {document_type!r} does not match the file's extension .{ext}",
            code="unsupported_file_type",
            details={"field": "document_type", "allowed": allowed, "expected": by_ext},
        )
    canonical, accepted = CONTENT_TYPES[by_ext]
    declared = content_type.split(";", 1)[0].strip().lower()
    if declared in _UNDECLARED_TYPES:
        return by_ext, canonical
    if declared not in accepted:
        raise UnsupportedMediaType(
            f"content type {declared!r} does not match a .{ext} file",
            code="unsupported_content_type",
            details={"field": "content_type", "accepted": sorted(accepted)},
        )
    return by_ext, declared


def check_size(file_size: int, limit: int, *, field: str = "file_size") -> None:
    if file_size < 1:
        raise BadRequest(
            "file_size must be at least 1 byte", code="invalid_file_size", details={"field": field}
        )
    if file_size > limit:
        raise PayloadTooLarge(
            f"{field} {file_size} exceeds the limit of {limit} bytes ({limit // MiB} MiB)",
            code="file_too_large",
            details={"field": field, "limit": limit, "limit_mb": limit // MiB, "size": file_size},
        )


def check_sha256(checksum: str | None) -> str | None:
    """A declared SHA-256 (64 hex digits) in lower case, or 400 ``invalid_checksum``."""
    if checksum is None:
        return None
    if not HEX_SHA256.fullmatch(checksum):
        raise BadRequest(
            "checksum_sha256 must be 64 hex digits",
            code="invalid_checksum",
            details={"field": "checksum_sha256"},
        )
    return checksum.lower()


def parse_md5(*, content_md5: str | None, hex_md5: str | None) -> bytes:
    """The declared MD5 digest from ``Content-MD5`` (base64) or a hex string."""
    if hex_md5:
        if not HEX_MD5.match(hex_md5.strip()):
            raise BadRequest(
                "chunk_hash must be the part's MD5 as 32 hex digits",
                code="invalid_checksum",
                details={"field": "chunk_hash"},
            )
        return bytes.fromhex(hex_md5.strip())
    if content_md5:
        value = content_md5.strip()
        try:  # RFC 1864 pads to 24 characters; 22 without the padding is as clear
            digest = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
        except ValueError:
            digest = b""
        if len(digest) != 16:
            raise BadRequest(
                "Content-MD5 must be the base64 of the part's 16-byte MD5",
                code="invalid_checksum",
                details={"field": "Content-MD5"},
            )
        return digest
    raise BadRequest(
        "send the part's MD5 as Content-MD5 (base64) or X-Chunk-Hash (hex)",
        code="checksum_required",
        details={"field": "Content-MD5"},
    )
