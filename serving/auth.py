"""The service's secrets: the admin token, the feedback token and the request-id key.

Each comes from config when configured, else from a file under ``$MLOPS_HOME/run/`` that
the first process needing it (``mlops serve`` or the service itself) creates with a random
value, mode 0600, exclusively (two starters racing end up with the same value):

``serving.token``
    Admin token (``serving.admin_token`` / ``MLOPS__SERVING__ADMIN_TOKEN`` wins): routes,
    slots, flips, preloading, forcing a load on demand. Also accepted on ``/feedback``.
``feedback.token``
    Feedback token (``serving.feedback_token`` / ``MLOPS__SERVING__FEEDBACK_TOKEN`` wins):
    posting labels to ``/feedback`` and nothing else. A label pipeline is given this one.
``request-ids.key``
    The key request ids are tagged with (``mlops.predlog.RequestIds``), so ``/feedback``
    accepts labels only for ids this service issued, also after a restart. Never sent.

An empty token or key file is never accepted.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from adapters.files import create_new
from mlops.errors import ConfigError
from mlops.predlog import ID_KEY_BYTES
from mlops.settings import Settings

TOKEN_FILE = "serving.token"
FEEDBACK_TOKEN_FILE = "feedback.token"
ID_KEY_FILE = "request-ids.key"


def token_path(settings: Settings) -> Path:
    """Where the generated admin token lives."""
    return _ADMIN.path(settings)


def feedback_token_path(settings: Settings) -> Path:
    """Where the generated feedback token lives."""
    return _FEEDBACK.path(settings)


def id_key_path(settings: Settings) -> Path:
    """Where the request-id key lives."""
    return settings.run_dir / ID_KEY_FILE


def _read(path: Path, what: str) -> str:
    token = path.read_text().strip()
    if not token:
        raise ConfigError(f"{path}: the {what} file is empty; delete it to generate a new one")
    return token


def _ensure(path: Path, what: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(ID_KEY_BYTES)
    if not create_new(path, (value + "\n").encode()):
        return _read(path, what)
    return value


def _missing(what: str, setting: str, path: Path) -> ConfigError:
    return ConfigError(
        f"no serving {what}: set serving.{setting} (MLOPS__SERVING__{setting.upper()}) or start the "
        f"service once with `mlops serve`, which writes {path}"
    )


@dataclass(frozen=True)
class _Token:
    """One of the two tokens: its ``serving.<setting>`` field and its generated file's name."""

    setting: str
    file: str
    what: str

    def configured(self, settings: Settings) -> str | None:
        return getattr(settings.serving, self.setting)

    def path(self, settings: Settings) -> Path:
        return settings.run_dir / self.file

    def read(self, settings: Settings) -> str:
        """Configured, else the generated file's; a missing file is a ``ConfigError``."""
        configured = self.configured(settings)
        if configured:
            return configured
        path = self.path(settings)
        try:
            return _read(path, f"serving {self.what}")
        except FileNotFoundError:
            raise _missing(self.what, self.setting, path) from None

    def ensure(self, settings: Settings) -> str:
        """Configured, else read or created (0600) in MLOPS_HOME."""
        return self.configured(settings) or _ensure(self.path(settings), f"serving {self.what}")


_ADMIN = _Token("admin_token", TOKEN_FILE, "admin token")
_FEEDBACK = _Token("feedback_token", FEEDBACK_TOKEN_FILE, "feedback token")


def read_token(settings: Settings) -> str:
    """The admin token clients send: configured, else the generated file's."""
    return _ADMIN.read(settings)


def ensure_token(settings: Settings) -> str:
    """The admin token the service checks: configured, else read or created (0600) in MLOPS_HOME."""
    return _ADMIN.ensure(settings)


def read_feedback_token(settings: Settings) -> str:
    """The feedback token a label pipeline sends: configured, else the generated file's."""
    return _FEEDBACK.read(settings)


def ensure_feedback_token(settings: Settings) -> str:
    """The feedback token the service checks: configured, else read or created (0600)."""
    return _FEEDBACK.ensure(settings)


def ensure_id_key(settings: Settings) -> bytes:
    """The key request ids are tagged with: read or created (0600) in MLOPS_HOME."""
    return _ensure(id_key_path(settings), "request-id key").encode()


def check_bearer(authorization: str | None, *tokens: str) -> int | None:
    """None when ``authorization`` carries one of ``tokens``; else 401 (no credentials) or 403
    (wrong ones)."""
    if not authorization:
        return 401
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return 401
    given = value.strip().encode()
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given, token.encode())
    return None if ok else 403
