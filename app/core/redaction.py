"""Keeping secrets out of log lines: by field name, and by pattern over the rendered line.

Fields whose name says secret (``authorization``, ``cookie``, ``password``,
``*_token``...) are replaced, in nested dicts, lists and header pairs too
(:func:`redact_secrets`).  The rendered line is then scrubbed of bearer/basic
credentials, ``token=``-style parameters, URL passwords, JWT-looking strings and
the literal values of the process's configured secrets (:func:`redact_text`).
Used by :mod:`app.core.logging`'s writer thread; pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

from app.core.secret import MASK, Secret

REDACTED = "[redacted]"
_MIN_LITERAL_SECRET = 8
"""Shorter configured secrets are not masked literally (they would mask common
words); URL passwords are still masked by pattern."""

_SECRET_NAMES = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "x_api_key",
        "api_key",
        "apikey",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "jwt",
        "password",
        "passwd",
        "secret",
        "credentials",
        "aws_secret_access_key",
        "x_amz_security_token",
    }
)
_SECRET_SUFFIXES = ("_secret", "_password", "_token", "_api_key", "_secret_key")

# Word lists shared by the text patterns: a key that names a secret.
_KEY = (
    r"[\w-]*(?:password|passwd|secret|token|api[_-]?key|secret[_-]?(?:access[_-]?)?key"
    r"|authorization|cookie)"
)
_TEXT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization header values: "Bearer <token>", "Basic <base64>" (base64 with a
    # digit or symbol, so that prose such as "basic checks" stays readable).
    (re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/=-]+"), rf"\1\2{REDACTED}"),
    (
        re.compile(r"(?i)\b(basic)(\s+)(?=[A-Za-z0-9+/]*[0-9+/=])[A-Za-z0-9+/]{6,}=*"),
        rf"\1\2{REDACTED}",
    ),
    # URL passwords: scheme://user:password@host -> scheme://user:***@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@'\"\\]*):[^\s@/'\"\\]*@"), r"\1:***@"),
    # key=value pairs (query strings, console fields, reprs): token=..., jwt_secret=...
    (re.compile(rf"(?i)\b({_KEY})=(?!\[redacted\])[^\s&;,'\"<>\\]+"), rf"\1={REDACTED}"),
    # quoted keys in reprs and JSON: 'authorization': '...', (b'cookie', b'...')
    (
        re.compile(rf"(?i)(\\?['\"]{_KEY}\\?['\"]\s*[:,]\s*b?\\?['\"])(?!\[redacted\])[^'\"\\]+"),
        rf"\1{REDACTED}",
    ),
    # JWTs: base64url JSON header ("eyJ"), payload and signature.
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # Anything else shaped like a signed token: three long base64url segments.
    (
        re.compile(r"\b[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}\b"),
        REDACTED,
    ),
)


def is_secret_key(key: str | bytes) -> bool:
    """Whether a field or header name says its value is secret."""
    text = key.decode("latin-1") if isinstance(key, bytes) else key
    name = text.lower().replace("-", "_")
    return name in _SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)


def redact_text(text: str, literals: Iterable[str] = ()) -> str:
    """Mask every secret-looking substring of ``text`` (see the module docstring)."""
    for literal in literals:
        if literal in text:
            text = text.replace(literal, MASK)
    for pattern, replacement in _TEXT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any, depth: int) -> Any:
    """``value`` with the values of secret-named keys replaced, recursively."""
    if depth > 8:
        return value  # the rendered-line scrub still applies
    if isinstance(value, dict):
        return {
            k: (
                REDACTED
                if isinstance(k, str | bytes) and is_secret_key(k) and v not in (None, "", b"")
                else _redact_value(v, depth + 1)
            )
            for k, v in value.items()
        }
    if type(value) in (list, tuple):
        if (
            len(value) == 2
            and isinstance(value[0], str | bytes)
            and isinstance(value[1], str | bytes)
            and is_secret_key(value[0])
        ):
            return type(value)((value[0], REDACTED))  # a (name, value) header pair
        return type(value)(_redact_value(v, depth + 1) for v in value)
    return value


_UNTOUCHED = frozenset({"event", "level", "logger", "timestamp", "exception", "exc_info"})


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace the values of secret-named fields, nested ones included."""
    for key, value in list(event_dict.items()):
        if key in _UNTOUCHED or key.startswith("_"):
            continue
        if is_secret_key(key) and value not in (None, "", b""):
            event_dict[key] = REDACTED
        elif isinstance(value, dict | list | tuple):
            event_dict[key] = _redact_value(value, 1)
    return event_dict


def scrub_line(literals: tuple[str, ...]) -> Callable[[Any, str, Any], str]:
    """The last processor: scrub the rendered line as a whole."""

    def scrub(_logger: Any, _method: str, line: Any) -> str:
        return redact_text(line if isinstance(line, str) else str(line), literals)

    return scrub


def secret_literals(secrets: Iterable[Secret | str]) -> tuple[str, ...]:
    """The substrings that must never be written, longest first."""
    found: set[str] = set()
    for secret in secrets:
        values = secret.fragments() if isinstance(secret, Secret) else (secret,)
        found.update(v for v in values if len(v) >= _MIN_LITERAL_SECRET)
    return tuple(sorted(found, key=len, reverse=True))
