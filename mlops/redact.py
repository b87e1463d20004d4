"""Masking secrets in configuration before it is printed: tokens, passwords, keys, URI credentials.

``mlops config show`` prints the effective configuration, which may carry an admin token, a
database password inside a tracking URI (``postgresql://user:pass@host/db``) or a key. What
is printed keeps the shape (which fields are set, user and host of a URI) and hides the
values: a field named like a secret becomes ``***``, and so does the password in a URI's
user-info and any secret-named query parameter (``?password=...``, ``?token=...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["MASK", "is_secret_name", "redact", "redact_uri"]

MASK = "***"

_SECRET_NAME = re.compile(
    r"(token|passw(or)?d|passwd|secret|credential|api[_-]?key|private[_-]?key|access[_-]?key|"
    r"signing[_-]?key|auth|session[_-]?key|^key$|_key$|^pwd$)",
    re.IGNORECASE,
)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_secret_name(name: str) -> bool:
    """Whether a field or parameter named ``name`` holds a secret (token, password, key...)."""
    return bool(_SECRET_NAME.search(name))


def redact_uri(text: str) -> str:
    """``text`` with the password of a URI's user-info and secret query parameters masked."""
    if not _URI.match(text):
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return MASK  # not parseable: print nothing of it
    out = text
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, sep, _password = userinfo.partition(":")
        # user:password keeps the user; a lone user-info is often a token (https://TOKEN@host)
        out = out.replace(parts.netloc, f"{user}:{MASK}@{host}" if sep else f"{MASK}@{host}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(is_secret_name(k) for k, _ in pairs):
            masked = urlencode([(k, MASK if is_secret_name(k) else v) for k, v in pairs], safe="*")
            out = out.replace("?" + parts.query, "?" + masked, 1)
    return out


def redact(data: Any) -> Any:
    """A copy of ``data`` (dicts, lists, strings) with secret-named values and URI credentials masked."""
    if isinstance(data, Mapping):
        return {
            k: (MASK if v not in (None, "") and is_secret_name(str(k)) else redact(v))
            for k, v in data.items()
        }
    if isinstance(data, list | tuple):
        return type(data)(redact(v) for v in data)
    if isinstance(data, str):
        return redact_uri(data)
    return data
