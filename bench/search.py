"""Benchmark search through a thin gateway and the warm embedding service.

    python bench/search.py [--chunks 100000] [--queries 300] [--clients 20]
                           [--requests 2000] [--ef N] [--sweep 20,40,64,100,200]
                           [--m M --ef-construction E] [--real N [--bulk neighbours|mixture]]
                           [--rates 25,50,100 --open-seconds 20]

Everything runs on an embedded stack, a real ``sluice embedder`` and a real
``sluice gateway`` (uvicorn) started here and stopped at the end.

The table: ``--chunks`` distinct real text chunks from this machine (docstrings,
comments and prose files of the standard library, ``site-packages`` and
``/usr/share/doc``, cut by Sluice's own chunker to 200-600 characters and
deduplicated: see ``bench/_search_corpus.py``), embedded once by the workers'
model (all-MiniLM-L6-v2, 2 processes of 1 torch thread) and cached under
``~/.cache/sluice-bench`` (the first build of 100,000 takes long on a small
machine; it prints its rate, and resumes where it stopped).  Queries are the
docstring summary lines of a disjoint set of source files, embedded by the
``sluice embedder``.  All rows belong to one user, 1,000 chunks per document,
loaded with one binary COPY; then the HNSW index is built with the latest
migration's definition (or ``--m``/``--ef-construction``), timed and sized.

``--real N`` (fewer than ``--chunks``) fills the rest with synthetic vectors
made from the N real ones: ``neighbours``, a perturbed interpolation between a
real vector and one of its 10 nearest, ``normalize(a*v_i + (1-a)*v_j +
N(0, 0.01^2))`` with ``a ~ U(0.5, 1)``, carrying ``v_i``'s text, or
``mixture``, Dirichlet mixtures of three random real vectors.  Such copies
form clusters that HNSW links poorly: use them only where real text runs out.

Measured in the same run:

1. recall@10 of the HNSW search at each ``--sweep`` ef_search against an exact
   scan (same SQL shape as the gateway's, same query vectors), by id and by
   distance;
2. the bare SQL baseline: ``--clients`` asyncpg tasks running the gateway's
   HNSW query with precomputed vectors;
3. search through the gateway (``POST /api/v1/search``, top_k 10) by
   ``--clients`` closed-loop keep-alive clients: p50/p99/max, searches/s, the
   gateway's event-loop lag and RSS, and how many queries the embedder coalesced
   per encode call;
4. the CPU each process spent per search (``/proc``: the gateway, the embedder,
   PostgreSQL's backends, this client; Redis's one rate-limit script is left out),
   and the ceiling that puts on searches/s and on closed-loop latency here;
5. latency below saturation: searches arriving as a Poisson process at each of
   ``--rates`` per second (latency counted from the planned arrival).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _search_corpus as corpus  # noqa: E402

from app.core.auth import TokenService  # noqa: E402
from app.core.db import create_pool, migrate_dsn  # noqa: E402
from app.core.embedding import OpenAIEmbedder, vector_literal  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from app.core.storage import ensure_bucket, open_s3  # noqa: E402
from devstack.embedder import EmbedderProcess  # noqa: E402
from devstack.process import free_port  # noqa: E402
from devstack.stack import EmbeddedStack  # noqa: E402

JWT_SECRET = "bench-secret-" + "x" * 32
USER = "bench-search-user"
DIM = 384
PER_DOC = 1000
TOP_K = 10
NOISE = 0.01
"""Per-dimension noise of the perturbed copies (|noise| ~ 0.2)."""
NEIGHBOURS = 10
EPSILON = 1e-3
HNSW_SQL = """
    SELECT c.document_id::text AS document_id, c.seq AS chunk_seq, c.text, c.page_start,
           c.page_end, c.char_start, c.char_end, 1 - (c.embedding <=> $1::text::vector) AS score
    FROM chunks c WHERE c.owner_id = $2 ORDER BY c.embedding <=> $1::text::vector LIMIT $3
"""
EXACT_SQL = """
    SELECT c.document_id::text AS document_id, c.seq AS chunk_seq,
           1 - (c.embedding <=> $1::text::vector) AS score FROM chunks c
    WHERE c.owner_id = $2 ORDER BY (c.embedding <=> $1::text::vector) + 0 LIMIT $3
"""


def say(message: str) -> None:
    """Progress on stderr (the figures go to stdout at the end)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- vectors ----------------------------------------------------------------------------


async def embed_all(embedder: OpenAIEmbedder, texts: list[str]) -> np.ndarray:
    batches = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    sem = asyncio.Semaphore(2)

    async def one(batch: list[str]) -> np.ndarray:
        async with sem:
            return await embedder.embed(batch)

    return np.concatenate(await asyncio.gather(*(one(b) for b in batches)))


def bulk_vectors(
    real: np.ndarray, total: int, bulk: str = "neighbours"
) -> tuple[np.ndarray, np.ndarray]:
    """``total`` rows: the real vectors, then interpolations between a real vector
    and one of its ``NEIGHBOURS`` nearest real ones, plus a little noise, so the
    bulk stays on the real vectors' manifold.  Returns the vectors and, per row,
    which real text it carries."""
    rng = np.random.default_rng(11)
    extra = total - len(real)
    if bulk == "mixture":
        # Dirichlet mixtures of three random real vectors: spread over the real
        # vectors' hull, no clusters of near-copies.
        picks = rng.integers(0, len(real), (extra, 3))
        weights = rng.dirichlet((1.0, 1.0, 1.0), extra).astype(np.float32)
        mixed = np.einsum("nk,nkd->nd", weights, real[picks])
        mixed += rng.normal(0, NOISE, (extra, DIM)).astype(np.float32)
        mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
        source = np.concatenate([np.arange(len(real)), picks[:, 0]])
        return np.concatenate([real, mixed]).astype(np.float32), source
    sims = real @ real.T
    np.fill_diagonal(sims, -2)
    nearest = np.argsort(-sims, axis=1)[:, :NEIGHBOURS]
    i = rng.integers(0, len(real), extra)
    j = nearest[i, rng.integers(0, NEIGHBOURS, extra)]
    a = rng.uniform(0.5, 1.0, (extra, 1)).astype(np.float32)
    noise = rng.normal(0, NOISE, (extra, DIM)).astype(np.float32)
    mixed = a * real[i] + (1 - a) * real[j] + noise
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    vectors = np.concatenate([real, mixed]).astype(np.float32)
    source = np.concatenate([np.arange(len(real)), i])
    return vectors, source


# --- loading -----------------------------------------------------------------------------


def _field(data: bytes) -> bytes:
    return struct.pack(">i", len(data)) + data


def _copy_rows(
    vectors: np.ndarray, source: np.ndarray, texts: list[str], docs: list[uuid.UUID]
) -> AsyncIterator[bytes]:
    encoded = [t.encode() for t in texts]
    shas = [uuid.uuid5(uuid.NAMESPACE_OID, t).hex.encode() for t in texts]
    owner = USER.encode()

    async def gen() -> AsyncIterator[bytes]:
        yield b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
        block: list[bytes] = []
        for row in range(len(vectors)):
            text = encoded[source[row]]
            vec = struct.pack(">HH", DIM, 0) + vectors[row].astype(">f4").tobytes()
            block.append(
                struct.pack(">h", 11)
                + _field(docs[row // PER_DOC].bytes)
                + _field(struct.pack(">i", row % PER_DOC))
                + _field(owner)
                + _field(text)
                + _field(struct.pack(">i", len(text) // 4))
                + _field(struct.pack(">i", 1))
                + _field(struct.pack(">i", 1))
                + _field(struct.pack(">i", 0))
                + _field(struct.pack(">i", len(text)))
                + _field(shas[source[row]])
                + _field(vec)
            )
            if len(block) == 5000:
                yield b"".join(block)
                block = []
        yield b"".join(block) + struct.pack(">h", -1)

    return gen()


def index_sql(m: int | None, ef_construction: int | None) -> str:
    """The HNSW index's definition: the last one in ``migrations/`` unless ``m`` or
    ``ef_construction`` is given (then pgvector's defaults, 16 and 64, fill the other)."""
    if m is None and ef_construction is None:
        found = []
        for path in sorted((ROOT / "migrations").glob("*.sql")):
            found += re.findall(
                r"CREATE INDEX[^;]*?chunks_embedding_hnsw[^;]*", path.read_text(), re.I
            )
        if not found:
            raise SystemExit("no chunks_embedding_hnsw index in migrations/")
        return " ".join(found[-1].replace("IF NOT EXISTS", "").split())
    return (
        "CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops)"
        f" WITH (m = {m or 16}, ef_construction = {ef_construction or 64})"
    )


async def load_table(
    dsn: str, vectors: np.ndarray, source: np.ndarray, texts: list[str], index: str
) -> dict[str, float]:
    """COPY the rows in, then build the HNSW ``index``: seconds for each, index MiB."""
    docs = [uuid.uuid4() for _ in range((len(vectors) + PER_DOC - 1) // PER_DOC)]
    # No command timeout: the index build takes minutes on a busy machine.
    conn = await asyncpg.connect(dsn, command_timeout=None)
    try:
        await conn.executemany(
            "INSERT INTO documents (id, owner_id, filename, content_type, document_type,"
            " size_bytes, object_key, status) VALUES ($1, $2, $3, 'text/plain', 'txt', 1,"
            " $4, 'indexed')",
            [(d, USER, f"doc-{n}.txt", f"bench/{d}") for n, d in enumerate(docs)],
        )
        await conn.execute("DROP INDEX IF EXISTS chunks_embedding_hnsw")
        t = time.perf_counter()
        await conn.copy_to_table(
            "chunks",
            source=_copy_rows(vectors, source, texts, docs),
            columns=[
                "document_id",
                "seq",
                "owner_id",
                "text",
                "token_count",
                "page_start",
                "page_end",
                "char_start",
                "char_end",
                "sha256",
                "embedding",
            ],
            format="binary",
        )
        copy_s = time.perf_counter() - t
        t = time.perf_counter()
        await conn.execute("SET maintenance_work_mem = '1GB'")
        await conn.execute("SET max_parallel_maintenance_workers = 2")
        await conn.execute(index)
        index_s = time.perf_counter() - t
        size = await conn.fetchval("SELECT pg_relation_size('chunks_embedding_hnsw')")
        await conn.execute("VACUUM ANALYZE chunks")
    finally:
        await conn.close()
    return {"copy_s": copy_s, "index_s": index_s, "index_mib": size / 2**20}


# --- measuring ---------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def closed_loop(
    clients: int, total: int, one: Callable[[int], Awaitable[None]]
) -> tuple[list[float], float]:
    """``clients`` tasks issuing ``total`` calls back to back; latencies (ms) and wall (s)."""
    latencies: list[float] = []
    counter = iter(range(total))

    async def client() -> None:
        for n in counter:
            t = time.perf_counter()
            await one(n)
            latencies.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - t0


async def recall_sweep(
    dsn: str, qvecs: list[str], sweep: list[int]
) -> dict[int, tuple[float, float]]:
    """Per ef_search: (recall@10 by id, recall@10 by distance).  By distance is
    ann-benchmarks' definition: a hit counts when it is no farther than the exact
    10th neighbour + ``EPSILON``; it does not punish swapping near-ties."""
    pool = await create_pool(dsn, max_size=2)
    try:
        exact = [await pool.fetch(EXACT_SQL, q, USER, TOP_K) for q in qvecs]
        out: dict[int, tuple[float, float]] = {}
        for ef in sweep:
            by_id = by_distance = 0
            for q, truth in zip(qvecs, exact, strict=True):
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(f"SET LOCAL hnsw.ef_search = {ef}")
                    rows = await conn.fetch(HNSW_SQL, q, USER, TOP_K)
                ids = {(r["document_id"], r["chunk_seq"]) for r in truth}
                by_id += len(ids & {(r["document_id"], r["chunk_seq"]) for r in rows})
                floor = min(float(r["score"]) for r in truth) - EPSILON
                by_distance += sum(1 for r in rows if float(r["score"]) >= floor)
            total = TOP_K * len(qvecs)
            out[ef] = (by_id / total, by_distance / total)
        return out
    finally:
        await pool.close()


async def bare_sql(
    dsn: str, qvecs: list[str], ef: int, clients: int, total: int, meter: CpuMeter
) -> dict[str, Any]:
    pool = await create_pool(dsn, max_size=clients)
    try:

        async def one(n: int) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL hnsw.ef_search = {ef}")
                await conn.fetch(HNSW_SQL, qvecs[n % len(qvecs)], USER, TOP_K)

        await closed_loop(clients, min(total, 200), one)  # warm the index into memory
        meter.start()
        lat, wall = await closed_loop(clients, total, one)
        cpu = meter.per_call(total)
    finally:
        await pool.close()
    return {"p50": pct(lat, 50), "p99": pct(lat, 99), "per_s": total / wall, "cpu_ms": cpu}


class Conn:
    """One keep-alive HTTP/1.1 connection, as lean as a client can be."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.head = (
            "POST /api/v1/search HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\n"
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def search(self, query: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        body = json.dumps({"query": query, "top_k": TOP_K}).encode()
        self.writer.write(self.head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def rss_mib(pid: int) -> dict[str, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def _stat(pid: int) -> list[str]:
    """``/proc/<pid>/stat``'s fields after the command name (field 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_s(pid: int, *, children: bool = False) -> float:
    """CPU seconds (user + system) of ``pid``; with ``children``, also of its
    reaped children (how a postmaster's exited backends are counted)."""
    try:
        f = _stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres_cpu_s(data_dir: Path) -> float:
    """CPU seconds of the embedded PostgreSQL whose data lives under ``data_dir``:
    its postmaster (with reaped backends) and every live child."""
    ppid: dict[int, int] = {}
    postmaster = None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid[int(entry.name)] = int(_stat(int(entry.name))[1])
            if (
                postmaster is None
                and (entry / "comm").read_text().strip() == "postgres"
                and str(data_dir) in (entry / "cmdline").read_text()
            ):
                postmaster = int(entry.name)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    if postmaster is None:
        return 0.0
    kids = [pid for pid, parent in ppid.items() if parent == postmaster]
    return _cpu_s(postmaster, children=True) + sum(_cpu_s(pid) for pid in kids)


class CpuMeter:
    """CPU seconds spent per process role between :meth:`start` and :meth:`per_call`."""

    def __init__(self, roles: dict[str, Callable[[], float]]) -> None:
        self.roles = roles
        self.before: dict[str, float] = {}

    def start(self) -> None:
        self.before = {name: read() for name, read in self.roles.items()}

    def per_call(self, calls: int) -> dict[str, float]:
        """Milliseconds of CPU per call, per role, since :meth:`start`."""
        return {
            name: (read() - self.before[name]) * 1000 / calls for name, read in self.roles.items()
        }


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def embedder_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for name in ("sluice_embedder_encode_calls_total", "sluice_embedder_texts_total"):
        out[name] = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + " ")
        )
    return out


LAG_SERIES = "sluice_event_loop_lag_seconds_bucket"


def lag_buckets(port: int) -> dict[float, float]:
    """The gateway's loop-lag histogram (cumulative count per bucket bound)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(LAG_SERIES):
            le = float(line.split('le="', 1)[1].split('"', 1)[0])
            out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def lag_summary(before: dict[float, float], after: dict[float, float]) -> str:
    """p50/p99/max of the lag samples taken between two scrapes, as bucket bounds."""
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    total = delta.get(float("inf"), 0.0)
    if total <= 0:
        return "no samples"

    def bound(q: float) -> str:
        le = next(le for le in sorted(delta) if delta[le] >= q * total)
        return "inf" if le == float("inf") else f"{le * 1000:g}"

    return f"p50 <={bound(0.5)} p99 <={bound(0.99)} max <={bound(1.0)} ms ({total:.0f} samples)"


async def through_gateway(
    port: int, queries: list[str], clients: int, total: int, embedder_url: str, meter: CpuMeter
) -> dict[str, Any]:
    token = TokenService(JWT_SECRET).mint(USER)
    conns = [Conn(port, token) for _ in range(clients)]
    free = list(conns)
    bad: list[int] = []
    short: list[int] = []

    async def one(n: int) -> None:
        conn = free.pop()
        try:
            status, body = await conn.search(queries[n % len(queries)])
        finally:
            free.append(conn)
        if status != 200:
            bad.append(status)
        elif len(json.loads(body)["results"]) != TOP_K:
            short.append(n)

    await closed_loop(clients, min(total, 200), one)  # warm-up
    before = embedder_counts(embedder_url)
    lag_before = lag_buckets(port)
    meter.start()
    lat, wall = await closed_loop(clients, total, one)
    cpu = meter.per_call(total)
    lag = lag_summary(lag_before, lag_buckets(port))
    after = embedder_counts(embedder_url)
    for c in conns:
        c.close()
    calls = (
        after["sluice_embedder_encode_calls_total"] - before["sluice_embedder_encode_calls_total"]
    )
    texts = after["sluice_embedder_texts_total"] - before["sluice_embedder_texts_total"]
    return {
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "max": max(lat),
        "per_s": total / wall,
        "errors": len(bad),
        "short": len(short),
        "queries_per_encode": texts / calls if calls else float("nan"),
        "loop_lag": lag,
        "cpu_ms": cpu,
    }


async def open_loop(port: int, queries: list[str], rate: float, total: int) -> dict[str, float]:
    """``total`` searches arriving as a Poisson process at ``rate``/s, whatever the answers'
    pace (no coordinated omission: each latency counts from its planned arrival)."""
    token = TokenService(JWT_SECRET).mint(USER)
    free: list[Conn] = []
    every: list[Conn] = []
    latencies: list[float] = []
    bad: list[int] = []
    rng = np.random.default_rng(7)

    async def one(n: int, planned: float) -> None:
        if free:
            conn = free.pop()
        else:
            conn = Conn(port, token)
            every.append(conn)
        try:
            status, _ = await conn.search(queries[n % len(queries)])
        finally:
            free.append(conn)
        latencies.append((time.perf_counter() - planned) * 1000)
        if status != 200:
            bad.append(status)

    tasks = []
    start = time.perf_counter()
    planned = start
    for n in range(total):
        planned += float(rng.exponential(1 / rate))
        await asyncio.sleep(max(0.0, planned - time.perf_counter()))
        tasks.append(asyncio.create_task(one(n, planned)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    for c in every:
        c.close()
    return {
        "p50": pct(latencies, 50),
        "p99": pct(latencies, 99),
        "per_s": total / wall,
        "connections": float(len(every)),
        "errors": float(len(bad)),
    }


# --- processes ---------------------------------------------------------------------------


def start_gateway(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "gateway", "--port", str(port)],
            env={**env, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("gateway not ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def table_vectors(
    args: argparse.Namespace,
) -> tuple[np.ndarray, np.ndarray, list[str], list[str], dict[str, Any]]:
    """Vectors of the table's rows, the text index per row, the texts, the queries."""
    real_n = min(args.real or args.chunks, args.chunks)
    t = time.perf_counter()
    texts, queries = corpus.build(real_n, args.queries, say)
    corpus_s = time.perf_counter() - t
    t = time.perf_counter()
    real = corpus.embed_cached(texts, args.processes, say)
    embed_s = time.perf_counter() - t
    if real_n < args.chunks:
        vectors, source = bulk_vectors(real, args.chunks, args.bulk)
    else:
        vectors, source = real, np.arange(len(real))
    info = {"real_chunks": real_n, "corpus_s": corpus_s, "vectors_s": embed_s}
    return vectors, source, texts, queries, info


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    vectors, source, texts, queries, info = table_vectors(args)
    index = index_sql(args.m, args.ef_construction)
    sweep = sorted({*map(int, args.sweep.split(",")), args.ef})
    with EmbeddedStack.in_dir(tmp / "stack", durable=False) as stack:
        env = {
            **os.environ,
            **stack.environ(bucket="sluice-bench"),
            "JWT_SECRET": JWT_SECRET,
            "LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            "RATE_LIMIT_REQUESTS_PER_MINUTE": "100000000",
            "SEARCH_EF_SEARCH": str(args.ef),
            "DATABASE_POOL_SIZE": str(max(10, args.clients)),
        }
        settings = Settings.from_environ(env)
        dsn = settings.database_url.reveal()
        await migrate_dsn(dsn)
        async with open_s3(settings) as s3:
            await ensure_bucket(s3, settings.minio_bucket_name)
        with EmbedderProcess(tmp / "embedder.log", env) as embedder:
            client = OpenAIEmbedder(embedder.api_url, model=settings.embedding_model, timeout_s=600)
            say(f"embedding {len(queries)} queries through the embedder")
            qvecs = [vector_literal(v) for v in await embed_all(client, queries)]
            await client.aclose()
            say(f"loading {len(vectors)} chunks (COPY), then: {index}")
            load = await load_table(dsn, vectors, source, texts, index)
            say("recall@10 against exact scans")
            recall = await recall_sweep(dsn, qvecs, sweep)
            if args.recall_only:
                return summary(args, info, index, load, recall, qvecs, {}, {}, {})
            say("bare SQL baseline")
            pg_cpu = lambda: postgres_cpu_s(tmp / "stack")  # noqa: E731
            bare_meter = CpuMeter({"postgres": pg_cpu, "client": self_cpu_s})
            bare = await bare_sql(dsn, qvecs, args.ef, args.clients, args.requests, bare_meter)
            say("searching through the gateway")
            gw_env = {**env, "SEARCH_EMBEDDING_URL": embedder.api_url}
            gateway, port = start_gateway(gw_env, tmp / "gateway.log")
            try:
                rss_idle = rss_mib(gateway.pid)
                embedder_pid = embedder.pid
                assert embedder_pid is not None
                meter = CpuMeter(
                    {
                        "gateway": lambda: _cpu_s(gateway.pid),
                        "embedder": lambda: _cpu_s(embedder_pid),
                        "postgres": pg_cpu,
                        "client": self_cpu_s,
                    }
                )
                search = await through_gateway(
                    port, queries, args.clients, args.requests, embedder.url, meter
                )
                rss = {"ready": rss_idle, "after": rss_mib(gateway.pid)}
                for rate in [float(r) for r in args.rates.split(",") if r]:
                    say(f"open loop at {rate:g} searches/s")
                    total = max(200, int(rate * args.open_seconds))
                    search[f"open_{rate:g}"] = await open_loop(port, queries, rate, total)
            finally:
                stop(gateway)
    return summary(args, info, index, load, recall, qvecs, bare, search, rss)


def _rounded(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return round(v, 2) if isinstance(v, float) else v


def summary(
    args: argparse.Namespace,
    info: dict[str, Any],
    index: str,
    load: dict[str, float],
    recall: dict[int, tuple[float, float]],
    qvecs: list[str],
    bare: dict[str, Any],
    search: dict[str, Any],
    rss: dict[str, Any],
) -> dict[str, Any]:
    """The run's figures, rounded, as one JSON-able dict."""
    return {
        "chunks": args.chunks,
        "bulk": args.bulk if info["real_chunks"] < args.chunks else "none",
        "queries": len(qvecs),
        "index": index,
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in info.items()},
        **{k: round(v, 1) for k, v in load.items()},
        "recall_at_10": {str(k): round(v[0], 4) for k, v in recall.items()},
        "recall_at_10_by_distance": {str(k): round(v[1], 4) for k, v in recall.items()},
        "bare_sql": {k: _rounded(v) for k, v in bare.items()},
        "gateway": {k: _rounded(v) for k, v in search.items()},
        "gateway_rss_mib": rss,
        "load_average": os.getloadavg(),
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    gw, bare = r["gateway"], r["bare_sql"]
    by_id = r["recall_at_10"][str(args.ef)]
    by_distance = r["recall_at_10_by_distance"][str(args.ef)]
    kind = "all real" if r["bulk"] == "none" else f"{r['real_chunks']:,} real, bulk {r['bulk']}"
    head = [
        f"search over {r['chunks']:,} chunks ({kind}), {r['queries']} queries, "
        f"{args.clients} clients, ef_search {args.ef}, load {r['load_average'][0]:.2f}",
        f"  table: corpus {r['corpus_s']} s, vectors {r['vectors_s']} s, COPY {r['copy_s']} s, "
        f"HNSW build {r['index_s']} s, index {r['index_mib']} MiB",
        f"  index: {r['index']}",
        "  recall@10 vs exact, by id / by distance (eps 1e-3): "
        + ", ".join(
            f"ef {k}: {v:.3f} / {r['recall_at_10_by_distance'][k]:.3f}"
            for k, v in r["recall_at_10"].items()
        ),
    ]
    if args.recall_only:
        return "\n".join(head)
    rss = r["gateway_rss_mib"]["after"]["VmHWM"]
    lines = [
        f"  bare SQL (baseline):  p50 {bare['p50']:.1f} ms  p99 {bare['p99']:.1f} ms  "
        f"{bare['per_s']:.0f}/s",
        f"  through the gateway:  p50 {gw['p50']:.1f} ms  p99 {gw['p99']:.1f} ms  "
        f"max {gw['max']:.1f} ms  {gw['per_s']:.0f}/s  errors {gw['errors']}  "
        f"short {gw['short']}",
        f"    = {gw['p50'] / bare['p50']:.1f}x / {gw['p99'] / bare['p99']:.1f}x the bare SQL "
        f"p50/p99; {gw['queries_per_encode']:.1f} queries per encode call; "
        f"gateway loop lag {gw['loop_lag']}",
        "  CPU ms per search: bare SQL "
        + " / ".join(f"{k} {v:.2f}" for k, v in bare["cpu_ms"].items())
        + "; through the gateway "
        + " / ".join(f"{k} {v:.2f}" for k, v in gw["cpu_ms"].items()),
        capacity_line(gw, args.clients),
        *(
            f"  open loop (Poisson arrivals) at {k[5:]}/s: p50 {v['p50']:.1f} ms  "
            f"p99 {v['p99']:.1f} ms  ({v['per_s']:.0f}/s served, {v['connections']:.0f} "
            f"connections, errors {v['errors']:.0f})"
            for k, v in gw.items()
            if k.startswith("open_")
        ),
        f"  gateway RSS peak {rss:.0f} MiB (ready: {r['gateway_rss_mib']['ready']['VmRSS']:.0f})",
        f"  targets: p50 <= 50 ms {'ok' if gw['p50'] <= 50 else 'MISSED'}, "
        f"p99 <= 150 ms {'ok' if gw['p99'] <= 150 else 'MISSED'}, "
        f"recall@10 >= 0.95 by id {'ok' if by_id >= 0.95 else 'MISSED'} "
        f"(by distance {'ok' if by_distance >= 0.95 else 'MISSED'}), "
        f"RSS < 150 MiB {'ok' if rss < 150 else 'MISSED'}",
    ]
    return "\n".join(head + lines)


def capacity_line(gw: dict[str, Any], clients: int) -> str:
    """What the CPU per search allows on this machine: with every process on its cores,
    searches/s cannot exceed cores x 1000 / (CPU ms per search), and ``clients`` closed-loop
    clients then wait at least ``clients`` / that rate (Little's law) on average."""
    cpu = sum(gw["cpu_ms"].values())
    cores = os.cpu_count() or 1
    most = cores * 1000 / cpu
    return (
        f"  CPU bound: {cpu:.1f} ms of CPU per search on {cores} cores -> at most "
        f"{most:.0f} searches/s, so {clients} closed-loop clients average >= "
        f"{clients / most * 1000:.0f} ms per search (measured {gw['per_s']:.0f}/s)"
    )


def default_ef() -> int:
    """``SEARCH_EF_SEARCH``'s default (app/core/settings.py)."""
    field = next(f for f in msgspec.structs.fields(Settings) if f.name == "search_ef_search")
    return int(field.default)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument(
        "--real",
        type=int,
        default=0,
        help="real chunks (default: all of --chunks); fewer fills the rest with --bulk",
    )
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--ef",
        type=int,
        default=default_ef(),
        help="the gateway's SEARCH_EF_SEARCH (default: the setting's default)",
    )
    parser.add_argument("--sweep", default="20,40,64,100,200")
    parser.add_argument(
        "--rates",
        default="25,50,100",
        help="open-loop arrival rates (searches/s) through the gateway after the closed loop",
    )
    parser.add_argument("--open-seconds", type=float, default=20.0, help="per open-loop rate")
    parser.add_argument("--m", type=int, default=None, help="HNSW m (default: the migration's)")
    parser.add_argument("--ef-construction", type=int, default=None)
    parser.add_argument("--processes", type=int, default=2, help="for the first embedding")
    parser.add_argument(
        "--bulk",
        choices=["neighbours", "mixture"],
        default="neighbours",
        help="how rows beyond --real are made (see the module docstring)",
    )
    parser.add_argument(
        "--recall-only", action="store_true", help="stop after the recall sweep (no load test)"
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-bench-search-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(report(result, args))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
