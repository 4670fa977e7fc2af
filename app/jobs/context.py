"""The collaborators the jobs and documents services take.

:class:`JobsContext` is a protocol: the gateway passes its own
:class:`~app.gateway.services.Services`, which has every member, and a test
or a tool can pass anything else that does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import asyncpg
from arq.connections import ArqRedis
from botocore.exceptions import ClientError

from app.core.queue import JobQueue
from app.core.settings import Settings
from app.core.storage import S3Client, client_error_code, storage_errors

_MISSING_OBJECT = frozenset({"404", "NoSuchKey", "NotFound"})


class JobsContext(Protocol):
    """What the jobs and documents services read: the pool, Redis, the queue, S3."""

    @property
    def settings(self) -> Settings: ...
    @property
    def db(self) -> asyncpg.Pool: ...
    @property
    def redis(self) -> ArqRedis: ...
    @property
    def queue(self) -> JobQueue: ...
    @property
    def s3(self) -> S3Client: ...
    @property
    def s3_public(self) -> S3Client:
        """Signs presigned URLs with the endpoint clients can reach."""
        ...

    @property
    def clock(self) -> Callable[[], float]: ...


async def object_exists(ctx: JobsContext, key: str, *, operation: str) -> bool:
    """Whether the object is stored; an S3 failure is 503 ``storage_unavailable``."""
    async with storage_errors(operation):
        try:
            await ctx.s3.head_object(Bucket=ctx.settings.minio_bucket_name, Key=key)
        except ClientError as exc:
            if client_error_code(exc) in _MISSING_OBJECT:
                return False
            raise
    return True
