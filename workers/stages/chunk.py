"""Stage 3, chunk: token-aware splitting with the embedding model's tokenizer.

The document's text is its pages joined by a blank line (pages with no text
are left out), split into paragraphs at blank lines and tokenized paragraph by
paragraph with the model's own WordPiece tokenizer, keeping each token's
character offsets.  Chunks are then cut greedily: each takes at most
``chunk_size - 2`` tokens (the model adds [CLS] and [SEP]; it silently
truncates anything past its max sequence length, so ``chunk_size`` is capped
by it), ending at the last paragraph boundary in the second half of the window,
else the last sentence end, else a word boundary.  The next chunk starts
``chunk_overlap`` tokens back, moved forward to a sentence start when one is
inside the overlap.  Each chunk keeps its page range, character offsets in the
joined text, token count and sha256.

:class:`StreamingChunker` does this a page at a time, so memory does not grow
with the page count: it holds the text and tokens from the next chunk's first
token on (and the paragraph not yet known to be complete), and hands out each
chunk as soon as no later page can change it.  Its chunks are identical to
cutting the whole joined text at once (:func:`chunk_pages` is that, for a list
of pages): a paragraph is tokenized only once the blank line that ends it is
followed by text (a blank-line run can grow across pages), and a chunk is cut
only once the token after its window exists.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from array import array
from collections.abc import Iterable
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


class _Tokens:
    """Tokens of a text: their character spans and three flags, in compact arrays
    (~19 bytes a token, not ~100 in Python lists).  Indices are local: the
    :class:`StreamingChunker` drops a prefix once no chunk needs it."""

    def __init__(self) -> None:
        self.starts = array("q")
        self.ends = array("q")
        self.word_start = bytearray()
        """The token starts a word (it is not a ``##`` continuation)."""
        self.sent_end = bytearray()
        self.para_end = bytearray()

    def __len__(self) -> int:
        return len(self.starts)

    def drop(self, count: int) -> None:
        """Forget the first ``count`` tokens (later indices move down by ``count``)."""
        for column in (self.starts, self.ends, self.word_start, self.sent_end, self.para_end):
            del column[:count]

    def add(self, base: int, names: list[str], offsets: list[tuple[int, int]]) -> None:
        """Append one paragraph's tokens; ``base`` is its offset in the document."""
        self.starts.extend(base + a for a, _ in offsets)
        self.ends.extend(base + b for _, b in offsets)
        self.word_start.extend(not tok.startswith("##") for tok in names)
        self.sent_end.extend(tok in _SENTENCE_END for tok in names)
        self.para_end.extend(bytes(len(names) - 1))
        self.para_end.append(1)

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


class StreamingChunker:
    """Chunks of a document fed one page at a time (see the module docstring).

    ``feed(page)`` returns the chunks that page made final, ``finish()`` the
    rest; together, in order, they are exactly ``chunk_pages`` of all the pages.
    What it holds: the text from the next chunk's first character on (at least
    the paragraph not yet tokenized), the tokens from the next chunk's first
    token on, and the starts of the pages from that chunk's page on.  Pure and
    synchronous: run it in the parse child or on a thread.
    """

    def __init__(self, tokenizer: Tokenizer, *, chunk_size: int, chunk_overlap: int) -> None:
        self._tokenizer = tokenizer
        self._budget = chunk_size - SPECIAL_TOKENS
        self._overlap = chunk_overlap
        self._text = ""
        """The joined text from offset ``_base`` on."""
        self._base = 0
        self._scan = 0
        """Document offset where the paragraph not yet tokenized starts."""
        self._tokens = _Tokens()
        """Tokens from document token ``_next`` on: local index 0 starts the next chunk."""
        self._page_starts: list[int] = []
        self._page_numbers: list[int] = []
        self._seq = 0

    def feed(self, page: PageText) -> list[Chunk]:
        """Add the next page; the chunks no later page can change."""
        if not page.text:
            return []
        if self._page_starts:
            self._text += PAGE_SEPARATOR
        self._page_starts.append(self._base + len(self._text))
        self._page_numbers.append(page.number)
        self._text += page.text
        self._tokenize(self._settled_paragraphs())
        return self._cut(final=False)

    def finish(self) -> list[Chunk]:
        """The document ended: the remaining chunks."""
        paragraphs = self._settled_paragraphs(final=True)
        self._tokenize(paragraphs)
        return self._cut(final=True)

    def _settled_paragraphs(self, *, final: bool = False) -> list[tuple[int, int]]:
        """(start, end) in the document of each paragraph from ``_scan`` on that is
        complete and not blank; ``_scan`` moves past them.  A blank-line run is
        complete once text follows it (before that, more pages may extend it)."""
        text, base = self._text, self._base
        settled = len(text) if final else len(text.rstrip())
        pos = self._scan - base
        found: list[tuple[int, int]] = []
        while (match := _PARA_RE.search(text, pos)) is not None:
            if not final and match.end() >= settled:
                break
            if text[pos : match.start()].strip():
                found.append((base + pos, base + match.start()))
            pos = match.end()
        if final and text[pos:].strip():
            found.append((base + pos, base + len(text)))
        self._scan = base + (len(text) if final else pos)
        return found

    def _tokenize(self, paragraphs: list[tuple[int, int]]) -> None:
        """Append the tokens of ``paragraphs``, ``ENCODE_BATCH`` at a time (the
        tokenizer's own encodings never exist for many paragraphs at once)."""
        text, base = self._text, self._base
        for first in range(0, len(paragraphs), ENCODE_BATCH):
            batch = paragraphs[first : first + ENCODE_BATCH]
            encodings = self._tokenizer.encode_batch(
                [text[a - base : b - base] for a, b in batch], add_special_tokens=False
            )
            for (start, _), enc in zip(batch, encodings, strict=True):
                if enc.tokens:
                    self._tokens.add(start, enc.tokens, enc.offsets)
            del encodings

    def _cut(self, *, final: bool) -> list[Chunk]:
        """Cut every chunk whose end is known, then forget what they alone needed.

        Before the end, a chunk starting at local token ``s`` is cut once token
        ``s + budget`` exists: its window is then full and every flag
        :meth:`_Tokens.best_end` and :meth:`_Tokens.next_start` read is final."""
        tokens, budget = self._tokens, self._budget
        n = len(tokens)
        s = 0
        out: list[Chunk] = []
        while s < n and (final or n > s + budget):
            e = min(s + budget, n)
            b = tokens.best_end(s, e, budget) if e < n else n
            out.append(self._chunk(s, b))
            if b >= n:
                s = n
                break
            s = tokens.next_start(s, b, self._overlap)
        self._forget(s)
        return out

    def _chunk(self, s: int, b: int) -> Chunk:
        tokens = self._tokens
        char_start, char_end = tokens.starts[s], tokens.ends[b - 1]
        body = self._text[char_start - self._base : char_end - self._base]
        starts, numbers = self._page_starts, self._page_numbers
        chunk = Chunk(
            seq=self._seq,
            text=body,
            token_count=b - s,
            page_start=numbers[bisect.bisect_right(starts, char_start) - 1],
            page_end=numbers[bisect.bisect_right(starts, char_end - 1) - 1],
            char_start=char_start,
            char_end=char_end,
            sha256=hashlib.sha256(body.encode()).hexdigest(),
        )
        self._seq += 1
        return chunk

    def _forget(self, s: int) -> None:
        """Drop the tokens before local ``s``, and the text and pages before the
        next chunk's first character."""
        tokens = self._tokens
        keep = tokens.starts[s] if s < len(tokens) else self._scan
        tokens.drop(s)
        if keep > self._base:
            self._text = self._text[keep - self._base :]
            self._base = keep
        starts = self._page_starts
        drop = bisect.bisect_right(starts, keep) - 1
        if drop > 0:
            del starts[:drop], self._page_numbers[:drop]


def chunk_pages(
    pages: Iterable[PageText], tokenizer: Tokenizer, *, chunk_size: int, chunk_overlap: int
) -> list[Chunk]:
    """Split ``pages`` into chunks; pure and synchronous (run it on a thread)."""
    chunker = StreamingChunker(tokenizer, chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    chunks: list[Chunk] = []
    for page in pages:
        chunks.extend(chunker.feed(page))
    chunks.extend(chunker.finish())
    return chunks
