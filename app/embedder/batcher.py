"""The micro-batcher: concurrent requests coalesced into one ``encode`` call.

Invariants:

* one model call at a time: a single consumer task takes work from the queue
  and awaits the encode before it takes more;
* a batch starts with the oldest waiting request and takes whole requests
  after it while the total stays within ``max_batch_size`` texts, waiting at
  most ``max_wait_ms`` for them (a request larger than the batch size is
  encoded alone, in one call);
* at most ``max_queue`` texts wait; :meth:`MicroBatcher.embed` refuses more
  with :class:`Overloaded` at once instead of queueing without bound;
* a request whose caller went away (cancelled) is dropped before encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from app.core.embedding import Vectors
from app.core.logging import get_logger
from app.embedder.metrics import EmbedderMetrics

log = get_logger("sluice.embedder")
Encode = Callable[[list[str]], Awaitable[Vectors]]


class Overloaded(Exception):
    """More texts are waiting than ``max_queue`` allows."""


@dataclass(slots=True)
class _Request:
    texts: list[str]
    future: asyncio.Future[Vectors]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Queue of embedding requests and the one task that encodes them in batches."""

    def __init__(
        self,
        encode: Encode,
        metrics: EmbedderMetrics,
        *,
        max_batch_size: int,
        max_wait_ms: int,
        max_queue: int,
    ) -> None:
        self._encode = encode
        self._metrics = metrics
        self._max_batch = max_batch_size
        self._max_wait = max_wait_ms / 1000
        self._max_queue = max_queue
        self._pending: deque[_Request] = deque()
        self._waiting_texts = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedder-batcher")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for req in self._pending:
            req.future.cancel()
        self._pending.clear()

    async def embed(self, texts: list[str]) -> Vectors:
        """Vectors for ``texts`` (one row each), encoded with whatever else is waiting."""
        if self._waiting_texts + len(texts) > self._max_queue:
            raise Overloaded
        req = _Request(texts, asyncio.get_running_loop().create_future())
        self._pending.append(req)
        self._waiting_texts += len(texts)
        self._metrics.queue_depth.set(self._waiting_texts)
        self._wakeup.set()
        return await req.future

    def _take_batch(self) -> list[_Request]:
        batch: list[_Request] = []
        size = 0
        while self._pending:
            nxt = self._pending[0]
            if batch and size + len(nxt.texts) > self._max_batch:
                break
            self._pending.popleft()
            self._waiting_texts -= len(nxt.texts)
            if nxt.future.done():  # the caller went away
                continue
            batch.append(nxt)
            size += len(nxt.texts)
        self._metrics.queue_depth.set(self._waiting_texts)
        return batch

    def _queued_texts(self) -> int:
        return self._waiting_texts

    async def _gather(self) -> list[_Request]:
        """Wait for a first request, then up to ``max_wait`` for the batch to fill."""
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._pending[0].enqueued + self._max_wait
        while self._queued_texts() < self._max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), left)
        return self._take_batch()

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            if batch:
                await self._encode_batch(batch)

    async def _encode_batch(self, batch: list[_Request]) -> None:
        texts = [t for req in batch for t in req.texts]
        started = time.perf_counter()
        try:
            vectors = await self._encode(texts)
        except Exception as exc:  # the model failed: every caller of this batch hears it
            log.error("encode_failed", error=type(exc).__name__, texts=len(texts))
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(exc)
            return
        self._metrics.observe_batch(len(batch), len(texts), time.perf_counter() - started)
        offset = 0
        for req in batch:
            rows = np.asarray(vectors[offset : offset + len(req.texts)])
            offset += len(req.texts)
            if not req.future.done():
                req.future.set_result(rows)
