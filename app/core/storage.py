"""Object storage (MinIO in production, any S3 API server in dev and tests).

:func:`open_s3` yields a raw aioboto3 S3 client configured for path-style
addressing and SigV4, which is what MinIO needs.  Higher-level operations
(multipart sessions, streaming reads) live next to the code that uses them and
take this client as a collaborator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from app.core.errors import ServiceUnavailable
from app.core.logging import get_logger
from app.core.settings import Settings

if TYPE_CHECKING:
    from botocore.config import Config

log = get_logger(__name__)

S3Client = Any  # aiobotocore's client is dynamically typed


def _config(max_pool_connections: int) -> Config:
    from botocore.config import Config  # imported when a client is made: the WS server never does

    return Config(
        signature_version="s3v4",
        # Bodies we send carry Content-MD5, which is signed and which the server
        # verifies; hashing every byte again for SigV4 costs ~16% of the gateway's
        # CPU per uploaded MiB for no added integrity.
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        connect_timeout=5,
        read_timeout=60,
        # Checksums other than MD5 are not understood by every S3 server.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


@asynccontextmanager
async def open_s3(
    settings: Settings, *, public: bool = False, max_pool_connections: int = 50
) -> AsyncIterator[S3Client]:
    """An S3 client for the configured endpoint (``public`` for presigned URLs)."""
    import aioboto3  # ~200 ms and ~17 MiB: only processes that talk to S3 pay for it

    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=settings.s3_public_endpoint_url if public else settings.s3_endpoint_url,
        aws_access_key_id=settings.minio_access_key,
        aws_secret_access_key=settings.minio_secret_key.reveal(),
        region_name=settings.minio_region,
        config=_config(max_pool_connections),
    ) as client:
        yield client


async def ensure_bucket(s3: S3Client, bucket: str) -> bool:
    """Create ``bucket`` unless it exists; return True if it was created."""
    try:
        await s3.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    try:
        await s3.create_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            raise
        return False
    return True


def client_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchUpload``...), else None."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


_STORAGE_FAILURES = (BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError)


@asynccontextmanager
async def storage_errors(operation: str) -> AsyncIterator[None]:
    """Turn S3 failures the caller did not handle into 503 ``storage_unavailable``."""
    try:
        yield
    except ClientError as exc:
        code = client_error_code(exc)
        log.warning("storage_error", operation=operation, s3_error=code)
        raise ServiceUnavailable(
            f"object storage failed during {operation} ({code})",
            code="storage_unavailable",
            details={"operation": operation, "s3_error": code},
        ) from None
    except _STORAGE_FAILURES as exc:
        log.warning(
            "storage_unreachable",
            operation=operation,
            error=type(exc).__name__,
            reason=str(exc)[:300],
        )
        raise ServiceUnavailable(
            f"object storage is unreachable ({type(exc).__name__})",
            code="storage_unavailable",
            details={"operation": operation},
        ) from None
