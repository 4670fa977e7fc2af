"""Parts of a resumable upload: received, verified, stored, recorded.

A part's bytes arrive into a :class:`PartBuffer` (memory grows as bytes
arrive, never reserved up front; the MD5 is computed piece by piece), are
verified (size, MD5) before S3 sees them, sent with ``ContentMD5`` so
storage checks them too (:func:`upload_part`), then recorded with an upsert
under the session's row lock, which records an ``upload`` progress change of
the job (:func:`record_part`), published once the transaction commits.
"""

from __future__ import annotations

import base64
import hashlib
import io
import uuid
from collections.abc import AsyncIterator

from botocore.exceptions import ClientError

from app.core.db import Queryable
from app.core.errors import BadRequest, Conflict
from app.core.storage import client_error_code, storage_errors
from app.jobs.model import JobStatus, Stage
from app.jobs.transitions import job_transaction
from app.uploads.model import UploadContext, UploadSession, UploadSessionStatus
from app.uploads.reconcile import list_s3_parts, object_complete, unquote, upload_lost
from app.uploads.schemas import PartAccepted
from app.uploads.sessions import ensure_writable, get_session


def check_part(
    session: UploadSession,
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


class PartBuffer:
    """One part held in memory as it arrives, with its MD5.

    Room is reserved as bytes arrive, never before: the reservation doubles from
    :data:`MIN_RESERVE` (twice what has arrived) until that would reach a quarter
    of ``capacity`` (the part's size), and then becomes the whole part.  So a slow
    client that sent a few bytes costs 64 KiB, not a part; a part costs its size
    only once an eighth of it has arrived; at most an eighth of the part is copied
    by regrowth (no quadratic copying, and the big buffer is allocated once, which
    keeps the allocator's peak where a fixed buffer would be); and S3's client
    streams from :meth:`finish`'s ``BytesIO`` without another copy.
    """

    MIN_RESERVE = 64 * 1024

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.body = io.BytesIO()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0
        self._reserved = 0

    def add(self, data: bytes) -> None:
        end = self.size + len(data)
        if end > self._reserved:
            room = max(self.MIN_RESERVE, 2 * end)
            self._reserve(max(end, self.capacity if 4 * room >= self.capacity else room))
        self.body.write(data)
        self.md5.update(data)
        self.size = end

    def _reserve(self, room: int) -> None:
        self.body.seek(room - 1)
        self.body.write(b"\0")
        self.body.seek(self.size)
        self._reserved = room

    def finish(self) -> io.BytesIO:
        """The part's bytes (the unused reservation dropped), positioned at 0."""
        self.body.truncate(self.size)
        self.body.seek(0)
        return self.body


async def read_exact(
    chunks: AsyncIterator[bytes], size: int, *, field: str = "body"
) -> tuple[io.BytesIO, bytes]:
    """Read exactly ``size`` bytes (400 on more or fewer) into a :class:`PartBuffer`;
    return it and the bytes' MD5.  The buffer is freed at once on any failure."""
    part = PartBuffer(size)
    try:
        async for piece in chunks:
            if part.size + len(piece) > size:
                raise BadRequest(
                    f"part must be exactly {size} bytes; more were sent",
                    code="invalid_part_size",
                    details={"field": field, "expected_size": size},
                )
            part.add(piece)
        if part.size != size:
            raise BadRequest(
                f"part must be exactly {size} bytes, got {part.size}",
                code="invalid_part_size",
                details={"field": field, "expected_size": size, "size": part.size},
            )
    except BaseException:
        part.body.close()  # free it now, not when the error's traceback goes
        raise
    return part.finish(), part.md5.digest()


async def upload_part(
    ctx: UploadContext,
    session: UploadSession,
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
            await _explain_refused_part(ctx, session, part_number, exc)
            raise
    return await record_part(
        ctx,
        session,
        part_number,
        size=size,
        etag=unquote(resp["ETag"]),
        md5_hex=computed_md5.hex(),
    )


async def _explain_refused_part(
    ctx: UploadContext, session: UploadSession, part_number: int, exc: ClientError
) -> None:
    """Raise what S3 refusing a part means for the client, if it means anything."""
    if client_error_code(exc) in {"BadDigest", "InvalidDigest"}:
        raise BadRequest(
            "storage rejected the part's MD5; resend it",
            code="checksum_mismatch",
            details={"part_number": part_number},
        ) from None
    # S3 answers NoSuchUpload for a forgotten upload; some servers (the
    # embedded one) answer 500.  Either way ListParts tells for sure.
    current = await get_session(ctx.db, session.owner_id, session.id)
    ensure_writable(current, ctx.now())
    if await list_s3_parts(ctx, current, max_parts=1) is None:
        if await object_complete(ctx, current):
            raise Conflict(
                "upload is already complete; call complete",
                code="upload_completed",
                details={"status": "completed"},
            ) from None
        raise upload_lost(current) from None


async def record_part(
    ctx: UploadContext,
    session: UploadSession,
    part_number: int,
    *,
    size: int,
    etag: str,
    md5_hex: str,
) -> PartAccepted:
    """Upsert a part S3 holds and record the upload's progress on the job."""
    async with job_transaction(ctx.db, ctx.redis) as changes:
        conn = changes.conn
        current = await get_session(conn, session.owner_id, session.id, lock=True)
        ensure_writable(current, ctx.now())
        if current.s3_upload_id != session.s3_upload_id:  # restarted while this part was sent
            raise upload_lost(current)
        await _store_part(conn, current, part_number, size=size, etag=etag, md5_hex=md5_hex)
        parts, received = await _totals(conn, session.id)
        fraction = round(received / session.file_size, 4)
        await changes.record(
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
    return PartAccepted(
        upload_id=session.id,
        part_number=part_number,
        etag=etag,
        size=size,
        parts_received=parts,
        bytes_received=received,
        progress=fraction,
    )


async def _store_part(
    conn: Queryable,
    session: UploadSession,
    part_number: int,
    *,
    size: int,
    etag: str,
    md5_hex: str,
) -> None:
    """Upsert the part (a resend replaces it); the first part makes the session ``uploading``."""
    sid = uuid.UUID(session.id)
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
    if session.status == UploadSessionStatus.INITIATED:
        await conn.execute(
            "UPDATE upload_sessions SET status = 'uploading', updated_at = now() WHERE id = $1",
            sid,
        )


async def _totals(conn: Queryable, upload_id: str) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT count(*) AS n, COALESCE(sum(size), 0)::bigint AS bytes "
        "FROM upload_parts WHERE upload_id = $1::uuid",
        upload_id,
    )
    assert row is not None
    return int(row["n"]), int(row["bytes"])
