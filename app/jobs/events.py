"""Progress events on Redis: the channel and stream names, encoding, publishing.

Every state change of a job is written to the ``jobs`` table first (which
assigns the next per-job ``seq``) and then published to Redis by
:func:`publish_event`:

* ``XADD sluice:job:{id}:events`` -- a capped per-job history (last
  :data:`STREAM_MAXLEN` events) that WebSocket servers replay to resuming
  clients; entries hold the encoded event under the field ``e``;
* ``PUBLISH sluice:job:{id}`` -- live fan-out to every WebSocket server;
* ``PUBLISH sluice:user:{owner}`` -- terminal events only, for ``/notifications``.

The table is the source of truth: Redis pub/sub is at-most-once, so a reader
that must not miss anything subscribes first, then reads the stream (or the
table snapshot) and merges by ``seq``.

This module owns every Redis name of a job's events: readers that route
messages by channel (the WebSocket hub) use :data:`JOB_CHANNEL_PREFIX` and
:data:`USER_CHANNEL_PREFIX` rather than spelling them again.
"""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis

from app.jobs.model import ProgressEvent

STREAM_MAXLEN = 1000
STREAM_TTL_SECONDS = 7 * 24 * 3600

JOB_CHANNEL_PREFIX = "sluice:job:"
"""Every per-job channel (and stream key) starts with this: ``sluice:job:{id}``."""
USER_CHANNEL_PREFIX = "sluice:user:"
"""Every per-user channel is ``sluice:user:{owner_id}``."""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(ProgressEvent).decode


def encode_event(event: ProgressEvent) -> bytes:
    return _encode(event)


def decode_event(data: bytes | str) -> ProgressEvent:
    return _decode(data)


def stream_key(job_id: str) -> str:
    return f"{JOB_CHANNEL_PREFIX}{job_id}:events"


def job_channel(job_id: str) -> str:
    return f"{JOB_CHANNEL_PREFIX}{job_id}"


def user_channel(owner_id: str) -> str:
    return f"{USER_CHANNEL_PREFIX}{owner_id}"


async def publish_event(redis: Redis, event: ProgressEvent) -> None:
    """Append ``event`` to its job's capped stream and fan it out (one round trip)."""
    payload = _encode(event)
    key = stream_key(event.job_id)
    pipe = redis.pipeline(transaction=True)
    pipe.xadd(key, {"e": payload}, maxlen=STREAM_MAXLEN, approximate=True)
    pipe.expire(key, STREAM_TTL_SECONDS)
    pipe.publish(job_channel(event.job_id), payload)
    if event.terminal and event.owner_id:
        pipe.publish(user_channel(event.owner_id), payload)
    await pipe.execute()
