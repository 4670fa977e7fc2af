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

import bisect
import hashlib
import re
from array import array
from typing import Any

from tokenizers import Tokenizer

from app.core.errors import PermanentError
from workers.stages.common import Chunk, PageText

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


def join_pages(pages: list[PageText]) -> tuple[str, list[int], list[int]]:
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


class _Tokens:
    """Every token of a text: its character span and three flags, in compact arrays
    (~19 bytes a token, not ~100 in Python lists)."""

    def __init__(self) -> None:
        self.starts = array("q")
        self.ends = array("q")
        self.word_start = bytearray()
        """The token starts a word (it is not a ``##`` continuation)."""
        self.sent_end = bytearray()
        self.para_end = bytearray()

    def __len__(self) -> int:
        return len(self.starts)

    def best_end(self, s: int, e: int, budget: int) -> int:
        """Where a chunk starting at token ``s`` ends, at most at ``e``: the last
        paragraph end, else sentence end, else word start in the window's second half."""
        low = s + max(1, budget // 2)
        for flags in (self.para_end, self.sent_end):
            for b in range(e, low, -1):
                if flags[b - 1]:
                    return b
        for b in range(e, low, -1):
            if self.word_start[b]:
                return b
        return e

    def next_start(self, s: int, b: int, overlap: int) -> int:
        """Where the chunk after ``[s, b)`` starts: ``overlap`` tokens back, moved
        forward to a sentence start inside the overlap, else to a word start."""
        nxt = max(b - overlap, s + 1)
        for i in range(nxt, b):  # prefer to start the overlap at a sentence
            if self.sent_end[i - 1] or self.para_end[i - 1]:
                return i
        while nxt < b and not self.word_start[nxt]:
            nxt += 1
        return nxt


def _paragraphs(text: str) -> list[tuple[int, int]]:
    """(start, end) of each paragraph of ``text`` that is not blank."""
    paragraphs: list[tuple[int, int]] = []
    pos = 0
    for match in _PARA_RE.finditer(text):
        paragraphs.append((pos, match.start()))
        pos = match.end()
    paragraphs.append((pos, len(text)))
    return [(a, b) for a, b in paragraphs if text[a:b].strip()]


def _tokenize(text: str, tokenizer: Tokenizer) -> _Tokens:
    """The tokens of ``text``, paragraphs tokenized a batch at a time so the
    tokenizer's own encodings never exist for the whole document at once."""
    tokens = _Tokens()
    paragraphs = _paragraphs(text)
    for first in range(0, len(paragraphs), ENCODE_BATCH):
        batch = paragraphs[first : first + ENCODE_BATCH]
        encodings = tokenizer.encode_batch([text[a:b] for a, b in batch], add_special_tokens=False)
        for (base, _), enc in zip(batch, encodings, strict=True):
            names = enc.tokens
            if not names:
                continue
            offsets = enc.offsets
            tokens.starts.extend(base + a for a, _ in offsets)
            tokens.ends.extend(base + b for _, b in offsets)
            tokens.word_start.extend(not tok.startswith("##") for tok in names)
            tokens.sent_end.extend(tok in _SENTENCE_END for tok in names)
            tokens.para_end.extend(bytes(len(names) - 1))
            tokens.para_end.append(1)
        del encodings
    return tokens


def chunk_pages(
    pages: list[PageText], tokenizer: Tokenizer, *, chunk_size: int, chunk_overlap: int
) -> list[Chunk]:
    """Split ``pages`` into chunks; pure and synchronous (run it on a thread)."""
    text, page_starts, page_numbers = join_pages(pages)
    if not text:
        return []
    tokens = _tokenize(text, tokenizer)
    n = len(tokens)
    budget = chunk_size - SPECIAL_TOKENS
    chunks: list[Chunk] = []
    s = 0
    while s < n:
        e = min(s + budget, n)
        b = tokens.best_end(s, e, budget) if e < n else n
        char_start, char_end = tokens.starts[s], tokens.ends[b - 1]
        body = text[char_start:char_end]
        chunks.append(
            Chunk(
                seq=len(chunks),
                text=body,
                token_count=b - s,
                page_start=page_numbers[bisect.bisect_right(page_starts, char_start) - 1],
                page_end=page_numbers[bisect.bisect_right(page_starts, char_end - 1) - 1],
                char_start=char_start,
                char_end=char_end,
                sha256=hashlib.sha256(body.encode()).hexdigest(),
            )
        )
        if b >= n:
            break
        s = tokens.next_start(s, b, chunk_overlap)
    return chunks
