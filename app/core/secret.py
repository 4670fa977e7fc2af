"""Values that must never reach a log: :class:`Secret` and :class:`SecretUrl`.

A secret setting (``JWT_SECRET``, ``MINIO_SECRET_KEY``, ``EMBEDDING_API_KEY``)
is held in a :class:`Secret`; a URL that may carry a password (``DATABASE_URL``,
``REDIS_URL``) in a :class:`SecretUrl`.  Invariants:

* ``repr``, ``str`` and ``format`` (f-strings, ``%s``) never show the value: a
  :class:`Secret` renders as ``**********``, a :class:`SecretUrl` as the URL with
  its password replaced by ``***``.  So a ``Settings`` repr, a log field or a
  traceback line that prints one shows nothing secret.
* The value is read only by calling :meth:`Secret.reveal`, at the one place
  that hands it to a client library (a grep for ``reveal()`` finds them all).
* It is not a ``str``: concatenation or ``json.dumps`` fails loudly instead of
  leaking.  Equality compares values in constant time; ``bool`` is "non-empty".
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "**********"


class Secret:
    """A string whose ``repr``/``str`` never show it; :meth:`reveal` returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{type(self).__name__} holds a str, got {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The secret itself: hand it to a client library, never to a log."""
        return self._value

    @property
    def masked(self) -> str:
        """What ``str``/``repr`` show: a fixed mask, empty for an empty secret."""
        return MASK if self._value else ""

    def fragments(self) -> tuple[str, ...]:
        """The substrings a log must never contain (for the logging scrubber)."""
        return (self._value,) if self._value else ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.masked!r})"

    def __str__(self) -> str:
        return self.masked

    def __format__(self, spec: str) -> str:
        return format(self.masked, spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Secret)
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((type(self), self._value))

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (type(self), (self._value,))


class SecretUrl(Secret):
    """A URL (``postgresql://user:pass@host/db``) whose password never shows.

    ``str`` gives the URL with the password replaced by ``***``
    (``postgresql://user:***@host/db``), which is safe to log.
    """

    __slots__ = ()

    @property
    def masked(self) -> str:
        return mask_url_password(self._value)

    def fragments(self) -> tuple[str, ...]:
        """The password, as written in the URL and percent-decoded."""
        try:
            password = urlsplit(self._value).password
        except ValueError:
            return (self._value,)
        if not password:
            return ()
        return tuple({password, unquote(password)})


def mask_url_password(url: str) -> str:
    """``scheme://user:pass@host/...`` -> ``scheme://user:***@host/...``.

    A URL without a password is returned unchanged; one that does not parse is
    masked entirely.
    """
    try:
        parts = urlsplit(url)
        if parts.password is None and "@" not in parts.netloc:
            return url
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostinfo}" if ":" in userinfo else f"{user}@{hostinfo}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return MASK


__all__ = ["MASK", "Secret", "SecretUrl", "mask_url_password"]
