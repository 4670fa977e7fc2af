"""``sluice embedder``: the warm embedding service.

One process holds the local model (all-MiniLM-L6-v2) and serves it over an
OpenAI-compatible ``POST /v1/embeddings``, so that the gateway embeds search
queries without loading torch.  Concurrent requests are coalesced by a
micro-batcher (:mod:`app.embedder.batcher`) into one ``encode`` call at a
time.  This package may import :mod:`app.core` only.
"""
