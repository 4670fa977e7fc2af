"""Retry promotion: a retried job waits out its backoff, then ranks as its priority says.

ARQ re-scores a retried job as ``now + defer``.  A priority is an offset of
the score into the past (``app/core/queue.py``), so a ``defer`` that kept the
offset would put the job in the past: it would start at once, its backoff
ignored.  Instead a retry is scored at its *ready time* (``defer`` = the
backoff; no worker starts it earlier) and recorded here:

* :func:`promote_key` -- sorted set, job id -> ready time (unix ms);
* :func:`rank_key` -- hash, job id -> the score the job takes once ready
  (``ready - OFFSET[priority]``, as if enqueued at its ready time).

Each poll of a Sluice worker that finds a ready job first *promotes* the due
ones (:data:`CLAIM_SCRIPT`, one atomic Lua script that also claims the ready
jobs; :data:`POLL_SCRIPT` reads the head instead):
the job's score is lowered to its rank, so a due retried critical job starts
before older waiting low jobs.  Invariants:

* **Promotion only moves a waiting job earlier.**  A job ARQ no longer holds
  (finished, aborted) just loses its record.  A job marked in progress is not
  touched: if its score is still below the record's ready time its retry is
  being written (ARQ's re-score lands with the in-progress key's deletion) and
  the record waits for the next poll; otherwise the job started without
  promotion and the record is dropped.
* **The backoff never depends on promotion.**  A lost record (Redis away when
  the retry was recorded, a plain ARQ worker) costs the job its rank after the
  backoff, never the wait.
* **An idle worker pays nothing**: the script runs only when the poll's plain
  read saw a ready job (a due retry is one), so an empty queue costs one
  command per poll, as before.
"""

from __future__ import annotations

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

PROMOTE_BATCH = 100
"""Most due retries one poll promotes (the rest at the next poll)."""


def promote_key(queue_name: str) -> str:
    """Sorted set of ``queue_name``'s retried jobs awaiting promotion, by ready time."""
    return f"{queue_name}:promote"


def rank_key(queue_name: str) -> str:
    """Hash: retried job id -> the score it takes once ready."""
    return f"{queue_name}:promote:rank"


_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[5])
for i = 1, #due, 2 do
  local id, ready = due[i], tonumber(due[i + 1])
  local settled = true
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score then
    score = tonumber(score)
    if redis.call('EXISTS', ARGV[2] .. id) == 1 then
      settled = score >= ready
    else
      local rank = redis.call('HGET', KEYS[3], id)
      if rank and tonumber(rank) < score then
        redis.call('ZADD', KEYS[1], 'XX', rank, id)
      end
    end
  end
  if settled then
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
  end
end
"""
"""Promotes up to ARGV[5] due retries (KEYS: queue, promote set, rank hash;
ARGV[1]: now (ms), ARGV[2]: in-progress key prefix)."""

POLL_SCRIPT = (
    _PROMOTE
    + """
if tonumber(ARGV[4]) == 0 then
  return {}
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '+inf', 'WITHSCORES', 'LIMIT', ARGV[3], ARGV[4])
"""
)
"""KEYS: queue, promote set, rank hash; ARGV: now (ms), in-progress key prefix,
read offset, read limit (0: promote only), promote batch.  Returns the queue's
head after promotion as ``[id, score, id, score, ...]``."""

CLAIM_SCRIPT = (
    _PROMOTE
    + """
local claimed = {}
local free = tonumber(ARGV[6])
if free > 0 then
  local head = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES',
                          'LIMIT', ARGV[3], ARGV[4])
  for i = 1, #head, 2 do
    local key = ARGV[2] .. head[i]
    if redis.call('EXISTS', key) == 0 then
      redis.call('PSETEX', key, ARGV[7], '1')
      claimed[#claimed + 1] = head[i]
      claimed[#claimed + 1] = head[i + 1]
      if #claimed >= 2 * free then break end
    end
  end
end
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES',
                         'LIMIT', 0, 1)
return {claimed, later}
"""
)
"""KEYS: queue, promote set, rank hash; ARGV: now (ms), in-progress key prefix,
read offset, read limit, promote batch, free job slots, in-progress key TTL (ms).
Promotes the due retries, then marks in progress (ARQ's in-progress key, as
ARQ's ``start_jobs`` does) up to ``free`` ready jobs of the head read that no
worker holds.  Returns ``{[id, score, ...] claimed, [id, score] of the earliest
job not ready yet, or empty}``."""


class QueuePoller:
    """Reads the head of one queue for a worker, promoting due retries first."""

    def __init__(self, redis: ArqRedis, queue_name: str) -> None:
        self._redis = redis
        self._queue = queue_name
        self._keys = [queue_name, promote_key(queue_name), rank_key(queue_name)]
        self._script = redis.register_script(POLL_SCRIPT)
        self._claim = redis.register_script(CLAIM_SCRIPT)

    async def read(self, now_ms: int, *, offset: int, limit: int) -> list[tuple[bytes, float]]:
        """Up to ``limit`` entries (id, score) from ``offset``, lowest score first.

        One command when no entry is ready (an idle worker); when one is, due
        retries are promoted and the head read again, in one script.
        """
        entries: list[tuple[bytes, float]] = await self._redis.zrangebyscore(
            self._queue, min="-inf", max="+inf", start=offset, num=limit, withscores=True
        )
        if not entries or entries[0][1] > now_ms:
            return entries
        return await self._run(now_ms, offset=offset, limit=limit)

    async def peek(self, *, offset: int, limit: int) -> list[tuple[bytes, float]]:
        """Up to ``limit`` entries (id, score) from ``offset``, lowest score first:
        one plain command, nothing promoted (what an idle worker's poll costs)."""
        entries: list[tuple[bytes, float]] = await self._redis.zrangebyscore(
            self._queue, min="-inf", max="+inf", start=offset, num=limit, withscores=True
        )
        return entries

    async def promote(self, now_ms: int) -> None:
        """Promote the due retries only (for ARQ's own poll, which reads itself)."""
        await self._run(now_ms, offset=0, limit=0)

    async def _run(self, now_ms: int, *, offset: int, limit: int) -> list[tuple[bytes, float]]:
        flat = await self._script(
            keys=self._keys,
            args=[now_ms, in_progress_key_prefix, offset, limit, PROMOTE_BATCH],
        )
        return [(flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def claim(
        self, now_ms: int, *, offset: int, limit: int, free: int, hold_ms: int
    ) -> tuple[list[tuple[str, int]], int | None]:
        """Promote the due retries and claim up to ``free`` ready jobs, in one command.

        A claimed job is marked in progress for ``hold_ms`` (ARQ's in-progress
        key, which ARQ's ``run_job`` and ``finish_job`` then own), atomically
        with reading it, so no other worker starts it.  Returns the claimed
        (job id, score) pairs, lowest score first, and the earliest score of a
        job not ready yet (None if there is none).
        """
        claimed, later = await self._claim(
            keys=self._keys,
            args=[now_ms, in_progress_key_prefix, offset, limit, PROMOTE_BATCH, free, hold_ms],
        )
        jobs = [
            (claimed[i].decode(), int(float(claimed[i + 1]))) for i in range(0, len(claimed), 2)
        ]
        return jobs, int(float(later[1])) if later else None
