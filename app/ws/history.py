"""A job's recent events, read back from its capped Redis history stream.

:func:`app.jobs.events.publish_event` appends every event to
``stream_key(job_id)`` (the last few hundred are kept).  A resuming subscriber,
a live ``seq`` gap and a pub/sub reconnect all need "the events after seq N";
:class:`HistoryReader` reads them newest first, a page at a time, and stops at
the first event at or before N -- which also proves nothing was trimmed in
between (``reached_back``).
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from redis.asyncio import Redis

from app.jobs.events import decode_event, stream_key
from app.jobs.model import ProgressEvent
from app.ws.feed import merge_by_seq

HISTORY_PAGE = 100

History = tuple[list[ProgressEvent], bool]
"""Events with seq above the floor (ascending, unique), and whether the stream
reaches back to the floor (holds an event at or before it)."""

_Page = list[tuple[bytes, dict[bytes, bytes]]]


class HistoryReader:
    """Reads jobs' history streams, all first pages in one round trip."""

    def __init__(self, redis: Redis, *, page: int = HISTORY_PAGE) -> None:
        self._redis = redis
        self._page = page

    async def after(self, floors: Mapping[str, int]) -> dict[str, History]:
        """Per job, the stream's events with seq > its floor."""
        out: dict[str, History] = {}
        if not floors:
            return out
        jobs = list(floors)
        pipe = self._redis.pipeline(transaction=False)
        for job_id in jobs:
            pipe.xrevrange(stream_key(job_id), "+", "-", count=self._page)
        pages = await pipe.execute()
        for job_id, page in zip(jobs, pages, strict=True):
            out[job_id] = await self._read_back(job_id, floors[job_id], page)
        return out

    async def _read_back(self, job_id: str, floor: int, page: _Page) -> History:
        events: list[ProgressEvent] = []
        while page:
            for _entry_id, fields in page:
                try:
                    event = decode_event(fields[b"e"])
                except (KeyError, msgspec.MsgspecError):
                    continue
                if event.seq <= floor:
                    return merge_by_seq(events), True
                events.append(event)
            if len(page) < self._page:
                break
            page = await self._redis.xrevrange(
                stream_key(job_id), f"({page[-1][0].decode()}", "-", count=self._page
            )
        return merge_by_seq(events), False
