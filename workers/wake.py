"""Wake-ups: an idle worker blocks on the queue's wake list instead of polling.

:meth:`~app.core.queue.JobQueue.enqueue` pushes one token per job onto the
queue's wake list (:func:`~app.core.queue.wake_key`) in the command that puts
the job in ARQ's sorted set.  Each worker runs one :class:`WakeListener`: a ``BLPOP`` on that
list over a connection of its own (a blocking call must not hold one of the
pool's connections), which nudges the worker's poll loop
(``workers/runtime.py``, :class:`~workers.runtime.SluiceWorker`) when a token
arrives.

Invariants:

* **Wake-ups are hints.**  The poll loop also polls every fallback interval
  (``WORKER_POLL_INTERVAL_MS``), so a job whose token was lost still starts
  within it; a token never carries a job.
* **A token goes to a worker that can take a job.**  The listener blocks only
  while its worker is *armed* (waiting, with a free job slot) and has no
  unprocessed token; a token that arrives after the worker filled up is pushed
  back for another worker.  Redis hands each token to one blocked client, so a
  burst of N jobs wakes up to N idle workers rather than one.
* **Never fatal.**  A Redis error in the listener is logged and retried after a
  backoff; meanwhile the fallback poll keeps the worker going.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import redis.asyncio
import redis.exceptions

from app.core.logging import get_logger
from app.core.queue import WAKE_TOKEN, wake_key

log = get_logger("sluice.worker")

BLOCK_SECONDS = 30
"""Longest single ``BLPOP``: an idle worker's listener costs Redis one command
per this many seconds, and a silently dead connection is noticed within it."""
RETRY_SECONDS = (0.1, 5.0)
"""First and largest wait before the listener retries after a Redis error."""


class WakeListener:
    """Turns tokens on the queue's wake list into nudges of one worker's poll loop.

    ``armed`` is set by the poll loop while it waits with a free job slot;
    ``nudge`` is the event the poll loop waits on (also set when a job ends).
    ``has_room`` says whether the worker could start a job now.
    """

    def __init__(
        self,
        redis_url: str,
        queue_name: str,
        *,
        armed: asyncio.Event,
        nudge: asyncio.Event,
        has_room: Callable[[], bool],
    ) -> None:
        self._url = redis_url
        self._key = wake_key(queue_name)
        self._armed = armed
        self._nudge = nudge
        self._has_room = has_room
        self.tokens = 0
        """Tokens taken so far (for tests and metrics)."""

    def _connect(self) -> redis.asyncio.Redis:
        client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            self._url, socket_connect_timeout=5, socket_keepalive=True
        )
        return client

    async def run(self) -> None:
        """Listen until cancelled; never raises for Redis."""
        client = self._connect()
        delay = RETRY_SECONDS[0]
        try:
            while True:
                await self._armed.wait()
                try:
                    got = await asyncio.wait_for(self._pop(client), BLOCK_SECONDS + 5)
                    if got is not None:
                        await self._deliver(client)
                    delay = RETRY_SECONDS[0]
                except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
                    log.info("wake_listener_retry", error=type(exc).__name__)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_SECONDS[1])
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _pop(self, client: redis.asyncio.Redis) -> object:
        return await client.blpop([self._key], timeout=BLOCK_SECONDS)  # type: ignore[misc]

    async def _deliver(self, client: redis.asyncio.Redis) -> None:
        """A token arrived: nudge the worker, or pass the token on if it is full."""
        if self._has_room():
            self.tokens += 1
            self._armed.clear()  # one token at a time: the rest wake other workers
            self._nudge.set()
        else:
            await client.lpush(self._key, WAKE_TOKEN)  # type: ignore[misc]
