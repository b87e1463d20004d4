"""Helpers that several test modules (and bench scripts) share."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def environ_restored() -> Iterator[None]:
    """Put ``os.environ`` back as it was on the way out (``configure`` and the CLI write the
    backends' variables into it)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
