"""Where ``sluice dev`` keeps the JWT secret it generates when JWT_SECRET is unset.

``sluice token`` run in the same directory finds it there, so its tokens are
accepted by the stack ``sluice dev`` runs.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path

from app.core.errors import ConfigError

DEFAULT_DATA_DIR = Path(".sluice")
SECRET_FILE = "jwt_secret"


def dev_secret(data_dir: Path, *, create: bool) -> str | None:
    """The secret in ``data_dir``; with ``create`` a new one (mode 0600) if there is none."""
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    if not create:
        return None
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(secret)
    return secret


def jwt_secret(environ: Mapping[str, str], data_dir: Path) -> str:
    """JWT_SECRET, else the secret ``sluice dev`` left in ``data_dir``; ConfigError if neither."""
    secret = environ.get("JWT_SECRET") or dev_secret(data_dir, create=False)
    if not secret:
        raise ConfigError(
            f"JWT_SECRET is not set and {data_dir / SECRET_FILE} does not exist "
            "(run 'sluice dev' first or set JWT_SECRET)"
        )
    return secret
