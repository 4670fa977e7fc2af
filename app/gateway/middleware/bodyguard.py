"""The body guard: how every request body is received, whatever the route does.

:class:`BodyGuardMiddleware` is pure ASGI (it wraps ``receive`` and ``send``;
nothing is buffered) and sits right inside the request-context middleware, so
it sees every response, including refusals made before a handler runs
(authentication, rate limits).  Its invariants:

* **Stalled bodies.**  A body that sends nothing for ``UPLOAD_BODY_TIMEOUT_SECONDS``
  makes ``receive`` raise :class:`~app.core.errors.RequestTimeout` (408
  ``body_timeout``); the reader's buffer goes with the handler's frame.
* **Drain, then answer.**  When a response starts before the request's body has
  been received in full (a refusal, or a route that takes no body), the rest is
  read and discarded -- at most ``REFUSED_BODY_DRAIN_MB`` and
  ``REFUSED_BODY_DRAIN_SECONDS`` -- *before* the response goes out.  Clients that
  send their whole body before reading (urllib, requests, browsers' fetch) then
  read the answer instead of a connection reset, and the connection stays
  reusable.  Discarding holds no memory.  A body that cannot be drained (declared
  larger than the bound, too slow, or silent for ``UPLOAD_BODY_TIMEOUT_SECONDS``)
  is not read further and the response carries ``Connection: close``.
* **Expect: 100-continue.**  The ASGI server sends ``100 Continue`` only when the
  app first calls ``receive`` (uvicorn does so for both its httptools and h11
  protocols).  A request refused before the app asked for its body is answered
  at once, without reading and with ``Connection: close``: the client never sends
  the body.
* An unexpected exception (a 500, answered outside this middleware) drains the
  same way before it propagates.
* **Vanished clients.**  A client that disconnects before its body is complete
  (:class:`~starlette.requests.ClientDisconnect`, or ``http.disconnect`` from
  ``receive``) is not a server error: no traceback, no 500.  The request is
  marked in ``scope["state"]["client_disconnected"]`` with the bytes received,
  and the request-context middleware logs one ``client_disconnected`` info line
  with status 499 (also the status in the HTTP metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import RequestTimeout
from app.core.settings import Settings

CLIENT_CLOSED_REQUEST = 499
"""The status recorded (never sent) for a request whose client went away (nginx's 499)."""


@dataclass
class BodyPolicy:
    """The bounds the guard enforces, from :class:`~app.core.settings.Settings`."""

    idle_timeout: float
    drain_bytes: int
    drain_seconds: float

    @classmethod
    def of(cls, settings: Settings) -> BodyPolicy:
        return cls(
            idle_timeout=float(settings.upload_body_timeout_seconds),
            drain_bytes=settings.refused_body_drain_bytes,
            drain_seconds=float(settings.refused_body_drain_seconds),
        )


@dataclass
class _Body:
    """What has happened to one request's body so far."""

    declared: int | None
    expect_continue: bool
    complete: bool
    received: int = 0
    asked: bool = False
    """The app called ``receive`` (so the server sent any ``100 Continue``)."""
    disconnected: bool = False
    timed_out: bool = False
    answering: bool = False
    """The response has started: the body is the guard's to drain, not the app's."""

    @classmethod
    def of(cls, scope: Scope) -> _Body:
        declared: int | None = None
        chunked = expect_continue = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit():
                declared = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"expect":
                expect_continue = value.lower() == b"100-continue"
        has_body = chunked or bool(declared)
        return cls(declared=declared, expect_continue=expect_continue, complete=not has_body)

    def note(self, message: Message) -> None:
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True
        elif message["type"] == "http.disconnect" and not self.complete:
            self.disconnected = True


class BodyGuardMiddleware:
    def __init__(self, app: ASGIApp, *, policy: BodyPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _Body.of(scope)
        policy = self.policy

        async def guarded_receive() -> Message:
            body.asked = True
            if body.complete or body.disconnected or body.answering:
                # only a disconnect can come now, or the app listens for one while
                # its response goes out (the guard drains the body meanwhile)
                return await receive()
            try:
                async with asyncio.timeout(policy.idle_timeout):
                    message = await receive()
            except TimeoutError:
                body.timed_out = True
                raise RequestTimeout(
                    f"the request body sent nothing for {policy.idle_timeout:g} s",
                    details={"timeout_seconds": policy.idle_timeout, "received": body.received},
                ) from None
            body.note(message)
            return message

        async def guarded_send(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and not body.complete
                and not await self._drain(body, receive)
            ):
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"
                ]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except ClientDisconnect:
            body.disconnected = True
        except Exception:
            # The 500 is rendered outside this middleware (Starlette's outermost
            # ServerErrorMiddleware), and the server closes the connection after
            # it: drain first so that it can be read.
            if not body.complete and not body.answering:
                await self._drain(body, receive)
            raise
        if body.disconnected:
            scope.setdefault("state", {})["client_disconnected"] = body.received

    async def _drain(self, body: _Body, receive: Receive) -> bool:
        """Read and discard the rest of the body within the policy's bounds.

        True when the body was received in full (the connection stays usable);
        False when it was left unread (the response must close the connection).
        """
        body.answering = True
        if body.disconnected or body.timed_out:
            return False
        if body.expect_continue and not body.asked:
            return False  # the client is waiting for 100 Continue: never ask for the body
        budget = self.policy.drain_bytes
        if body.declared is not None and body.declared - body.received > budget:
            return False
        start = body.received
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.policy.drain_seconds):
                while not body.complete and not body.disconnected:
                    async with asyncio.timeout(self.policy.idle_timeout):
                        body.note(await receive())
                    if body.received - start > budget:
                        return False
        return body.complete
