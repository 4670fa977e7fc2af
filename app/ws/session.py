"""One connection's protocol state machine, without any I/O.

:class:`ProtocolSession` takes raw frames and timer expiries and returns
:data:`Action` values (reply, close, run a command, authenticated); the server
(:mod:`app.ws.server`) performs them and the tests drive the session directly.
It is named for what it is -- the protocol half of a connection -- so that it is
never confused with an upload session.

Invariant: once a session has returned a :class:`Close` it is ``closed`` and
returns no further actions.  A close caused by a :class:`~app.core.errors.SluiceError`
uses that error's ``ws_close_code`` (4000 + its HTTP status) and its ``code``
as the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from app.core.auth import Identity, TokenService
from app.core.errors import SluiceError, Unauthorized
from app.core.jsonguard import MAX_JSON_DEPTH, too_deep
from app.ws.messages import (
    CLOSE_INVALID_DATA,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    MAX_MESSAGE_BYTES,
    SUPPORTED_CHANNELS,
    Auth,
    CancelJob,
    Command,
    Connected,
    Endpoint,
    Error,
    GetJobStatus,
    Ping,
    Pong,
    RequestId,
    ServerMessage,
    Subscribe,
    Unsubscribe,
    parse,
)


@dataclass(frozen=True, slots=True)
class Reply:
    message: ServerMessage


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str

    @classmethod
    def on_error(cls, exc: SluiceError) -> Close:
        """The close for an error that ends the connection: its private code, its code as reason."""
        return cls(exc.ws_close_code, exc.code)


@dataclass(frozen=True, slots=True)
class Run:
    command: Command


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The session now acts for ``identity`` (first time, or a refreshed token)."""

    identity: Identity
    first: bool


Action = Reply | Close | Run | Authenticated


class ProtocolSession:
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
            return self._fail(self._rejected, None)
        if self.identity is None:
            return []
        return [Authenticated(self.identity, first=True), Reply(self._connected(self.identity))]

    def receive(self, data: bytes | str) -> list[Action]:
        if self.closed:
            return []
        refused = self._refuse_unreadable(data)
        if refused:
            self.closed = True
            return refused
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

    def _refuse_unreadable(self, data: bytes | str) -> list[Action]:
        """An error and a close for a frame too large or too deeply nested to decode."""
        if len(data) > self._max_message_bytes:
            error = Error(
                code="message_too_large",
                message=f"message of {len(data)} bytes exceeds the "
                f"{self._max_message_bytes}-byte limit",
                details={"limit": self._max_message_bytes, "size": len(data)},
            )
            return [Reply(error), Close(CLOSE_MESSAGE_TOO_BIG, "message too large")]
        if too_deep(data):
            error = Error(
                code="invalid_json",
                message=f"message is nested more than {MAX_JSON_DEPTH} levels deep",
                details={"max_depth": MAX_JSON_DEPTH},
            )
            return [Reply(error), Close(CLOSE_INVALID_DATA, "message nested too deeply")]
        return []

    def _auth(self, token: str, request_id: RequestId) -> list[Action]:
        try:
            identity = self._tokens.verify(token)
        except Unauthorized as exc:
            if self.identity is not None:  # a failed refresh keeps the current token
                return [Reply(Error(code=exc.code, message=exc.message, id=request_id))]
            return self._fail(exc, request_id)
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

    def _fail(self, exc: SluiceError, request_id: RequestId) -> list[Action]:
        """Say what went wrong, then close with the error's own close code."""
        self.closed = True
        return [
            Reply(Error(code=exc.code, message=exc.message, id=request_id)),
            Close.on_error(exc),
        ]

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
