"""Long documents cost a worker no more memory than short ones (issue 12, item 4).

* the parse child streams pages through the chunker, so a document of many long
  pages parses inside a memory limit the whole-text chunker needed more than
  twice of (it held every page, then tokenized up to 256 pages' paragraphs at once);
* the embed stage splits a batch of long chunks into model calls of at most
  ``EMBEDDING_MAX_CALL_TOKENS`` padded tokens (the model's activations are what a
  worker's memory peaks on), and the split changes no vector.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.core.embedding import LocalEmbedder, load_tokenizer, model_dir
from tests.fixtures_hostile import shared_stream_pdf, text_stream
from workers.parse import ParseJob, ParseReporter, parse_in_child
from workers.stages.budget import ExtractLimits
from workers.stages.chunk import chunk_pages
from workers.stages.common import NullReporter, PageText
from workers.stages.embed import calls, embed_chunks
from workers.stages.extract import extract_document

MB = 1024 * 1024


async def _nothing(*_: object) -> None:
    return None


async def test_a_long_document_parses_within_a_short_ones_memory(tmp_path: Path) -> None:
    """100 pages of 30,000 characters each (2.8 million in all) in a 160 MiB child:
    before streaming this died at 200 MiB; the chunks are the whole-text chunker's."""
    path = tmp_path / "long.pdf"
    path.write_bytes(shared_stream_pdf(100, text_stream(30_000, string_length=2000)))
    job = ParseJob(
        path=str(path),
        document_type="pdf",
        chunk_size=256,
        chunk_overlap=32,
        tokenizer_path=str(model_dir() / "tokenizer.json"),
        limits=ExtractLimits(),
        memory_bytes=160 * MB,
        time_seconds=300,
    )
    parsed = await parse_in_child(job, ParseReporter(_nothing, _nothing, _nothing))
    assert parsed.pages == 100 and parsed.chars > 2_500_000
    extracted = await extract_document(path, "pdf", report=NullReporter())
    assert parsed.chunks == chunk_pages(
        extracted.pages, load_tokenizer(), chunk_size=256, chunk_overlap=32
    )
    assert {c.page_start for c in parsed.chunks} == set(range(1, 101))


def test_calls_are_cut_at_the_padded_token_budget() -> None:
    def cut(lengths: list[int], budget: int) -> list[list[int]]:
        return [lengths[part] for part in calls(lengths, budget)]

    # Longest first (as the embed stage orders them): full-length texts two a call.
    assert cut([258, 258, 258, 258, 100], 516) == [[258, 258], [258, 258], [100]]
    # Short texts fill a call up to the budget; a text over the budget goes alone.
    assert cut([10] * 7, 30) == [[10, 10, 10], [10, 10, 10], [10]]
    assert cut([500, 10, 10, 10, 10], 30) == [[500], [10, 10, 10], [10]]
    assert cut([], 100) == []
    assert cut([5] * 64, 8192) == [[5] * 64]  # a batch under the budget is one call


async def test_split_calls_give_the_vectors_of_one_call(embedder: LocalEmbedder) -> None:
    pages = [
        PageText(
            p, " ".join(f"Page {p} sentence {i} is about topic {p * 7 + i}." for i in range(40))
        )
        for p in range(1, 4)
    ]
    chunks = chunk_pages(pages, load_tokenizer(), chunk_size=64, chunk_overlap=8)
    assert len(chunks) > 8
    whole = await embed_chunks(embedder, chunks, batch_size=64, report=NullReporter())
    split = await embed_chunks(
        embedder, chunks, batch_size=64, report=NullReporter(), max_call_tokens=70
    )
    assert split.shape == whole.shape == (len(chunks), embedder.dim)
    assert np.allclose(split, whole, atol=1e-5)
    direct = await embedder.embed([c.text for c in chunks])
    assert np.allclose(split, direct, atol=1e-5)
