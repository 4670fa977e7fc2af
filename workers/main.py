"""``sluice-worker`` / ``python -m workers``: one worker process.

Builds :class:`~app.core.settings.Settings` from the environment once,
configures logging, loads the embedding model, and runs the ARQ worker plus a
maintenance loop (heartbeat in the worker registry, ``queue_read_limit`` from
the fleet's slots, the lease reaper, the queue resync).  ``/health`` and
``/metrics`` are served on ``WORKER_METRICS_HOST:WORKER_METRICS_PORT`` (loopback
by default; port 0 disables them).
SIGTERM/SIGINT stop it gracefully: running jobs are handed back to the queue,
and ``/health`` keeps answering until the last of them has.
``--check`` runs ARQ's health check (exit 0 when a worker is alive), for
container health probes.

Outages are waited out, never fatal: ARQ's poll loop runs under
:func:`poll_supervised`, which resumes it (backoff with jitter) once Redis
answers again while running jobs carry on; ``/health`` then says
``"status": "degraded"`` with HTTP **200** (alive: a liveness probe must not
restart a worker for an outage it is riding out) and ``sluice_worker_redis_up``
drops to 0.  :func:`watch_queue_epoch` notices within
:data:`EPOCH_CHECK_SECONDS` that Redis lost its data and re-enqueues the
waiting jobs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
from collections.abc import Callable

import msgspec
import redis.exceptions
from arq.worker import Worker, async_check_health
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.core.errors import ConfigError
from app.core.logging import configure_logging, get_logger
from app.core.outage import is_database_outage, is_redis_outage
from app.core.queue import QUEUE_NAME, queue_depth_by_priority, read_limit_for, redis_settings
from app.core.settings import Settings
from workers import lease
from workers.context import WorkerContext
from workers.runtime import build_worker, open_worker_context

log = get_logger("sluice.worker")
RESYNC_EVERY_SECONDS = 60.0
EPOCH_CHECK_SECONDS = 2.0
"""How often each worker checks that Redis still holds the queue (one SET NX)."""
RESUME_BACKOFF = (0.1, 5.0)
"""First and largest wait (seconds, jittered) before resuming a failed poll loop."""


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
        except Exception as exc:  # a dependency hiccup must not stop recovery for good
            outage = is_redis_outage(exc) or is_database_outage(exc)
            if is_redis_outage(exc):
                ctx.set_redis_up(False)
            log.warning("maintenance_failed", error=type(exc).__name__, exc_info=not outage)
        await asyncio.sleep(interval)


async def watch_queue_epoch(ctx: WorkerContext) -> None:
    """Resync the queue from the jobs table as soon as Redis has lost its data."""
    while True:
        try:
            if await lease.claim_new_epoch(ctx):
                requeued = await lease.resync_queue(ctx, grace_seconds=0)
                log.warning("queue_state_lost_resynced", requeued=len(requeued))
            ctx.set_redis_up(True)
        except Exception as exc:  # Redis (or Postgres) away: try again next round
            if is_redis_outage(exc):
                ctx.set_redis_up(False)
            log.info("epoch_check_failed", error=type(exc).__name__)
        await asyncio.sleep(EPOCH_CHECK_SECONDS)


_RESUMABLE = (redis.exceptions.RedisError, OSError, TimeoutError)


async def poll_supervised(worker: Worker, ctx: WorkerContext) -> None:
    """Run ARQ's poll loop until the worker is told to stop.

    ARQ's loop ends at the first Redis error (a restart, a failover, a blip);
    here it is resumed once Redis answers a ``PING`` again, after a backoff
    with jitter.  Running jobs are separate tasks: they are untouched.
    Returns when a signal stopped the worker (ARQ cancels its main task).
    """
    stopping = asyncio.Event()
    worker.on_stop = lambda _sig: stopping.set()
    delay = RESUME_BACKOFF[0]
    while not stopping.is_set():
        try:
            await worker.async_run()
            return
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return  # ARQ's signal handler cancelled its main task: shutting down
        except _RESUMABLE as exc:
            ctx.set_redis_up(False)
            log.warning("queue_poll_interrupted", error=type(exc).__name__, detail=str(exc)[:200])
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay * random.uniform(0.5, 1.0))  # noqa: S311
            delay = min(delay * 2, RESUME_BACKOFF[1])
            try:
                await ctx.redis.ping()
            except _RESUMABLE:
                continue
            ctx.set_redis_up(True)
            log.info("queue_poll_resumed")
            delay = RESUME_BACKOFF[0]
            break


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


async def run(settings: Settings, *, on_ready: Callable[[], None] | None = None) -> int:
    async with open_worker_context(settings) as ctx:
        worker = build_worker(ctx)
        server = None
        stopping = asyncio.Event()
        if settings.worker_metrics_port:
            server = await serve_http(
                ctx,
                settings.worker_metrics_host,
                settings.worker_metrics_port,
                stopping=stopping,
            )
        maintenance = asyncio.create_task(maintenance_loop(ctx, worker))
        epoch = asyncio.create_task(watch_queue_epoch(ctx))
        log.info(
            "worker_started",
            worker_id=ctx.worker_id,
            max_jobs=settings.max_concurrent_tasks,
            provider=ctx.embedder.name,
        )
        if on_ready is not None:
            on_ready()
        try:
            await poll_supervised(worker, ctx)
        finally:
            stopping.set()
            for task in (maintenance, epoch):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Let cancelled jobs hand themselves back before the pools close;
            # /health answers ("stopping") until the last one has.
            await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
            if server is not None:
                server.close()
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
    return asyncio.run(
        async_check_health(redis_settings(settings.redis_url.reveal()), None, QUEUE_NAME)
    )


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
