"""DuckDB files under MLOPS_HOME written copy-on-write, read under a lock.

``warehouse.duckdb`` (and any other file kept this way, e.g. the edge telemetry store) is
never opened for writing in place. A writer takes the store's
write lock, copies the file, changes the copy, checkpoints and closes it, fsyncs it and
renames it onto the published name (one atomic step). A reader takes the lock shared and
attaches the current file read-only in a fresh in-memory DuckDB. See
docs/design/score-store.md for why.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb

from adapters import duckdb_files, rwlock
from adapters.files import fsync_dir, fsync_file
from mlops.errors import DataError, PlatformError

__all__ = [
    "LOCK_FILE",
    "WAREHOUSE_FILE",
    "StorageError",
    "Warehouse",
    "WarehouseBusy",
    "WorkingCopy",
    "attach_read_only",
    "sql_literal",
]

WAREHOUSE_FILE = "warehouse.duckdb"
LOCK_FILE = ".warehouse.lock"
_WORK_SUFFIX = ".tmp"

_T = TypeVar("_T")


class StorageError(PlatformError):
    """The score store (its Parquet folders or the DuckDB warehouse) refused an operation."""


class WarehouseBusy(StorageError):
    """Another process kept the warehouse file locked for longer than we may wait."""


def attach_read_only(path: Path) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB with the file at ``path`` attached read-only as the default
    database (close it when done); a ``duckdb.Error`` if the file cannot be attached.

    ``duckdb.connect(path)`` would hand back an instance this process already has open on
    that path, which may be the file as it was before the last publish (a rename does not
    reach open files).
    """
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH {sql_literal(str(path))} AS warehouse (READ_ONLY)")
        con.execute("USE warehouse")
    except BaseException:
        con.close()
        raise
    return con


def sql_literal(text: str) -> str:
    """``text`` as a single-quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


class WorkingCopy:
    """A private copy of the warehouse that a writer changes and then publishes whole.

    A kill at any point leaves the previous file intact and at worst a stray copy, which
    the next writer deletes.
    """

    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse
        self.path = warehouse.root / f"{warehouse.work_prefix}{uuid.uuid4().hex}{_WORK_SUFFIX}"
        if warehouse.path.exists():
            shutil.copyfile(warehouse.path, self.path)
        self._con: duckdb.DuckDBPyConnection | None = duckdb.connect(str(self.path))
        self.published = False

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The working copy, open read-write until ``publish``."""
        if self._con is None:
            raise StorageError(f"{self.path} was published or discarded; it is closed")
        return self._con

    def publish(self) -> None:
        """Make this copy the warehouse (one rename); the connection is closed."""
        con, self._con = self.con, None
        try:
            con.execute("CHECKPOINT")
        finally:
            con.close()
        if _wal(self.path).exists():
            raise StorageError(f"{self.path} kept a write-ahead log after closing; not published")
        fsync_file(self.path)
        os.replace(self.path, self.warehouse.path)
        self.published = True
        fsync_dir(self.warehouse.root)

    def discard(self) -> None:
        """Close and delete the copy if it was not published."""
        if self._con is not None:
            self._con.close()
            self._con = None
        for path in (self.path, _wal(self.path)):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Warehouse:
    """DuckDB file ``name`` (default ``warehouse.duckdb``) and its lock file in folder ``root``."""

    root: Path
    name: str = WAREHOUSE_FILE

    @classmethod
    def at(cls, root: str | os.PathLike[str], name: str = WAREHOUSE_FILE) -> Warehouse:
        """The file ``name`` of ``root``, spelled one way (DuckDB caches instances by path)."""
        return cls(Path(root).expanduser().resolve(), name)

    @property
    def path(self) -> Path:
        """The published file."""
        return self.root / self.name

    @property
    def lock(self) -> Path:
        """The reader/writer lock file beside it (``.warehouse.lock`` for the warehouse)."""
        return self.root / f".{self.name.removesuffix('.duckdb')}.lock"

    @property
    def work_prefix(self) -> str:
        """How the names of working copies begin (``.warehouse.duckdb.``)."""
        return f".{self.name}."

    @contextmanager
    def _locked(self, *, exclusive: bool, timeout: float) -> Iterator[None]:
        try:
            with rwlock.locked(self.lock, exclusive=exclusive, timeout=timeout):
                yield
        except rwlock.LockTimeout as exc:
            holder = "readers or another writer" if exclusive else "a writer"
            raise WarehouseBusy(
                f"warehouse {self.path} stayed locked by {holder} for {timeout:.1f}s"
            ) from exc

    def _retrying(self, timeout: float, open_: Callable[[], _T]) -> _T:
        try:
            return duckdb_files.open_waiting(open_, timeout)
        except duckdb_files.StillLocked as exc:
            raise WarehouseBusy(f"warehouse {self.path} stayed locked for {timeout:.1f}s: {exc}") from exc
        except duckdb.Error as exc:
            raise StorageError(f"cannot open warehouse {self.path}: {exc}") from exc

    def _settle(self, timeout: float) -> None:
        """Under the write lock: drop working copies of killed writers and fold a WAL the
        published file still has into it, so that a copy of the file alone is the whole
        warehouse."""
        for entry in self.root.glob(f"{self.work_prefix}*{_WORK_SUFFIX}*"):
            entry.unlink(missing_ok=True)
        if _wal(self.path).exists():
            con = self._retrying(timeout, lambda: duckdb.connect(str(self.path)))
            try:
                con.execute("CHECKPOINT")
            finally:
                con.close()

    @contextmanager
    def writer(self, timeout: float, ddl: Sequence[str] = ()) -> Iterator[WorkingCopy]:
        """The write lock and a working copy (``ddl`` run on it first), published on a clean exit.

        A caller that must publish before doing more calls ``publish()`` itself; an
        exception discards the copy and leaves the published warehouse as it was.
        """
        deadline = time.monotonic() + timeout
        with self._locked(exclusive=True, timeout=timeout):
            self._settle(max(0.0, deadline - time.monotonic()))
            try:
                work = WorkingCopy(self)
            except duckdb.Error as exc:
                raise StorageError(f"cannot open warehouse {self.path}: {exc}") from exc
            try:
                for statement in ddl:
                    work.con.execute(statement)
                yield work
                if not work.published:
                    work.publish()
            except duckdb.Error as exc:
                raise StorageError(f"warehouse {self.path}: {exc}") from exc
            finally:
                work.discard()

    @contextmanager
    def reader(self, timeout: float) -> Iterator[duckdb.DuckDBPyConnection]:
        """The lock shared and a read-only connection to the current file for the block.

        A DuckDB error inside the block becomes a ``DataError``.
        """
        if not self.path.exists():
            raise DataError(f"no warehouse at {self.path}: nothing has been committed yet")
        deadline = time.monotonic() + timeout
        with self._locked(exclusive=False, timeout=timeout):
            con = self._retrying(max(0.0, deadline - time.monotonic()), lambda: attach_read_only(self.path))
            try:
                yield con
            except duckdb.Error as exc:
                raise DataError(f"query on {self.path} failed: {exc}") from exc
            finally:
                con.close()
