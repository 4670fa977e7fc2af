"""Stage 4, embed: vectors for every chunk, batch by batch.

Chunks are embedded longest first in batches of ``batch_size`` (less
padding).  A batch goes to the model in calls of at most ``max_call_tokens``
padded tokens (texts times the longest, [CLS] and [SEP] counted): the model's
activations, not the document, are what a worker's memory peaks on (64
full 256-token chunks in one call take ~475 MB above idle; 32 take ~225 MB),
so a long document costs no more memory than a short one.  Batches already
embedded by an earlier attempt (checkpointed by the caller through
``on_batch``) are passed in ``done`` and not recomputed.  Between
batches the reporter's boundary runs, so a cancellation stops the stage at the
next batch; the embedder runs off the event loop, so progress and lease
renewals keep flowing during a batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import numpy as np

from app.core.embedding import Embedder, Vectors
from workers.stages.common import Chunk, StageReporter

OnBatch = Callable[[int, Vectors], Awaitable[None]]
SPECIAL_TOKENS = 2
DEFAULT_MAX_CALL_TOKENS = 8192
"""Padded tokens per model call: 32 chunks of 256 tokens."""


def calls(lengths: list[int], max_tokens: int) -> Iterator[slice]:
    """Consecutive slices of a batch whose texts have ``lengths`` tokens, each at
    most ``max_tokens`` once padded to its longest (one text at least)."""
    start, longest = 0, 0
    for i, length in enumerate(lengths):
        longest = max(longest, length)
        if i > start and (i + 1 - start) * longest > max_tokens:
            yield slice(start, i)
            start, longest = i, length
    if start < len(lengths):
        yield slice(start, len(lengths))


async def embed_chunks(
    embedder: Embedder,
    chunks: list[Chunk],
    *,
    batch_size: int,
    report: StageReporter,
    done: dict[int, Vectors] | None = None,
    on_batch: OnBatch | None = None,
    max_call_tokens: int = DEFAULT_MAX_CALL_TOKENS,
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
            lengths = [chunks[i].token_count + SPECIAL_TOKENS for i in rows]
            for part in calls(lengths, max_call_tokens):
                out[rows[part]] = await embedder.embed([chunks[i].text for i in rows[part]])
            vectors = out[rows]
            if on_batch is not None:
                await on_batch(index, vectors)
        finished = min((index + 1) * batch_size, total)
        await report.progress(finished / total, f"embedded {finished}/{total} chunks")
    return out
