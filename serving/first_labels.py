"""The first label of every labelled request, kept on disk instead of in memory.

A service refuses a label that differs from the first one its request got (``/feedback``
and ``/tenants/feedback``). Remembering every labelled request in a dict grew without bound
with the label traffic; ``FirstLabels`` keeps them in a SQLite index under
``$MLOPS_HOME/run/first-labels.sqlite`` (one row per labelled request, per scope: ``main`` or
``tenant:<name>``), and in memory only the labels accepted since the last flush.

A label becomes durable in the index only after its feedback file is written (the writer's
``on_feedback`` hook), so the index never claims a label the log lost in a crash: a label
that never reached a file may be sent again. At start, each scope catches up from the log
what was written after the index's watermark (a crash between a file and the index), and a
scope the index has never seen is loaded from its whole log once.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

INDEX_FILE = "first-labels.sqlite"
MAIN = "main"
CATCH_UP_MARGIN = timedelta(minutes=10)
"""How far before the watermark the catch-up reads: other processes' flushes may land late."""

_CHUNK = 500  # ids per lookup statement (SQLite's variable limit is far above)

FeedbackReader = Callable[[datetime | None], pd.DataFrame]
"""Feedback rows (``request_id``, ``label``, ``ts``) with ``ts >= since`` (None: all of them)."""


def tenant_scope(tenant: str) -> str:
    """The index scope of one tenant's labels."""
    return f"tenant:{tenant}"


class FirstLabels:
    """First labels by (scope, request id): durable ones in SQLite, accepted ones in memory."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._con.execute("PRAGMA journal_mode = WAL")
        self._con.execute("PRAGMA synchronous = NORMAL")
        self._con.execute(
            "CREATE TABLE IF NOT EXISTS labels (scope TEXT NOT NULL, request_id TEXT NOT NULL, "
            "label INTEGER NOT NULL, PRIMARY KEY (scope, request_id)) WITHOUT ROWID"
        )
        self._con.execute(
            "CREATE TABLE IF NOT EXISTS watermarks (scope TEXT PRIMARY KEY, ts_us INTEGER NOT NULL)"
        )
        self._lock = threading.Lock()
        self.pending: dict[str, dict[str, int]] = {}  # scope -> accepted, not yet in a file

    def close(self) -> None:
        """Close the index (what is pending stays in the writers' buffers)."""
        with self._lock:
            self._con.close()

    def known(self, scope: str, request_ids: Iterable[str]) -> dict[str, int]:
        """The first label of each of ``request_ids`` that has one (pending or durable)."""
        ids = list(dict.fromkeys(request_ids))
        pending = self.pending.get(scope, {})
        out = {rid: pending[rid] for rid in ids if rid in pending}
        rest = [rid for rid in ids if rid not in out]
        with self._lock:
            for i in range(0, len(rest), _CHUNK):
                chunk = rest[i : i + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                rows = self._con.execute(
                    f"SELECT request_id, label FROM labels WHERE scope = ? AND request_id IN ({marks})",
                    [scope, *chunk],
                ).fetchall()
                out.update(rows)
        return out

    def accept(self, scope: str, labels: dict[str, int]) -> None:
        """Remember labels handed to the writer's buffer, until their file is written."""
        self.pending.setdefault(scope, {}).update(labels)

    def written(self, scope: str, items: Sequence[tuple[str, int, float]]) -> None:
        """Record ``(request id, label, ts)`` rows whose feedback file is now durable."""
        if not items:
            return
        self._insert(scope, [(rid, label) for rid, label, _ in items], max(ts for _, _, ts in items))
        pending = self.pending.get(scope)
        if pending:
            for rid, label, _ in items:
                if pending.get(rid) == label:
                    del pending[rid]

    def catch_up(self, scope: str, read: FeedbackReader) -> int:
        """Index what the log of ``scope`` holds past the watermark (all of it for a new
        scope), first label first; the number of rows read."""
        with self._lock:
            row = self._con.execute("SELECT ts_us FROM watermarks WHERE scope = ?", [scope]).fetchone()
        since = None if row is None else datetime.fromtimestamp(row[0] / 1e6, UTC) - CATCH_UP_MARGIN
        frame = read(since)
        if frame.empty:
            self._insert(scope, [], None if row is not None else 0.0)
            return 0
        frame = frame.sort_values("ts", kind="stable")
        ts = pd.to_datetime(frame["ts"], utc=True)
        newest = float(ts.max().timestamp())
        pairs = list(zip(frame["request_id"].astype(str), frame["label"].astype(int), strict=True))
        self._insert(scope, pairs, newest)
        return len(frame)

    def _insert(self, scope: str, pairs: list[tuple[str, int]], newest: float | None) -> None:
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                self._con.executemany(
                    "INSERT OR IGNORE INTO labels VALUES (?, ?, ?)",
                    [(scope, rid, int(label)) for rid, label in pairs],
                )
                if newest is not None:
                    self._con.execute(
                        "INSERT INTO watermarks VALUES (?, ?) ON CONFLICT (scope) "
                        "DO UPDATE SET ts_us = max(ts_us, excluded.ts_us)",
                        [scope, int(newest * 1e6)],
                    )
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    def count(self, scope: str) -> int:
        """Durable first labels of ``scope``."""
        with self._lock:
            return self._con.execute("SELECT count(*) FROM labels WHERE scope = ?", [scope]).fetchone()[0]
