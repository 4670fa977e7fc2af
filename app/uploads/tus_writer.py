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

Invariants: a segment's bytes never change once its start is committed (a later
PATCH starts after it); segments are deleted only after the commit that stopped
listing them; nothing here writes Postgres (the caller commits offsets, and may
give :class:`PartWriter` a callback to commit each stored part at once).
"""

from __future__ import annotations

import asyncio
import io
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from app.uploads.tus_protocol import Checksum
from app.uploads.tus_store import TusStorage, md5_of, segment_key

PartSink = Callable[[int, io.BytesIO, bytes], Awaitable[None]]
"""Stores part ``number`` (the body, positioned at 0, and its MD5)."""
OnPart = Callable[[int], Awaitable[bool]]
"""Commits a new offset once a part is stored (per-part progress); whether it did."""


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


class PartWriter:
    """One PATCH body, cut into S3 parts of ``chunk`` bytes as it arrives.

    The upload's committed state is ``offset`` and the incomplete-part segments
    ``pending`` (their start offsets; they cover ``[pending[0], offset)``).  The
    part being filled starts at :attr:`base` (a multiple of ``chunk``); its
    first ``offset - base`` bytes are the segments, fetched only when the part
    is full (or the upload ends).  With ``on_part`` (no checksum to verify
    first), each stored part commits its offset at once, so a gateway killed
    mid-PATCH loses at most the part in progress.
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
        on_part: OnPart | None,
        checksum: Checksum | None,
    ) -> None:
        self.storage, self.cache, self.upload_id = storage, cache, upload_id
        self.chunk, self.sink, self.on_part = chunk, sink, on_part
        self.pending = list(pending)
        self.pending_end = offset
        self.base = self.pending[0] if self.pending else offset
        if self.base % chunk:
            raise ValueError(f"incomplete part starts at {self.base}, not a part boundary")
        self.next_part = self.base // chunk + 1
        self.hasher = checksum.hasher() if checksum is not None else None
        self.consumed: list[tuple[str, int]] = []
        """Segments folded into stored parts; deleted once a commit stops listing them."""
        self.new_segment: tuple[str, bytes] | None = None
        self.saved: tuple[int, list[int]] = (offset, list(pending))
        """The offset and segments last committed (by the caller, or ``on_part``)."""
        self._buf = io.BytesIO()
        """This PATCH's bytes of the part in progress (its segments come before them)."""
        self._fill = 0
        self._in_flight: asyncio.Task[None] | None = None

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
        body, number = await self._take_part()
        await self.wait()
        self._in_flight = asyncio.create_task(self._store(number, body, self.base))

    async def _take_part(self) -> tuple[io.BytesIO, int]:
        """The part in progress (segments put in front), and a fresh buffer for the next."""
        body = await self._with_pending(self._buf)
        body.seek(0)
        number = self.next_part
        self.next_part += 1
        self.base += self._pending_size + self._fill
        self.pending, self._fill = [], 0
        self._buf = io.BytesIO()
        return body, number

    async def _with_pending(self, new: io.BytesIO) -> io.BytesIO:
        """``new`` with the segments' bytes in front (``new`` itself when there are none)."""
        if not self.pending:
            return new
        part = io.BytesIO()
        ends = [*self.pending[1:], self.pending_end]
        for start, end in zip(self.pending, ends, strict=True):
            key = segment_key(self.upload_id, start)
            data = self.cache.get(key, end - start)
            if data is None:
                data = await self.storage.get_range(key, 0, end - start)
            part.write(data)
            self.consumed.append((key, end - start))
        with new, new.getbuffer() as view:
            part.write(view)
        return part

    async def _store(self, number: int, body: io.BytesIO, offset: int) -> None:
        with body:
            await self.sink(number, body, await md5_of(body))
        if self.on_part is not None and await self.on_part(offset):
            self.saved = (offset, [])
            await self.discard_consumed()

    async def wait(self) -> None:
        """Wait for the part being stored (its failure is raised here)."""
        task, self._in_flight = self._in_flight, None
        if task is not None:
            await task

    async def finish_last(self) -> None:
        """Store what is left as the upload's last part (the body reached its length)."""
        await self.wait()
        if self._pending_size + self._fill:
            body, number = await self._take_part()
            with body:
                await self.sink(number, body, await md5_of(body))

    async def keep_rest(self) -> list[int]:
        """Store the bytes after the last full part as a new segment; the pending list."""
        await self.wait()
        if self._fill:
            start = self.base + self._pending_size
            data = self._buf.getvalue()  # shares the buffer, no copy
            key = segment_key(self.upload_id, start)
            await self.storage.put_object(key, data)
            self.new_segment = (key, data)
            self.pending.append(start)
            self.pending_end = start + len(data)
            self._buf, self._fill = io.BytesIO(), 0
        return list(self.pending)

    def committed(self) -> None:
        """The caller committed :attr:`end` and :attr:`pending`: remember the new segment."""
        self.saved = (self.end, list(self.pending))
        if self.new_segment is not None:
            self.cache.put(*self.new_segment)
            self.new_segment = None

    async def discard_consumed(self) -> None:
        """Delete the segments folded into stored parts (after their commit)."""
        consumed, self.consumed = self.consumed, []
        for key, size in consumed:
            self.cache.drop(key, size)
        await self.storage.delete_keys([key for key, _ in consumed])
