"""What storage holds against what Sluice recorded, and telling a lost upload.

``status`` and ``complete`` merge S3's ListParts into the recorded parts
(:func:`reconcile`), so a part S3 accepted just before a gateway crash, or
one sent straight to S3 through a presigned URL, is not lost.

**Lost uploads**: when S3 no longer knows the multipart upload (aborted by a
lifecycle rule or an operator, lost by a restarted dev S3 server) and the
object was not completed, the parts it held are gone: part PUTs, form chunks,
presign and complete answer 410 ``upload_lost`` (:func:`upload_lost`), and
``status`` reports ``lost`` with no parts, until the client restarts the
session (:func:`app.uploads.sessions.restart`).
"""

from __future__ import annotations

from botocore.exceptions import ClientError

from app.core.db import Queryable
from app.core.errors import Gone
from app.core.logging import get_logger
from app.core.storage import client_error_code, storage_errors
from app.uploads.model import StoredPart, UploadContext, UploadSession
from app.uploads.rules import HEX_MD5

log = get_logger(__name__)

NO_SUCH_UPLOAD = frozenset({"NoSuchUpload", "404"})
"""S3 error codes meaning the multipart upload is unknown (404 from some servers)."""


def unquote(etag: str) -> str:
    return etag.strip('"')


def upload_lost(session: UploadSession) -> Gone:
    """410 ``upload_lost``: storage no longer has the session's multipart upload."""
    log.warning("upload_lost", upload_id=session.id, job_id=session.job_id)
    return Gone(
        "storage no longer has this upload's parts (the multipart upload was aborted or "
        "lost); restart it with POST /api/v1/documents/upload/restart/{upload_id} and "
        "send every part again",
        code="upload_lost",
        details={"upload_id": session.id, "total_parts": session.total_parts},
    )


async def object_complete(ctx: UploadContext, session: UploadSession) -> bool:
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


async def is_lost(ctx: UploadContext, session: UploadSession) -> bool:
    """Whether S3 forgot the session's multipart upload without completing it."""
    return await list_s3_parts(ctx, session, max_parts=1) is None and not (
        await object_complete(ctx, session)
    )


async def list_s3_parts(
    ctx: UploadContext, session: UploadSession, *, max_parts: int = 1000
) -> dict[int, StoredPart] | None:
    """Every part S3 holds for the session, or None once S3 no longer knows the upload.

    With ``max_parts`` below 1000 only the first page is read (a probe).
    """
    found: dict[int, StoredPart] = {}
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
                if client_error_code(exc) in NO_SUCH_UPLOAD:
                    return None
                raise
            for p in resp.get("Parts", []):
                n = int(p["PartNumber"])
                found[n] = StoredPart(n, int(p["Size"]), unquote(str(p["ETag"])))
            if not resp.get("IsTruncated") or max_parts < 1000:
                return found
            marker = int(resp["NextPartNumberMarker"])


async def recorded_parts(conn: Queryable, upload_id: str) -> dict[int, StoredPart]:
    """The parts Sluice recorded for a session, by number."""
    rows = await conn.fetch(
        "SELECT part_number, size, etag FROM upload_parts WHERE upload_id = $1::uuid "
        "ORDER BY part_number",
        upload_id,
    )
    return {r["part_number"]: StoredPart(r["part_number"], r["size"], r["etag"]) for r in rows}


async def reconcile(
    ctx: UploadContext, conn: Queryable, session: UploadSession, *, authoritative: bool
) -> dict[int, StoredPart] | None:
    """Merge S3's ListParts into the recorded parts and return the verified set,
    or None when the upload is lost (S3 forgot it and the object is not complete).

    Parts S3 holds at the right size that Sluice did not record (a crash
    between S3 and Postgres, a presigned upload) or recorded with another
    ETag (a resend) are upserted.  With ``authoritative`` (the caller holds
    the session lock, so no part can be recorded meanwhile) a recorded part
    that S3 does not hold is dropped.
    """
    s3_parts = await list_s3_parts(ctx, session)
    db_parts = await recorded_parts(conn, session.id)
    if s3_parts is None:
        # Completed by an earlier call that crashed before recording it: complete
        # finishes from the recorded parts.  Otherwise the parts are gone.
        return db_parts if await object_complete(ctx, session) else None
    await _record_unrecorded(conn, session, s3_parts, db_parts)
    if authoritative:
        await _drop_unheld(conn, session, s3_parts, db_parts)
    return db_parts


async def _record_unrecorded(
    conn: Queryable,
    session: UploadSession,
    s3_parts: dict[int, StoredPart],
    db_parts: dict[int, StoredPart],
) -> None:
    """Upsert the parts S3 holds at the right size that are unrecorded or re-sent."""
    fixes = [
        p
        for p in s3_parts.values()
        if p.part_number <= session.total_parts
        and p.size == session.expected_size(p.part_number)
        and (p.part_number not in db_parts or db_parts[p.part_number].etag != p.etag)
    ]
    if not fixes:
        return
    await conn.executemany(
        """
        INSERT INTO upload_parts (upload_id, part_number, size, etag, md5)
        VALUES ($1::uuid, $2, $3, $4, $5)
        ON CONFLICT (upload_id, part_number) DO UPDATE
        SET size = EXCLUDED.size, etag = EXCLUDED.etag, md5 = EXCLUDED.md5
        """,
        [
            (session.id, p.part_number, p.size, p.etag, p.etag if HEX_MD5.match(p.etag) else "")
            for p in fixes
        ],
    )
    log.info("upload_parts_reconciled", upload_id=session.id, parts=[p.part_number for p in fixes])
    db_parts.update({p.part_number: p for p in fixes})


async def _drop_unheld(
    conn: Queryable,
    session: UploadSession,
    s3_parts: dict[int, StoredPart],
    db_parts: dict[int, StoredPart],
) -> None:
    """Forget recorded parts S3 does not hold (at the right size)."""
    gone = [
        n for n in db_parts if n not in s3_parts or s3_parts[n].size != session.expected_size(n)
    ]
    if not gone:
        return
    await conn.execute(
        "DELETE FROM upload_parts WHERE upload_id = $1::uuid AND part_number = ANY($2::int[])",
        session.id,
        gone,
    )
    for n in gone:
        del db_parts[n]
