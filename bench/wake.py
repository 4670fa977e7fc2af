"""Wake-ups against today's 10 ms polling, both measured in one run.

    python bench/wake.py [--latency-jobs 100] [--idle-seconds 10] [--noop-jobs 2000]
                         [--reps 2] [--report FILE]

Starts its own embedded stack (Postgres+pgvector, Redis, S3 API server), then,
for each mode -- **poll** (``WORKER_WAKE=false``, ``WORKER_POLL_INTERVAL_MS=10``:
ARQ's loop as it ran before) and **wake** (the defaults: ``WORKER_WAKE=true``,
fallback poll 1000 ms) -- starts a real worker process (``python -m workers``)
alone on that Redis and measures:

1. **Enqueue-to-start latency** on the idle worker: tiny text jobs one at a
   time, from ``JobQueue.enqueue`` to the worker's ``running`` event
   (targets for wake: p50 <= 5 ms, p99 <= 20 ms).
2. **Idle CPU** of the worker process over ``--idle-seconds`` (``/proc``
   utime + stime; target <= 1% of a core).
3. **Redis commands/s** the idle worker sends, from the ``INFO commandstats``
   delta over the same window (everything the process sends: the queue poll,
   the wake listener, the fleet heartbeat, the epoch check, ARQ's health key;
   target <= 2/s), with the commands it sent.

Then **pick-up latency** (``--pickup-jobs``): the production worker class
in this process, idle, one no-op job at a time, from ``JobQueue.enqueue`` to
the job function's start: the queue alone, without the pipeline's database
work.  And **no-op jobs/s**: the production worker class (``SluiceWorker``, the
production ARQ options) in this process, in each mode, alternating, best of
``--reps``; a producer enqueues ``--noop-jobs`` jobs through ``JobQueue`` at
four priorities while the worker runs; the rate is from the first enqueue to
the last job done (target: wake >= 0.9x poll).

Everything it starts is stopped at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from arq.connections import ArqRedis  # noqa: E402
from arq.worker import func  # noqa: E402

from app.core.db import create_pool, migrate_dsn  # noqa: E402
from app.core.queue import PROCESS_FUNCTION, JobQueue, Priority, connect_redis  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from app.core.storage import ensure_bucket, open_s3  # noqa: E402
from app.jobs.documents import create_document, create_job, object_key_for  # noqa: E402
from app.jobs.events import decode_event, job_channel  # noqa: E402
from app.jobs.model import JobStatus  # noqa: E402
from devstack.process import free_port  # noqa: E402
from devstack.stack import EmbeddedStack  # noqa: E402
from workers.runtime import SluiceWorker  # noqa: E402

SECRET = "bench-secret-" + "x" * 32
MODES = {
    "poll": {"WORKER_WAKE": "false", "WORKER_POLL_INTERVAL_MS": "10"},
    "wake": {"WORKER_WAKE": "true", "WORKER_POLL_INTERVAL_MS": "1000"},
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- a worker process ----------------------------------------------------------------


@asynccontextmanager
async def worker_process(env: dict[str, str], log_path: Path) -> AsyncIterator[int]:
    """A running ``python -m workers``; yields its pid once ``/health`` answers."""
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "workers"],
            cwd=ROOT,
            env={**env, "WORKER_METRICS_PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await wait_ready(port, proc)
            yield proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(900):
            if proc.poll() is not None:
                raise SystemExit(f"worker exited with {proc.returncode}")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health", timeout=1)).is_success:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("worker not ready")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


async def command_calls(redis: ArqRedis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


# --- 1. enqueue-to-start latency -----------------------------------------------------


async def latency(settings: Settings, redis: ArqRedis, jobs: int) -> list[float]:
    pool = await create_pool(settings.database_url.reveal(), max_size=2)
    queue = JobQueue(redis)
    out: list[float] = []
    try:
        async with open_s3(settings) as s3:
            for i in range(jobs):
                job_id = await tiny_job(pool, s3, settings, i)
                pubsub = redis.pubsub()
                await pubsub.subscribe(job_channel(job_id))
                await asyncio.sleep(0.02)  # the worker is idle again, waiting
                t0 = time.time()
                await queue.enqueue(job_id, Priority.NORMAL)
                out.append((await started_at(pubsub) - t0) * 1000)
                await pubsub.aclose()  # type: ignore[no-untyped-call]
    finally:
        await pool.close()
    return out


async def tiny_job(pool: Any, s3: Any, settings: Settings, i: int) -> str:
    owner = f"lat-{uuid.uuid4().hex[:6]}"
    doc_id = await create_document(
        pool,
        owner_id=owner,
        filename="t.txt",
        content_type="text/plain",
        document_type="txt",
        size_bytes=20,
        status="stored",
    )
    job_id = await create_job(pool, owner_id=owner, document_id=doc_id, status=JobStatus.QUEUED)
    await s3.put_object(
        Bucket=settings.minio_bucket_name, Key=object_key_for(doc_id), Body=f"note {i}".encode()
    )
    return job_id


async def started_at(pubsub: Any) -> float:
    """``ts`` of the job's ``running`` event, after waiting for its end."""
    started = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if msg is None:
            continue
        event = decode_event(msg["data"])
        if started is None and event.status == "running":
            started = event.ts
        if event.terminal:
            break
    if started is None:
        raise SystemExit("no running event within 10 s")
    return float(started)


# --- 2 + 3. the idle worker ----------------------------------------------------------


async def idle_cost(pid: int, redis: ArqRedis, seconds: float) -> tuple[float, dict[str, int]]:
    """(CPU % of one core, commands sent per command name) over ``seconds``."""
    await asyncio.sleep(2)  # settle after the latency jobs
    cpu0, calls0, t0 = cpu_seconds(pid), await command_calls(redis), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, calls1, t1 = cpu_seconds(pid), await command_calls(redis), time.monotonic()
    calls1["info"] = calls1.get("info", 0) - 1  # the second INFO counted itself
    sent = {k: n - calls0.get(k, 0) for k, n in calls1.items() if n - calls0.get(k, 0) > 0}
    return (cpu1 - cpu0) / (t1 - t0) * 100, sent


# --- 4. no-op jobs per second --------------------------------------------------------


async def _noop(ctx: dict[str, Any], job_id: str) -> None:
    state = ctx["state"]  # ARQ hands each job a copy of ctx: share through an object
    state["left"] -= 1
    if state["left"] == 0:
        state["done"].set()


def noop_worker(
    settings: Settings, redis: ArqRedis, qname: str, state: dict[str, Any], *, wake: bool
) -> SluiceWorker:
    """The production worker class and options (workers/runtime.py), a no-op job."""
    return SluiceWorker(
        functions=[func(_noop, name=PROCESS_FUNCTION, keep_result=0, max_tries=1000)],
        queue_name=qname,
        redis_pool=redis,
        max_jobs=10,
        keep_result=0,
        poll_delay=1.0 if wake else 0.01,
        queue_read_limit=100,
        max_tries=1000,
        health_check_interval=30,
        allow_abort_jobs=True,
        handle_signals=False,
        wake_redis_url=settings.redis_url.reveal() if wake else None,
        ctx={"state": state},
    )


async def noop_rate(settings: Settings, jobs: int, *, wake: bool) -> float:
    redis = await connect_redis(settings.redis_url.reveal())
    qname = f"bench:noop:{uuid.uuid4().hex[:6]}"
    queue = JobQueue(redis, queue_name=qname)
    prios = list(Priority)
    done = asyncio.Event()
    worker = noop_worker(settings, redis, qname, {"left": jobs, "done": done}, wake=wake)
    task = asyncio.create_task(worker.async_run())
    try:
        await asyncio.sleep(0.5)  # idle first, as in production
        t0 = time.perf_counter()
        for i in range(jobs):
            await queue.enqueue(f"{qname}:{i}", prios[i % 4])
        await asyncio.wait_for(done.wait(), 300)
        return jobs / (time.perf_counter() - t0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()


async def pickup_latency(settings: Settings, jobs: int, *, wake: bool) -> list[float]:
    """ms from ``JobQueue.enqueue`` to the job function's start, idle worker, no DB."""
    redis = await connect_redis(settings.redis_url.reveal())
    qname = f"bench:pickup:{uuid.uuid4().hex[:6]}"
    queue = JobQueue(redis, queue_name=qname)
    out: list[float] = []
    task = None
    try:
        for i in range(jobs):
            done = asyncio.Event()
            state = {"left": 1, "done": done}
            if task is None:
                worker = noop_worker(settings, redis, qname, state, wake=wake)
                task = asyncio.create_task(worker.async_run())
                await asyncio.sleep(0.5)
            worker.ctx["state"] = state
            await asyncio.sleep(0.02)  # idle again
            t0 = time.perf_counter()
            await queue.enqueue(f"{qname}:{i}", Priority.NORMAL)
            await asyncio.wait_for(done.wait(), 10)
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()
    return out


# --- orchestration -------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> list[str]:
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmpdir:
        tmp = Path(tmpdir)
        with EmbeddedStack.in_dir(tmp / "stack", durable=False) as stack:
            env = {
                **stack.environ(bucket="bench"),
                "JWT_SECRET": SECRET,
                "LOG_LEVEL": "WARNING",
                "LOG_FORMAT": "json",
                "HF_HUB_OFFLINE": "1",
                "PATH": os.environ["PATH"],
                "MAX_CONCURRENT_TASKS": "1",
            }
            settings = Settings.from_environ(env)
            await migrate_dsn(settings.database_url.reveal())
            async with open_s3(settings) as s3:
                await ensure_bucket(s3, settings.minio_bucket_name)
            redis = await connect_redis(settings.redis_url.reveal())
            try:
                await per_mode(args, env, settings, redis, tmp, say)
            finally:
                await redis.aclose()
            await noop(args, settings, say)
    return lines


async def per_mode(
    args: argparse.Namespace,
    env: dict[str, str],
    settings: Settings,
    redis: ArqRedis,
    tmp: Path,
    say: Any,
) -> None:
    results: dict[str, tuple[list[float], float, dict[str, int]]] = {}
    per_job: dict[str, float] = {}
    for mode, extra in MODES.items():
        async with worker_process({**env, **extra}, tmp / f"worker-{mode}.log") as pid:
            calls0 = await command_calls(redis)
            lat = await latency(settings, redis, args.latency_jobs)
            calls1 = await command_calls(redis)
            per_job[mode] = (sum(calls1.values()) - sum(calls0.values())) / args.latency_jobs
            cpu, sent = await idle_cost(pid, redis, args.idle_seconds)
        results[mode] = (lat, cpu, sent)
    say(f"## Idle worker: poll every 10 ms vs wake-ups ({args.latency_jobs} jobs)")
    say("| mode | enqueue->start p50 | p99 | max | idle CPU | Redis commands/s |")
    say("|---|---|---|---|---|---|")
    for mode, (lat, cpu, sent) in results.items():
        rate = sum(sent.values()) / args.idle_seconds
        say(
            f"| {mode} | {statistics.median(lat):.1f} ms | {pct(lat, 0.99):.1f} ms | "
            f"{max(lat):.1f} ms | {cpu:.2f}% | {rate:.2f} |"
        )
    (poll_lat, poll_cpu, poll_sent), (lat, cpu, sent) = results["poll"], results["wake"]
    say(
        f"wake vs poll: p50 {statistics.median(lat) / statistics.median(poll_lat):.2f}x, "
        f"p99 {pct(lat, 0.99) / pct(poll_lat, 0.99):.2f}x, "
        f"idle CPU {cpu / max(poll_cpu, 1e-9):.3f}x, "
        f"Redis commands {sum(sent.values()) / max(1, sum(poll_sent.values())):.3f}x "
        "(targets: wake p50 <= 5 ms, p99 <= 20 ms, CPU <= 1%, <= 2 commands/s)"
    )
    for mode, (_, _, sent) in results.items():
        top = sorted(sent.items(), key=lambda kv: -kv[1])
        say(f"{mode} idle commands in {args.idle_seconds:.0f} s: {dict(top)}")
    say(
        "Redis commands per tiny job, the enqueue and this bench's subscription included: "
        + ", ".join(f"{mode} {n:.0f}" for mode, n in per_job.items())
    )


async def noop(args: argparse.Namespace, settings: Settings, say: Any) -> None:
    best: dict[str, float] = {}
    for _ in range(args.reps):
        for mode in MODES:
            rate = await noop_rate(settings, args.noop_jobs, wake=mode == "wake")
            best[mode] = max(best.get(mode, 0.0), rate)
    say("")
    say(f"## Pick-up latency, production worker class in-process, no DB ({args.pickup_jobs} jobs)")
    for mode in MODES:
        lat = await pickup_latency(settings, args.pickup_jobs, wake=mode == "wake")
        say(
            f"{mode}: enqueue -> job function p50 {statistics.median(lat):.2f} ms, "
            f"p99 {pct(lat, 0.99):.2f} ms, max {max(lat):.2f} ms"
        )
    say("")
    say(f"## No-op jobs/s, production worker class, max_jobs 10 (best of {args.reps})")
    say(
        f"poll {best['poll']:.0f}/s, wake {best['wake']:.0f}/s: "
        f"ratio {best['wake'] / best['poll']:.3f} (target >= 0.9)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--noop-jobs", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--pickup-jobs", type=int, default=200)
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    load = os.getloadavg()
    lines = asyncio.run(main_async(args))
    lines.append(f"\nload average at start: {load[0]:.2f}, at end: {os.getloadavg()[0]:.2f}")
    print(lines[-1])
    if args.report:
        cmd = "python bench/wake.py " + " ".join(sys.argv[1:])
        args.report.write_text(f"# Wake-up benchmark\n\nCommand: `{cmd}`\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
