"""Stage 3, chunk: token-aware splitting with the embedding model's tokenizer.

The pages are joined (a blank line between pages) and tokenized paragraph by
paragraph with the model's own WordPiece tokenizer, keeping each token's
character offsets.  Chunks are then cut greedily: each takes at most
``chunk_size - 2`` tokens (the model adds [CLS] and [SEP]; it silently
truncates anything past its max sequence length, so ``chunk_size`` is capped
by it), ending at the last paragraph boundary in the second half of the window,
else the last sentence end, else a word boundary.  The next chunk starts
``chunk_overlap`` tokens back, moved forward to a sentence start when one is
inside the overlap.  Each chunk keeps its page range, character offsets in the
joined text, token count and sha256.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import re
from array import array
from typing import Any

from tokenizers import Tokenizer

from app.core.errors import PermanentError
from workers.stages.common import Chunk, Page, StageReporter

DEFAULT_CHUNK_SIZE = 256
DEFAULT_CHUNK_OVERLAP = 32
MIN_CHUNK_SIZE = 16
PAGE_SEPARATOR = "\n\n"
SPECIAL_TOKENS = 2  # [CLS] ... [SEP]
ENCODE_BATCH = 256
"""Paragraphs tokenized per ``encode_batch`` call."""

_PARA_RE = re.compile(r"\n\s*\n")
_SENTENCE_END = frozenset({".", "!", "?", "\u3002", "\uff01", "\uff1f"})


def resolve_options(options: dict[str, Any], max_seq_length: int) -> tuple[int, int]:
    """(chunk_size, chunk_overlap) in tokens from ``processing_options``."""
    size = options.get("chunk_size", DEFAULT_CHUNK_SIZE)
    overlap = options.get("chunk_overlap", DEFAULT_CHUNK_OVERLAP)
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_CHUNK_SIZE:
        raise PermanentError(
            f"chunk_size must be an integer >= {MIN_CHUNK_SIZE}",
            code="invalid_processing_options",
            details={"field": "chunk_size"},
        )
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise PermanentError(
            "chunk_overlap must be an integer >= 0",
            code="invalid_processing_options",
            details={"field": "chunk_overlap"},
        )
    size = min(size, max_seq_length)
    return size, min(overlap, (size - SPECIAL_TOKENS) // 2)


def join_pages(pages: list[Page]) -> tuple[str, list[int], list[int]]:
    """The document text, each page's start offset, and page numbers."""
    parts: list[str] = []
    starts: list[int] = []
    numbers: list[int] = []
    offset = 0
    for page in pages:
        if not page.text:
            continue
        if parts:
            parts.append(PAGE_SEPARATOR)
            offset += len(PAGE_SEPARATOR)
        starts.append(offset)
        numbers.append(page.number)
        parts.append(page.text)
        offset += len(page.text)
    return "".join(parts), starts, numbers


def chunk_pages(
    pages: list[Page], tokenizer: Tokenizer, *, chunk_size: int, chunk_overlap: int
) -> list[Chunk]:
    """Split ``pages`` into chunks; pure and synchronous (run it on a thread)."""
    text, page_starts, page_numbers = join_pages(pages)
    if not text:
        return []
    paragraphs: list[tuple[int, int]] = []
    pos = 0
    for match in _PARA_RE.finditer(text):
        paragraphs.append((pos, match.start()))
        pos = match.end()
    paragraphs.append((pos, len(text)))
    paragraphs = [(a, b) for a, b in paragraphs if text[a:b].strip()]

    # Per token: character span and three flags, in compact arrays (~19 bytes a
    # token, not ~100 in Python lists), paragraphs tokenized a batch at a time so
    # the tokenizer's own encodings never exist for the whole document at once.
    starts = array("q")
    ends = array("q")
    word_start = bytearray()
    sent_end = bytearray()
    para_end = bytearray()
    for first in range(0, len(paragraphs), ENCODE_BATCH):
        batch = paragraphs[first : first + ENCODE_BATCH]
        encodings = tokenizer.encode_batch([text[a:b] for a, b in batch], add_special_tokens=False)
        for (base, _), enc in zip(batch, encodings, strict=True):
            tokens = enc.tokens
            if not tokens:
                continue
            offsets = enc.offsets
            starts.extend(base + a for a, _ in offsets)
            ends.extend(base + b for _, b in offsets)
            word_start.extend(not tok.startswith("##") for tok in tokens)
            sent_end.extend(tok in _SENTENCE_END for tok in tokens)
            para_end.extend(bytes(len(tokens) - 1))
            para_end.append(1)
        del encodings
    n = len(starts)
    budget = chunk_size - SPECIAL_TOKENS

    def best_end(s: int, e: int) -> int:
        low = s + max(1, budget // 2)
        for flags in (para_end, sent_end):
            for b in range(e, low, -1):
                if flags[b - 1]:
                    return b
        for b in range(e, low, -1):
            if word_start[b]:
                return b
        return e

    chunks: list[Chunk] = []
    s = 0
    while s < n:
        e = min(s + budget, n)
        b = best_end(s, e) if e < n else n
        char_start, char_end = starts[s], ends[b - 1]
        body = text[char_start:char_end]
        first = page_numbers[bisect.bisect_right(page_starts, char_start) - 1]
        last = page_numbers[bisect.bisect_right(page_starts, char_end - 1) - 1]
        chunks.append(
            Chunk(
                seq=len(chunks),
                text=body,
                token_count=b - s,
                page_start=first,
                page_end=last,
                char_start=char_start,
                char_end=char_end,
                sha256=hashlib.sha256(body.encode()).hexdigest(),
            )
        )
        if b >= n:
            break
        nxt = max(b - chunk_overlap, s + 1)
        for i in range(nxt, b):  # prefer to start the overlap at a sentence
            if sent_end[i - 1] or para_end[i - 1]:
                nxt = i
                break
        else:
            while nxt < b and not word_start[nxt]:
                nxt += 1
        s = nxt
    return chunks


async def chunk_document(
    pages: list[Page],
    tokenizer: Tokenizer,
    *,
    options: dict[str, Any],
    max_seq_length: int,
    report: StageReporter,
) -> list[Chunk]:
    size, overlap = resolve_options(options, max_seq_length)
    await report.progress(0.0, f"chunking ({size} tokens, {overlap} overlap)")
    chunks = await asyncio.to_thread(
        chunk_pages, pages, tokenizer, chunk_size=size, chunk_overlap=overlap
    )
    await report.progress(1.0, f"{len(chunks)} chunks")
    return chunks
