"""The tus 1.0.0 protocol as pure functions: header parsing, metadata, checksums.

No I/O here.  Each parser takes a raw header value and returns what it means,
or raises the precise :class:`~app.core.errors.SluiceError` naming the header
(400 for a malformed value, 412 for another protocol version, 415 for a body
that is not ``application/offset+octet-stream``).  The gateway's tus routes
(:mod:`app.gateway.routes.tus`) and the service (:mod:`app.uploads.tus`) share
these, so the two never disagree on what a header says.

Invariants:

* :func:`parse_metadata` accepts exactly the tus grammar (comma-separated
  ``key[ base64value]``, unique ASCII keys without spaces or commas) and
  returns the decoded values as text; the raw header is what ``HEAD`` echoes.
* :class:`Checksum` only ever names an algorithm of :data:`CHECKSUM_ALGORITHMS`.
* :func:`upload_id_of` accepts a URL (absolute or a path) only if its path
  ends in ``/api/v1/tus/<uuid>``; it never follows the URL anywhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import ClassVar
from urllib.parse import urlsplit

import msgspec

from app.core.errors import BadRequest, SluiceError, UnsupportedMediaType

TUS_VERSION = "1.0.0"
TUS_PREFIX = "/api/v1/tus"
TUS_EXTENSIONS = (
    "creation",
    "creation-with-upload",
    "creation-defer-length",
    "expiration",
    "checksum",
    "termination",
    "concatenation",
)
CHECKSUM_ALGORITHMS: dict[str, Callable[[], hashlib._Hash]] = {
    "md5": lambda: hashlib.md5(usedforsecurity=False),
    "sha1": lambda: hashlib.sha1(usedforsecurity=False),
    "sha256": hashlib.sha256,
}
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
MAX_METADATA_CHARS = 16 * 1024
"""Longest ``Upload-Metadata`` accepted (the HTTP server already bounds headers)."""

# Metadata keys Sluice reads; any others are kept (HEAD echoes them) and ignored.
FILENAME_KEYS = ("filename", "name")
"""Where the file's name may be (tus-js-client and tuspy examples use ``filename``,
Uppy sends both)."""
FILETYPE_KEYS = ("filetype", "type", "content_type")
"""Where its content type may be (Uppy sends ``filetype`` and ``type``)."""


class PreconditionFailed(SluiceError):
    """412: the client speaks another tus version (``Tus-Version`` names ours)."""

    status = 412
    default_code = "tus_version_unsupported"


class Locked(SluiceError):
    """423: another request holds this upload (a PATCH in progress, on any replica)."""

    status = 423
    default_code = "upload_locked"


class ChecksumMismatch(SluiceError):
    """460 (tus checksum extension): the PATCH body does not match ``Upload-Checksum``."""

    status = 460
    default_code = "checksum_mismatch"


class Concat(msgspec.Struct, frozen=True):
    """What ``Upload-Concat`` says: ``partial``, or ``final`` with the partial ids in order."""

    kind: str
    """``none``, ``partial`` or ``final``."""
    partial_ids: tuple[str, ...] = ()
    header: str = ""
    """The header as received (a final upload's ``HEAD`` echoes it)."""


NO_CONCAT = Concat("none")


def check_version(value: str | None) -> None:
    """412 unless the request speaks tus 1.0.0 (``Tus-Resumable``)."""
    if value != TUS_VERSION:
        raise PreconditionFailed(
            f"this server speaks tus {TUS_VERSION}; send Tus-Resumable: {TUS_VERSION}",
            details={"field": "Tus-Resumable", "supported": [TUS_VERSION]},
            headers={"Tus-Version": TUS_VERSION},
        )


def check_content_type(value: str | None) -> None:
    """415 unless the body is ``application/offset+octet-stream``."""
    declared = (value or "").split(";", 1)[0].strip().lower()
    if declared != OFFSET_OCTET_STREAM:
        raise UnsupportedMediaType(
            f"a tus body must be sent as {OFFSET_OCTET_STREAM}",
            code="unsupported_content_type",
            details={"field": "Content-Type", "accepted": [OFFSET_OCTET_STREAM]},
        )


def parse_count(value: str, header: str) -> int:
    """A non-negative decimal integer header (``Upload-Offset``, ``Upload-Length``)."""
    text = value.strip()
    if not text.isdigit() or not text.isascii() or len(text) > 19:
        raise BadRequest(
            f"{header} must be a non-negative integer",
            code=f"invalid_{header.lower().replace('-', '_')}",
            details={"field": header},
        )
    return int(text)


def parse_length(length: str | None, defer: str | None) -> int | None:
    """``Upload-Length``, or None for ``Upload-Defer-Length: 1``; exactly one is required."""
    if defer is not None and defer.strip() != "1":
        raise BadRequest(
            "Upload-Defer-Length must be 1",
            code="invalid_upload_defer_length",
            details={"field": "Upload-Defer-Length"},
        )
    if (length is None) == (defer is None):
        raise BadRequest(
            "send exactly one of Upload-Length and Upload-Defer-Length: 1",
            code="invalid_upload_length",
            details={"field": "Upload-Length"},
        )
    return None if length is None else parse_count(length, "Upload-Length")


def parse_metadata(value: str | None) -> dict[str, str]:
    """``Upload-Metadata``: ``key base64value,key2,...`` as decoded text values."""
    if value is None or not value.strip():
        return {}

    def refuse(reason: str) -> BadRequest:
        return BadRequest(
            f"Upload-Metadata {reason}",
            code="invalid_metadata",
            details={"field": "Upload-Metadata", "reason": reason},
        )

    if len(value) > MAX_METADATA_CHARS:
        raise refuse(f"must be at most {MAX_METADATA_CHARS} characters")
    found: dict[str, str] = {}
    for pair in value.split(","):
        words = pair.strip().split(" ")
        key = words[0]
        if not key or len(words) > 2 or not key.isascii() or not key.isprintable():
            raise refuse("must be comma-separated 'key base64value' pairs")
        if key in found:
            raise refuse(f"names {key!r} twice")
        encoded = words[1] if len(words) == 2 else ""
        try:
            raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
            found[key] = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            raise refuse(f"value of {key!r} is not base64 of UTF-8 text") from None
    return found


def first_of(metadata: dict[str, str], keys: tuple[str, ...]) -> str | None:
    return next((metadata[k] for k in keys if k in metadata), None)


def initiate_fields(metadata: dict[str, str], file_size: int) -> dict[str, object]:
    """The fields of an ``initiate`` request that the metadata spells (not yet validated)."""
    fields: dict[str, object] = {"file_size": file_size}
    filename = first_of(metadata, FILENAME_KEYS)
    if filename is not None:
        fields["filename"] = filename
    filetype = first_of(metadata, FILETYPE_KEYS)
    if filetype is not None:
        fields["content_type"] = filetype
    for key in ("priority", "document_type", "checksum_sha256"):
        if metadata.get(key):
            fields[key] = metadata[key]
    return fields


class Checksum(msgspec.Struct, frozen=True):
    """A declared ``Upload-Checksum``: the algorithm and the digest it must give."""

    algorithm: str
    digest: bytes

    NAMES: ClassVar[str] = ",".join(CHECKSUM_ALGORITHMS)

    def hasher(self) -> hashlib._Hash:
        return CHECKSUM_ALGORITHMS[self.algorithm]()

    def verify(self, computed: bytes) -> None:
        """460 unless ``computed`` is the declared digest."""
        if computed != self.digest:
            raise ChecksumMismatch(
                f"the body's {self.algorithm} does not match Upload-Checksum; nothing was kept",
                details={
                    "field": "Upload-Checksum",
                    "algorithm": self.algorithm,
                    "expected": base64.b64encode(self.digest).decode(),
                    "computed": base64.b64encode(computed).decode(),
                },
            )


def parse_checksum(value: str | None) -> Checksum | None:
    """``Upload-Checksum: <algorithm> <base64 digest>``; 400 for an unsupported algorithm."""
    if value is None:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    algorithm = algorithm.lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise BadRequest(
            f"checksum algorithm {algorithm!r} is not supported; use one of {Checksum.NAMES}",
            code="unsupported_checksum_algorithm",
            details={"field": "Upload-Checksum", "supported": list(CHECKSUM_ALGORITHMS)},
        )
    size = CHECKSUM_ALGORITHMS[algorithm]().digest_size
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != size:
        raise BadRequest(
            f"Upload-Checksum must be '{algorithm} <base64 of the {size}-byte digest>'",
            code="invalid_checksum",
            details={"field": "Upload-Checksum"},
        )
    return Checksum(algorithm, digest)


def upload_id_of(url: str) -> str:
    """The upload id in a tus upload URL (absolute or a path), or 400."""
    path = urlsplit(url.strip()).path.rstrip("/")
    head, _, tail = path.rpartition("/")
    try:
        if not head.endswith(TUS_PREFIX):
            raise ValueError(url)
        return str(uuid.UUID(tail))
    except ValueError:
        raise BadRequest(
            f"{url[:200]!r} is not a tus upload URL of this server",
            code="invalid_upload_concat",
            details={"field": "Upload-Concat"},
        ) from None


def parse_concat(value: str | None) -> Concat:
    """``Upload-Concat``: absent, ``partial``, or ``final;<url> <url> ...``."""
    if value is None:
        return NO_CONCAT
    text = value.strip()
    if text == "partial":
        return Concat("partial", header=text)
    kind, sep, urls = text.partition(";")
    if kind != "final" or not sep or not urls.split():
        raise BadRequest(
            "Upload-Concat must be 'partial' or 'final;<url> <url> ...'",
            code="invalid_upload_concat",
            details={"field": "Upload-Concat"},
        )
    return Concat("final", tuple(upload_id_of(u) for u in urls.split()), header=text)


def http_date(moment: datetime) -> str:
    """An RFC 9110 HTTP-date (``Upload-Expires``): ``Wed, 25 Jun 2014 16:00:00 GMT``."""
    return format_datetime(moment.astimezone(UTC), usegmt=True)
