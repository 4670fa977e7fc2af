"""One client connection's outgoing side: the hub's :class:`~app.ws.hub.Peer`.

Frames are written without waiting.  A connection whose unsent data passes
``max_buffer_bytes`` is closed with 4429 (it can reconnect and resume with
``since``), so a client that stops reading costs bounded memory and never
delays anyone else.  A catch-up burst (a subscription's snapshot or replayed
history, bounded by the history's length) is allowed on top of the limit once.

A live event goes to every subscriber of its job as the same bytes: the hub
frames it once (:func:`text_frame`) and :meth:`Connection.push` writes those
bytes to each transport, instead of ``websockets`` building and serialising a
frame per subscriber.  This is safe because the server sends whole, unmasked,
uncompressed text frames (``compression=None``), which carry no per-connection
state, and every write is one whole frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from app.core.logging import get_logger
from app.ws.feed import JobFeed
from app.ws.messages import CLOSE_SLOW_CONSUMER, ServerMessage, encode
from app.ws.metrics import WsMetrics
from app.ws.session import ProtocolSession

log = get_logger(__name__)


def text_frame(payload: bytes) -> bytes:
    """``payload`` as one complete server-to-client text frame (FIN, unmasked)."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


class Connection:
    """One client connection: its protocol session, its job feeds, its write buffer."""

    __slots__ = (
        "__weakref__",
        "_max_buffer_bytes",
        "_metrics",
        "_spawn",
        "auth_timer",
        "corked",
        "credit",
        "dropped",
        "expiry_timer",
        "feeds",
        "notifications_for",
        "session",
        "ws",
    )

    def __init__(
        self,
        ws: ServerConnection,
        session: ProtocolSession,
        *,
        max_buffer_bytes: int,
        metrics: WsMetrics,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.ws = ws
        self.session = session
        self._max_buffer_bytes = max_buffer_bytes
        self._metrics = metrics
        self._spawn = spawn
        self.feeds: dict[str, JobFeed] = {}
        self.dropped = False
        self.corked: list[bytes] | None = None
        """Frames held back to be written together (one syscall for a subscribe's burst)."""
        self.credit = 0
        """Buffered bytes allowed beyond the limit while a catch-up burst drains."""
        self.auth_timer: asyncio.TimerHandle | None = None
        self.expiry_timer: asyncio.TimerHandle | None = None
        self.notifications_for: str | None = None

    @property
    def user_id(self) -> str:
        identity = self.session.identity
        assert identity is not None
        return identity.user_id

    @property
    def reader_scope(self) -> str | None:
        """Whose jobs this connection may follow and read: its user's, or any job
        (``None``) for an admin token, as ``GET /api/v1/admin/jobs`` shows them."""
        identity = self.session.identity
        assert identity is not None
        return None if identity.admin else identity.user_id

    def push(self, frame: bytes, *, catch_up: bool = False, wire: bytes | None = None) -> None:
        """Queue ``frame``; ``wire``, if given, is ``text_frame(frame)``, framed once for
        every subscriber of a live event."""
        if self.corked is not None:
            self.corked.append(frame)
        elif wire is not None:
            ws = self.ws
            if self.dropped or ws.protocol.state is not State.OPEN:
                return
            ws.transport.write(wire)
            self._check_buffer(catch_up=catch_up)
        else:
            self._write((frame,), catch_up=catch_up)

    def cork(self) -> None:
        """Hold frames back until :meth:`uncork` (call both without awaiting in between)."""
        if self.corked is None:
            self.corked = []

    def uncork(self) -> None:
        frames, self.corked = self.corked, None
        if frames:
            self._write(frames, catch_up=True)

    def reply(self, message: ServerMessage) -> None:
        self.push(encode(message))
        self._metrics.sent()

    def stop_timers(self) -> None:
        for timer in (self.auth_timer, self.expiry_timer):
            if timer is not None:
                timer.cancel()

    def _write(self, frames: tuple[bytes, ...] | list[bytes], *, catch_up: bool) -> None:
        ws = self.ws
        if self.dropped or ws.protocol.state is not State.OPEN:
            return
        if len(frames) == 1:
            broadcast((ws,), frames[0], text=True)
        else:  # frame them all, then one write
            for frame in frames:
                ws.protocol.send_text(frame)
            ws.transport.write(b"".join(ws.protocol.data_to_send()))
        self._check_buffer(catch_up=catch_up)

    def _check_buffer(self, *, catch_up: bool) -> None:
        """Drop the connection as a slow consumer if its unsent data passed the limit."""
        ws = self.ws
        buffered = ws.transport.get_write_buffer_size()
        limit = self._max_buffer_bytes
        if catch_up:
            # A replay burst is bounded by the history length; allow it on top of the limit.
            self.credit = max(self.credit, buffered)
        elif buffered <= limit:
            self.credit = 0
        elif buffered > limit + self.credit:
            self.dropped = True
            self._metrics.drops.labels(reason="slow_consumer").inc()
            log.warning(
                "slow_consumer_dropped",
                connection_id=self.session.connection_id,
                buffered=buffered,
            )
            self._spawn(ws.close(CLOSE_SLOW_CONSUMER, "slow consumer"))
