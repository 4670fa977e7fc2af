"""``sluice-worker`` / ``python -m workers``: one worker process.

Builds :class:`~app.core.settings.Settings` from the environment once,
configures logging, loads the embedding model, and runs the ARQ worker plus a
maintenance loop (heartbeat in the worker registry, ``queue_read_limit`` from
the fleet's slots, the lease reaper, the queue resync).  ``/health`` and
``/metrics`` are served on ``WORKER_METRICS_HOST:WORKER_METRICS_PORT`` (loopback
by default; port 0 disables them).
SIGTERM/SIGINT stop it gracefully: running jobs are handed back to the queue.
``--check`` runs ARQ's health check (exit 0 when a worker is alive), for
container health probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable

import msgspec
from arq.connections import RedisSettings
from arq.worker import Worker, async_check_health
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.core.errors import ConfigError
from app.core.logging import configure_logging, get_logger
from app.core.queue import QUEUE_NAME, queue_depth_by_priority, read_limit_for
from app.core.settings import Settings
from workers import lease
from workers.context import WorkerContext
from workers.settings import build_worker, open_worker_context

log = get_logger("sluice.worker")
RESYNC_EVERY_SECONDS = 60.0


async def maintenance_tick(ctx: WorkerContext, worker: Worker | None, *, resync: bool) -> None:
    """One round of the background duties every worker shares."""
    max_jobs = ctx.settings.max_concurrent_tasks
    fleet_slots = await lease.heartbeat(ctx, max_jobs)
    if worker is not None:
        worker.queue_read_limit = read_limit_for(fleet_slots, max_jobs)
    await lease.reap_expired(ctx)
    if resync:
        await lease.resync_queue(ctx)


async def maintenance_loop(ctx: WorkerContext, worker: Worker | None) -> None:
    interval = ctx.lease_seconds / 3
    last_resync = 0.0
    while True:
        now = time.monotonic()
        try:
            await maintenance_tick(ctx, worker, resync=now - last_resync >= RESYNC_EVERY_SECONDS)
            if now - last_resync >= RESYNC_EVERY_SECONDS:
                last_resync = now
        except Exception:  # a dependency hiccup must not stop recovery for good
            log.warning("maintenance_failed", exc_info=True)
        await asyncio.sleep(interval)


class Health(msgspec.Struct):
    status: str
    worker_id: str
    jobs_running: int
    max_jobs: int
    embedding_provider: str


def _http(status: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def serve_http(ctx: WorkerContext, host: str, port: int) -> asyncio.Server:
    """A minimal HTTP/1.1 server for ``/health`` and ``/metrics``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if path == "/health":
                body = msgspec.json.encode(
                    Health(
                        status="ok",
                        worker_id=ctx.worker_id,
                        jobs_running=len(ctx.running),
                        max_jobs=ctx.settings.max_concurrent_tasks,
                        embedding_provider=ctx.embedder.name,
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


async def run(settings: Settings, *, on_ready: Callable[[], None] | None = None) -> int:
    async with open_worker_context(settings) as ctx:
        worker = build_worker(ctx)
        server = None
        if settings.worker_metrics_port:
            server = await serve_http(
                ctx, settings.worker_metrics_host, settings.worker_metrics_port
            )
        maintenance = asyncio.create_task(maintenance_loop(ctx, worker))
        log.info(
            "worker_started",
            worker_id=ctx.worker_id,
            max_jobs=settings.max_concurrent_tasks,
            provider=ctx.embedder.name,
        )
        if on_ready is not None:
            on_ready()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await worker.async_run()
        finally:
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
            if server is not None:
                server.close()
            # Let cancelled jobs hand themselves back before the pools close.
            await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
            with contextlib.suppress(Exception):
                await lease.leave(ctx)
                await ctx.redis.delete(worker.health_check_key)
            log.info(
                "worker_stopped",
                worker_id=ctx.worker_id,
                completed=worker.jobs_complete,
                failed=worker.jobs_failed,
                retried=worker.jobs_retried,
            )
    return 0


def check_health(settings: Settings) -> int:
    """``python -m workers --check``: 0 if some worker recorded ARQ's health key lately."""
    redis_settings = RedisSettings.from_dsn(settings.redis_url.reveal())
    return asyncio.run(async_check_health(redis_settings, None, QUEUE_NAME))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        settings = Settings.from_environ(os.environ)
    except ConfigError as exc:
        print(f"sluice-worker: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, secrets=settings.secrets)
    if "--check" in argv:
        return check_health(settings)
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
