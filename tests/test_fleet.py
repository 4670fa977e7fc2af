"""A crowded fleet on one machine (issue 12 item 3): exactly once, under SIGKILL.

6 ``python -m workers`` processes, 2 ``sluice gateway`` processes and 2
``sluice ws`` servers against the one Redis, Postgres and S3 of the test stack.
4 users upload 2,000 no-op-sized jobs and 100 small real documents through both
gateways at mixed priorities (``POST /documents/upload/simple``) while every job
is watched over WebSocket by two subscribers, one on each WS server.  Two
workers are SIGKILLed mid-run (each while it holds a lease) and restarted.

The no-op-sized jobs are tiny text notes, most of them identical for their
user: they go through the lease, the ledger, the queue, events, the S3
download and validate, and then end ``deduplicated`` (no parse child, no
embedding), so the run fits a CI budget on 2 cores while hammering the
concurrent dedup path; the first of each note and the 100 real documents are
parsed, embedded and indexed.

Afterwards, from the tables rather than from statuses alone:

* every job ran to a terminal state exactly once: one run with a final outcome
  in the ``job_runs`` ledger, and no run left open;
* chunks per document equal a clean in-process run's (extract + chunk of the same
  bytes), with zero duplicates: per user and content exactly one document holds
  chunks and every other one points at it;
* no job is ``running`` without a live lease;
* a higher priority never started after a lower one that started while it was
  ready and waiting (beyond :data:`PRIORITY_SLACK_S` of poll staleness);
* every subscriber got each of its jobs' terminal event exactly once.

It prints its duration with the load average.  Select it with ``-m fleet``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect

from app.core.auth import TokenService
from app.core.embedding import LocalEmbedder, load_tokenizer
from app.core.keepalive import CLIENT_KEEPALIVE_EXPIRY
from app.core.queue import Priority
from app.gateway.services import Services
from app.jobs.model import FINAL_RUN_OUTCOMES
from devstack.process import free_port
from tests.fixtures_pipeline import ROOT, EmbeddingEndpoint, WorkerProcs, make_pdf, page_sentence
from tests.fixtures_ws import WsProcess
from workers.stages.chunk import chunk_pages
from workers.stages.common import NullReporter
from workers.stages.extract import extract_document

TIMEOUT_S = int(os.environ.get("SLUICE_FLEET_TIMEOUT_S", "420"))
"""The whole test's bound (the soak raises it)."""
pytestmark = [pytest.mark.fleet, pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S)]

WORKERS = 6
USERS = 4
TINY_JOBS = int(os.environ.get("SLUICE_FLEET_TINY_JOBS", "2000"))
REAL_DOCS = int(os.environ.get("SLUICE_FLEET_REAL_DOCS", "100"))
"""The issue's sizes; ``bench/fleet.py`` (the soak) raises them through the environment."""
KILLS = int(os.environ.get("SLUICE_FLEET_KILLS", "2"))
"""Workers SIGKILLed mid-run (0: the clean baseline of ``bench/fleet.py``)."""
NOTES_PER_USER = 10
"""Distinct tiny notes per user; the other tiny uploads repeat them."""
UPLOAD_CONCURRENCY = 12
PRIORITY_SLACK_S = float(os.environ.get("SLUICE_FLEET_PRIORITY_SLACK_S", "1.0"))
"""How stale a worker's read of the queue, and late its first write, may be on a quiet
machine; scaled by the machine's oversubscription (1-minute load / cores) when loaded."""
REAL_OPTIONS = {"chunk_size": 48, "chunk_overlap": 8}
EMBEDDER = os.environ.get("SLUICE_FLEET_EMBEDDER", "local")
"""``local``: each worker loads MiniLM in-process (the production default, and this
test's); ``shared``: workers use ``EMBEDDING_PROVIDER=openai`` against one real
model served from the test process (6x less start-up CPU and memory, for a loaded
machine or a quick iteration)."""
READY_TIMEOUT_S = 240
"""Six workers importing torch and loading the model at once on 2 busy cores."""
WORKER_ENV = {
    "JOB_LEASE_SECONDS": "3",
    "MAX_CONCURRENT_TASKS": "4",
    "MAX_PROCESSING_TIME_MINUTES": "10",
    "EMBEDDING_THREADS": "1",  # six workers on a few cores (README: sizing a fleet)
}
GATEWAY_ENV = {"RATE_LIMIT_UPLOADS_PER_MINUTE": "100000"}
TERMINAL = {"completed", "failed", "cancelled"}
_decode = msgspec.json.Decoder().decode


@dataclass(frozen=True)
class Upload:
    owner: str
    data: bytes
    filename: str
    priority: Priority
    real: bool


@dataclass
class Uploaded:
    upload: Upload
    job_id: str
    document_id: str
    ready: float
    """When the gateway had answered (wall clock): the job was on the queue by then."""


class GatewayProcs:
    """``python -m app gateway`` children, always stopped."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self._env, self._log_dir = env, log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> str:
        port = free_port()
        with open(self._log_dir / f"gateway-{port}.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "app",
                    "gateway",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                cwd=ROOT,
                env={
                    **self._env,
                    "PYTHONUNBUFFERED": "1",
                    "RATE_LIMIT_UPLOADS_PER_MINUTE": "100000",
                },
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append(proc)
        return f"http://127.0.0.1:{port}"

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def gateways(settings_env: dict[str, str], tmp_path: Path) -> Iterator[GatewayProcs]:
    procs = GatewayProcs(settings_env, tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


async def _wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/health", timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise AssertionError(f"{url} did not become healthy")


# -- the workload ------------------------------------------------------------------------


def _workload(users: list[str], rng: random.Random) -> list[Upload]:
    levels = list(Priority)
    uploads: list[Upload] = []
    for i in range(TINY_JOBS):
        owner = users[i % len(users)]
        note = rng.randrange(NOTES_PER_USER)
        data = f"Note {note} of {owner}: {page_sentence(note, 1)}".encode()
        uploads.append(Upload(owner, data, f"note-{i}.txt", rng.choice(levels), real=False))
    for i in range(REAL_DOCS):
        owner = users[i % len(users)]
        if i % 2:
            pages = [
                [" ".join(page_sentence(1000 + i * 3 + p, n) for n in range(8))] for p in (0, 1)
            ]
            data, name = make_pdf(pages), f"real-{i}.pdf"
        else:
            data = " ".join(page_sentence(5000 + i, n) for n in range(14)).encode()
            name = f"real-{i}.md"
        uploads.append(Upload(owner, data, name, rng.choice(levels), real=True))
    rng.shuffle(uploads)
    return uploads


async def _clean_chunks(upload: Upload, tmp: Path, tokenizer: Any) -> list[str]:
    """The chunk texts of a clean, in-process run over the same bytes."""
    path = tmp / upload.filename
    path.write_bytes(upload.data)
    kind = upload.filename.rsplit(".", 1)[1]
    extracted = await extract_document(path, kind, report=NullReporter())
    size, overlap = (REAL_OPTIONS["chunk_size"], REAL_OPTIONS["chunk_overlap"])
    if not upload.real:
        from workers.stages.chunk import resolve_options

        size, overlap = resolve_options({}, 256)
    chunks = chunk_pages(extracted.pages, tokenizer, chunk_size=size, chunk_overlap=overlap)
    return [c.text for c in chunks]


# -- WebSocket subscribers ---------------------------------------------------------------


@dataclass
class Subscriber:
    """One connection following one user's jobs; reads everything as it arrives."""

    ws: ClientConnection
    terminals: Counter[str] = field(default_factory=Counter)
    pending: list[str] = field(default_factory=list)
    subscribed: set[str] = field(default_factory=set)
    errors: list[dict[str, Any]] = field(default_factory=list)

    async def read(self) -> None:
        async for raw in self.ws:
            message = _decode(raw)
            kind = message.get("type")
            if kind == "job_progress" and message["data"]["status"] in TERMINAL:
                self.terminals[message["job_id"]] += 1
            elif kind == "error":
                self.errors.append(message)

    async def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:100], self.pending[100:]
            await self.ws.send(msgspec.json.encode({"type": "subscribe", "job_ids": batch}))
            self.subscribed.update(batch)


@contextlib.asynccontextmanager
async def _subscribers(
    urls: list[str], users: list[str], tokens: TokenService
) -> AsyncIterator[dict[str, list[Subscriber]]]:
    async with contextlib.AsyncExitStack() as stack:
        subs: dict[str, list[Subscriber]] = {}
        readers: list[asyncio.Task[None]] = []
        for user in users:
            subs[user] = []
            for url in urls:
                ws = await stack.enter_async_context(
                    connect(f"{url}/api/v1/ws/progress?token={tokens.mint(user)}", open_timeout=10)
                )
                assert _decode(await ws.recv())["type"] == "connected"
                sub = Subscriber(ws)
                subs[user].append(sub)
                readers.append(asyncio.create_task(sub.read()))
        try:
            yield subs
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


# -- the run -----------------------------------------------------------------------------


async def _upload_all(
    uploads: list[Upload],
    gateway_urls: list[str],
    tokens: TokenService,
    subs: dict[str, list[Subscriber]],
    done: list[Uploaded],
) -> None:
    """Upload everything through both gateways, appending to ``done`` as they return."""
    queue: asyncio.Queue[Upload] = asyncio.Queue()
    for item in uploads:
        queue.put_nowait(item)
    headers = {u: {"Authorization": f"Bearer {tokens.mint(u)}"} for u in subs}

    async def uploader(client: httpx.AsyncClient, url: str) -> None:
        while not queue.empty():
            up = queue.get_nowait()
            form: dict[str, str] = {"priority": str(up.priority)}
            if up.real:
                form["processing_options"] = msgspec.json.encode(REAL_OPTIONS).decode()
            r = await client.post(
                f"{url}/api/v1/documents/upload/simple",
                headers=headers[up.owner],
                data=form,
                files={"file": (up.filename, up.data, "application/octet-stream")},
                timeout=60,
            )
            assert r.status_code == 201, (r.status_code, r.text)
            body = r.json()
            done.append(Uploaded(up, body["job_id"], body["document_id"], time.time()))
            for sub in subs[up.owner]:
                sub.pending.append(body["job_id"])

    async def flusher() -> None:
        while True:
            await asyncio.sleep(0.05)
            for group in subs.values():
                for sub in group:
                    await sub.flush()

    flushing = asyncio.create_task(flusher())
    try:
        limits = httpx.Limits(max_connections=64, keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY)
        async with httpx.AsyncClient(limits=limits) as client:
            await asyncio.gather(
                *(
                    uploader(client, gateway_urls[n % len(gateway_urls)])
                    for n in range(UPLOAD_CONCURRENCY)
                )
            )
    finally:
        flushing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flushing
    for group in subs.values():
        for sub in group:
            await sub.flush()


async def _kill_running_workers(
    services: Services,
    worker_procs: WorkerProcs,
    workers: dict[str, tuple[subprocess.Popen[bytes], int]],
    done: list[Uploaded],
    env: dict[str, str],
) -> list[str]:
    """SIGKILL :data:`KILLS` workers that hold a lease right now (once some jobs
    have completed), then start as many fresh ones; returns the victims' ids."""
    deadline = time.monotonic() + 120
    victims: list[str] = []
    while len(victims) < KILLS:
        job_ids = [u.job_id for u in done]
        rows = await services.db.fetch(
            "SELECT status, regexp_replace(lease_owner, ':[^:]*$', '') AS w FROM jobs "
            "WHERE id = ANY($1::uuid[])",
            job_ids,
        )
        statuses = Counter(r["status"] for r in rows)
        assert time.monotonic() < deadline, f"no worker was running jobs to kill: {statuses}"
        if statuses["completed"]:
            for w in {r["w"] for r in rows if r["status"] == "running" and r["w"]}:
                if w in workers and w not in victims and len(victims) < KILLS:
                    victims.append(w)
                    os.kill(workers[w][0].pid, signal.SIGKILL)
        await asyncio.sleep(0.02)
    for _ in victims:
        worker_procs.start(**env)
    return victims


async def _wait_all_terminal(services: Services, job_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + 15
    while True:
        if time.monotonic() > next_report:  # shown with -s: where a slow run stands
            next_report += 15
            counts = await services.db.fetch(
                "SELECT status, count(*) AS n FROM jobs WHERE id = ANY($1::uuid[]) GROUP BY 1",
                job_ids,
            )
            print(f"fleet: {dict((r['status'], r['n']) for r in counts)}", flush=True)
        left = await services.db.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) "
            "AND status NOT IN ('completed', 'failed', 'cancelled')",
            job_ids,
        )
        if left == 0:
            return
        if time.monotonic() > deadline:
            rows = await services.db.fetch(
                "SELECT status, left(message, 40) AS m, count(*) AS n FROM jobs "
                "WHERE id = ANY($1::uuid[]) AND status NOT IN ('completed', 'failed', 'cancelled') "
                "GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 8",
                job_ids,
            )
            raise AssertionError(f"{left} jobs not finished: {[tuple(r) for r in rows]}")
        await asyncio.sleep(0.25)


async def _wait_delivered(subs: dict[str, list[Subscriber]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(set(s.subscribed) - set(s.terminals) for g in subs.values() for s in g):
        if time.monotonic() > deadline:
            return  # the assertions below say which
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # anything duplicated would arrive by now


# -- the checks --------------------------------------------------------------------------


async def _check_ledger(services: Services, job_ids: list[str]) -> None:
    rows = await services.db.fetch(
        "SELECT j.id::text AS id, j.status, j.lease_owner, "
        "  count(r.id) FILTER (WHERE r.outcome = ANY($2::text[])) AS finals, "
        "  count(r.id) FILTER (WHERE r.ended_at IS NULL) AS open "
        "FROM jobs j LEFT JOIN job_runs r ON r.job_id = j.id "
        "WHERE j.id = ANY($1::uuid[]) GROUP BY j.id",
        job_ids,
        [str(o) for o in FINAL_RUN_OUTCOMES],
    )
    assert len(rows) == len(job_ids)
    statuses = Counter(r["status"] for r in rows)
    assert statuses == {"completed": len(job_ids)}, statuses
    not_once = [(r["id"], r["finals"]) for r in rows if r["finals"] != 1]
    assert not not_once, f"{len(not_once)} jobs did not end exactly once: {not_once[:5]}"
    assert not [r["id"] for r in rows if r["open"]], "runs left open"
    assert not [r["id"] for r in rows if r["lease_owner"]], "a finished job kept a lease"
    stuck = await services.db.fetchval(
        "SELECT count(*) FROM jobs WHERE status = 'running' AND id = ANY($1::uuid[]) "
        "AND (lease_expires_at IS NULL OR lease_expires_at < now())",
        job_ids,  # this run's jobs: the database is shared with the rest of the suite
    )
    assert stuck == 0, "jobs running without a live lease"


async def _check_chunks(services: Services, done: list[Uploaded], tmp: Path) -> None:
    tokenizer = load_tokenizer()
    rows = await services.db.fetch(
        "SELECT d.id::text AS id, d.owner_id, d.sha256, d.deduplicated_of::text AS dup, "
        "  coalesce(array_agg(c.text ORDER BY c.seq) FILTER (WHERE c.seq IS NOT NULL), '{}') "
        "    AS texts "
        "FROM documents d LEFT JOIN chunks c ON c.document_id = d.id "
        "WHERE d.id = ANY($1::uuid[]) GROUP BY d.id",
        [u.document_id for u in done],
    )
    by_doc = {r["id"]: r for r in rows}
    holders: dict[tuple[str, bytes], list[str]] = {}
    expected: dict[bytes, list[str]] = {}
    for u in done:
        row = by_doc[u.document_id]
        key = (u.upload.owner, u.upload.data)
        if row["texts"]:
            holders.setdefault(key, []).append(u.document_id)
            if u.upload.data not in expected:
                expected[u.upload.data] = await _clean_chunks(u.upload, tmp, tokenizer)
            assert list(row["texts"]) == expected[u.upload.data], u.upload.filename
    for u in done:
        key = (u.upload.owner, u.upload.data)
        assert len(holders.get(key, [])) == 1, (u.upload.filename, holders.get(key))
        if u.document_id not in holders[key]:
            assert by_doc[u.document_id]["dup"] == holders[key][0], u.upload.filename


async def _check_priorities(services: Services, done: list[Uploaded], slack: float) -> int:
    """Pairs (h, l) with h of higher priority ready before l started (by more than the
    slack) yet started after it: must be none.  A job is ready once its upload has
    answered (the gateway enqueued it before); it started with its first run in the
    ledger.  Returns how many pairs were compared."""
    rows = await services.db.fetch(
        "SELECT job_id::text AS id, extract(epoch FROM min(started_at))::float8 AS started "
        "FROM job_runs WHERE job_id = ANY($1::uuid[]) GROUP BY job_id",
        [u.job_id for u in done],
    )
    started_at = {r["id"]: r["started"] for r in rows}
    rank = {p: i for i, p in enumerate(Priority)}
    levels: dict[int, list[tuple[float, float]]] = {}
    for u in done:
        levels.setdefault(rank[u.upload.priority], []).append((u.ready, started_at[u.job_id]))
    compared, inversions = 0, []
    for level, jobs in levels.items():
        jobs.sort()
        readies = [ready for ready, _ in jobs]
        latest_start: list[float] = []  # the latest start among jobs ready up to index i
        for _, started in jobs:
            latest_start.append(max(started, latest_start[-1] if latest_start else started))
        for lower, others in levels.items():
            if lower >= level:
                continue
            for _, started in others:
                i = bisect.bisect_left(readies, started - slack)
                compared += i
                if i and latest_start[i - 1] > started:
                    inversions.append((lower, level, round(latest_start[i - 1] - started, 3)))
    assert not inversions, (
        f"{len(inversions)} lower-priority starts jumped the queue "
        f"(lower level, higher level, seconds the higher one started later): {inversions[:10]}"
    )
    return compared


def _check_subscribers(subs: dict[str, list[Subscriber]], done: list[Uploaded]) -> None:
    jobs_of: dict[str, set[str]] = {}
    for u in done:
        jobs_of.setdefault(u.upload.owner, set()).add(u.job_id)
    for owner, group in subs.items():
        assert len(group) == 2
        for sub in group:
            assert not sub.errors, sub.errors[:3]
            assert sub.subscribed == jobs_of[owner]
            missing = jobs_of[owner] - set(sub.terminals)
            assert not missing, f"{len(missing)} terminal events never arrived"
            twice = {j: n for j, n in sub.terminals.items() if n != 1}
            assert not twice, f"terminal events delivered more than once: {list(twice.items())[:5]}"


async def test_a_crowded_fleet_runs_every_job_exactly_once(
    services: Services,
    worker_procs: WorkerProcs,
    gateways: GatewayProcs,
    ws_factory: Any,
    tokens: TokenService,
    tmp_path: Path,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        env = dict(WORKER_ENV)
        if EMBEDDER == "shared":
            model = await LocalEmbedder.load_async(batch_size=64)
            endpoint = await stack.enter_async_context(EmbeddingEndpoint(model, []))
            env |= {"EMBEDDING_PROVIDER": "openai", "EMBEDDING_API_URL": endpoint.url}
        await _run_fleet(services, worker_procs, gateways, ws_factory, tokens, tmp_path, env)


async def _run_fleet(
    services: Services,
    worker_procs: WorkerProcs,
    gateways: GatewayProcs,
    ws_factory: Any,
    tokens: TokenService,
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    began = time.monotonic()
    load_before = os.getloadavg()
    rng = random.Random(12)
    run = f"fleet-{rng.getrandbits(32):08x}-{int(time.time())}"
    users = [f"{run}-u{i}" for i in range(USERS)]
    uploads = _workload(users, rng)

    started = [worker_procs.start(**env) for _ in range(WORKERS)]
    gateway_urls = [gateways.start() for _ in range(2)]
    ws_servers: list[WsProcess] = [ws_factory() for _ in range(2)]
    health = await asyncio.gather(
        *(worker_procs.wait_ready(p, proc, timeout=READY_TIMEOUT_S) for proc, p in started)
    )
    await asyncio.gather(*(_wait_http(url) for url in gateway_urls))
    workers = {h["worker_id"]: s for h, s in zip(health, started, strict=True)}
    ready_s = time.monotonic() - began

    async with _subscribers([w.url for w in ws_servers], users, tokens) as subs:
        done: list[Uploaded] = []

        async def kill_when_busy() -> list[str]:
            while len(done) < len(uploads) // 2:
                await asyncio.sleep(0.1)
            return await _kill_running_workers(services, worker_procs, workers, done, env)

        killer = asyncio.create_task(kill_when_busy())
        try:
            await _upload_all(uploads, gateway_urls, tokens, subs, done)
            killed = await asyncio.wait_for(killer, 150)
        finally:
            killer.cancel()
        job_ids = [u.job_id for u in done]
        uploaded_s = time.monotonic() - began
        await _wait_all_terminal(services, job_ids, timeout=TIMEOUT_S - 60 - uploaded_s)
        finished_s = time.monotonic() - began
        await _wait_delivered(subs)

        assert len(killed) == KILLS and all(workers[w][0].poll() is not None for w in killed)
        await _check_ledger(services, job_ids)
        await _check_chunks(services, done, tmp_path)
        _check_subscribers(subs, done)
        slack = PRIORITY_SLACK_S * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
        compared = await _check_priorities(services, done, slack)

    lost = await services.db.fetchval(
        "SELECT count(*) FROM job_runs WHERE job_id = ANY($1::uuid[]) AND outcome = 'lost'",
        job_ids,
    )
    figures = {
        "jobs": len(job_ids),
        "workers": WORKERS,
        "killed": KILLS,
        "lost_runs": lost,
        "ready_s": round(ready_s, 2),
        "uploaded_s": round(uploaded_s, 2),
        "terminal_s": round(finished_s, 2),
        "priority_pairs": compared,
        "priority_slack_s": round(slack, 2),
        "load_before": round(load_before[0], 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    if report := os.environ.get("SLUICE_FLEET_REPORT"):
        Path(report).write_bytes(msgspec.json.encode(figures))
    print(
        f"\nfleet: {len(job_ids)} jobs, {WORKERS} workers ({KILLS} SIGKILLed, {lost} runs lost), "
        f"ready {ready_s:.1f} s, uploaded {uploaded_s:.1f} s, all terminal {finished_s:.1f} s, "
        f"total {time.monotonic() - began:.1f} s; priority pairs compared {compared} "
        f"(slack {slack:.1f} s); "
        f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}"
    )
