"""The gateway's Prometheus series: one class per component, one registry per process.

The pattern (the WebSocket server's :class:`~app.ws.hub.Metrics` and the
worker's :class:`~workers.context.WorkerMetrics` follow it too): a component's
instruments are the attributes of one class whose constructor takes the
registry and registers them; the process builds it once, holds it where its
other collaborators are (here :class:`~app.gateway.services.Services`) and
passes it to what records (the request-context middleware gets
:attr:`GatewayMetrics.http`; handlers reach :attr:`GatewayMetrics.uploads`
through ``services(request).metrics``).  There is no module-global lookup:
two apps built on one :class:`Services` share its series, and a second
:class:`GatewayMetrics` on the same registry fails loudly (duplicate series)
instead of silently splitting the counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from app.core.looplag import LoopLagMetrics


class HttpMetrics:
    """Request counters and latencies, by route template (``"unmatched"`` for a 404/405)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sluice_http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "sluice_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=registry,
        )


class UploadMetrics:
    """Upload counters (errors are in the per-route HTTP metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = Counter(
            "sluice_upload_bytes_total", "Part and file bytes accepted", registry=registry
        )
        self.parts = Counter(
            "sluice_upload_parts_total", "Parts accepted", ["route"], registry=registry
        )
        self.part_seconds = Histogram(
            "sluice_upload_part_seconds",
            "Receiving, verifying and storing one part",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.sessions = Counter(
            "sluice_uploads_total", "Upload lifecycle events", ["event"], registry=registry
        )


class GatewayMetrics:
    """Every series the gateway exports, on :attr:`registry` (what ``/metrics`` serves)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.http = HttpMetrics(self.registry)
        self.uploads = UploadMetrics(self.registry)
        self.loop_lag = LoopLagMetrics(self.registry)
