"""Resumable upload sessions: one S3 multipart upload per session, state in Postgres.

Everything here is HTTP-free: the gateway parses requests and calls these
functions with an :class:`UploadContext` (pool, Redis, S3 clients, queue,
settings, clock).  The rules:

* **initiate** decides the part size (``UPLOAD_CHUNK_SIZE_MB``, never below
  S3's 5 MiB minimum, raised so that a file needs at most 10,000 parts),
  starts the S3 multipart upload, then creates the document, its job
  (``awaiting_upload``) and the session in one transaction.
* **parts** are verified (size, MD5) before S3 sees them, sent with
  ``ContentMD5`` so storage checks them too, then recorded with an upsert
  under the session's row lock, which publishes an ``upload`` progress event.
* **status** and **complete** reconcile Sluice's own part list with S3's
  ListParts, so a part S3 accepted just before a gateway crash, or one sent
  straight to S3 through a presigned URL, is not lost.
* **complete** holds the session's row lock from the check to the commit, so
  two racing calls complete (and enqueue) once; the second returns the same
  answer.  The job is handed to the queue after the commit and
  ``enqueued_at`` is recorded; a completion interrupted in between is
  enqueued later by a repeated ``complete`` or by the sweeper.
* **lost uploads**: when S3 no longer knows the multipart upload (aborted by
  a lifecycle rule or an operator, lost by a restarted dev S3 server) and the
  object was not completed, the parts it held are gone: part PUTs, form
  chunks, presign and complete answer 410 ``upload_lost``, and ``status``
  reports ``lost`` with no parts.  :func:`restart` recovers the session in
  place: a fresh S3 multipart upload under the same upload, job and
  document ids, recorded parts cleared, TTL renewed; the client sends every
  part again.  Parts are only ever recorded against the session's current
  S3 upload id, so a part that raced a restart is refused, not mis-recorded.
* **cancel** aborts the S3 upload and cancels the job through
  :func:`app.jobs.service.request_cancel`, the one cancel path.
* the **sweeper** (:mod:`app.uploads.sweeper`) aborts sessions past
  their TTL and those whose job was cancelled elsewhere.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy
from botocore.exceptions import ClientError
from redis.asyncio import Redis

from app.core.errors import (
    BadRequest,
    Conflict,
    Gone,
    NotFound,
)
from app.core.logging import get_logger
from app.core.queue import Priority
from app.core.schemas import Page, PageQuery, decode_cursor, encode_cursor
from app.core.settings import Settings
from app.core.storage import S3Client, client_error_code, storage_errors
from app.jobs.documents import create_document, create_job, object_key_for
from app.jobs.events import publish_event
from app.jobs.model import JobStatus, ProgressEvent, Stage
from app.jobs.service import request_cancel
from app.jobs.transitions import record_progress
from app.uploads.rules import (
    HEX_MD5,
    MAX_PARTS,
    check_filename,
    check_size,
    classify,
    decide_chunk_size,
    parse_md5,
)
from app.uploads.schemas import (
    ActiveUpload,
    CancelledUpload,
    CompletedUpload,
    InitiatedUpload,
    InitiateUpload,
    PartAccepted,
    PartInfo,
    PresignedPart,
    UploadStatus,
)

log = get_logger(__name__)

REENQUEUE_GRACE_SECONDS = 10.0
"""A completed session not marked enqueued after this long is enqueued again."""
ACTIVE_STATUSES = ("initiated", "uploading")

Db = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy

# --- collaborators -------------------------------------------------------------------


class Enqueuer(Protocol):
    async def enqueue(self, job_id: str, priority: Priority) -> bool: ...


@dataclass(frozen=True, slots=True)
class UploadContext:
    db: asyncpg.Pool
    redis: Redis | None
    s3: S3Client
    s3_public: S3Client
    queue: Enqueuer
    settings: Settings
    clock: Callable[[], float]

    @property
    def bucket(self) -> str:
        return self.settings.minio_bucket_name

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)


class Session(msgspec.Struct, kw_only=True):
    id: str
    owner_id: str
    document_id: str
    job_id: str
    s3_upload_id: str
    object_key: str
    filename: str
    file_size: int
    content_type: str
    chunk_size: int
    total_parts: int
    status: str
    expires_at: datetime
    created_at: datetime
    completed_at: datetime | None
    enqueued_at: datetime | None
    job_status: str
    priority: str

    def expected_size(self, part_number: int) -> int:
        if part_number < self.total_parts:
            return self.chunk_size
        return self.file_size - self.chunk_size * (self.total_parts - 1)

    def expired_at(self, now: datetime) -> bool:
        return self.status == "expired" or (
            self.status in ACTIVE_STATUSES and self.expires_at <= now
        )


SESSION_COLUMNS = """
    s.id::text AS id, s.owner_id, s.document_id::text AS document_id, s.job_id::text AS job_id,
    s.s3_upload_id, s.object_key, s.filename, s.file_size, s.content_type, s.chunk_size,
    s.total_parts, s.status, s.expires_at, s.created_at, s.completed_at, s.enqueued_at,
    j.status AS job_status, j.priority
"""


def session_from_row(row: asyncpg.Record) -> Session:
    return Session(**dict(row))


def check_part(
    session: Session,
    part_number: int,
    size: int | None = None,
    total_parts: int | None = None,
    *,
    size_field: str = "chunk_file",
) -> int:
    """Validate a part's number (and size, and declared total); return its expected size."""
    if total_parts is not None and total_parts != session.total_parts:
        raise BadRequest(
            f"total_parts is {total_parts} but this upload has {session.total_parts}",
            code="invalid_total_parts",
            details={"field": "total_parts", "expected": session.total_parts},
        )
    if not 1 <= part_number <= session.total_parts:
        raise BadRequest(
            f"part_number must be between 1 and {session.total_parts}",
            code="invalid_part_number",
            details={"field": "part_number", "min": 1, "max": session.total_parts},
        )
    expected = session.expected_size(part_number)
    if size is not None and size != expected:
        raise BadRequest(
            f"part {part_number} must be exactly {expected} bytes, got {size}",
            code="invalid_part_size",
            details={"field": size_field, "expected_size": expected, "size": size},
        )
    return expected


def _unquote(etag: str) -> str:
    return etag.strip('"')


# --- storage errors --------------------------------------------------------------------


async def abort_s3(ctx: UploadContext, session: Session) -> None:
    async with storage_errors("abort_multipart_upload"):
        try:
            await ctx.s3.abort_multipart_upload(
                Bucket=ctx.bucket, Key=session.object_key, UploadId=session.s3_upload_id
            )
        except ClientError as exc:
            if client_error_code(exc) not in {"NoSuchUpload", "404"}:
                raise


async def publish(ctx: UploadContext, event: ProgressEvent | None) -> None:
    if event is None or ctx.redis is None:
        return
    try:
        await publish_event(ctx.redis, event)
    except Exception:  # the table holds the truth; subscribers fall back to it
        log.warning("event_publish_failed", job_id=event.job_id, seq=event.seq, exc_info=True)


# --- sessions --------------------------------------------------------------------------


async def initiate(ctx: UploadContext, owner_id: str, req: InitiateUpload) -> InitiatedUpload:
    filename = check_filename(req.filename)
    document_type, content_type = classify(filename, req.content_type, req.document_type)
    check_size(req.file_size, ctx.settings.max_upload_size_bytes)
    if req.checksum_sha256 is not None and not re.fullmatch(
        r"[0-9a-fA-F]{64}", req.checksum_sha256
    ):
        raise BadRequest(
            "checksum_sha256 must be 64 hex digits",
            code="invalid_checksum",
            details={"field": "checksum_sha256"},
        )
    chunk_size, total_parts = decide_chunk_size(req.file_size, ctx.settings.upload_chunk_size_bytes)
    document_id, job_id, upload_id = (str(uuid.uuid4()) for _ in range(3))
    key = object_key_for(document_id)
    async with storage_errors("create_multipart_upload"):
        created = await ctx.s3.create_multipart_upload(
            Bucket=ctx.bucket,
            Key=key,
            ContentType=content_type,
            Metadata={"document-id": document_id, "owner": _ascii(owner_id)},
        )
    s3_upload_id = str(created["UploadId"])
    expires_at = ctx.now() + timedelta(hours=ctx.settings.upload_session_ttl_hours)
    try:
        async with ctx.db.acquire() as conn, conn.transaction():
            await create_document(
                conn,
                owner_id=owner_id,
                filename=filename,
                content_type=content_type,
                document_type=document_type,
                size_bytes=req.file_size,
                processing_options=req.processing_options.to_dict(),
                checksum_sha256=req.checksum_sha256.lower() if req.checksum_sha256 else None,
                document_id=document_id,
            )
            await create_job(
                conn,
                owner_id=owner_id,
                document_id=document_id,
                priority=req.priority,
                job_id=job_id,
            )
            await conn.execute(
                """
                INSERT INTO upload_sessions (id, owner_id, document_id, job_id, s3_upload_id,
                    object_key, filename, file_size, content_type, chunk_size, total_parts,
                    expires_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                """,
                uuid.UUID(upload_id),
                owner_id,
                uuid.UUID(document_id),
                uuid.UUID(job_id),
                s3_upload_id,
                key,
                filename,
                req.file_size,
                content_type,
                chunk_size,
                total_parts,
                expires_at,
            )
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: nothing half-written stays
            await ctx.s3.abort_multipart_upload(Bucket=ctx.bucket, Key=key, UploadId=s3_upload_id)
        raise
    log.info(
        "upload_initiated",
        upload_id=upload_id,
        job_id=job_id,
        size=req.file_size,
        parts=total_parts,
    )
    return InitiatedUpload(
        upload_id=upload_id,
        job_id=job_id,
        document_id=document_id,
        chunk_size=chunk_size,
        total_parts=total_parts,
        expires_at=expires_at,
        filename=filename,
        file_size=req.file_size,
        content_type=content_type,
        document_type=document_type,
        priority=str(req.priority),
    )


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode()


async def get_session(db: Db, owner_id: str, upload_id: str, *, lock: bool = False) -> Session:
    """The caller's session; unknown, malformed and foreign ids are all 404."""
    try:
        sid = uuid.UUID(upload_id)
    except ValueError:
        raise NotFound("upload not found", code="upload_not_found") from None
    row = await db.fetchrow(
        f"SELECT {SESSION_COLUMNS} FROM upload_sessions s JOIN jobs j ON j.id = s.job_id "
        f"WHERE s.id = $1 AND s.owner_id = $2{' FOR UPDATE OF s' if lock else ''}",
        sid,
        owner_id,
    )
    if row is None:
        raise NotFound("upload not found", code="upload_not_found")
    return session_from_row(row)


def ensure_writable(session: Session, now: datetime) -> None:
    """404 for an expired session, 409 for a finished one."""
    if session.expired_at(now):
        raise NotFound(
            "upload session has expired",
            code="upload_expired",
            details={"expires_at": session.expires_at.isoformat()},
        )
    if session.status == "cancelled" or session.job_status == JobStatus.CANCELLED:
        raise Conflict(
            "upload was cancelled", code="upload_cancelled", details={"status": "cancelled"}
        )
    if session.status in ("completing", "completed"):
        raise Conflict(
            "upload is already complete",
            code="upload_completed",
            details={"status": session.status},
        )


async def upload_part(
    ctx: UploadContext,
    session: Session,
    part_number: int,
    body: bytes | io.BytesIO,
    *,
    computed_md5: bytes,
    declared_md5: bytes,
) -> PartAccepted:
    """Send one verified part to S3 and record it.  ``body`` is exactly the part."""
    if isinstance(body, bytes):
        body = io.BytesIO(body)  # shares the buffer; aiohttp streams file-likes
    size = body.seek(0, io.SEEK_END)
    body.seek(0)
    check_part(session, part_number, size)
    if computed_md5 != declared_md5:
        raise BadRequest(
            "the part's MD5 does not match the declared hash; resend it",
            code="checksum_mismatch",
            details={
                "part_number": part_number,
                "expected": declared_md5.hex(),
                "computed": computed_md5.hex(),
            },
        )
    async with storage_errors("upload_part"):
        try:
            resp = await ctx.s3.upload_part(
                Bucket=ctx.bucket,
                Key=session.object_key,
                UploadId=session.s3_upload_id,
                PartNumber=part_number,
                Body=body,
                ContentMD5=base64.b64encode(declared_md5).decode(),
                ContentLength=size,
            )
        except ClientError as exc:
            code = client_error_code(exc)
            if code in {"BadDigest", "InvalidDigest"}:
                raise BadRequest(
                    "storage rejected the part's MD5; resend it",
                    code="checksum_mismatch",
                    details={"part_number": part_number},
                ) from None
            # S3 answers NoSuchUpload for a forgotten upload; some servers (the
            # embedded one) answer 500.  Either way ListParts tells for sure.
            current = await get_session(ctx.db, session.owner_id, session.id)
            ensure_writable(current, ctx.now())
            if await _list_s3_parts(ctx, current, max_parts=1) is None:
                if await _object_complete(ctx, current):
                    raise Conflict(
                        "upload is already complete; call complete",
                        code="upload_completed",
                        details={"status": "completed"},
                    ) from None
                raise upload_lost(current) from None
            raise
    return await record_part(
        ctx,
        session,
        part_number,
        size=size,
        etag=_unquote(resp["ETag"]),
        md5_hex=computed_md5.hex(),
    )


async def record_part(
    ctx: UploadContext, session: Session, part_number: int, *, size: int, etag: str, md5_hex: str
) -> PartAccepted:
    """Upsert a part S3 holds and publish the upload's progress."""
    sid = uuid.UUID(session.id)
    async with ctx.db.acquire() as conn, conn.transaction():
        current = await get_session(conn, session.owner_id, session.id, lock=True)
        ensure_writable(current, ctx.now())
        if current.s3_upload_id != session.s3_upload_id:  # restarted while this part was sent
            raise upload_lost(current)
        await conn.execute(
            """
            INSERT INTO upload_parts (upload_id, part_number, size, etag, md5)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (upload_id, part_number) DO UPDATE
            SET size = EXCLUDED.size, etag = EXCLUDED.etag, md5 = EXCLUDED.md5, created_at = now()
            """,
            sid,
            part_number,
            size,
            etag,
            md5_hex,
        )
        if current.status == "initiated":
            await conn.execute(
                "UPDATE upload_sessions SET status = 'uploading', updated_at = now() WHERE id = $1",
                sid,
            )
        parts, received = await _totals(conn, sid)
        fraction = round(received / session.file_size, 4)
        event = await record_progress(
            conn,
            None,
            session.job_id,
            stage=Stage.UPLOAD,
            stage_progress=fraction,
            message=f"uploaded part {part_number} of {session.total_parts}",
            details={
                "upload_id": session.id,
                "part_number": part_number,
                "parts_received": parts,
                "total_parts": session.total_parts,
                "bytes_received": received,
                "file_size": session.file_size,
            },
            only_if_status=[JobStatus.AWAITING_UPLOAD],
        )
    await publish(ctx, event)
    return PartAccepted(
        upload_id=session.id,
        part_number=part_number,
        etag=etag,
        size=size,
        parts_received=parts,
        bytes_received=received,
        progress=fraction,
    )


async def _totals(conn: Db, sid: uuid.UUID) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT count(*) AS n, COALESCE(sum(size), 0)::bigint AS bytes "
        "FROM upload_parts WHERE upload_id = $1",
        sid,
    )
    assert row is not None
    return int(row["n"]), int(row["bytes"])


async def presign_part(
    ctx: UploadContext, session: Session, part_number: int, content_md5: str | None = None
) -> PresignedPart:
    """A presigned ``UploadPart`` URL; ``complete`` verifies the part with ListParts."""
    ensure_writable(session, ctx.now())
    expected = check_part(session, part_number)
    if await _lost(ctx, session):  # a presigned URL for a lost upload could never work
        raise upload_lost(session)
    params: dict[str, Any] = {
        "Bucket": ctx.bucket,
        "Key": session.object_key,
        "UploadId": session.s3_upload_id,
        "PartNumber": part_number,
    }
    headers: dict[str, str] = {}
    if content_md5:
        params["ContentMD5"] = base64.b64encode(
            parse_md5(content_md5=None, hex_md5=content_md5)
        ).decode()
        headers["Content-MD5"] = params["ContentMD5"]
    ttl = ctx.settings.presign_expiry_seconds
    async with storage_errors("presign_upload_part"):
        url = await ctx.s3_public.generate_presigned_url(
            "upload_part", Params=params, ExpiresIn=ttl
        )
    return PresignedPart(
        upload_id=session.id,
        part_number=part_number,
        url=str(url),
        method="PUT",
        expires_at=ctx.now() + timedelta(seconds=ttl),
        size=expected,
        headers=headers,
    )


# --- reconciliation ---------------------------------------------------------------------


class _Part(msgspec.Struct):
    part_number: int
    size: int
    etag: str


def upload_lost(session: Session) -> Gone:
    """410 ``upload_lost``: storage no longer has the session's multipart upload."""
    log.warning("upload_lost", upload_id=session.id, job_id=session.job_id)
    return Gone(
        "storage no longer has this upload's parts (the multipart upload was aborted or "
        "lost); restart it with POST /api/v1/documents/upload/restart/{upload_id} and "
        "send every part again",
        code="upload_lost",
        details={"upload_id": session.id, "total_parts": session.total_parts},
    )


async def _object_complete(ctx: UploadContext, session: Session) -> bool:
    """Whether the object exists at the file's size (completed by a call that crashed
    before recording it)."""
    async with storage_errors("head_object"):
        try:
            head = await ctx.s3.head_object(Bucket=ctx.bucket, Key=session.object_key)
        except ClientError as exc:
            if client_error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise
    return int(head["ContentLength"]) == session.file_size


async def _lost(ctx: UploadContext, session: Session) -> bool:
    """Whether S3 forgot the session's multipart upload without completing it."""
    return await _list_s3_parts(ctx, session, max_parts=1) is None and not (
        await _object_complete(ctx, session)
    )


async def _list_s3_parts(
    ctx: UploadContext, session: Session, *, max_parts: int = 1000
) -> dict[int, _Part] | None:
    """Every part S3 holds for the session, or None once S3 no longer knows the upload.

    With ``max_parts`` below 1000 only the first page is read (a probe).
    """
    found: dict[int, _Part] = {}
    marker = 0
    async with storage_errors("list_parts"):
        while True:
            try:
                resp = await ctx.s3.list_parts(
                    Bucket=ctx.bucket,
                    Key=session.object_key,
                    UploadId=session.s3_upload_id,
                    MaxParts=max_parts,
                    PartNumberMarker=marker,
                )
            except ClientError as exc:
                if client_error_code(exc) in {"NoSuchUpload", "404"}:
                    return None
                raise
            for p in resp.get("Parts", []):
                n = int(p["PartNumber"])
                found[n] = _Part(n, int(p["Size"]), _unquote(str(p["ETag"])))
            if not resp.get("IsTruncated") or max_parts < 1000:
                return found
            marker = int(resp["NextPartNumberMarker"])


async def _db_parts(conn: Db, sid: str) -> dict[int, _Part]:
    rows = await conn.fetch(
        "SELECT part_number, size, etag FROM upload_parts WHERE upload_id = $1::uuid "
        "ORDER BY part_number",
        sid,
    )
    return {r["part_number"]: _Part(r["part_number"], r["size"], r["etag"]) for r in rows}


async def _reconcile(
    ctx: UploadContext, conn: Db, session: Session, *, authoritative: bool
) -> dict[int, _Part] | None:
    """Merge S3's ListParts into the recorded parts and return the verified set,
    or None when the upload is lost (S3 forgot it and the object is not complete).

    Parts S3 holds at the right size that Sluice did not record (a crash
    between S3 and Postgres, a presigned upload) or recorded with another
    ETag (a resend) are upserted.  With ``authoritative`` (the caller holds
    the session lock, so no part can be recorded meanwhile) a recorded part
    that S3 does not hold is dropped.
    """
    s3_parts = await _list_s3_parts(ctx, session)
    db_parts = await _db_parts(conn, session.id)
    if s3_parts is None:
        # Completed by an earlier call that crashed before recording it: complete
        # finishes from the recorded parts.  Otherwise the parts are gone.
        return db_parts if await _object_complete(ctx, session) else None
    fixes = [
        p
        for p in s3_parts.values()
        if p.part_number <= session.total_parts
        and p.size == session.expected_size(p.part_number)
        and (p.part_number not in db_parts or db_parts[p.part_number].etag != p.etag)
    ]
    if fixes:
        await conn.executemany(
            """
            INSERT INTO upload_parts (upload_id, part_number, size, etag, md5)
            VALUES ($1::uuid, $2, $3, $4, $5)
            ON CONFLICT (upload_id, part_number) DO UPDATE
            SET size = EXCLUDED.size, etag = EXCLUDED.etag, md5 = EXCLUDED.md5
            """,
            [
                (
                    session.id,
                    p.part_number,
                    p.size,
                    p.etag,
                    p.etag if HEX_MD5.match(p.etag) else "",
                )
                for p in fixes
            ],
        )
        log.info(
            "upload_parts_reconciled", upload_id=session.id, parts=[p.part_number for p in fixes]
        )
        db_parts.update({p.part_number: p for p in fixes})
    if authoritative:
        gone = [
            n for n in db_parts if n not in s3_parts or s3_parts[n].size != session.expected_size(n)
        ]
        if gone:
            await conn.execute(
                "DELETE FROM upload_parts WHERE upload_id = $1::uuid "
                "AND part_number = ANY($2::int[])",
                session.id,
                gone,
            )
            for n in gone:
                del db_parts[n]
    return db_parts


async def status(ctx: UploadContext, owner_id: str, upload_id: str) -> UploadStatus:
    session = await get_session(ctx.db, owner_id, upload_id)
    now = ctx.now()
    lost = False
    if session.status in ACTIVE_STATUSES and not session.expired_at(now):
        async with ctx.db.acquire() as conn:
            reconciled = await _reconcile(ctx, conn, session, authoritative=False)
        lost = reconciled is None
        parts = reconciled or {}
        if parts and session.status == "initiated":
            await ctx.db.execute(
                "UPDATE upload_sessions SET status = 'uploading' "
                "WHERE id = $1::uuid AND status = 'initiated'",
                session.id,
            )
            session.status = "uploading"
    else:
        parts = await _db_parts(ctx.db, session.id)
    received = sum(p.size for p in parts.values())
    shown = "expired" if session.expired_at(now) else session.status
    if shown == "completing":
        shown = "uploading"
    if shown == "uploading" and session.job_status == JobStatus.CANCELLED:
        shown = "cancelled"
    elif lost and session.job_status != JobStatus.CANCELLED:
        shown = "lost"  # POST .../restart/{upload_id} starts it again
    return UploadStatus(
        upload_id=session.id,
        status=shown,
        filename=session.filename,
        file_size=session.file_size,
        chunk_size=session.chunk_size,
        total_parts=session.total_parts,
        parts=[
            PartInfo(part_number=p.part_number, size=p.size, etag=p.etag)
            for p in sorted(parts.values(), key=lambda p: p.part_number)
        ],
        missing_parts=[]
        if shown == "completed"
        else [n for n in range(1, session.total_parts + 1) if n not in parts],
        parts_received=len(parts),
        bytes_received=received,
        progress=round(received / session.file_size, 4),
        expires_at=session.expires_at,
        job_id=session.job_id,
        document_id=session.document_id,
        created_at=session.created_at,
        completed_at=session.completed_at,
    )


async def restart(ctx: UploadContext, owner_id: str, upload_id: str) -> UploadStatus:
    """Start a fresh S3 multipart upload for a lost session, in place.

    Same upload, job and document ids; the recorded parts are cleared and the
    TTL renewed, so the client sends every part again.  Idempotent: when S3
    still knows the session's upload (never lost, or a racing restart won)
    nothing changes.  404 for an unknown or expired session, 409 for a
    cancelled or completed one.  Returns the session's status.
    """
    created_id: str | None = None
    try:
        async with ctx.db.acquire() as conn, conn.transaction():
            session = await get_session(conn, owner_id, upload_id, lock=True)
            ensure_writable(session, ctx.now())
            if await _lost(ctx, session):
                async with storage_errors("create_multipart_upload"):
                    created = await ctx.s3.create_multipart_upload(
                        Bucket=ctx.bucket,
                        Key=session.object_key,
                        ContentType=session.content_type,
                        Metadata={"document-id": session.document_id, "owner": _ascii(owner_id)},
                    )
                created_id = str(created["UploadId"])
                await conn.execute(
                    "DELETE FROM upload_parts WHERE upload_id = $1::uuid", session.id
                )
                await conn.execute(
                    "UPDATE upload_sessions SET s3_upload_id = $2, status = 'initiated', "
                    "expires_at = $3, updated_at = now() WHERE id = $1::uuid",
                    session.id,
                    created_id,
                    ctx.now() + timedelta(hours=ctx.settings.upload_session_ttl_hours),
                )
    except BaseException:
        if created_id is not None:
            with contextlib.suppress(Exception):  # best effort: nothing half-written stays
                await ctx.s3.abort_multipart_upload(
                    Bucket=ctx.bucket, Key=session.object_key, UploadId=created_id
                )
        raise
    if created_id is not None:
        log.info("upload_restarted", upload_id=session.id, job_id=session.job_id)
    return await status(ctx, owner_id, upload_id)


# --- completion --------------------------------------------------------------------------


def _completed(session: Session) -> CompletedUpload:
    return CompletedUpload(
        upload_id=session.id,
        job_id=session.job_id,
        document_id=session.document_id,
        status="queued",
        size=session.file_size,
        filename=session.filename,
    )


async def complete(ctx: UploadContext, owner_id: str, upload_id: str) -> CompletedUpload:
    """Complete the S3 upload from the verified part list and enqueue the job, once."""
    session = await get_session(ctx.db, owner_id, upload_id)
    if session.status == "completed":
        await reenqueue_if_lost(ctx, session)
        return _completed(session)
    async with ctx.db.acquire() as conn, conn.transaction():
        session = await get_session(conn, owner_id, upload_id, lock=True)
        if session.status == "completed":  # a racing call finished first
            return _completed(session)
        if session.job_status == JobStatus.CANCELLED and session.status in ACTIVE_STATUSES:
            await abort_s3(ctx, session)
            await conn.execute(
                "UPDATE upload_sessions SET status = 'cancelled', "
                "updated_at = now() WHERE id = $1::uuid",
                session.id,
            )
            raise Conflict(
                "upload was cancelled", code="upload_cancelled", details={"status": "cancelled"}
            )
        ensure_writable(session, ctx.now())
        parts = await _reconcile(ctx, conn, session, authoritative=True)
        if parts is None:
            raise upload_lost(session)
        missing = [n for n in range(1, session.total_parts + 1) if n not in parts]
        if missing:
            raise Conflict(
                f"{len(missing)} of {session.total_parts} parts are missing",
                code="missing_parts",
                details={"missing_parts": missing[:MAX_PARTS], "total_parts": session.total_parts},
            )
        await _complete_s3(ctx, session, [parts[n] for n in sorted(parts)])
        now = ctx.now()
        await conn.execute(
            "UPDATE upload_sessions SET status = 'completed', completed_at = $2, "
            "updated_at = now() WHERE id = $1::uuid",
            session.id,
            now,
        )
        await conn.execute(
            "UPDATE documents SET status = 'stored', size_bytes = $2, updated_at = now() "
            "WHERE id = $1::uuid",
            session.document_id,
            session.file_size,
        )
        event = await record_progress(
            conn,
            None,
            session.job_id,
            status=JobStatus.QUEUED,
            stage=Stage.UPLOAD,
            stage_progress=1.0,
            message="upload complete; queued for processing",
            details={
                "upload_id": session.id,
                "bytes_received": session.file_size,
                "file_size": session.file_size,
            },
            only_if_status=[JobStatus.AWAITING_UPLOAD],
        )
    await publish(ctx, event)
    session.status, session.completed_at = "completed", now
    if event is not None:
        await _enqueue(ctx, session)
    log.info(
        "upload_completed",
        upload_id=session.id,
        job_id=session.job_id,
        size=session.file_size,
        parts=session.total_parts,
    )
    return _completed(session)


async def _complete_s3(ctx: UploadContext, session: Session, parts: list[_Part]) -> None:
    async with storage_errors("complete_multipart_upload"):
        try:
            await ctx.s3.complete_multipart_upload(
                Bucket=ctx.bucket,
                Key=session.object_key,
                UploadId=session.s3_upload_id,
                MultipartUpload={
                    "Parts": [{"ETag": f'"{p.etag}"', "PartNumber": p.part_number} for p in parts]
                },
            )
        except ClientError as exc:
            code = client_error_code(exc)
            if code not in {"NoSuchUpload", "404"}:
                if code in {"InvalidPart", "InvalidPartOrder", "EntityTooSmall"}:
                    raise Conflict(
                        f"storage rejected the part list ({code}); check status "
                        "and resend the listed parts",
                        code="invalid_parts",
                        details={"s3_error": code},
                    ) from None
                raise
            # Completed by an earlier call that crashed before recording it?  Then the
            # object exists with the right size, checked below.
        head = await ctx.s3.head_object(Bucket=ctx.bucket, Key=session.object_key)
    size = int(head["ContentLength"])
    if size != session.file_size:
        log.error(
            "upload_size_mismatch", upload_id=session.id, size=size, expected=session.file_size
        )
        raise Conflict(
            f"stored object has {size} bytes, expected {session.file_size}",
            code="size_mismatch",
            details={"size": size, "file_size": session.file_size},
        )


async def _enqueue(ctx: UploadContext, session: Session) -> bool:
    try:
        await ctx.queue.enqueue(session.job_id, Priority(session.priority))
    except Exception:  # the sweeper or a repeated complete enqueues it later
        log.warning("enqueue_failed", job_id=session.job_id, exc_info=True)
        return False
    await ctx.db.execute(
        "UPDATE upload_sessions SET enqueued_at = now() WHERE id = $1::uuid", session.id
    )
    return True


async def reenqueue_if_lost(ctx: UploadContext, session: Session) -> bool:
    """Enqueue a completed upload whose enqueue never happened (crash in between)."""
    if session.enqueued_at is not None or session.completed_at is None:
        return False
    if (ctx.now() - session.completed_at).total_seconds() < REENQUEUE_GRACE_SECONDS:
        return False
    claimed = await ctx.db.fetchval(
        """
        UPDATE upload_sessions s SET enqueued_at = now()
        FROM jobs j
        WHERE s.id = $1::uuid AND j.id = s.job_id AND s.enqueued_at IS NULL AND j.status = 'queued'
        RETURNING s.id
        """,
        session.id,
    )
    if claimed is None:
        return False
    try:
        await ctx.queue.enqueue(session.job_id, Priority(session.priority))
    except Exception:
        await ctx.db.execute(
            "UPDATE upload_sessions SET enqueued_at = NULL WHERE id = $1::uuid", session.id
        )
        log.warning("reenqueue_failed", job_id=session.job_id, exc_info=True)
        return False
    log.info("upload_job_reenqueued", upload_id=session.id, job_id=session.job_id)
    return True


# --- cancel, expiry ----------------------------------------------------------------------


async def cancel(ctx: UploadContext, owner_id: str, upload_id: str) -> CancelledUpload:
    """Abort the S3 upload and cancel the job; idempotent; 409 once completed."""
    async with ctx.db.acquire() as conn, conn.transaction():
        session = await get_session(conn, owner_id, upload_id, lock=True)
        if session.status in ("completing", "completed"):
            raise Conflict(
                "upload is already complete",
                code="upload_completed",
                details={"status": session.status},
            )
        if session.expired_at(ctx.now()):
            raise NotFound("upload session has expired", code="upload_expired")
        if session.status != "cancelled":
            await abort_s3(ctx, session)
            await conn.execute(
                "UPDATE upload_sessions SET status = 'cancelled', "
                "updated_at = now() WHERE id = $1::uuid",
                session.id,
            )
    # After the commit, on its own connection: never hold one connection while waiting
    # for another.  If this fails, a repeated cancel finishes it (the job is not yet
    # cancelled, so this branch runs again).
    if session.job_status != JobStatus.CANCELLED:
        await request_cancel(ctx.db, ctx.redis, session.job_id, owner_id)
    log.info("upload_cancelled", upload_id=session.id, job_id=session.job_id)
    return CancelledUpload(upload_id=session.id, job_id=session.job_id, status="cancelled")


# --- listing ------------------------------------------------------------------------------


async def list_active(ctx: UploadContext, owner_id: str, query: PageQuery) -> Page[ActiveUpload]:
    """The caller's unfinished sessions, newest first (keyset pagination)."""
    after_ts: datetime | None = None
    after_id: uuid.UUID | None = None
    if query.cursor:
        after_ts, after_id = decode_cursor(query.cursor)
    rows = await ctx.db.fetch(
        f"""
        SELECT {SESSION_COLUMNS}, COALESCE(p.n, 0) AS parts, COALESCE(p.bytes, 0) AS bytes
        FROM upload_sessions s JOIN jobs j ON j.id = s.job_id
        LEFT JOIN LATERAL (SELECT count(*) AS n, sum(size)::bigint AS bytes
                           FROM upload_parts WHERE upload_id = s.id) p ON true
        WHERE s.owner_id = $1 AND s.status IN ('initiated', 'uploading') AND s.expires_at > $2
          AND j.status <> 'cancelled'
          AND ($3::timestamptz IS NULL OR (s.created_at, s.id) < ($3, $4::uuid))
        ORDER BY s.created_at DESC, s.id DESC
        LIMIT $5
        """,
        owner_id,
        ctx.now(),
        after_ts,
        after_id,
        query.limit + 1,
    )
    items = [_active(r) for r in rows[: query.limit]]
    next_cursor = None
    if len(rows) > query.limit:
        last = rows[query.limit - 1]
        next_cursor = encode_cursor(last["created_at"], last["id"])
    return Page[ActiveUpload](items=items, next_cursor=next_cursor)


def _active(row: asyncpg.Record) -> ActiveUpload:
    return ActiveUpload(
        upload_id=row["id"],
        status=row["status"],
        filename=row["filename"],
        file_size=row["file_size"],
        chunk_size=row["chunk_size"],
        total_parts=row["total_parts"],
        parts_received=int(row["parts"]),
        bytes_received=int(row["bytes"]),
        progress=round(int(row["bytes"]) / row["file_size"], 4),
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        job_id=row["job_id"],
        document_id=row["document_id"],
    )
