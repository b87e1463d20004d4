"""Opening a DuckDB file that other processes open too: wait out DuckDB's file lock.

DuckDB lets one process open a file read-write or any number of processes read-only, and
refuses the rest at once ("Could not set lock on file"). Callers that keep connections
short (the score store, the edge telemetry store) wait instead, with jittered backoff, up
to a timeout; any other error is raised as it is.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import duckdb

_T = TypeVar("_T")


class StillLocked(Exception):
    """The file stayed locked by another process for the whole timeout; ``error`` is DuckDB's last word."""

    def __init__(self, error: duckdb.Error):
        super().__init__(str(error))
        self.error = error


def is_lock_conflict(exc: duckdb.Error) -> bool:
    """Whether ``exc`` is DuckDB refusing a file another process (or connection) holds."""
    text = str(exc)
    if isinstance(exc, duckdb.IOException):
        return "lock" in text.lower()
    # The same file already open in this process with the other access mode.
    return isinstance(exc, duckdb.ConnectionException) and "different configuration" in text


def open_waiting(open_: Callable[[], _T], timeout: float) -> _T:
    """``open_()``, called again while it fails on a lock conflict, for up to ``timeout`` s.

    Raises ``StillLocked`` when the time is up, and any other ``duckdb.Error`` at once.
    Attempts do not queue: a holder that reopens without pause can keep a waiter out.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            return open_()
        except duckdb.Error as exc:
            if not is_lock_conflict(exc):
                raise
            if time.monotonic() >= deadline:
                raise StillLocked(exc) from exc
        time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: waiters do not retry in step
        delay = min(delay * 1.5, 0.05)
