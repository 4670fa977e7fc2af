"""The embedder's ONNX Runtime backend: the bundled weights, cheaper per query than torch.

Invariants:

* the graph is exported from the local weights by a child process
  (:mod:`app.embedder.export`, torch stays out of this process) once, into
  ``EMBEDDER_CACHE_DIR`` under a name keyed by the weights' sha256, the export
  recipe's version and the variant (fp32 or int8); the file appears whole or not
  at all, and a later start reuses it;
* its vectors are sentence-transformers' (mean pooling over the attention mask,
  L2 normalisation, truncation at 256 tokens): cosine >= 0.999 against torch for
  fp32 (``bench/embedder.py`` measures it), so queries match what workers stored;
* texts are tokenised with the fast tokenizer directly, sorted by length and run
  in sub-batches of at most ``max_batch`` texts and ``max_call_tokens`` padded
  tokens, so a short query never pays for a long neighbour's padding;
* one run at a time, on one dedicated thread, with ``threads`` intra-op threads
  that never spin while idle.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from app.core.embedding import (
    EMBEDDING_DIM,
    MODEL_MAX_SEQ_LENGTH,
    Vectors,
    load_tokenizer,
    model_dir,
)
from app.core.errors import ConfigError
from app.core.logging import get_logger

log = get_logger("sluice.embedder")
RECIPE = "v2"
"""Bump when :mod:`app.embedder.export` changes what it writes: old files are then ignored."""
EXPORT_TIMEOUT_S = 600.0


def cache_dir(configured: str) -> Path:
    """``EMBEDDER_CACHE_DIR``, or the user's cache directory's ``sluice``."""
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sluice"


def _weights_digest() -> str:
    digest = hashlib.sha256()
    with (model_dir() / "model.safetensors").open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]


def graph_path(directory: Path, *, int8: bool) -> Path:
    """Where the graph of the bundled weights lives (hashes the weights: call off the loop)."""
    variant = "int8" if int8 else "fp32"
    return directory / f"all-MiniLM-L6-v2-{_weights_digest()}-{RECIPE}-{variant}.onnx"


def _lookup(directory: Path, int8: bool) -> tuple[Path, bool]:
    path = graph_path(directory, int8=int8)
    if path.exists():
        return path, True
    directory.mkdir(parents=True, exist_ok=True)  # an unusable cache fails here, at once
    return path, False


async def ensure_graph(directory: Path, *, int8: bool) -> Path:
    """The cached graph, exported first (in a child process) if it is not there yet."""
    path, cached = await asyncio.to_thread(_lookup, directory, int8)
    if cached:
        return path
    log.info("embedder_onnx_export", path=str(path))
    args = [sys.executable, "-m", "app.embedder.export", str(path)] + (["--int8"] if int8 else [])
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), EXPORT_TIMEOUT_S)
    finally:
        if proc.returncode is None:  # timed out or cancelled: no export left behind
            proc.kill()
            await proc.wait()
    if proc.returncode != 0 or not path.exists():
        tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
        raise ConfigError(f"ONNX export failed ({proc.returncode}): {' '.join(tail)[:300]}")
    return path


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort  # type: ignore[import-untyped]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def sub_batches(lengths: list[int], max_batch: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped shortest first: each group within ``max_batch`` texts and
    ``max_tokens`` padded tokens (a text longer than that alone)."""
    groups: list[list[int]] = []
    group: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if group and (len(group) >= max_batch or (len(group) + 1) * lengths[i] > max_tokens):
            groups.append(group)
            group = []
        group.append(i)
    if group:
        groups.append(group)
    return groups


class OnnxEmbedder:
    """The bundled model under ONNX Runtime, one run at a time."""

    name = "onnx"
    dim = EMBEDDING_DIM
    max_seq_length = MODEL_MAX_SEQ_LENGTH

    def __init__(self, session: Any, *, max_batch: int = 64, max_call_tokens: int = 8192) -> None:
        self._session = session
        self._tokenizer = load_tokenizer()
        self._tokenizer.enable_truncation(MODEL_MAX_SEQ_LENGTH)
        self._max_batch = max_batch
        self._max_tokens = max_call_tokens
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    @classmethod
    async def load(
        cls, directory: Path, *, int8: bool, threads: int, max_batch: int, max_call_tokens: int
    ) -> OnnxEmbedder:
        path = await ensure_graph(directory, int8=int8)
        session = await asyncio.to_thread(_session, path, threads)
        return cls(session, max_batch=max_batch, max_call_tokens=max_call_tokens)

    def encode_sync(self, texts: list[str]) -> Vectors:
        ids = [self._tokenizer.encode(t).ids for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for group in sub_batches([len(x) for x in ids], self._max_batch, self._max_tokens):
            width = max(len(ids[i]) for i in group)
            input_ids = np.zeros((len(group), width), dtype=np.int64)
            mask = np.zeros((len(group), width), dtype=np.int64)
            for row, i in enumerate(group):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            feeds = {"input_ids": input_ids, "attention_mask": mask}
            out[group] = self._session.run(["embedding"], feeds)[0]
        return out

    async def embed(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.encode_sync, texts)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
