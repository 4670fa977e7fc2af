"""Presigned part uploads: the client sends a part straight to S3.

Sluice records nothing when the URL is used; ``status`` and ``complete``
find the part with S3's ListParts (:func:`app.uploads.reconcile.reconcile`).
"""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

from app.core.storage import storage_errors
from app.uploads.model import UploadContext, UploadSession
from app.uploads.parts import check_part
from app.uploads.reconcile import is_lost, upload_lost
from app.uploads.rules import parse_md5
from app.uploads.schemas import PresignedPart
from app.uploads.sessions import ensure_writable


async def presign_part(
    ctx: UploadContext, session: UploadSession, part_number: int, content_md5: str | None = None
) -> PresignedPart:
    """A presigned ``UploadPart`` URL; with ``content_md5`` (hex) storage refuses other bytes."""
    ensure_writable(session, ctx.now())
    expected = check_part(session, part_number)
    if await is_lost(ctx, session):  # a presigned URL for a lost upload could never work
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
