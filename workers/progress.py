"""How far a running job has got: each stage's share of the whole, and the
reporter a stage reports through.

A job's ``overall_progress`` moves through the stages in order, each stage
owning a slice of it (:data:`STAGE_WEIGHTS`); a stage reports its own fraction
done and :class:`StageProgress` maps it into its slice, recording at most one
update per ``progress_interval_seconds`` (and always the stage's end).
"""

from __future__ import annotations

import time

from app.jobs.model import Stage
from workers.attempt import Attempt

STAGE_WEIGHTS: dict[Stage, tuple[float, float]] = {
    Stage.VALIDATE: (0.0, 0.05),
    Stage.EXTRACT: (0.05, 0.20),
    Stage.CHUNK: (0.25, 0.05),
    Stage.EMBED: (0.30, 0.60),
    Stage.INDEX: (0.90, 0.10),
}
"""(start, share) of ``overall_progress`` per stage; the shares sum to 1."""


def stage_start(stage: Stage) -> float:
    """``overall_progress`` when ``stage`` starts."""
    return STAGE_WEIGHTS[stage][0]


def stage_end(stage: Stage) -> float:
    """``overall_progress`` once ``stage`` is done."""
    return sum(STAGE_WEIGHTS[stage])


class StageProgress:
    """A stage's :class:`~workers.stages.common.StageReporter` for one attempt.

    ``progress`` records at most every ``progress_interval_seconds`` (a stage's
    end always); ``boundary`` is :meth:`Attempt.check` at a page or batch
    boundary (throttled there)."""

    def __init__(self, attempt: Attempt, stage: Stage) -> None:
        self._attempt = attempt
        self._stage = stage
        self._base, self._weight = STAGE_WEIGHTS[stage]
        self._last = 0.0

    async def progress(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last < self._attempt.ctx.progress_interval_seconds:
            return
        self._last = now
        await self._attempt.record(
            stage=self._stage,
            stage_progress=fraction,
            overall_progress=self._base + self._weight * fraction,
            message=message,
        )

    async def boundary(self) -> None:
        await self._attempt.check(force=False)
