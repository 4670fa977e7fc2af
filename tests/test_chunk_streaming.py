"""The streaming chunker cuts exactly the chunks the whole-text chunker cut.

``_reference_chunks`` is the chunker as it was before streaming (join every
page, tokenize the whole text, cut), frozen here as the oracle: chunk
boundaries, page ranges, offsets, token counts and hashes must not change for
any document, whether pages come one by one or split anywhere.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
import re
import resource
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from app.core.embedding import load_tokenizer
from workers.stages.chunk import StreamingChunker, chunk_pages
from workers.stages.common import Chunk, PageText

_PARA_RE = re.compile(r"\n\s*\n")
_SENTENCE_END = frozenset({".", "!", "?", "\u3002", "\uff01", "\uff1f"})


def _reference_chunks(
    pages: list[PageText], tokenizer: Tokenizer, *, chunk_size: int, chunk_overlap: int
) -> list[Chunk]:
    """The pre-streaming chunker (workers/stages/chunk.py before issue 12), verbatim in effect."""
    parts: list[str] = []
    page_starts: list[int] = []
    page_numbers: list[int] = []
    offset = 0
    for page in pages:
        if not page.text:
            continue
        if parts:
            parts.append("\n\n")
            offset += 2
        page_starts.append(offset)
        page_numbers.append(page.number)
        parts.append(page.text)
        offset += len(page.text)
    text = "".join(parts)
    if not text:
        return []
    paragraphs: list[tuple[int, int]] = []
    pos = 0
    for match in _PARA_RE.finditer(text):
        paragraphs.append((pos, match.start()))
        pos = match.end()
    paragraphs.append((pos, len(text)))
    paragraphs = [(a, b) for a, b in paragraphs if text[a:b].strip()]
    starts, ends = array("q"), array("q")
    word_start, sent_end, para_end = bytearray(), bytearray(), bytearray()
    for first in range(0, len(paragraphs), 256):
        batch = paragraphs[first : first + 256]
        encodings = tokenizer.encode_batch([text[a:b] for a, b in batch], add_special_tokens=False)
        for (base, _), enc in zip(batch, encodings, strict=True):
            names = enc.tokens
            if not names:
                continue
            starts.extend(base + a for a, _ in enc.offsets)
            ends.extend(base + b for _, b in enc.offsets)
            word_start.extend(not tok.startswith("##") for tok in names)
            sent_end.extend(tok in _SENTENCE_END for tok in names)
            para_end.extend(bytes(len(names) - 1))
            para_end.append(1)

    def best_end(s: int, e: int, budget: int) -> int:
        low = s + max(1, budget // 2)
        for flags in (para_end, sent_end):
            for b in range(e, low, -1):
                if flags[b - 1]:
                    return b
        for b in range(e, low, -1):
            if word_start[b]:
                return b
        return e

    def next_start(s: int, b: int, overlap: int) -> int:
        nxt = max(b - overlap, s + 1)
        for i in range(nxt, b):
            if sent_end[i - 1] or para_end[i - 1]:
                return i
        while nxt < b and not word_start[nxt]:
            nxt += 1
        return nxt

    n = len(starts)
    budget = chunk_size - 2
    chunks: list[Chunk] = []
    s = 0
    while s < n:
        e = min(s + budget, n)
        b = best_end(s, e, budget) if e < n else n
        char_start, char_end = starts[s], ends[b - 1]
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
        s = next_start(s, b, chunk_overlap)
    return chunks


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


def _streamed(pages: list[PageText], tok: Tokenizer, size: int, overlap: int) -> list[Chunk]:
    """Pages fed one at a time, the chunks collected as the chunker hands them out."""
    chunker = StreamingChunker(tok, chunk_size=size, chunk_overlap=overlap)
    out: list[Chunk] = []
    for page in pages:
        out.extend(chunker.feed(page))
    out.extend(chunker.finish())
    return out


def _same(pages: list[PageText], tok: Tokenizer, size: int, overlap: int) -> list[Chunk]:
    expected = _reference_chunks(pages, tok, chunk_size=size, chunk_overlap=overlap)
    got = _streamed(pages, tok, size, overlap)
    assert got == expected
    assert chunk_pages(pages, tok, chunk_size=size, chunk_overlap=overlap) == expected
    return got


_WORDS = ["river", "stone", "antidisestablishmentarianism", "Ünïcödé", "東京", "x", "42", "e.g."]


def _sentence(rng: random.Random) -> str:
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 15)))
    return words + rng.choice([".", "!", "?", "", ",", "\u3002"])


def _page_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.1:
        return ""  # a page with no text (a scanned page)
    if kind < 0.2:
        return rng.choice([" ", "\n", "\n\n", " \n \n ", "\t\n", "\x0c"])  # whitespace only
    if kind < 0.3:
        return rng.choice(["a", ".", "x.", "Hi!"])  # tiny pages
    if kind < 0.4:  # one very long paragraph, no sentence ends
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(300, 900)))
    paragraphs = [
        " ".join(_sentence(rng) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 6))
    ]
    seps = ["\n\n", "\n \n", "\n", "\n\n\n", " \n\t\n "]
    text = paragraphs[0]
    for para in paragraphs[1:]:
        text += rng.choice(seps) + para
    edges = ["", "\n", " ", "\n\n", " \n"]
    return rng.choice(edges) + text + rng.choice(edges)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("size", "overlap"), [(16, 0), (24, 4), (64, 8), (256, 32), (256, 127)])
def test_streaming_matches_whole_text_chunker(
    tok: Tokenizer, seed: int, size: int, overlap: int
) -> None:
    rng = random.Random(seed * 1000 + size + overlap)
    pages = [PageText(i + 1, _page_text(rng)) for i in range(rng.randint(1, 40))]
    chunks = _same(pages, tok, size, overlap)
    assert [c.seq for c in chunks] == list(range(len(chunks)))


def test_edge_documents(tok: Tokenizer) -> None:
    cases = [
        [],
        [PageText(1, "")],
        [PageText(1, ""), PageText(2, "  \n ")],
        [PageText(1, "one."), PageText(2, ""), PageText(3, ""), PageText(4, "four.")],
        [PageText(1, "a \n"), PageText(2, " \nb")],  # a blank-line run across pages
        [PageText(1, "a\n "), PageText(2, " "), PageText(3, "\n \n"), PageText(4, " b c")],
        [PageText(1, "no end " * 2000)],  # one paragraph much longer than a chunk
        [PageText(i, "x") for i in range(1, 500)],  # tiny pages: many per chunk
    ]
    for pages in cases:
        for size, overlap in ((16, 0), (24, 4), (256, 32)):
            _same(pages, tok, size, overlap)


_text = st.lists(
    st.sampled_from([*"ab .!?\n\t", "\u3002", "word", "##", "\x0c", "é", "\n\n"]),
    max_size=200,
).map("".join)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=_text,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    size=st.sampled_from([16, 20, 40]),
    overlap=st.integers(min_value=0, max_value=9),
)
def test_any_page_split_gives_the_chunks_of_one_page_text(
    tok: Tokenizer, text: str, cuts: list[int], size: int, overlap: int
) -> None:
    """A text cut into pages anywhere: the streaming chunks equal the oracle's for
    those pages (page ranges included)."""
    points = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *points, len(text)]
    pages = [PageText(i + 1, text[a:b]) for i, (a, b) in enumerate(itertools.pairwise(bounds))]
    _same(pages, tok, size, overlap)


def test_chunks_come_out_as_pages_go_in(tok: Tokenizer) -> None:
    """Each page's chunks are handed out while later pages are still coming: no
    chunk waits for the end of the document, and the chunker's memory stays flat."""
    chunker = StreamingChunker(tok, chunk_size=64, chunk_overlap=8)
    handed: list[int] = []
    held: list[int] = []
    for p in range(1, 401):
        text = "\n\n".join(f"Page {p} paragraph {i} says something new." for i in range(6))
        handed.append(len(chunker.feed(PageText(p, text))))
        held.append(len(chunker._text) + len(chunker._tokens) + len(chunker._page_starts))
    rest = chunker.finish()
    assert sum(handed) > 10 * len(rest)
    assert all(n > 0 for n in handed[1:])
    # What it holds after 400 pages is what it held after 10: bounded by a chunk and a page.
    assert max(held[10:]) <= 2 * max(held[:10])


def test_peak_memory_does_not_grow_with_page_count(tok: Tokenizer) -> None:
    """Chunking 4,000 pages in a stream needs no more memory than a few pages'
    worth beyond the chunks themselves (ru_maxrss is this process's high-water mark)."""
    chunker = StreamingChunker(tok, chunk_size=256, chunk_overlap=32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    count = 0
    for p in range(1, 4001):
        text = "\n\n".join(
            f"Page {p} paragraph {i}: " + "words and more words. " * 30 for i in range(5)
        )
        count += len(chunker.feed(PageText(p, text)))
    count += len(chunker.finish())
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert count > 4000
    assert grown_kb < 64 * 1024, f"peak RSS grew by {grown_kb} KiB"
