"""JWT bearer tokens (HS256).

The token's ``sub`` claim is the user id; nothing else identifies a caller.
A ``role: "admin"`` claim (``sluice token --admin``) grants the fleet-wide
views (every user's jobs, workers, queue internals); without it a caller sees
only what it owns.
:class:`TokenService` is built from the secret and a clock, so tests can mint
expired tokens without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jwt
import msgspec

from app.core.errors import Unauthorized

ALGORITHM = "HS256"
ISSUER = "sluice"


ADMIN_ROLE = "admin"


class Identity(msgspec.Struct, frozen=True):
    user_id: str
    expires_at: float
    """Unix time after which the token is no longer valid."""
    admin: bool = False
    """The token carries ``role: "admin"``: fleet-wide views are allowed."""


class TokenService:
    """Mints and verifies Sluice bearer tokens."""

    def __init__(self, secret: str, *, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock

    def mint(self, user_id: str, *, ttl_seconds: int = 24 * 3600, admin: bool = False) -> str:
        if not user_id or len(user_id) > 200:
            raise ValueError("user id must be 1-200 characters")
        now = int(self._clock())
        claims: dict[str, object] = {
            "sub": user_id,
            "iat": now,
            "exp": now + ttl_seconds,
            "iss": ISSUER,
        }
        if admin:
            claims["role"] = ADMIN_ROLE
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Identity:
        """Return the token's identity or raise :class:`Unauthorized` saying why."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "exp"], "verify_exp": False},
                issuer=ISSUER,
            )
        except jwt.InvalidIssuerError:
            raise Unauthorized("token was not issued by Sluice", code="invalid_token") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(
                f"token lacks the {exc.claim!r} claim", code="invalid_token"
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("token signature is invalid", code="invalid_token") from None
        except jwt.PyJWTError:
            raise Unauthorized("token is malformed", code="invalid_token") from None
        sub, exp = claims.get("sub"), claims.get("exp")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("token subject must be a non-empty string", code="invalid_token")
        if not isinstance(exp, int | float):
            raise Unauthorized("token expiry must be a number", code="invalid_token")
        # Checked here rather than by PyJWT so the injected clock is honoured.
        if exp <= self._clock():
            raise Unauthorized("token has expired", code="token_expired")
        role = claims.get("role")
        if role is not None and not isinstance(role, str):
            raise Unauthorized("token role must be a string", code="invalid_token")
        return Identity(user_id=sub, expires_at=float(exp), admin=role == ADMIN_ROLE)

    def verify_header(self, authorization: str | None) -> Identity:
        """Verify an ``Authorization: Bearer <token>`` header value."""
        if not authorization:
            raise Unauthorized(
                "missing bearer token: send 'Authorization: Bearer <token>'", code="missing_token"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "authorization header must be 'Bearer <token>'", code="invalid_token"
            )
        return self.verify(token.strip())
