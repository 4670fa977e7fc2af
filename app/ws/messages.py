"""The WebSocket wire format: every message as a msgspec Struct, decoded and encoded once.

* Client messages are one tagged union on ``type`` (``auth``, ``subscribe``,
  ``unsubscribe``, ``get_job_status``, ``cancel_job``, ``ping``), decoded by a
  decoder built once at import; :func:`parse` returns the message or an
  :class:`Error` that names the offending field.  A ``user_id`` field in client
  messages is accepted (the originating spec's client sends it) and ignored:
  the identity comes from the token only.  Any client message may carry an
  ``id`` that the direct reply echoes, so clients can match replies to requests.
* Server messages are tagged Structs encoded by one encoder (:func:`encode`);
  a live event is wrapped without re-encoding (:func:`progress_frame`).
* :class:`SystemNotice` is the payload of ``sluice:system`` on Redis, relayed
  to every ``/notifications`` connection.

Close codes: private ones are ``4000 + the HTTP status`` of the matching
:class:`~app.core.errors.SluiceError` (its ``ws_close_code``): 4401 for an
authentication failure, 4429 for a connection dropped as a slow consumer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec

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
"""``Unauthorized(...).ws_close_code``: bad, expired or missing token."""
CLOSE_SLOW_CONSUMER = 4429
"""``RateLimited(...).ws_close_code``: the client did not read fast enough."""

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
    """The reply to ``cancel_job`` (a wire message, not the workers' exception)."""

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


# --- system notices (from Redis) -------------------------------------------------------------


class SystemNotice(msgspec.Struct, kw_only=True):
    """Payload of ``sluice:system`` messages, relayed to every /notifications connection."""

    message: str
    level: Literal["info", "warning", "critical"] = "info"


SYSTEM_CHANNEL = "sluice:system"
decode_system_notice = msgspec.json.Decoder(SystemNotice).decode
encode_system_notice = _encoder.encode


# --- parsing client frames -------------------------------------------------------------------


class _TypeOnly(msgspec.Struct):
    type: Any = None


class _IdOnly(msgspec.Struct):
    id: Any = None


_decode_type_only = msgspec.json.Decoder(_TypeOnly).decode
_decode_id_only = msgspec.json.Decoder(_IdOnly).decode


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


def _request_id(data: bytes | str) -> RequestId:
    try:
        value = _decode_id_only(data).id
    except msgspec.MsgspecError:
        return None
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None
