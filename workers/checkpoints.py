"""Stage outputs kept between attempts, in ``job_checkpoints``.

A retry, or an attempt resumed after an outage, skips what an earlier one
stored: :func:`checkpointed` loads a stage's whole output or produces and saves
it (validate + extract + chunk: the chunk plan with the extraction's
warnings), and :func:`load_batches`/:func:`save_batch` keep a stage's output
part by part as it goes (embed: one part per batch of vectors).

Every save is fenced by the lease: a worker that lost its lease writes nothing.
The checkpoints of a job are dropped when it ends (``workers/endings.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import numpy as np

from app.core.embedding import Vectors
from app.jobs.model import Stage
from workers.attempt import Attempt
from workers.progress import stage_end

T = TypeVar("T")


async def save(attempt: Attempt, stage: Stage, part: int, data: bytes) -> None:
    """Store part ``part`` of ``stage``'s output (while this attempt holds the lease)."""
    await attempt.ctx.db.execute(
        """
        INSERT INTO job_checkpoints (job_id, stage, part, data)
        SELECT $1::uuid, $2, $3, $4 FROM jobs
        WHERE id = $1::uuid AND lease_owner = $5
        ON CONFLICT (job_id, stage, part) DO UPDATE SET data = EXCLUDED.data
        """,
        attempt.job_id,
        str(stage),
        part,
        data,
        attempt.token,
    )


async def load(attempt: Attempt, stage: Stage) -> dict[int, bytes]:
    """The stored parts of ``stage``'s output, by part number."""
    rows = await attempt.ctx.db.fetch(
        "SELECT part, data FROM job_checkpoints WHERE job_id = $1::uuid AND stage = $2",
        attempt.job_id,
        str(stage),
    )
    return {r["part"]: r["data"] for r in rows}


async def checkpointed(
    attempt: Attempt,
    stage: Stage,
    kind: type[T],
    produce: Callable[[], Awaitable[T | None]],
    *,
    resumed: str,
) -> T | None:
    """``stage``'s output: the one an earlier attempt stored (the job's progress
    then moves to the stage's end, ``resumed`` as its message), else what
    ``produce()`` returns, stored for the next attempt.

    ``produce`` returns None when the job ended without this output (nothing is
    stored then).  A stored output of an older format is produced again.
    """
    stored = (await load(attempt, stage)).get(0)
    if stored is not None:
        try:
            value: T = msgspec.msgpack.decode(stored, type=kind)
        except msgspec.DecodeError:
            pass
        else:
            await attempt.record(
                stage=stage, stage_progress=1.0, overall_progress=stage_end(stage), message=resumed
            )
            return value
    produced = await produce()
    if produced is not None:
        await save(attempt, stage, 0, msgspec.msgpack.encode(produced))
    return produced


async def load_batches(attempt: Attempt, stage: Stage, dim: int) -> dict[int, Vectors]:
    """The batches of ``dim``-wide float32 vectors ``stage`` stored, by batch index."""
    return {
        part: np.frombuffer(data, dtype=np.float32).reshape(-1, dim)
        for part, data in (await load(attempt, stage)).items()
    }


async def save_batch(attempt: Attempt, stage: Stage, index: int, vectors: Vectors) -> None:
    """Store batch ``index`` of ``stage``'s vectors (as float32)."""
    await save(attempt, stage, index, np.ascontiguousarray(vectors, np.float32).tobytes())
