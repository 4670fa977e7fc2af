"""The gateway's query-embedding client: an OpenAI-compatible ``POST {base}/embeddings``.

The same contract and errors as :class:`~app.core.embedding.OpenAIEmbedder`
(429/5xx, timeouts and connection errors are
:class:`~app.core.errors.TransientError` ``embedding_unavailable``; other
refusals and a wrong shape :class:`~app.core.errors.PermanentError`), built for
one short query per search: aiohttp with keep-alive connections and msgspec for
both bodies.  httpx's client (``OpenAIEmbedder``) costs ~3.5x the CPU per
call (2.4 against 0.7 ms measured on one 2-core machine); at hundreds of
searches per second that is a share of the whole search budget.

Invariants: no connection is made until the first call; an answer is read up to
:data:`MAX_ANSWER_BYTES` plus 16 KiB per text, no further; vectors come back
L2-normalised float32, one row per text, in input order.
"""

from __future__ import annotations

import aiohttp
import msgspec
import numpy as np

from app.core.embedding import EMBEDDING_DIM, MODEL_MAX_SEQ_LENGTH, Vectors
from app.core.errors import ConfigError, PermanentError, TransientError

MAX_ANSWER_BYTES = 64 * 1024
"""Fixed allowance of an answer's size; each text adds 16 KiB (384 floats take ~8)."""


class _Item(msgspec.Struct):
    index: int
    embedding: list[float]


class _Answer(msgspec.Struct):
    data: list[_Item]


_DECODER = msgspec.json.Decoder(_Answer)


def _unavailable(message: str, status: int | None = None) -> TransientError:
    details = {"status": status} if status is not None else None
    return TransientError(message, code="embedding_unavailable", details=details)


class EmbeddingClient:
    """Embeds texts with an OpenAI-compatible endpoint over pooled keep-alive connections."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        dim: int = EMBEDDING_DIM,
        max_seq_length: int = MODEL_MAX_SEQ_LENGTH,
        timeout_s: float = 10.0,
    ) -> None:
        if not base_url:
            raise ConfigError("SEARCH_EMBEDDING_URL is required")
        self._url = base_url.rstrip("/") + "/embeddings"
        self._model = model
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.dim = dim
        self.max_seq_length = max_seq_length

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def embed(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        body = msgspec.json.encode({"model": self._model, "input": texts})
        limit = MAX_ANSWER_BYTES + 16 * 1024 * len(texts)
        try:
            async with self._client().post(
                self._url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                answer = await _read(resp, limit)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unavailable(f"embedding endpoint unreachable: {type(exc).__name__}") from exc
        return self._vectors(answer, len(texts))

    def _vectors(self, answer: bytes, n: int) -> Vectors:
        try:
            items = sorted(_DECODER.decode(answer).data, key=lambda d: d.index)
            arr = np.asarray([d.embedding for d in items], dtype=np.float32)
        except (msgspec.DecodeError, ValueError) as exc:
            raise _unavailable("embedding endpoint sent a malformed body") from exc
        if arr.shape != (n, self.dim):
            raise PermanentError(
                f"embedding endpoint returned shape {arr.shape}, expected ({n}, {self.dim})",
                code="embedding_dimension_mismatch",
            )
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        return np.asarray(arr / np.maximum(norms, 1e-12), dtype=np.float32)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body (at most ``limit`` bytes), or the error its status means."""
    status = resp.status
    if status == 429 or status >= 500:
        raise _unavailable(f"embedding endpoint answered {status}", status)
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise PermanentError(
                f"embedding endpoint answered more than {limit} bytes",
                code="embedding_rejected",
                details={"status": status},
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    if status != 200:
        raise PermanentError(
            f"embedding endpoint answered {status}: {body[:200].decode(errors='replace')}",
            code="embedding_rejected",
            details={"status": status},
        )
    return body
