"""Job snapshots read from the ``jobs`` table, the source of truth.

A snapshot is the job's current state as a :class:`~app.jobs.model.ProgressEvent`
(the columns and row mapping belong to :mod:`app.jobs.transitions`).  It is
what a new subscriber is sent first, the ownership check of a subscription,
and the fallback when a resume cannot replay the missed events.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable

import asyncpg

from app.jobs.model import ProgressEvent
from app.jobs.transitions import job_snapshots


class SnapshotLoader:
    """Reads job snapshots, coalescing concurrent requests into few queries.

    When thousands of clients (re)subscribe at once -- after a deploy, say --
    each would cost a round trip; instead requests that arrive while
    ``max_inflight`` queries are running wait and go out together in the next
    one.  A request only ever joins a query that has not started yet, so a
    snapshot is always read after the caller's pub/sub subscription.
    """

    def __init__(self, db: asyncpg.Pool, *, max_inflight: int = 2, max_batch: int = 2000) -> None:
        self._db = db
        self._max_inflight = max_inflight
        self._max_batch = max_batch
        self._pending: dict[str, asyncio.Future[ProgressEvent | None]] = {}
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.queries = 0

    async def load(self, job_ids: Iterable[str]) -> dict[str, ProgressEvent]:
        """Current snapshots of the existing ``job_ids`` (any owner)."""
        loop = asyncio.get_running_loop()
        wanted: dict[str, asyncio.Future[ProgressEvent | None]] = {}
        for job_id in job_ids:
            fut = self._pending.get(job_id)
            if fut is None:
                fut = self._pending[job_id] = loop.create_future()
            wanted[job_id] = fut
        self._kick()
        if not wanted:
            return {}
        await asyncio.wait(wanted.values())
        out: dict[str, ProgressEvent] = {}
        for job_id, fut in wanted.items():
            snapshot = fut.result()
            if snapshot is not None:
                out[job_id] = snapshot
        return out

    def _kick(self) -> None:
        while self._pending and self._inflight < self._max_inflight:
            ids = list(self._pending)[: self._max_batch]
            batch = {job_id: self._pending.pop(job_id) for job_id in ids}
            self._inflight += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: dict[str, asyncio.Future[ProgressEvent | None]]) -> None:
        self.queries += 1
        try:
            found = await job_snapshots(self._db, list(batch))
        except Exception as exc:
            for fut in batch.values():
                if not fut.done():
                    fut.set_exception(exc)
        except BaseException:
            for fut in batch.values():
                fut.cancel()
            raise
        else:
            for job_id, fut in batch.items():
                if not fut.done():
                    fut.set_result(found.get(job_id))
        finally:
            self._inflight -= 1
            self._kick()

    async def owned(self, job_ids: Iterable[str], owner_id: str | None) -> dict[str, ProgressEvent]:
        """The owner's jobs among ``job_ids``; foreign and unknown ones are left out alike.
        ``owner_id=None`` (an admin) reads any job."""
        found = await self.load(job_ids)
        if owner_id is None:
            return found
        return {j: e for j, e in found.items() if e.owner_id == owner_id}

    async def one(self, job_id: str, owner_id: str | None) -> ProgressEvent | None:
        """The owner's job state, or None for malformed, unknown and foreign ids alike."""
        if not valid_job_id(job_id):
            return None
        return (await self.owned([job_id], owner_id)).get(job_id)


def valid_job_id(value: str) -> bool:
    """Whether ``value`` can name a job at all (a UUID); others are unknown without a query."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
