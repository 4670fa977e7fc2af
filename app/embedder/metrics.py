"""The embedder's Prometheus series (one registry per process).

``sluice_embedder_encode_calls_total`` against ``sluice_embedder_requests_total``
shows the batching at work: N concurrent requests cost fewer than N model calls.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class EmbedderMetrics:
    """Requests, model calls, batch sizes and the queue."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "sluice_embedder_requests_total",
            "POST /v1/embeddings requests, by status",
            ["status"],
            registry=registry,
        )
        self.encode_calls = Counter(
            "sluice_embedder_encode_calls_total", "Model encode calls", registry=registry
        )
        self.texts = Counter("sluice_embedder_texts_total", "Texts embedded", registry=registry)
        self.batch_requests = Histogram(
            "sluice_embedder_batch_requests",
            "Requests coalesced into one encode call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        self.encode_seconds = Histogram(
            "sluice_embedder_encode_seconds",
            "Duration of one encode call",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "sluice_embedder_queue_texts", "Texts waiting for the model", registry=registry
        )
        self.ready = Gauge("sluice_embedder_ready", "1 once the model is loaded", registry=registry)

    def observe_batch(self, requests: int, texts: int, seconds: float) -> None:
        self.encode_calls.inc()
        self.texts.inc(texts)
        self.batch_requests.observe(requests)
        self.encode_seconds.observe(seconds)
