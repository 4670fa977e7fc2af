"""The worker's ``/health`` and ``/metrics``, on ``WORKER_METRICS_HOST:WORKER_METRICS_PORT``.

A minimal HTTP/1.1 server (loopback by default; port 0 disables it).
``/health`` answers 200 while the process lives: ``"status": "ok"``,
``"degraded"`` while Redis or Postgres is unreachable (alive: a liveness probe
must not restart a worker for an outage it is riding out), ``"stopping"`` while
running jobs are handed back.  ``/metrics`` serves the process's registry
(:class:`~workers.context.WorkerMetrics`), with the queue depth by priority
read from the jobs table at each scrape.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.core.queue import queue_depth_by_priority
from workers.context import WorkerContext


class Health(msgspec.Struct):
    """``/health``: ``status`` is ``ok``, or ``degraded`` (still 200) while Redis or
    Postgres is unreachable; ``stopping`` while running jobs are handed back."""

    status: str
    worker_id: str
    jobs_running: int
    max_jobs: int
    embedding_provider: str
    redis: str = "up"
    database: str = "up"


def _http(status: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def serve_http(
    ctx: WorkerContext, host: str, port: int, *, stopping: asyncio.Event | None = None
) -> asyncio.Server:
    """A minimal HTTP/1.1 server for ``/health`` and ``/metrics``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if path == "/health":
                health = ctx.health
                status = "degraded" if health.degraded else "ok"
                if stopping is not None and stopping.is_set():
                    status = "stopping"
                body = msgspec.json.encode(
                    Health(
                        status=status,
                        worker_id=ctx.worker_id,
                        jobs_running=len(ctx.running),
                        max_jobs=ctx.settings.max_concurrent_tasks,
                        embedding_provider=ctx.embedder.name,
                        redis="up" if health.redis_up else "down",
                        database="up" if health.database_up else "down",
                    )
                )
                writer.write(_http("200 OK", body, "application/json"))
            elif path == "/metrics":
                with contextlib.suppress(Exception):
                    for prio, n in (await queue_depth_by_priority(ctx.db)).items():
                        ctx.metrics.queue_depth.labels(prio).set(n)
                writer.write(
                    _http("200 OK", generate_latest(ctx.metrics.registry), CONTENT_TYPE_LATEST)
                )
            else:
                writer.write(_http("404 Not Found", b"not found\n", "text/plain"))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
