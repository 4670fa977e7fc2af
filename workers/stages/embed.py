"""Stage 4, embed: vectors for every chunk, batch by batch.

Chunks are embedded longest first in batches of ``batch_size`` (less
padding).  Batches already embedded by an earlier attempt (checkpointed by the caller
through ``on_batch``) are passed in ``done`` and not recomputed.  Between
batches the reporter's boundary runs, so a cancellation stops the stage at the
next batch; the embedder runs off the event loop, so progress and lease
renewals keep flowing during a batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np

from app.core.embedding import Embedder, Vectors
from workers.stages.common import Chunk, StageReporter

OnBatch = Callable[[int, Vectors], Awaitable[None]]


async def embed_chunks(
    embedder: Embedder,
    chunks: list[Chunk],
    *,
    batch_size: int,
    report: StageReporter,
    done: dict[int, Vectors] | None = None,
    on_batch: OnBatch | None = None,
) -> Vectors:
    """A ``(len(chunks), dim)`` float32 array, row ``i`` for ``chunks[i]``."""
    done = done or {}
    total = len(chunks)
    out = np.zeros((total, embedder.dim), dtype=np.float32)
    # Longest first, as sentence-transformers does inside one encode() call:
    # batches of similar lengths waste less on padding.  The order only
    # depends on the chunks, so stored batches line up on a retry.
    order = np.array(sorted(range(total), key=lambda i: -len(chunks[i].text)), dtype=np.int64)
    batches = (total + batch_size - 1) // batch_size
    for index in range(batches):
        rows = order[index * batch_size : (index + 1) * batch_size]
        cached = done.get(index)
        if cached is not None and cached.shape == (len(rows), embedder.dim):
            out[rows] = cached
        else:
            await report.boundary()
            vectors = await embedder.embed([chunks[i].text for i in rows])
            out[rows] = vectors
            if on_batch is not None:
                await on_batch(index, vectors)
        finished = min((index + 1) * batch_size, total)
        await report.progress(finished / total, f"embedded {finished}/{total} chunks")
    return out
