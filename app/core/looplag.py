"""Event-loop lag: how late the loop wakes a task that asked to sleep a few ms.

:class:`LoopLagProbe` is one background task per process: it sleeps
:data:`PROBE_INTERVAL` (5 ms) again and again and records how much later than
asked it woke.  A callback that holds the loop (CPU work on the loop, a long
GC pause, a walk over every connection) shows up here as one large sample,
whatever task caused it.  Each sample goes to the process's
``sluice_event_loop_lag_seconds`` histogram (label ``component``: ``ws``,
``gateway``, ``worker``) and to a bounded window that :meth:`LoopLagProbe.take`
summarises and empties (the WebSocket server's self-report reads it every few
seconds).

Invariants: the probe never raises out of its task; it costs about 200 wake-ups
a second; the window holds at most :data:`WINDOW_SAMPLES` samples (the oldest
are dropped), so memory is bounded however long nobody calls :meth:`take`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram

PROBE_INTERVAL = 0.005
"""Seconds the probe sleeps between samples."""
WINDOW_SAMPLES = 4096
"""Samples kept for :meth:`LoopLagProbe.take` (about 20 s at 200 samples/s)."""
LAG_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class LoopLagMetrics:
    """``sluice_event_loop_lag_seconds``, registered once in a process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Histogram(
            "sluice_event_loop_lag_seconds",
            "How late the event loop woke a 5 ms sleep",
            ["component"],
            buckets=LAG_BUCKETS,
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class LagSummary:
    """Lag over one window, in milliseconds."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def summarise(samples: list[float]) -> LagSummary | None:
    """p50/p99/max of ``samples`` (seconds) in ms; None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    last = len(ordered) - 1

    def at(p: float) -> float:
        return ordered[min(last, round(p * last))] * 1000

    return LagSummary(len(ordered), at(0.50), at(0.99), ordered[-1] * 1000)


class LoopLagProbe:
    """Measures this loop's wake-up lag until :meth:`stop`; see the module docstring."""

    def __init__(
        self, metrics: LoopLagMetrics, component: str, *, interval: float = PROBE_INTERVAL
    ) -> None:
        self._observe = metrics.lag.labels(component=component).observe
        self._interval = interval
        self._window: deque[float] = deque(maxlen=WINDOW_SAMPLES)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling on the running loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="loop-lag-probe")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def take(self) -> LagSummary | None:
        """Summarise the samples since the previous call and start a new window."""
        samples = list(self._window)
        self._window.clear()
        return summarise(samples)

    async def _run(self) -> None:
        interval = self._interval
        clock = time.perf_counter
        while True:
            asked = clock()
            await asyncio.sleep(interval)
            lag = max(0.0, clock() - asked - interval)
            self._window.append(lag)
            self._observe(lag)
