"""Event brokers behind one small interface; the embedded one is an append-only log in SQLite.

A topic is one ordered log of messages with dense offsets from 0. A consumer group reads
from its committed offset and commits the offset of the next message it still needs, only
after what it made of the earlier ones is durable; a restarted consumer therefore sees
again every message whose output was not committed, and none that was.

``SqliteBroker`` keeps the log and the group offsets in one SQLite file (WAL mode, one
transaction per publish and per commit), so several processes on one host can publish and
consume. SQLite errors become ``BrokerError``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mlops.errors import PlatformError


class BrokerError(PlatformError):
    """The broker cannot be reached, or refused a publish, poll or commit (e.g. a commit backwards)."""

    exit_code = 8


@dataclass(frozen=True)
class Message:
    """One message of a topic: its offset, partitioning key and JSON payload."""

    offset: int
    key: str
    payload: dict[str, Any]


class Broker(Protocol):
    """Append-only topics with consumer-group offsets."""

    def publish(self, topic: str, messages: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Append ``(key, payload)`` messages in order; returns the offset after the last one."""
        ...

    def poll(self, topic: str, group: str, max_messages: int, start: int | None = None) -> list[Message]:
        """Up to ``max_messages`` from ``start`` (default: the group's committed offset), in order."""
        ...

    def committed(self, topic: str, group: str) -> int:
        """The group's committed offset: the first message it still needs (0 if it never committed)."""
        ...

    def commit(self, topic: str, group: str, offset: int) -> None:
        """Record that the group needs messages from ``offset`` on (never backwards)."""
        ...

    def end_offset(self, topic: str) -> int:
        """The offset the next published message will get."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    topic TEXT NOT NULL, offset INTEGER NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (topic, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL, grp TEXT NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, grp)
) WITHOUT ROWID;
"""


class SqliteBroker:
    """The embedded broker: topics and group offsets in one SQLite file."""

    def __init__(self, path: Path, timeout_seconds: float = 30.0):
        self.path = Path(path)
        self._timeout = timeout_seconds
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db().executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise BrokerError(f"{self.path}: cannot open the broker log ({exc})") from None

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    def _tx(self) -> _Transaction:
        return _Transaction(self._db())

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def publish(self, topic: str, messages: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Append the messages in one transaction; returns the topic's new end offset."""
        try:
            with self._tx() as db:
                (end,) = db.execute(
                    "SELECT COALESCE(MAX(offset) + 1, 0) FROM log WHERE topic = ?", (topic,)
                ).fetchone()
                rows = [(topic, end + i, str(k), json.dumps(p)) for i, (k, p) in enumerate(messages)]
                db.executemany("INSERT INTO log VALUES (?, ?, ?, ?)", rows)
                return end + len(rows)
        except (sqlite3.Error, TypeError, ValueError) as exc:
            raise BrokerError(f"{self.path}: cannot publish to {topic!r} ({exc})") from None

    def end_offset(self, topic: str) -> int:
        """The offset the next published message of ``topic`` will get."""
        return self._one("SELECT COALESCE(MAX(offset) + 1, 0) FROM log WHERE topic = ?", (topic,))

    def committed(self, topic: str, group: str) -> int:
        """The group's committed offset (0 if it never committed)."""
        return self._one(
            "SELECT COALESCE((SELECT next_offset FROM offsets WHERE topic = ? AND grp = ?), 0)",
            (topic, group),
        )

    def poll(self, topic: str, group: str, max_messages: int, start: int | None = None) -> list[Message]:
        """Up to ``max_messages`` messages from ``start`` (default: the committed offset), in offset order."""
        first = self.committed(topic, group) if start is None else start
        try:
            rows = (
                self._db()
                .execute(
                    "SELECT offset, key, payload FROM log WHERE topic = ? AND offset >= ? ORDER BY offset LIMIT ?",
                    (topic, first, max_messages),
                )
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise BrokerError(f"{self.path}: cannot read {topic!r} ({exc})") from None
        return [Message(o, k, json.loads(p)) for o, k, p in rows]

    def commit(self, topic: str, group: str, offset: int) -> None:
        """Move the group's offset to ``offset``; moving it backwards is refused."""
        try:
            with self._tx() as db:
                row = db.execute(
                    "SELECT next_offset FROM offsets WHERE topic = ? AND grp = ?", (topic, group)
                ).fetchone()
                if row is not None and offset < row[0]:
                    raise BrokerError(
                        f"{topic!r}/{group!r}: commit {offset} is behind the committed {row[0]}"
                    )
                db.execute(
                    "INSERT INTO offsets VALUES (?, ?, ?) ON CONFLICT (topic, grp) DO UPDATE SET next_offset = ?",
                    (topic, group, offset, offset),
                )
        except sqlite3.Error as exc:
            raise BrokerError(f"{self.path}: cannot commit {topic!r}/{group!r} ({exc})") from None

    def _one(self, sql: str, args: Sequence[Any]) -> int:
        try:
            return int(self._db().execute(sql, args).fetchone()[0])
        except sqlite3.Error as exc:
            raise BrokerError(f"{self.path}: cannot read ({exc})") from None


class _Transaction:
    """``BEGIN IMMEDIATE`` .. ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
