"""The WebSocket server's Prometheus instruments.

Constructed once per process with the process's
:class:`~prometheus_client.CollectorRegistry` (by :func:`app.ws.server.serve`)
and passed to whatever records into it; nothing creates its own.  The series
names are part of the operations contract: do not rename them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from app.core.looplag import LoopLagMetrics


class WsMetrics:
    """Every series the WebSocket server exports, registered in ``registry``.

    :attr:`sent_total` mirrors ``sluice_ws_messages_sent`` as a plain int (the
    self-report reads it without touching the client library's internals);
    record sends with :meth:`sent` so the two never disagree.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.sent_total = 0
        self.connections = Gauge(
            "sluice_ws_connections",
            "Open WebSocket connections",
            ["endpoint"],
            registry=registry,
        )
        self.subscriptions = Gauge(
            "sluice_ws_subscriptions",
            "Job subscriptions held by local connections",
            registry=registry,
        )
        self.channels = Gauge(
            "sluice_ws_redis_channels",
            "Redis pub/sub channels this process listens to",
            registry=registry,
        )
        self.messages_sent = Counter(
            "sluice_ws_messages_sent", "Messages queued to clients", registry=registry
        )
        self.events_received = Counter(
            "sluice_ws_events_received",
            "Pub/sub messages received from Redis",
            registry=registry,
        )
        self.drops = Counter(
            "sluice_ws_drops",
            "Connections dropped by the server, by reason",
            ["reason"],
            registry=registry,
        )
        self.recoveries = Counter(
            "sluice_ws_resumes",
            "Subscriptions with 'since', by outcome",
            ["recovered"],
            registry=registry,
        )
        self.gap_repairs = Counter(
            "sluice_ws_gap_repairs",
            "Live seq gaps repaired from the history stream",
            registry=registry,
        )
        self.redis_reconnects = Counter(
            "sluice_ws_redis_reconnects",
            "Pub/sub connection re-establishments",
            registry=registry,
        )
        self.loop_lag = LoopLagMetrics(registry)
        for endpoint in ("progress", "notifications"):  # export zeros from the start
            self.connections.labels(endpoint=endpoint)
        self.drops.labels(reason="slow_consumer")

    def sent(self, n: int = 1) -> None:
        """``n`` messages were queued to clients."""
        self.sent_total += n
        self.messages_sent.inc(n)
