"""``sluice-worker`` / ``python -m workers``: one worker process.

Builds :class:`~app.core.settings.Settings` from the environment once,
configures logging and the process's metrics registry, opens the worker's
collaborators (``workers/runtime.py``: pools, the embedding model, the ARQ
worker) and runs, until SIGTERM/SIGINT:

* the poll loop (woken on enqueue, ``workers/wake.py``), supervised so that a
  Redis outage pauses it instead of ending the process
  (:func:`~workers.runtime.poll_supervised`);
* the fleet's maintenance loop and queue-epoch watch (``workers/fleet.py``:
  heartbeat, lease reaper, queue resync);
* ``/health`` and ``/metrics`` (``workers/health.py``).

SIGTERM/SIGINT stop it gracefully: running jobs are handed back to the queue,
and ``/health`` keeps answering (``"stopping"``) until the last of them has.
``--check`` runs ARQ's health check (exit 0 when a worker is alive), for
container health probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from arq.worker import async_check_health
from prometheus_client import CollectorRegistry

from app.core.errors import ConfigError
from app.core.logging import configure_logging, get_logger
from app.core.looplag import LoopLagProbe
from app.core.queue import QUEUE_NAME, redis_settings
from app.core.settings import Settings
from workers import fleet
from workers.context import WorkerMetrics
from workers.health import serve_http
from workers.runtime import build_worker, open_worker_context, poll_supervised

log = get_logger("sluice.worker")


async def run(settings: Settings) -> int:
    """Run one worker until it is told to stop (see the module docstring)."""
    metrics = WorkerMetrics(CollectorRegistry())
    async with open_worker_context(settings, metrics=metrics) as ctx:
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
        # 4 samples/s: an idle worker's CPU stays under 1% (200 wake-ups/s cost ~3%);
        # a timer's lateness is the loop's lag whatever the sleep asked for.
        lag = LoopLagProbe(metrics.loop_lag, "worker", interval=0.25)
        lag.start()
        maintenance = asyncio.create_task(fleet.maintenance_loop(ctx, worker))
        epoch = asyncio.create_task(fleet.watch_queue_epoch(ctx))
        log.info(
            "worker_started",
            worker_id=ctx.worker_id,
            max_jobs=settings.max_concurrent_tasks,
            provider=ctx.embedder.name,
        )
        try:
            await poll_supervised(worker, ctx)
        finally:
            stopping.set()
            await lag.stop()
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
                await fleet.leave(ctx)
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
