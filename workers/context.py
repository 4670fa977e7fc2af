"""What every job of a worker process shares: collaborators, timings, metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from arq.connections import ArqRedis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.core.embedding import Embedder
from app.core.looplag import LoopLagMetrics
from app.core.queue import JobQueue
from app.core.settings import Settings
from app.core.storage import S3Client
from workers.parse import ParseChildren

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class WorkerMetrics:
    """Every series a worker process exports, registered in ``registry``.

    Built once per process with the process's registry (``workers/main.py``, or
    :func:`~workers.runtime.open_worker_context` for an embedded worker) and
    reached only through :attr:`WorkerContext.metrics`: nothing holds it in a
    module global, and a second one on the same registry fails loudly
    (duplicate series) instead of splitting the counts.  ``/metrics`` serves
    :attr:`registry`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.jobs = Counter(
            "sluice_worker_jobs_total",
            "Jobs finished by this worker, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "sluice_worker_stage_duration_seconds",
            "Time spent in each pipeline stage",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.running = Gauge(
            "sluice_worker_jobs_running", "Jobs running in this worker", registry=self.registry
        )
        self.queue_depth = Gauge(
            "sluice_queue_depth",
            "Jobs waiting (queued or retrying), by priority",
            ["priority"],
            registry=self.registry,
        )
        self.reaped = Counter(
            "sluice_worker_leases_reaped_total",
            "Jobs recovered from a lapsed lease",
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "sluice_worker_redis_up",
            "1 while this worker reaches Redis, 0 during an outage (it keeps running)",
            registry=self.registry,
        )
        self.database_up = Gauge(
            "sluice_worker_database_up",
            "1 while this worker reaches Postgres, 0 while a job waits for it",
            registry=self.registry,
        )
        self.loop_lag = LoopLagMetrics(self.registry)
        self.redis_up.set(1)
        self.database_up.set(1)


class DependencyHealth:
    """What this worker knows of Redis and Postgres right now (for ``/health``).

    Set by whoever notices: the poll-loop supervisor and the epoch watch
    (Redis), a job waiting out an outage (Postgres).  Mirrored in the
    ``sluice_worker_redis_up`` / ``sluice_worker_database_up`` gauges.
    """

    def __init__(self) -> None:
        self.redis_up = True
        self.database_up = True

    @property
    def degraded(self) -> bool:
        return not (self.redis_up and self.database_up)


@dataclass
class WorkerContext:
    """Collaborators of the job function, built once per worker process."""

    settings: Settings
    db: asyncpg.Pool
    redis: ArqRedis
    s3: S3Client
    embedder: Embedder
    tokenizer_path: Path
    """The model's ``tokenizer.json``, which the parse child chunks with."""
    queue: JobQueue
    worker_id: str
    tmp_dir: Path
    metrics: WorkerMetrics
    clock: Callable[[], float] = time.time
    lease_seconds: float = 30.0
    """A running job's lease; renewed every third of it, reaped once lapsed."""
    retry_base_seconds: float = 2.0
    """First retry delay; doubles per attempt (with jitter), capped below."""
    retry_max_seconds: float = 300.0
    max_processing_seconds: float = 3600.0
    progress_interval_seconds: float = 0.25
    """At most one recorded progress update per stage per interval (plus stage ends)."""
    running: set[str] = field(default_factory=set)
    health: DependencyHealth = field(default_factory=DependencyHealth)
    parse_children: ParseChildren = field(default_factory=ParseChildren)
    """Where jobs get their parse child process (``workers/parse.py``)."""

    @property
    def job_timeout_seconds(self) -> float:
        """ARQ's timeout for the job function: a minute above the processing
        bound, which the run enforces itself (``processing_timeout``)."""
        return self.max_processing_seconds + 60

    @property
    def in_progress_seconds(self) -> float:
        """The TTL ARQ gives a picked-up job's in-progress key (its
        ``Worker.in_progress_timeout_s``: the largest function timeout + 10 s)."""
        return self.job_timeout_seconds + 10

    def set_redis_up(self, up: bool) -> None:
        self.health.redis_up = up
        self.metrics.redis_up.set(1 if up else 0)

    def set_database_up(self, up: bool) -> None:
        self.health.database_up = up
        self.metrics.database_up.set(1 if up else 0)

    @classmethod
    def timings_from(cls, settings: Settings) -> dict[str, float]:
        return {
            "lease_seconds": float(settings.job_lease_seconds),
            "max_processing_seconds": settings.max_processing_time_minutes * 60.0,
        }
