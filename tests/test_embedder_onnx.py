"""The embedder's ONNX Runtime backend (``EMBEDDER_BACKEND=onnx``, the default).

It must give the vectors torch gives (the workers store torch's), export its
graph once and reuse it, and keep a short query's batch free of long padding.
The graph is the one the session's ``embedder_service`` exported into its cache
at its first start.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from app.core.embedding import LocalEmbedder
from app.embedder.onnx import OnnxEmbedder, ensure_graph, graph_path, sub_batches
from devstack.embedder import EmbedderProcess
from tests.fixtures_pipeline import TOPIC_PAGES

SENTENCES = [line for page in TOPIC_PAGES for line in page]
TEXTS = [
    "how do volcanoes erupt",
    "Magma rises through the crust and erupts as lava.",
    "a sourdough loaf needs a starter, flour, water and salt",
    "x",
    "é ü 漢字 emoji 🙂 and punctuation!?",
    *SENTENCES,
    " ".join(SENTENCES * 8),  # far past 256 tokens: truncated as sentence-transformers does
]


def _cache(service: EmbedderProcess) -> Path:
    return Path(service._env["EMBEDDER_CACHE_DIR"])


@pytest.fixture(scope="module")
def torch_model() -> LocalEmbedder:
    return LocalEmbedder.load()


async def test_onnx_vectors_agree_with_torch(
    embedder_service: EmbedderProcess, torch_model: LocalEmbedder
) -> None:
    onnx = await OnnxEmbedder.load(
        _cache(embedder_service), int8=False, threads=1, max_batch=4, max_call_tokens=512
    )
    try:
        got = await onnx.embed(TEXTS)  # several sub-batches, one text alone
        alone = await onnx.embed([TEXTS[0]])
    finally:
        await onnx.aclose()
    want = torch_model.encode_sync(TEXTS)
    assert got.shape == want.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert float((got * want).sum(axis=1).min()) >= 0.999
    # A row does not depend on what it was batched with (no padding leaks in).
    assert float(alone[0] @ got[0]) > 0.99999


async def test_the_graph_is_exported_once_and_then_reused(
    embedder_service: EmbedderProcess,
) -> None:
    cache = _cache(embedder_service)
    path = graph_path(cache, int8=False)
    assert path.exists() and path.stat().st_size > 10_000_000
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left
    before = path.stat().st_mtime_ns
    assert await ensure_graph(cache, int8=False) == path
    assert path.stat().st_mtime_ns == before


async def test_a_cache_that_cannot_be_written_fails_the_load(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(OSError):
        await ensure_graph(blocker / "cache", int8=False)
    assert os.listdir(tmp_path) == ["not-a-dir"]


def test_sub_batches_group_similar_lengths_within_the_bounds() -> None:
    lengths = [40, 5, 300, 6, 41, 7, 5]
    groups = sub_batches(lengths, max_batch=3, max_tokens=128)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        widths = [lengths[i] for i in group]
        assert len(group) <= 3
        assert len(group) == 1 or len(group) * max(widths) <= 128
    # The short texts go together, the long one alone.
    assert groups[0] == [1, 6, 3] and groups[-1] == [2]
