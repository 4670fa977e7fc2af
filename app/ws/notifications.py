"""``/notifications`` fan-out: a user's terminal job events and system notices.

:class:`Notifications` keeps which local connections listen for which user and
holds the matching channels on the shared :class:`~app.ws.bus.ChannelBus`
(``user_channel(id)`` while one of the user's connections is open,
``sluice:system`` while any is).  Each message is encoded once and pushed to
every listener; unlike progress there is no replay: a notification missed
while disconnected is not sent again.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from app.core.logging import get_logger
from app.jobs.events import decode_event, user_channel
from app.ws.bus import ChannelBus
from app.ws.messages import SYSTEM_CHANNEL, Notification, decode_system_notice, encode
from app.ws.metrics import WsMetrics

log = get_logger(__name__)


class Listener(Protocol):
    """What notifications need from a connection."""

    def push(self, frame: bytes, *, catch_up: bool = False) -> None: ...


class Notifications:
    """This process's /notifications listeners, by user."""

    def __init__(self, bus: ChannelBus, *, metrics: WsMetrics) -> None:
        self._bus = bus
        self._metrics = metrics
        self._users: dict[str, set[Listener]] = {}
        self._system: set[Listener] = set()

    async def listen(self, peer: Listener, user_id: str) -> None:
        """Start delivering to ``peer``; returns once Redis confirmed both channels."""
        self._users.setdefault(user_id, set()).add(peer)
        self._system.add(peer)
        await self._bus.add([user_channel(user_id), SYSTEM_CHANNEL])

    def stop(self, peer: Listener, user_id: str) -> None:
        self._system.discard(peer)
        peers = self._users.get(user_id)
        if peers is not None:
            peers.discard(peer)
            if not peers:
                del self._users[user_id]
                self._bus.remove([user_channel(user_id)])
        if not self._system:
            self._bus.remove([SYSTEM_CHANNEL])

    def on_user_event(self, user_id: str, payload: bytes) -> None:
        """A terminal event of one of ``user_id``'s jobs, as published."""
        peers = self._users.get(user_id)
        if not peers:
            return
        try:
            event = decode_event(payload)
        except msgspec.MsgspecError:
            return
        frame = encode(
            Notification(kind=f"job_{event.status}", job_id=event.job_id, data=msgspec.Raw(payload))
        )
        for peer in list(peers):
            peer.push(frame)
        self._metrics.sent(len(peers))

    def on_system(self, payload: bytes) -> None:
        try:
            notice = decode_system_notice(payload)
        except msgspec.MsgspecError:
            log.warning("undecodable_system_notice")
            return
        frame = encode(Notification(kind="system", message=notice.message, level=notice.level))
        for peer in list(self._system):
            peer.push(frame)
        self._metrics.sent(len(self._system))
