"""One exception tree for all of Sluice.

Every error a client can see is a :class:`SluiceError` with a machine-readable
``code``, an HTTP ``status`` and optional structured ``details``.  The gateway
renders it as ``{"error", "message", "details", "request_id"}``; the WebSocket
server sends ``{"type": "error", "code", "message"}`` and, where it must close
the connection, uses close code ``4000 + status`` (so 4401 for an expired token).
Pipeline stages raise :class:`PermanentError` or :class:`TransientError` to say
whether a retry can help.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details: dict[str, Any] = details or {}
        self.headers: dict[str, str] = headers or {}

    @property
    def ws_close_code(self) -> int:
        """Private WebSocket close code (4000-4999) mirroring the HTTP status.

        The WebSocket server closes with it whenever an error ends a connection
        (``app.ws.session.Close.on_error``): 4401 for a bad or expired token.
        """
        return 4000 + self.status

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class ConfigError(SluiceError):
    """Settings are missing or invalid; the process must not start."""

    default_code = "config_error"


class BadRequest(SluiceError):
    status = 400
    default_code = "bad_request"


class ValidationFailed(BadRequest):
    """A request body or parameter failed schema validation."""

    status = 422
    default_code = "validation_error"


class Unauthorized(SluiceError):
    status = 401
    default_code = "unauthorized"


class Forbidden(SluiceError):
    """Authenticated, but the token does not grant this (``admin_required``)."""

    status = 403
    default_code = "forbidden"


class NotFound(SluiceError):
    """Missing, or owned by someone else: the two are indistinguishable on purpose."""

    status = 404
    default_code = "not_found"


class RequestTimeout(SluiceError):
    """The client stopped sending its request body."""

    status = 408
    default_code = "body_timeout"


class Conflict(SluiceError):
    status = 409
    default_code = "conflict"


class Gone(SluiceError):
    """The resource existed but is gone for good (an upload whose storage was lost)."""

    status = 410
    default_code = "gone"


class PayloadTooLarge(SluiceError):
    status = 413
    default_code = "payload_too_large"


class UnsupportedMediaType(SluiceError):
    status = 415
    default_code = "unsupported_media_type"


class RateLimited(SluiceError):
    status = 429
    default_code = "rate_limited"


class ServiceUnavailable(SluiceError):
    status = 503
    default_code = "service_unavailable"


class PermanentError(SluiceError):
    """A processing failure that no retry can fix (corrupt file, wrong type...)."""

    status = 422
    default_code = "processing_failed"


class TransientError(SluiceError):
    """A processing failure worth retrying (a dependency briefly down...)."""

    status = 503
    default_code = "transient_error"


class CancelRequested(SluiceError):
    """Raised inside a running job once its worker has seen that a cancel was asked for.

    Not to be confused with the WebSocket message ``job_cancelled`` (class
    ``JobCancelled``), which tells a client that a job ended cancelled."""

    status = 409
    default_code = "cancelled"
