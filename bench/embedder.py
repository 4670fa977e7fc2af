"""Benchmark the embedder's backends: torch against ONNX Runtime, in one run.

    python bench/embedder.py [--texts 1000] [--queries 200] [--requests 600]
                             [--clients 1,20] [--backends torch,onnx,onnx_int8]
                             [--cache DIR]

Texts are real: paragraphs of the Python standard library's docstrings (the
chunks, 200-600 characters) and their summary lines (the queries, 30-200
characters), as in ``bench/search.py``.  Measured, each backend against torch:

1. **agreement**: cosine between each backend's vector and torch's for every
   chunk and query (min and mean); recall@10 of each backend's query vectors
   against torch's over the chunks (exact scan: what a query finds among stored
   vectors the workers made with torch);
2. **CPU per query of the model alone**: a child process per backend and thread
   count encodes the queries in batches of 1, 8 and 16 (process CPU time / texts);
3. **the served embedder**: a real ``sluice embedder`` per backend
   (``EMBEDDER_THREADS=1``), ``--clients`` closed-loop keep-alive clients posting one
   query each: p50/p99 latency, queries/s, the embedder process's CPU ms per query
   (from ``/proc``), the queries it coalesced per encode call, and its RSS.

Every ratio is the backend's figure over torch's in the same run.  The ONNX graphs
are exported into ``--cache`` (default: the embedder's own cache) when missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.settings import Settings  # noqa: E402
from app.embedder.onnx import cache_dir  # noqa: E402
from devstack.embedder import EmbedderProcess  # noqa: E402

BATCHES = (1, 8, 16)
THREADS = (1, 2)
SERVICE_ENV = {  # what Settings requires; the embedder itself reaches none of these
    "DATABASE_URL": "postgresql://bench@127.0.0.1:9/bench",
    "REDIS_URL": "redis://127.0.0.1:9/0",
    "MINIO_ENDPOINT": "http://127.0.0.1:9",
    "MINIO_ACCESS_KEY": "bench",
    "MINIO_SECRET_KEY": "bench-secret",
    "JWT_SECRET": "bench-secret-" + "x" * 32,
    "LOG_LEVEL": "WARNING",
    "HF_HUB_OFFLINE": "1",
    "EMBEDDER_THREADS": "1",
}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_texts(n_texts: int, n_queries: int) -> tuple[list[str], list[str]]:
    sys.path.insert(0, str(ROOT / "bench"))
    from search import real_texts  # the same real text as the search benchmark

    chunks, queries = real_texts(n_texts, n_queries)
    return list(chunks), list(queries)


# --- the model alone, in a child process per backend -------------------------------------


async def _model(backend: str, threads: int, cache: Path) -> Any:
    if backend == "torch":
        import torch

        from app.core.embedding import LocalEmbedder

        torch.set_num_threads(threads)
        return LocalEmbedder.load()
    from app.embedder.onnx import OnnxEmbedder

    return await OnnxEmbedder.load(
        cache, int8=backend == "onnx_int8", threads=threads, max_batch=64, max_call_tokens=8192
    )


async def child(backend: str, threads: int, cache: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Vectors of every text, and CPU ms per query at each batch size (run in a child)."""
    model = await _model(backend, threads, cache)
    model.encode_sync(["warm up"])
    out: dict[str, Any] = {"cpu_ms": {}}
    queries = data["queries"]
    for batch in BATCHES:
        c0 = time.process_time()
        for i in range(0, len(queries), batch):
            model.encode_sync(queries[i : i + batch])
        out["cpu_ms"][str(batch)] = (time.process_time() - c0) * 1000 / len(queries)
    if threads == THREADS[0]:
        vecs = model.encode_sync(data["chunks"] + queries)
        np.save(data["vectors"] + f".{backend}.npy", vecs)
    return out


def run_child(backend: str, threads: int, cache: Path, texts_file: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", backend, str(threads), str(cache), str(texts_file)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{backend} child failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def agreement(vecs: np.ndarray, ref: np.ndarray, n_chunks: int) -> dict[str, float]:
    cos = (vecs * ref).sum(axis=1)
    corpus = ref[:n_chunks]
    want = np.argsort(-(ref[n_chunks:] @ corpus.T), axis=1)[:, :10]
    got = np.argsort(-(vecs[n_chunks:] @ corpus.T), axis=1)[:, :10]
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "recall10": float(recall)}


# --- the served embedder ----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """The process's resident set now, MiB."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if "VmRSS" in x)
    return int(line.split()[1]) / 1024


def encode_calls(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    name = "sluice_embedder_encode_calls_total "
    return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith(name))


async def closed_loop(url: str, queries: list[str], clients: int, total: int) -> dict[str, Any]:
    """``clients`` keep-alive clients posting ``total`` queries back to back (aiohttp:
    the lightest client here, so the bench takes little of the CPU it measures)."""
    latencies: list[float] = []
    counter = iter(range(total))
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def one_client() -> None:
            for n in counter:
                body = {"model": "all-MiniLM-L6-v2", "input": queries[n % len(queries)]}
                t = time.perf_counter()
                async with http.post("/v1/embeddings", json=body) as r:
                    await r.read()
                    r.raise_for_status()
                latencies.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {
        "p50": float(np.percentile(latencies, 50)),
        "p99": float(np.percentile(latencies, 99)),
        "qps": total / wall,
    }


def served(backend: str, cache: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        **SERVICE_ENV,
        "EMBEDDER_BACKEND": backend,
        "EMBEDDER_CACHE_DIR": str(cache),
    }
    Settings.from_environ(env)  # refuse a bad environment here, not in the child
    results: dict[str, Any] = {}
    with EmbedderProcess(tmp / f"embedder-{backend}.log", env) as proc:
        assert proc.pid is not None
        for clients in args.clients:
            asyncio.run(closed_loop(proc.url, args.query_texts, clients, clients * 5))  # warm-up
            calls0, cpu0 = encode_calls(proc.url), cpu_seconds(proc.pid)
            r = asyncio.run(closed_loop(proc.url, args.query_texts, clients, args.requests))
            r["cpu_ms"] = (cpu_seconds(proc.pid) - cpu0) * 1000 / args.requests
            r["per_call"] = args.requests / max(encode_calls(proc.url) - calls0, 1)
            results[str(clients)] = r
            say(f"{backend} at {clients} clients: {r}")
        results["rss_mib"] = rss_mib(proc.pid)
    return results


# --- the report ----------------------------------------------------------------------------


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"load average at start: {r['load']}, at end: {os.getloadavg()[0]:.2f}", ""]
    lines.append("agreement with torch (cosine per text; recall@10 of queries over chunks)")
    for b, a in r["agreement"].items():
        lines.append(
            f"  {b:10s} cos min {a['cos_min']:.6f} mean {a['cos_mean']:.6f}  "
            f"recall@10 {a['recall10']:.3f}"
        )
    lines += ["", "model alone, CPU ms per query (ratio to torch at the same threads and batch)"]
    for threads in THREADS:
        for batch in map(str, BATCHES):
            base = r["cpu"]["torch"][str(threads)][batch]
            row = f"  threads {threads} batch {batch:>2s}: torch {base:6.2f}"
            for b in args.backends[1:]:
                v = r["cpu"][b][str(threads)][batch]
                row += f"  {b} {v:6.2f} ({v / base:.2f}x)"
            lines.append(row)
    lines += ["", "served (EMBEDDER_THREADS=1), one query per request"]
    for clients in map(str, args.clients):
        base = r["served"]["torch"][clients]
        for b in args.backends:
            s = r["served"][b][clients]
            lines.append(
                f"  {clients:>2s} clients {b:10s}"
                f" p50 {s['p50']:7.2f} ms ({s['p50'] / base['p50']:.2f}x)"
                f"  p99 {s['p99']:7.2f} ms ({s['p99'] / base['p99']:.2f}x)"
                f"  {s['qps']:6.1f} q/s ({s['qps'] / base['qps']:.2f}x)"
                f"  CPU {s['cpu_ms']:5.2f} ms/q ({s['cpu_ms'] / base['cpu_ms']:.2f}x)"
                f"  {s['per_call']:.1f} q/encode"
            )
    lines.append(
        "  embedder RSS after the run: "
        + ", ".join(f"{b} {r['served'][b]['rss_mib']:.0f} MiB" for b in args.backends)
    )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        backend, threads, cache, texts_file = sys.argv[2:6]
        data = json.loads(Path(texts_file).read_text())
        out = asyncio.run(child(backend, int(threads), Path(cache), data))
        print(json.dumps(out))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--clients", default="1,20")
    p.add_argument("--backends", default="torch,onnx,onnx_int8")
    p.add_argument("--cache", default="")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.backends = args.backends.split(",")
    if args.backends[0] != "torch":
        raise SystemExit("--backends must start with torch (the baseline)")
    cache = cache_dir(args.cache)
    r: dict[str, Any] = {"load": f"{os.getloadavg()[0]:.2f}", "cpu": {}, "served": {}}
    chunks, queries = load_texts(args.texts, args.queries)
    args.query_texts = queries
    with tempfile.TemporaryDirectory(prefix="sluice-bench-embedder-") as tmp_name:
        tmp = Path(tmp_name)
        texts_file = tmp / "texts.json"
        vectors = str(tmp / "vectors")
        texts_file.write_text(
            json.dumps({"chunks": chunks, "queries": queries, "vectors": vectors})
        )
        for b in args.backends:
            r["cpu"][b] = {str(t): run_child(b, t, cache, texts_file)["cpu_ms"] for t in THREADS}
            say(f"{b}: model alone {r['cpu'][b]}")
        ref = np.load(f"{vectors}.torch.npy")
        r["agreement"] = {
            b: agreement(np.load(f"{vectors}.{b}.npy"), ref, len(chunks)) for b in args.backends
        }
        for b in args.backends:
            r["served"][b] = served(b, cache, tmp, args)
    print(report(r, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
