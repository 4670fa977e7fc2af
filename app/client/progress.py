"""The bar ``sluice upload`` shows while parts are sent (``rich``'s progress display).

One line on stderr: bar, percent, MB sent of the file's total, MB/s of this
run (bytes sent since the bar appeared over the time since: resumed bytes do
not count as speed) and the ETA at that rate.  On a terminal it redraws in
place, at most :data:`REFRESH_PER_SECOND` times a second, from rich's refresh
thread.  Anywhere else -- a pipe, a CI log -- it writes nothing while running
and its final state once, as one plain line without the bar: no colours, no
``\\r``, no cursor movement.  ``rich`` won over ``tqdm`` on that last point
(tqdm rewrites its line with ``\\r`` in logs); ``bench/client_progress.py``
has the measurements.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

REFRESH_PER_SECOND = 10


def _rate(task: Task) -> float:
    """Bytes a second sent since the bar started (not counting what a resume skipped)."""
    elapsed = max(task.elapsed or 0.0, 1e-6)
    first: int = task.fields["first"]
    return (task.completed - first) / elapsed


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{_rate(task) / 1e6:6.1f} MB/s", style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        rate = _rate(task)
        if rate <= 0:
            return Text("ETA --:--", style="progress.remaining")
        eta = int((task.remaining or 0) / rate)
        return Text(f"ETA {eta // 60:02d}:{eta % 60:02d}", style="progress.remaining")


class UploadProgress:
    """``total`` bytes to send, ``done`` of them already there (a resumed upload).

    A context manager; :meth:`close` (idempotent) draws the final state.
    ``clock`` is for tests.
    """

    def __init__(
        self,
        total: int,
        *,
        done: int = 0,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        console = Console(file=stream if stream is not None else sys.stderr, highlight=False)
        columns: list[ProgressColumn] = [BarColumn(bar_width=30)] if console.is_terminal else []
        columns += [TextColumn("{task.percentage:5.1f}%"), DownloadColumn()]
        columns += [_RateColumn(), _EtaColumn()]
        self._progress = Progress(
            *columns, console=console, get_time=clock, refresh_per_second=REFRESH_PER_SECOND
        )
        self._task = self._progress.add_task(
            "upload", total=max(total, 1), completed=done, first=done
        )
        self._closed = False
        self._progress.start()

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._progress.stop()

    def __enter__(self) -> UploadProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
