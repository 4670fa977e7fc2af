"""The one error the upload client raises (the upload itself and ``--follow``)."""

from __future__ import annotations

from typing import Any


class UploadError(Exception):
    """The gateway refused the upload (not worth retrying), or retries ran out.

    ``status`` is the HTTP status (None: no answer at all), ``code`` and
    ``details`` the error body's ``error`` and ``details`` fields.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or {}
