"""Where ``sluice dev`` keeps the JWT secret it generates when JWT_SECRET is unset."""

from __future__ import annotations

import secrets
from pathlib import Path

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
