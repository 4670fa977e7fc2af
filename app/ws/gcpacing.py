"""When the WebSocket server lets CPython's cyclic garbage collector do a full pass.

Measured with the loop-lag probe (``bench/ws.py``, BENCHMARKS.md): the server's
p99 stalls were full (generation 2) collections.  Each open connection keeps
about 80 GC-tracked objects alive (the ``websockets`` connection, its protocol,
reader, tasks and futures, our session, connection and feeds), and a full pass
visits every one of them with the loop stopped: ~40 ms of CPU at 1,000
connections, 300-630 ms at 10,000 (measured on a loaded 2-core machine).
CPython starts one whenever objects promoted since the last pass exceed a
quarter of the old ones, i.e. again and again while connections ramp up, and
then at a random moment shortly after -- in the middle of the traffic.

:class:`GcPacer` takes full passes out of CPython's hands:

* at start everything allocated so far (modules, settings, pools) is frozen
  (``gc.freeze``): never scanned again;
* CPython's own generation-2 trigger is switched off; young collections
  (generations 0 and 1, which only visit recently allocated objects and take
  well under a millisecond) stay automatic, so short-lived cycles are still
  reclaimed at once;
* a full pass runs only when cyclic garbage can have piled up: after
  ``max(min_closed, live / 2)`` connections closed since the last one (closed
  connections are what leaves reference cycles behind, ~14 objects each), or
  every ``interval`` seconds at most.  Memory held by garbage is therefore
  bounded by that many closed connections.

Invariants: :meth:`GcPacer.install` and :meth:`GcPacer.uninstall` pair up and
restore the previous thresholds; the pacer never raises out of its task; a
full pass still stops the loop for its duration (logged as ``gc_full_pass``
with its duration), but it happens at most once per ``interval`` while
connections are stable instead of several times during every ramp-up.
Thresholds are process-wide, so only the ``sluice ws`` process installs it
(tests that run a server in-process do not).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable

from app.core.logging import get_logger

log = get_logger(__name__)

FULL_PASS_SECONDS = 600.0
"""At most this long between two full passes."""
MIN_CLOSED = 2000
"""Closed connections that justify an early full pass (at least)."""
CHECK_SECONDS = 1.0
NEVER = 1 << 30
"""A generation-2 threshold CPython never reaches (counted in generation-1 passes)."""


class GcPacer:
    """Schedules the full garbage-collector passes of a connection-holding process."""

    def __init__(
        self,
        live: Callable[[], int],
        closed: Callable[[], int],
        *,
        interval: float = FULL_PASS_SECONDS,
        min_closed: int = MIN_CLOSED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._live = live
        self._closed = closed
        self._interval = interval
        self._min_closed = min_closed
        self._clock = clock
        self._saved: tuple[int, int, int] | None = None
        self._last_at = clock()
        self._closed_at_last = 0
        self._task: asyncio.Task[None] | None = None
        self.passes = 0

    def install(self) -> None:
        """Freeze what exists and switch CPython's own full passes off."""
        if self._saved is not None:
            return
        gc.collect()
        gc.freeze()
        t0, t1, t2 = gc.get_threshold()
        self._saved = (t0, t1, t2)
        gc.set_threshold(t0, t1, NEVER)
        self._last_at = self._clock()
        self._closed_at_last = self._closed()
        self._task = asyncio.create_task(self._run(), name="gc-pacer")

    async def uninstall(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            gc.unfreeze()
            self._saved = None

    def due(self) -> bool:
        """Whether enough connections closed, or enough time passed, for a full pass."""
        closed = self._closed() - self._closed_at_last
        if closed >= max(self._min_closed, self._live() // 2):
            return True
        return self._clock() - self._last_at >= self._interval

    def full_pass(self) -> int:
        """Run one full pass now; the number of unreachable objects it found."""
        started = time.perf_counter()
        found = gc.collect()
        self.passes += 1
        self._last_at = self._clock()
        self._closed_at_last = self._closed()
        log.info(
            "gc_full_pass",
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
            unreachable=found,
            connections=self._live(),
        )
        return found

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            if self.due():
                self.full_pass()
