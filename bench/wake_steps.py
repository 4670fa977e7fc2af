"""Where the milliseconds of enqueue -> start go, step by step, on one idle worker.

    python bench/wake_steps.py [--jobs 200]

Starts its own embedded stack (Postgres+pgvector, Redis, S3 API server) and
runs the production worker (``build_worker`` over ``open_worker_context``:
the real job function, lease, ledger and events) **in this process**, woken
on enqueue, idle between jobs.  Tiny text jobs are enqueued one at a time
through ``JobQueue.enqueue``; each step of the path is timestamped by a thin
wrapper around the function that ends it, and the report gives, per step,
the p50 of the time since the previous step (and the p50 of the cumulative
time since the enqueue began), over ``--jobs`` jobs.

"start" is what ``bench/wake.py`` counts: the ``ts`` of the job's ``running``
event (``updated_at`` of the row, set by Postgres' ``clock_timestamp()`` while
the statement runs, so it comes before that statement's reply).
The wrappers cost a few microseconds each; the figures are for finding the
expensive steps, ``bench/wake.py`` (a separate worker process, no wrappers)
gives the latency itself.  Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import app.core.promotion as promotion  # noqa: E402
import workers.lease as lease  # noqa: E402
import workers.run as run  # noqa: E402
import workers.runtime as runtime  # noqa: E402
import workers.wake as wake  # noqa: E402
from app.core.db import create_pool, migrate_dsn  # noqa: E402
from app.core.queue import JobQueue, Priority, connect_redis  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from app.core.storage import ensure_bucket, open_s3  # noqa: E402
from app.jobs.events import decode_event, job_channel  # noqa: E402
from bench.wake import SECRET, tiny_job  # noqa: E402
from devstack.stack import EmbeddedStack  # noqa: E402

MARKS: dict[str, float] = {}
"""Step name -> when it ended (time.time()), for the job in flight."""


def _mark(name: str) -> None:
    MARKS.setdefault(name, time.time())


def _wrap(owner: Any, attr: str, name: str, *, at_start: bool = False) -> None:
    """Mark ``name`` when ``owner.attr`` returns (or is entered, ``at_start``)."""
    original = getattr(owner, attr, None)
    if original is None:
        return

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if at_start:
            _mark(name)
        result = await original(*args, **kwargs)
        if not at_start:
            _mark(name)
        return result

    setattr(owner, attr, wrapper)


def instrument() -> None:
    """The steps, in path order (a step the code no longer has is skipped)."""
    _wrap(wake.WakeListener, "_deliver", "1 BLPOP returned", at_start=True)
    _wrap(promotion.QueuePoller, "read", "2 poll read")
    _wrap(promotion.QueuePoller, "claim", "2 poll read + claim")
    _wrap(runtime.SluiceWorker, "run_job", "3 run_job entered", at_start=True)
    _wrap(run.JobRun, "run", "4 job function entered", at_start=True)
    _wrap(lease, "acquire", "5 lease taken")
    _wrap(lease, "start", "8 statement returned (lease + ledger + running)")
    _wrap(run, "start_run", "6 ledger row")


STEPS_AFTER = ("7 running (row ts)",)


async def measure(settings: Settings, jobs: int) -> list[dict[str, float]]:
    from workers.runtime import build_worker, open_worker_context

    out: list[dict[str, float]] = []
    pool = await create_pool(settings.database_url.reveal(), max_size=2)
    redis = await connect_redis(settings.redis_url.reveal())
    queue = JobQueue(redis)
    try:
        async with open_worker_context(settings, worker_id="steps") as ctx, open_s3(settings) as s3:
            worker = build_worker(ctx, handle_signals=False)
            task = asyncio.create_task(worker.async_run())
            try:
                for i in range(jobs):
                    out.append(await one_job(pool, s3, settings, redis, queue, worker, i))
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    finally:
        await redis.aclose()
        await pool.close()
    return out


async def one_job(
    pool: Any, s3: Any, settings: Settings, redis: Any, queue: JobQueue, worker: Any, i: int
) -> dict[str, float]:
    job_id = await tiny_job(pool, s3, settings, i)
    pubsub = redis.pubsub()
    await pubsub.subscribe(job_channel(job_id))
    deadline = time.monotonic() + 10
    while not worker.waiting_for_work:  # idle again, its BLPOP on the wire
        assert time.monotonic() < deadline, "worker did not become idle"
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.02)
    MARKS.clear()
    t0 = time.time()
    await queue.enqueue(job_id, Priority.NORMAL)
    MARKS["0 enqueue returned"] = time.time()
    started = None
    while time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if msg is None:
            continue
        event = decode_event(msg["data"])
        if started is None and event.status == "running":
            started = float(event.ts)
        if event.terminal:
            break
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert started is not None, "no running event"
    marks = {k: (v - t0) * 1000 for k, v in MARKS.items()}
    marks[STEPS_AFTER[0]] = (started - t0) * 1000
    return marks


def report(rows: list[dict[str, float]], say: Callable[[str], None]) -> None:
    names = sorted({k for r in rows for k in r})
    say(f"## enqueue -> start, step by step ({len(rows)} jobs, in-process worker)")
    say("| step ends | p50 since previous step | p50 since enqueue began |")
    say("|---|---|---|")
    prev: str | None = None
    for name in names:
        cum = [r[name] for r in rows if name in r]
        delta = [
            r[name] - (r[prev] if prev else 0.0)
            for r in rows
            if name in r and (not prev or prev in r)
        ]
        say(f"| {name} | {statistics.median(delta):.2f} ms | {statistics.median(cum):.2f} ms |")
        prev = name


async def main_async(args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmpdir,
        EmbeddedStack.in_dir(Path(tmpdir) / "stack", durable=False) as stack,
    ):
        env = {
            **stack.environ(bucket="bench"),
            "JWT_SECRET": SECRET,
            "LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            "MAX_CONCURRENT_TASKS": "1",
        }
        settings = Settings.from_environ(env)
        await migrate_dsn(settings.database_url.reveal())
        async with open_s3(settings) as s3:
            await ensure_bucket(s3, settings.minio_bucket_name)
        instrument()
        rows = await measure(settings, args.jobs)
    report(rows, lambda line: print(line, flush=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    load = os.getloadavg()
    asyncio.run(main_async(args))
    print(f"\nload average at start: {load[0]:.2f}, at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
