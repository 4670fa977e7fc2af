"""One tus PATCH body, cut into S3 parts as it arrives; incomplete parts kept.

S3 parts must be at least 5 MiB (all but the last) while a tus PATCH may carry
any number of bytes, so :class:`PartWriter` cuts the stream at the upload's
chunk size (the session's ``chunk_size``) as bytes arrive:

* every full part goes to S3 at once (through a :data:`PartSink`) while the next
  one is being received: at most two parts of an upload are in memory, never the
  whole body;
* the bytes after the last full part, when a PATCH ends (or its client goes
  away), are kept in S3 as an *incomplete part*: one small object per PATCH
  (``tus/<upload id>/pending/<start offset>``), listed in the upload's row by
  start offset, so ``Upload-Offset`` counts every byte received and any gateway
  replica can continue.  When a later PATCH fills the part, the segments are
  read back (from :class:`PendingCache` when this process wrote them, the common
  case) and put in front of the new bytes.  One segment per PATCH, instead of
  rewriting one growing object, keeps the extra storage traffic linear: a byte
  that arrives in a small PATCH is written once more and read back at most once.
* a part that a *small* PATCH fills (its own bytes are at most half the part,
  the rest are segments of earlier PATCHes) is not waited for: the PATCH keeps
  its share of the part as one more segment (a small PUT) and answers, and the
  part is stored in the background (:meth:`PartWriter.defer`), a *fold*, while
  the client sends the next PATCH.  Until the fold commits, the upload's row
  still lists the part's segments, so a gateway that dies meanwhile loses
  nothing: the next PATCH, on any replica, folds them itself.

Invariants: a segment never crosses a part boundary (a PATCH's bytes are cut at
part boundaries); its bytes never change once its start is committed (a later
PATCH starts after it); segments are deleted only after the commit that stopped
listing them; nothing here writes Postgres (the caller commits offsets, and
gives :class:`PartWriter` a callback, :data:`OnPart`, run when each part is
stored).
"""

from __future__ import annotations

import asyncio
import io
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from app.uploads.tus_protocol import Checksum
from app.uploads.tus_store import TusStorage, md5_of, segment_key

PartSink = Callable[[int, io.BytesIO, bytes], Awaitable[None]]
"""Stores part ``number`` (the body, positioned at 0, and its MD5)."""


@dataclass
class Part:
    """A full part sent to S3: bytes ``[start, end)`` of the upload, part ``number``.

    ``consumed`` are the segments it was built from (deleted once it is
    committed); ``tail`` is this PATCH's share of it (``(start, bytes)``), kept
    while it could still become a segment (see :meth:`PartWriter.defer`).
    ``deferred`` is set when the PATCH answered without waiting for it; the
    part's commit then waits for the PATCH's own (``patch_committed``).
    """

    number: int
    start: int
    end: int
    consumed: list[tuple[str, int]]
    tail: tuple[int, bytes] | None
    deferred: bool = False
    patch_committed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def range(self) -> tuple[int, int]:
        return self.start, self.end


OnPart = Callable[[Part], Awaitable[None]]
"""Commits a stored part (drops its segments from the row, deletes them)."""


class PendingCache:
    """Incomplete-part segments this process wrote, most recent first kept.

    Bounded by ``max_bytes`` (least recently used dropped first).  Keys are
    ``(segment key, size)``; an entry is added only after its start offset
    was committed, so it always holds the bytes S3 holds under that key.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._size = 0

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        self.drop(key, len(data))
        self._entries[(key, len(data))] = data
        self._size += len(data)
        while self._size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._size -= len(old)

    def get(self, key: str, size: int) -> bytes | None:
        return self._entries.get((key, size))

    def drop(self, key: str, size: int) -> None:
        old = self._entries.pop((key, size), None)
        if old is not None:
            self._size -= len(old)

    @property
    def size(self) -> int:
        return self._size


async def read_segments(
    storage: TusStorage,
    cache: PendingCache,
    upload_id: str,
    starts: Sequence[int],
    end: int,
    *,
    into: io.BytesIO,
) -> list[tuple[str, int]]:
    """Append segments ``starts`` (covering ``[starts[0], end)``) to ``into``; their keys."""
    consumed: list[tuple[str, int]] = []
    ends = [*starts[1:], end]
    for start, stop in zip(starts, ends, strict=True):
        key = segment_key(upload_id, start)
        data = cache.get(key, stop - start)
        if data is None:
            data = await storage.get_range(key, 0, stop - start)
        into.write(data)
        consumed.append((key, stop - start))
    return consumed


class PartWriter:
    """One PATCH body, cut into S3 parts of ``chunk`` bytes as it arrives.

    The upload's committed state is ``offset`` and the incomplete-part segments
    ``pending`` (their start offsets; they cover ``[pending[0], offset)``, all
    within the part in progress).  The part being filled starts at
    :attr:`base` (a multiple of ``chunk``); its first ``offset - base`` bytes
    are the segments, fetched only when the part is full (or the upload ends).
    Every stored part runs ``on_part`` (its commit) as soon as it is stored;
    :attr:`stored` is the range of the parts this PATCH stored and waited for.
    """

    def __init__(
        self,
        *,
        storage: TusStorage,
        cache: PendingCache,
        upload_id: str,
        chunk: int,
        offset: int,
        pending: Sequence[int],
        sink: PartSink,
        on_part: OnPart,
        checksum: Checksum | None,
    ) -> None:
        self.storage, self.cache, self.upload_id = storage, cache, upload_id
        self.chunk, self.sink, self.on_part = chunk, sink, on_part
        self.pending = sorted(pending)
        self.pending_end = offset
        self.base = self.pending[0] if self.pending else offset
        if self.base % chunk and self.pending:
            raise ValueError(f"incomplete part starts at {self.base}, not a part boundary")
        if self.pending and self.pending[-1] >= offset:
            raise ValueError("an incomplete part's segment starts at or after the offset")
        self.next_part = self.base // chunk + 1
        self.hasher = checksum.hasher() if checksum is not None else None
        self.stored = (self.base, self.base)
        """``[start, end)`` of the parts stored (and waited for) by this PATCH."""
        self.new_segments: list[tuple[int, bytes]] = []
        """Segments written by this PATCH (start, bytes), not yet committed."""
        self.uncommitted: list[tuple[str, int]] = []
        """Segments of stored parts whose commit is the PATCH's (with a checksum)."""
        self._buf = io.BytesIO()
        """This PATCH's bytes of the part in progress (its segments come before them)."""
        self._fill = 0
        self._in_flight: tuple[asyncio.Task[None], Part] | None = None

    @property
    def _pending_size(self) -> int:
        return self.pending_end - self.base if self.pending else 0

    @property
    def end(self) -> int:
        """The offset of the last byte received so far, plus one."""
        return self.base + self._pending_size + self._fill

    def digest(self) -> bytes | None:
        return self.hasher.digest() if self.hasher is not None else None

    async def write(self, piece: bytes) -> None:
        if self.hasher is not None:
            self.hasher.update(piece)
        view = memoryview(piece)
        while view:
            room = self.chunk - self._pending_size - self._fill
            self._buf.write(view[:room])
            taken = min(room, len(view))
            self._fill += taken
            view = view[taken:]
            if self._pending_size + self._fill == self.chunk:
                await self._emit()

    async def _emit(self) -> None:
        body, part = await self._take_part()
        await self.wait()
        self._in_flight = (asyncio.create_task(self._store(part, body)), part)

    async def _take_part(self) -> tuple[io.BytesIO, Part]:
        """The part in progress (segments put in front), and a fresh buffer for the next."""
        new, start, size = self._buf, self.base, self._pending_size + self._fill
        own_start = start + self._pending_size
        tail = None
        if self.pending and self._fill <= self.chunk // 2:  # a small PATCH filled it
            tail = (own_start, new.getvalue())
        if self.pending:
            body = io.BytesIO()
            consumed = await read_segments(
                self.storage, self.cache, self.upload_id, self.pending, own_start, into=body
            )
            with new, new.getbuffer() as view:
                body.write(view)
        else:
            body, consumed = new, []
        body.seek(0)
        part = Part(self.next_part, start, start + size, consumed, tail)
        self.next_part += 1
        self.base += size
        self.pending, self._fill = [], 0
        self._buf = io.BytesIO()
        return body, part

    async def _store(self, part: Part, body: io.BytesIO) -> None:
        with body:
            await self.sink(part.number, body, await md5_of(body))
        await self.on_part(part)

    async def wait(self) -> None:
        """Wait for the part being stored (its failure is raised here)."""
        flight, self._in_flight = self._in_flight, None
        if flight is not None:
            task, part = flight
            await task
            self.stored = (self.stored[0], part.end)

    def deferrable(self) -> bool:
        """Whether the part in flight was filled by a small share of this PATCH."""
        return (
            self._in_flight is not None
            and not self._in_flight[0].done()
            and self._in_flight[1].tail is not None
        )

    def defer(self) -> tuple[asyncio.Task[None], Part]:
        """Stop waiting for the part in flight: its share of this PATCH becomes a segment
        (written by :meth:`keep_rest`), the part a fold that commits after the PATCH."""
        assert self._in_flight is not None
        task, part = self._in_flight
        assert part.tail is not None
        self._in_flight = None
        part.deferred = True
        self.new_segments.append(part.tail)
        part.consumed.append((segment_key(self.upload_id, part.tail[0]), len(part.tail[1])))
        return task, part

    async def finish_last(self) -> None:
        """Store what is left as the upload's last part (the body reached its length)."""
        await self.wait()
        if self._pending_size + self._fill:
            body, part = await self._take_part()
            with body:
                await self.sink(part.number, body, await md5_of(body))
            self.stored = (self.stored[0], part.end)

    async def keep_rest(self) -> list[int]:
        """Write this PATCH's new segments to S3: the bytes after the last full part,
        and a deferred part's share (see :meth:`defer`); their starts, in order."""
        await self.wait()
        if self._fill:
            start = self.base + self._pending_size
            self.new_segments.append((start, self._buf.getvalue()))
            self.pending.append(start)
            self.pending_end = start + self._fill
            self._buf, self._fill = io.BytesIO(), 0
        await asyncio.gather(
            *[
                self.storage.put_object(segment_key(self.upload_id, start), data)
                for start, data in self.new_segments
            ]
        )
        return [start for start, _ in self.new_segments]

    def committed(self) -> None:
        """The caller committed :attr:`end` and the new segments: cache them."""
        for start, data in self.new_segments:
            self.cache.put(segment_key(self.upload_id, start), data)
        self.new_segments = []
