"""The admin API's bearer token: from config, else generated once into MLOPS_HOME.

``serving.admin_token`` (or ``MLOPS__SERVING__ADMIN_TOKEN``) wins. Without it, the first
process that needs a token (``mlops serve`` or the service itself) creates
``$MLOPS_HOME/run/serving.token`` with a random value, mode 0600, exclusively (two starters
racing end up with the same token); the admin client reads the same file. An empty token
is never accepted.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from mlops.errors import ConfigError
from mlops.settings import Settings

TOKEN_FILE = "serving.token"


def token_path(settings: Settings) -> Path:
    return settings.run_dir / TOKEN_FILE


def _read(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ConfigError(f"{path}: the serving admin token file is empty; delete it to generate a new one")
    return token


def read_token(settings: Settings) -> str:
    """The admin token clients send: configured, else the generated file's."""
    if settings.serving.admin_token:
        return settings.serving.admin_token
    path = token_path(settings)
    try:
        return _read(path)
    except FileNotFoundError:
        raise ConfigError(
            f"no serving admin token: set serving.admin_token (MLOPS__SERVING__ADMIN_TOKEN) or start "
            f"the service once with `mlops serve`, which writes {path}"
        ) from None


def ensure_token(settings: Settings) -> str:
    """The admin token the service checks: configured, else read or created (0600) in MLOPS_HOME."""
    if settings.serving.admin_token:
        return settings.serving.admin_token
    path = token_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return token


def check_bearer(authorization: str | None, token: str) -> int | None:
    """None when ``authorization`` carries ``token``; else 401 (no credentials) or 403 (wrong ones)."""
    if not authorization:
        return 401
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return 401
    return None if hmac.compare_digest(value.strip().encode(), token.encode()) else 403
