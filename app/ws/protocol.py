"""The WebSocket progress protocol, without any I/O.

* Message schemas.  Client messages are one tagged union on ``type`` (``auth``,
  ``subscribe``, ``unsubscribe``, ``get_job_status``, ``cancel_job``, ``ping``),
  decoded once by a prebuilt decoder; server messages are tagged Structs encoded
  by one encoder.  A ``user_id`` field in client messages is accepted (the
  originating spec's client sends it) and ignored: the identity comes from the
  token only.  Any client message may carry an ``id`` that the direct reply
  echoes, so clients can match replies to requests.
* :class:`Session` -- one connection's protocol state machine: raw frames and
  timer expiries in, :data:`Action` values out (reply, close, run a command,
  authenticated).  The server performs the actions; the tests drive it directly.
* :class:`JobFeed` -- one subscriber's delivery state for one job: it merges
  the snapshot or history read at subscribe time with live events that arrived
  meanwhile, drops duplicates, never lets ``seq`` go backwards and lets exactly
  one terminal event through.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal

import msgspec

from app.core.auth import Identity, TokenService
from app.core.errors import Unauthorized
from app.core.jsonguard import MAX_JSON_DEPTH, too_deep
from app.jobs.model import ProgressEvent

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
"""Largest client frame accepted; bigger ones get an error and close 1009."""
MAX_JOBS_PER_MESSAGE = 100
MAX_SUBSCRIPTIONS = 1000
"""Jobs one connection may follow at once."""
CLOSE_GOING_AWAY = 1001
CLOSE_INVALID_DATA = 1007
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_UNAUTHORIZED = 4401
CLOSE_SLOW_CONSUMER = 4429

Endpoint = Literal["progress", "notifications"]
RequestId = int | str | None
JobIds = Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_JOBS_PER_MESSAGE)]
Seq = Annotated[int, msgspec.Meta(ge=0)]


# --- client messages ---------------------------------------------------------------------


class _ClientMessage(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    id: RequestId = None
    """Optional request id, echoed in the direct reply."""
    user_id: Any = None
    """Sent by the originating spec's client; ignored (identity comes from the token)."""


class Auth(_ClientMessage, tag="auth"):
    token: str


class Subscribe(_ClientMessage, tag="subscribe"):
    job_ids: JobIds
    channels: list[str] = msgspec.field(default_factory=lambda: ["progress"])
    since: dict[str, Seq] | None = None
    """``{job_id: last seq seen}``: resume after a reconnect."""


class Unsubscribe(_ClientMessage, tag="unsubscribe"):
    job_ids: JobIds


class GetJobStatus(_ClientMessage, tag="get_job_status"):
    job_id: str


class CancelJob(_ClientMessage, tag="cancel_job"):
    job_id: str


class Ping(_ClientMessage, tag="ping"):
    pass


ClientMessage = Auth | Subscribe | Unsubscribe | GetJobStatus | CancelJob | Ping
Command = Subscribe | Unsubscribe | GetJobStatus | CancelJob
"""Client messages that need I/O (the database or Redis) to answer."""
CLIENT_TYPES = ("auth", "subscribe", "unsubscribe", "get_job_status", "cancel_job", "ping")
SUPPORTED_CHANNELS = frozenset({"progress"})

_decode_client: Callable[[bytes | str], ClientMessage] = msgspec.json.Decoder(ClientMessage).decode


class _TypeOnly(msgspec.Struct):
    type: Any = None


_decode_type_only = msgspec.json.Decoder(_TypeOnly).decode


# --- server messages ---------------------------------------------------------------------


class _ServerMessage(msgspec.Struct, tag_field="type", omit_defaults=True, kw_only=True):
    pass


class Connected(_ServerMessage, tag="connected"):
    connection_id: str
    user_id: str
    endpoint: str
    server_time: float
    heartbeat_interval: int
    token_expires_at: float
    protocol_version: int = PROTOCOL_VERSION


class JobProgress(_ServerMessage, tag="job_progress"):
    job_id: str
    data: msgspec.Raw | ProgressEvent
    snapshot: bool = False
    """True when ``data`` is the job's current state rather than a recorded event."""
    recovered: bool | None = None
    """False on the snapshot sent when a resume could not replay the missed events."""


class JobStatusResponse(_ServerMessage, tag="job_status_response"):
    job_id: str
    data: ProgressEvent
    id: RequestId = None


class Subscribed(_ServerMessage, tag="subscribed"):
    job_ids: list[str]
    recovered: dict[str, bool] | None = None
    """With ``since``: per job, whether every missed event is replayed."""
    id: RequestId = None


class Unsubscribed(_ServerMessage, tag="unsubscribed"):
    job_ids: list[str]
    id: RequestId = None


class JobCancelled(_ServerMessage, tag="job_cancelled"):
    job_id: str
    data: ProgressEvent
    id: RequestId = None


class Notification(_ServerMessage, tag="notification"):
    kind: str
    """``job_completed`` / ``job_failed`` / ``job_cancelled``, or ``system``."""
    job_id: str | None = None
    data: msgspec.Raw | ProgressEvent | None = None
    message: str | None = None
    level: str | None = None


class Pong(_ServerMessage, tag="pong"):
    server_time: float
    id: RequestId = None


class Error(_ServerMessage, tag="error"):
    code: str
    message: str
    job_id: str | None = None
    details: dict[str, Any] | None = None
    id: RequestId = None


ServerMessage = (
    Connected
    | JobProgress
    | JobStatusResponse
    | Subscribed
    | Unsubscribed
    | JobCancelled
    | Notification
    | Pong
    | Error
)

_encoder = msgspec.json.Encoder()


def encode(message: ServerMessage) -> bytes:
    return _encoder.encode(message)


def progress_frame(job_id: str, payload: bytes) -> bytes:
    """A ``job_progress`` frame around an already encoded event (no re-encoding)."""
    return _encoder.encode(JobProgress(job_id=job_id, data=msgspec.Raw(payload)))


class SystemNotice(msgspec.Struct, kw_only=True):
    """Payload of ``sluice:system`` messages, relayed to every /notifications connection."""

    message: str
    level: Literal["info", "warning", "critical"] = "info"


SYSTEM_CHANNEL = "sluice:system"
decode_system_notice = msgspec.json.Decoder(SystemNotice).decode
encode_system_notice = _encoder.encode


def parse(data: bytes | str) -> ClientMessage | Error:
    """Decode one client frame, or explain precisely what is wrong with it."""
    try:
        return _decode_client(data)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: check it first
        return _explain(data, str(exc))
    except msgspec.DecodeError as exc:
        return Error(code="invalid_json", message=f"message is not valid JSON: {exc}")


def _explain(data: bytes | str, problem: str) -> Error:
    try:
        kind = _decode_type_only(data).type
    except msgspec.MsgspecError:
        return Error(code="invalid_message", message=f"message must be a JSON object: {problem}")
    request_id = _request_id(data)
    if kind is None:
        return Error(
            code="missing_type",
            message="message has no 'type' field",
            details={"field": "type", "expected": list(CLIENT_TYPES)},
            id=request_id,
        )
    if not isinstance(kind, str) or kind not in CLIENT_TYPES:
        return Error(
            code="unknown_type",
            message=f"unknown message type {kind!r}",
            details={"field": "type", "expected": list(CLIENT_TYPES)},
            id=request_id,
        )
    text, _, where = problem.partition(" - at `$.")
    field = where.split("`", 1)[0].split("[", 1)[0] if where else None
    if field is None and "`" in text:  # "Object missing required field `job_ids`"
        field = text.split("`")[1]
    details = {"field": field} if field else None
    return Error(
        code="invalid_message",
        message=f"invalid {kind!r} message: {problem}",
        details=details,
        id=request_id,
    )


class _IdOnly(msgspec.Struct):
    id: Any = None


_decode_id_only = msgspec.json.Decoder(_IdOnly).decode


def _request_id(data: bytes | str) -> RequestId:
    try:
        value = _decode_id_only(data).id
    except msgspec.MsgspecError:
        return None
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


# --- the session state machine -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    message: ServerMessage


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Run:
    command: Command


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The session now acts for ``identity`` (first time, or a refreshed token)."""

    identity: Identity
    first: bool


Action = Reply | Close | Run | Authenticated


class Session:
    """One connection's protocol logic: frames and timers in, actions out.

    A connection authenticates with the query token (``identity`` given at
    construction) or with an ``auth`` message, which must come before the
    auth deadline; ``auth`` may be sent again with a fresh token for the same
    user to extend the session.  Until then only ``auth`` and ``ping`` are
    answered.  Replies that need no I/O (``pong``, errors) are produced here.

    A query token that failed verification (``rejected``) is reported after
    the upgrade: an error message, then close 4401 with the error code as the
    reason, so a browser can tell an auth failure from a network failure.  A
    frame nested deeper than :data:`~app.core.jsonguard.MAX_JSON_DEPTH` is
    never decoded: an error message, then close 1007.
    """

    def __init__(
        self,
        tokens: TokenService,
        *,
        endpoint: Endpoint,
        connection_id: str,
        heartbeat_interval: int,
        identity: Identity | None = None,
        clock: Callable[[], float] = time.time,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        rejected: Unauthorized | None = None,
    ) -> None:
        self._tokens = tokens
        self._rejected = rejected
        self.endpoint: Endpoint = endpoint
        self.connection_id = connection_id
        self.heartbeat_interval = heartbeat_interval
        self.identity = identity
        self._clock = clock
        self._max_message_bytes = max_message_bytes
        self.closed = False

    @property
    def authenticated(self) -> bool:
        return self.identity is not None

    def opened(self) -> list[Action]:
        """The handshake is done: greet a client that authenticated in the URL,
        or refuse one whose URL token failed."""
        if self._rejected is not None:
            self.closed = True
            exc = self._rejected
            return [
                Reply(Error(code=exc.code, message=exc.message)),
                Close(CLOSE_UNAUTHORIZED, exc.code),
            ]
        if self.identity is None:
            return []
        return [Authenticated(self.identity, first=True), Reply(self._connected(self.identity))]

    def receive(self, data: bytes | str) -> list[Action]:
        if self.closed:
            return []
        if len(data) > self._max_message_bytes:
            self.closed = True
            return [
                Reply(
                    Error(
                        code="message_too_large",
                        message=f"message of {len(data)} bytes exceeds the "
                        f"{self._max_message_bytes}-byte limit",
                        details={"limit": self._max_message_bytes, "size": len(data)},
                    )
                ),
                Close(CLOSE_MESSAGE_TOO_BIG, "message too large"),
            ]
        if too_deep(data):
            self.closed = True
            return [
                Reply(
                    Error(
                        code="invalid_json",
                        message=f"message is nested more than {MAX_JSON_DEPTH} levels deep",
                        details={"max_depth": MAX_JSON_DEPTH},
                    )
                ),
                Close(CLOSE_INVALID_DATA, "message nested too deeply"),
            ]
        message = parse(data)
        match message:
            case Error():
                return [Reply(message)]
            case Auth(token=token):
                return self._auth(token, message.id)
            case Ping(id=request_id):
                return [Reply(Pong(server_time=self._clock(), id=request_id))]
            case _ if self.identity is None:
                return [
                    Reply(
                        Error(
                            code="auth_required",
                            message="send {'type': 'auth', 'token': ...} first",
                            id=message.id,
                        )
                    )
                ]
            case Subscribe(channels=channels) if not SUPPORTED_CHANNELS.issuperset(channels):
                unknown = sorted(set(channels) - SUPPORTED_CHANNELS)
                return [
                    Reply(
                        Error(
                            code="unsupported_channel",
                            message=f"unsupported channel(s): {', '.join(unknown)}",
                            details={"field": "channels", "supported": sorted(SUPPORTED_CHANNELS)},
                            id=message.id,
                        )
                    )
                ]
            case Subscribe() | Unsubscribe() | GetJobStatus() | CancelJob():
                return [Run(message)]
        raise AssertionError(f"unhandled message {message!r}")  # pragma: no cover

    def _auth(self, token: str, request_id: RequestId) -> list[Action]:
        try:
            identity = self._tokens.verify(token)
        except Unauthorized as exc:
            if self.identity is not None:  # a failed refresh keeps the current token
                return [Reply(Error(code=exc.code, message=exc.message, id=request_id))]
            self.closed = True
            return [
                Reply(Error(code=exc.code, message=exc.message, id=request_id)),
                Close(CLOSE_UNAUTHORIZED, exc.code),
            ]
        if self.identity is None:
            self.identity = identity
            return [Authenticated(identity, first=True), Reply(self._connected(identity))]
        if identity.user_id != self.identity.user_id:
            return [
                Reply(
                    Error(
                        code="identity_mismatch",
                        message="a connection cannot change user; reconnect instead",
                        id=request_id,
                    )
                )
            ]
        self.identity = identity
        return [Authenticated(identity, first=False), Reply(self._connected(identity))]

    def auth_deadline_passed(self) -> list[Action]:
        if self.identity is not None or self.closed:
            return []
        self.closed = True
        return [Close(CLOSE_UNAUTHORIZED, "authentication timeout")]

    def expiry_reached(self) -> list[Action]:
        """The token-expiry timer fired; close unless the token was refreshed."""
        if self.identity is None or self.closed or self.identity.expires_at > self._clock():
            return []
        self.closed = True
        return [Close(CLOSE_UNAUTHORIZED, "token expired")]

    def _connected(self, identity: Identity) -> Connected:
        return Connected(
            connection_id=self.connection_id,
            user_id=identity.user_id,
            endpoint=self.endpoint,
            server_time=self._clock(),
            heartbeat_interval=self.heartbeat_interval,
            token_expires_at=identity.expires_at,
        )


# --- per-subscriber delivery -----------------------------------------------------------------


class Offer(Enum):
    SEND = "send"
    """Deliver the event now."""
    DROP = "drop"
    """Duplicate, stale, after the terminal event, or buffered while catching up."""
    GAP = "gap"
    """Events are missing before this one: the feed is catching up again and
    the caller must read the history after :attr:`JobFeed.last_seq` and call
    :meth:`JobFeed.catch_up`."""


class JobFeed:
    """One subscriber's delivery state for one job.

    Starts *syncing*: live events are buffered while the subscriber's history
    (or snapshot) is read.  :meth:`catch_up` merges that history with the
    buffer by ``seq``, drops duplicates and returns what to send; afterwards
    :meth:`offer` decides for each live event.  ``seq`` never goes backwards
    and at most one terminal event is let through, after which the feed is
    :attr:`done`.
    """

    __slots__ = ("done", "job_id", "last_seq", "pending", "syncing")

    def __init__(self, job_id: str, last_seq: int = -1) -> None:
        self.job_id = job_id
        self.last_seq = last_seq
        self.syncing = True
        self.pending: list[ProgressEvent] = []
        self.done = False

    def offer(self, event: ProgressEvent) -> Offer:
        if self.done:
            return Offer.DROP
        if self.syncing:
            self.pending.append(event)
            return Offer.DROP
        if event.seq <= self.last_seq:
            return Offer.DROP
        if event.seq > self.last_seq + 1 and self.last_seq >= 0:
            self.syncing = True
            self.pending.append(event)
            return Offer.GAP
        self._advance(event)
        return Offer.SEND

    def catch_up(
        self, history: Iterable[ProgressEvent], *, floor: int | None = None
    ) -> list[ProgressEvent]:
        """Merge ``history`` with the buffered live events; return them in order.

        Events at or below ``floor`` (default: the last delivered ``seq``) are
        dropped; so is anything after a terminal event.
        """
        if floor is not None:
            self.last_seq = max(self.last_seq, floor)
        merged = sorted([*history, *self.pending], key=lambda e: e.seq)
        self.pending = []
        self.syncing = False
        out: list[ProgressEvent] = []
        for event in merged:
            if self.done:
                break
            if event.seq > self.last_seq:
                self._advance(event)
                out.append(event)
        return out

    def _advance(self, event: ProgressEvent) -> None:
        self.last_seq = event.seq
        if event.terminal:
            self.done = True


def merge_by_seq(events: Iterable[ProgressEvent]) -> list[ProgressEvent]:
    """Events sorted by ``seq`` with duplicates removed."""
    by_seq = {e.seq: e for e in events}
    return [by_seq[s] for s in sorted(by_seq)]


def covers(events: list[ProgressEvent], since: int, *, reached_back: bool) -> bool:
    """Whether ``events`` (sorted, unique, all with seq > since) hold every event after ``since``.

    ``reached_back`` says the history they were read from also holds an event
    at or before ``since``, i.e. nothing was trimmed before the first of them.
    """
    expected = since + 1
    for event in events:
        if event.seq != expected:
            return False
        expected += 1
    return reached_back or (bool(events) and events[0].seq == since + 1)
