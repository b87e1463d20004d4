"""Score storage: staged Parquet parts, an atomic publish per run date, DuckDB views.

Exactly once per run date: a scoring run writes its partitions into a private staging
folder, and ``commit`` publishes the whole run in one step. A reader of the warehouse sees
either the whole previous run for that date or the whole new one, never a mix and never
half; re-running a date replaces it, it never duplicates.

Layout under ``root`` (the caller's MLOPS_HOME)::

    warehouse.duckdb                          table score_runs, view scores
    .warehouse.lock                           the store's reader/writer lock (flock)
    scores/_staging/<run_id>/_stage.json      which run_date this staging run is for
    scores/_staging/<run_id>/part-00000.parquet ...
    scores/_runs/run_date=D/<run_id>/part-*.parquet   committed runs, immutable
    scores/run_date=D -> _runs/run_date=D/<run_id>    pointer for Hive-style readers

Writing. ``StagedRun.open`` creates the staging folder (sweeping abandoned staging runs of
the same date); ``write_part`` needs only (root, run_date, run_id, index), so Dask workers
call it directly. Each part is written by pyarrow to a temporary name in the staging
folder, fsynced and renamed, so a part is either absent or complete at its final name;
writing an index again replaces it (idempotent retries). DuckDB ``COPY`` is never used for
outputs: killed mid-write it leaves truncated files at their final names.

Publishing. The commit point is one rename of the warehouse file. ``commit`` takes the
store's write lock, renames the staging folder to its immutable run folder, verifies every
expected part (present, readable footer, right row count, one schema), then, in a private
copy of the warehouse, replaces the date's ``score_runs`` row and recreates the ``scores``
view over the explicit list of committed part files in one transaction, checkpoints and
closes the copy, fsyncs it and renames it onto ``warehouse.duckdb``. The published file is
never opened for writing: DuckDB rewrites blocks of its file in place when it checkpoints,
and a process killed in the middle of such a write leaves a block whose checksum fails,
which makes the whole warehouse unreadable. Only after the rename does it swap the
``scores/run_date=D`` symlink (``os.replace`` of a fresh symlink onto the old one, atomic
on POSIX) and sweep the superseded run folder. A crash before the rename publishes nothing
(the orphan run folder and the stray copy are swept later); a crash after it leaves the
warehouse correct and only the derived symlink or the sweep behind, which the next
``sweep`` (run at the start of every run) or commit reconciles from ``score_runs``.

Why an explicit file list and not a glob over the symlinks. Both read the same files, and
``read_parquet('scores/run_date=*/*.parquet', hive_partitioning = true)`` does follow the
directory symlinks in DuckDB 2.0.1 (checked by a test; ``scores/**/*.parquet`` does not
follow them and finds ``_runs`` instead). But a view naming immutable files cannot change
under a reader whatever the timing, keeps the view and ``score_runs`` in one transaction
(one commit point instead of two), and never picks up a stray file.

Readers and the lock. ``.warehouse.lock`` is a reader/writer lock (``flock``): writers
(open, commit, sweep, abort, replay reports) hold it exclusively, ``query`` and
``committed_dates`` shared for one call, so while a store reader runs no writer can swap a
pointer or delete a superseded run folder. The lock belongs to an open file, so threads
of one process exclude each other as processes do. A waiter sleeps in the kernel's
``flock`` queue and is woken when the lock is released, so readers get in between the
commits of a busy writer; after ``lock_timeout`` it gives up with ``WarehouseBusy``. Each
store read attaches the current file in a fresh in-memory DuckDB (``duckdb.connect(path)``
would reuse an instance this process already has open, which may be the file as it was
before the last rename). Other tools may open ``warehouse.duckdb``
read-only at any time and never block a commit: they keep the snapshot they opened, and a
query of theirs over ``scores`` can fail on the files of a date re-scored since (open
again to see it). The file is written by the store only; changes made to it by another
tool are folded in (a write-ahead log left beside it is checkpointed into it under the
write lock) but a tool holding it open read-write races the store. Non-DuckDB readers of
the symlinked layout should resolve ``scores/run_date=D`` once (``os.path.realpath``) and
read from there.

Stale staging runs. A staging run is abandoned when a newer run of the same date is opened
(one live run per date), or when nothing in it changed for ``stale_after`` (other dates,
whose runs may be live in other processes), or when it has no marker (left by a process
killed half-way through building or removing it). Both are swept under the write lock, and
a swept folder is renamed to a hidden name before it is deleted, so a sweep killed half-way
leaves nothing that looks live.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from adapters import duckdb_files, warehouse_query
from mlops.errors import DataError, PlatformError

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_STALE_AFTER",
    "CommitInfo",
    "IncompleteRun",
    "PartInfo",
    "RunRecord",
    "StagedRun",
    "StagingMissing",
    "StorageError",
    "SweepReport",
    "WarehouseBusy",
    "commit",
    "committed_dates",
    "new_run_id",
    "part_name",
    "query",
    "sweep",
    "write_part",
]

log = logging.getLogger(__name__)

WAREHOUSE_FILE = "warehouse.duckdb"
LOCK_FILE = ".warehouse.lock"
_WORK_PREFIX = ".warehouse.duckdb."
_WORK_SUFFIX = ".tmp"
SCORES_DIR = "scores"
STAGING_DIR = "_staging"
RUNS_DIR = "_runs"
STAGE_MARKER = "_stage.json"
PARTITION_KEY = "run_date"

DEFAULT_LOCK_TIMEOUT = 30.0
"""Seconds to wait for the store's lock (held by a writer, or by readers for a writer)."""

DEFAULT_STALE_AFTER = timedelta(hours=6)
"""A staging run of another date with no change for this long is abandoned."""

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PART_NAME = re.compile(r"^part-(\d{5})\.parquet$")
_MAX_PARTS = 100_000

_SCORE_RUNS_DDL = """
CREATE TABLE IF NOT EXISTS score_runs (
    run_date      DATE PRIMARY KEY,
    run_id        VARCHAR NOT NULL,
    model_name    VARCHAR NOT NULL,
    model_version VARCHAR NOT NULL,
    alias         VARCHAR,
    flow_run_id   VARCHAR,
    rows_in       BIGINT NOT NULL,
    rows_out      BIGINT NOT NULL,
    parts         INTEGER NOT NULL,
    bytes         BIGINT NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ NOT NULL,
    phase_seconds JSON NOT NULL,
    committed_at  TIMESTAMPTZ NOT NULL
)
"""

_T = TypeVar("_T")


# --------------------------------------------------------------------------- errors


class StorageError(PlatformError):
    """The score store (its Parquet folders or the DuckDB warehouse) refused an operation."""


class WarehouseBusy(StorageError):
    """Another process kept the warehouse file locked for longer than we may wait."""


class StagingMissing(StorageError):
    """A staging run does not exist: it was never opened, was superseded by a newer run of
    the same date, or was swept as abandoned. Nothing of it was published."""


class IncompleteRun(StorageError):
    """``commit`` found an expected part missing, unreadable, of the wrong row count or of
    another schema; nothing was published and the staging run is left as it was.
    ``problems`` names each part and what is wrong with it."""

    def __init__(self, message: str, problems: Sequence[str]):
        super().__init__(message)
        self.problems = list(problems)

    def __str__(self) -> str:
        head = super().__str__()
        return head + "".join(f"\n  - {p}" for p in self.problems)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PartInfo:
    """One staged part as written (``path`` is in staging): what ``commit`` checks."""

    index: int
    path: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class RunRecord:
    """What the scoring flow knows about its run; ``commit`` adds the rest to score_runs."""

    model_name: str
    model_version: str
    alias: str | None
    flow_run_id: str | None
    rows_in: int
    started_at: datetime
    finished_at: datetime
    phase_seconds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CommitInfo:
    """The run now published for ``run_date``."""

    run_date: date
    run_id: str
    rows_out: int
    parts: int
    bytes: int
    committed_at: datetime
    path: str


@dataclass(frozen=True)
class SweepReport:
    """Paths a sweep removed or repointed (relative to ``<root>/scores``)."""

    removed: tuple[str, ...] = ()
    repointed: tuple[str, ...] = ()


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Layout:
    root: Path

    @classmethod
    def of(cls, root: str | os.PathLike[str]) -> _Layout:
        # One spelling per file: DuckDB caches database instances by path, and two
        # instances of one file in one process would not exclude each other.
        return cls(Path(root).expanduser().resolve())

    @property
    def warehouse(self) -> Path:
        return self.root / WAREHOUSE_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def scores(self) -> Path:
        return self.root / SCORES_DIR

    @property
    def staging(self) -> Path:
        return self.scores / STAGING_DIR

    @property
    def runs(self) -> Path:
        return self.scores / RUNS_DIR

    def stage_dir(self, run_id: str) -> Path:
        return self.staging / run_id

    def run_dir(self, run_date: date, run_id: str) -> Path:
        return self.runs / f"{PARTITION_KEY}={run_date.isoformat()}" / run_id

    def link(self, run_date: date) -> Path:
        return self.scores / f"{PARTITION_KEY}={run_date.isoformat()}"

    @staticmethod
    def link_target(run_date: date, run_id: str) -> str:
        return f"{RUNS_DIR}/{PARTITION_KEY}={run_date.isoformat()}/{run_id}"


def part_name(index: int) -> str:
    """The file name of part ``index``: ``part-00007.parquet``."""
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < _MAX_PARTS:
        raise ValueError(f"part index must be an int in [0, {_MAX_PARTS}), got {index!r}")
    return f"part-{index:05d}.parquet"


def new_run_id() -> str:
    """A fresh, sortable run id such as ``20250301T021500Z-9f2c61aa``."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"run id must be 1-128 characters of letters, digits, '.', '_' or '-' "
            f"starting with a letter or digit, got {run_id!r}"
        )
    return run_id


def _check_date(run_date: date) -> date:
    if not isinstance(run_date, date) or isinstance(run_date, datetime):
        raise TypeError(f"run_date must be a datetime.date, got {run_date!r}")
    return run_date


def _parse_partition(name: str) -> date | None:
    """``run_date=2025-03-01`` -> date(2025, 3, 1); anything else -> None."""
    key, sep, value = name.partition("=")
    if key != PARTITION_KEY or not sep:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


# --------------------------------------------------------------------------- file system


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Delete ``path`` (a folder, file or symlink); already gone is fine."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass


def _discard(entry: Path) -> None:
    """Remove a staging folder so that a kill half-way leaves only a dot-named leftover.

    It is renamed to a hidden name first (one atomic step), then deleted; a sweep that dies
    while deleting leaves a folder every later sweep recognises as abandoned, never a
    marker-less folder that looks like a live run.
    """
    if entry.name.startswith("."):
        _remove_tree(entry)
        return
    hidden = entry.with_name(f".{entry.name}.{uuid.uuid4().hex}.removed")
    try:
        os.rename(entry, hidden)
    except FileNotFoundError:
        return
    _remove_tree(hidden)


def _write_json_atomic(path: Path, data: Mapping[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_marker(stage_dir: Path) -> dict[str, str] | None:
    try:
        with open(stage_dir / STAGE_MARKER, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _last_change(path: Path) -> float:
    """Newest mtime of a folder and its direct entries (parts land there)."""
    newest = path.lstat().st_mtime
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _point(link: Path, target: str) -> bool:
    """Make ``link`` a symlink to ``target`` with one atomic rename; True if it changed."""
    if link.is_symlink() and os.readlink(link) == target:
        return False
    if link.exists() and not link.is_symlink():
        raise StorageError(f"{link} is a real folder, not a pointer to a committed run")
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)
    return True


# --------------------------------------------------------------------------- warehouse


def _retrying(path: Path, timeout: float, open_: Callable[[], _T]) -> _T:
    """``open_()``, waiting while another process holds DuckDB's own lock on ``path``."""
    try:
        return duckdb_files.open_waiting(open_, timeout)
    except duckdb_files.StillLocked as exc:
        raise WarehouseBusy(f"warehouse {path} stayed locked for {timeout:.1f}s: {exc}") from exc
    except duckdb.Error as exc:
        raise StorageError(f"cannot open warehouse {path}: {exc}") from exc


def _flock(fd: int, mode: int, timeout: float) -> bool:
    """Take ``flock`` ``mode`` on ``fd``, waiting up to ``timeout`` s; whether it was taken.

    The wait is a blocking ``flock`` in a helper thread, not a poll: the kernel wakes a
    waiter the moment the lock is released, so a reader gets in between two commits of a
    busy writer instead of probing at random and starving. If the time runs out first,
    the helper gives the lock back as soon as it gets it.
    """
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if timeout <= 0:
            return False
    waiter_fd = os.dup(fd)  # same open file: a lock it takes is held through ``fd`` too
    decided = threading.Lock()
    taken = threading.Event()
    abandoned = False

    def wait() -> None:
        try:
            fcntl.flock(waiter_fd, mode)
            with decided:
                if abandoned:
                    fcntl.flock(waiter_fd, fcntl.LOCK_UN)
                else:
                    taken.set()
        finally:
            os.close(waiter_fd)

    threading.Thread(target=wait, name="warehouse-lock-wait", daemon=True).start()
    taken.wait(timeout)
    with decided:
        if taken.is_set():
            return True
        abandoned = True
        return False


@contextmanager
def _store_lock(layout: _Layout, *, exclusive: bool, timeout: float) -> Iterator[None]:
    """The store's reader/writer lock: ``flock`` on ``.warehouse.lock`` beside the file.

    Writers hold it exclusively, the store's own readers shared. ``flock`` locks belong to
    an open file, so two threads of one process exclude each other like two processes do.
    """
    layout.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.lock, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        if not _flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, timeout):
            holder = "readers or another writer" if exclusive else "a writer"
            raise WarehouseBusy(f"warehouse {layout.warehouse} stayed locked by {holder} for {timeout:.1f}s")
        yield
    finally:
        os.close(fd)  # releases the lock


class _WorkingCopy:
    """A private copy of the warehouse that a writer changes and then publishes whole.

    DuckDB rewrites some blocks of its file in place when it checkpoints, and a process
    killed in the middle of such a write leaves a block whose checksum no longer matches:
    the whole warehouse becomes unreadable. So the published file is never opened for
    writing: a writer copies it, changes the copy, checkpoints and closes it (no WAL
    left), fsyncs it and renames it onto the published name. A kill at any point leaves
    the previous file intact and at worst a stray copy, which the next writer deletes.
    """

    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        self.path = layout.root / f"{_WORK_PREFIX}{uuid.uuid4().hex}{_WORK_SUFFIX}"
        if layout.warehouse.exists():
            shutil.copyfile(layout.warehouse, self.path)
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
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.path, self.layout.warehouse)
        self.published = True
        _fsync_dir(self.layout.root)

    def discard(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        for path in (self.path, _wal(self.path)):
            path.unlink(missing_ok=True)


def _wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _settle(layout: _Layout, timeout: float) -> None:
    """Under the write lock: drop working copies of killed writers and fold a WAL that
    the published file still has (a warehouse written in place by an older release, or
    by another tool) into it, so that a copy of the file alone is the whole warehouse."""
    for entry in layout.root.glob(f"{_WORK_PREFIX}*{_WORK_SUFFIX}*"):
        entry.unlink(missing_ok=True)
    if _wal(layout.warehouse).exists():
        con = _retrying(layout.warehouse, timeout, lambda: duckdb.connect(str(layout.warehouse)))
        try:
            con.execute("CHECKPOINT")
        finally:
            con.close()


@contextmanager
def _writer(layout: _Layout, timeout: float) -> Iterator[_WorkingCopy]:
    """The warehouse's write lock and a working copy of it, published on a clean exit.

    A caller that must publish before doing more (``commit`` publishes, then sweeps what
    the new state supersedes) calls ``publish()`` itself; an exception discards the copy
    and leaves the published warehouse as it was.
    """
    deadline = time.monotonic() + timeout
    with _store_lock(layout, exclusive=True, timeout=timeout):
        _settle(layout, max(0.0, deadline - time.monotonic()))
        try:
            work = _WorkingCopy(layout)
        except duckdb.Error as exc:
            raise StorageError(f"cannot open warehouse {layout.warehouse}: {exc}") from exc
        try:
            work.con.execute(_SCORE_RUNS_DDL)
            work.con.execute(
                "CREATE VIEW IF NOT EXISTS scores AS "
                f"SELECT CAST(NULL AS DATE) AS {PARTITION_KEY} WHERE false"
            )
            yield work
            if not work.published:
                work.publish()
        except duckdb.Error as exc:
            raise StorageError(f"warehouse {layout.warehouse}: {exc}") from exc
        finally:
            work.discard()


def _attach_read_only(path: Path) -> duckdb.DuckDBPyConnection:
    # A fresh in-memory instance that attaches the file: duckdb.connect(path) would hand
    # back a database instance this process already has open on that path, which may be
    # the file as it was before the last publish (a rename does not reach open files).
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH {_sql_str(str(path))} AS warehouse (READ_ONLY)")
        con.execute("USE warehouse")
    except BaseException:
        con.close()
        raise
    return con


@contextmanager
def _reader(layout: _Layout, timeout: float) -> Iterator[duckdb.DuckDBPyConnection]:
    if not layout.warehouse.exists():
        raise DataError(f"no warehouse at {layout.warehouse}: nothing has been committed yet")
    deadline = time.monotonic() + timeout
    with _store_lock(layout, exclusive=False, timeout=timeout):
        con = _retrying(
            layout.warehouse,
            max(0.0, deadline - time.monotonic()),
            lambda: _attach_read_only(layout.warehouse),
        )
        try:
            yield con
        except duckdb.Error as exc:
            raise DataError(f"query on {layout.warehouse} failed: {exc}") from exc
        finally:
            con.close()


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _scores_view_sql(files: Sequence[str]) -> str:
    """The DDL of the ``scores`` view over exactly ``files`` (run_date from their paths)."""
    if not files:
        return f"CREATE OR REPLACE VIEW scores AS SELECT CAST(NULL AS DATE) AS {PARTITION_KEY} WHERE false"
    listing = ", ".join(_sql_str(f) for f in files)
    return (
        f"CREATE OR REPLACE VIEW scores AS SELECT * FROM read_parquet([{listing}], "
        f"hive_partitioning = true, hive_types = {{'{PARTITION_KEY}': DATE}}, "
        "union_by_name = true)"
    )


def _published(con: duckdb.DuckDBPyConnection) -> dict[date, tuple[str, int]]:
    rows = con.execute("SELECT run_date, run_id, parts FROM score_runs ORDER BY run_date")
    return {d: (run_id, parts) for d, run_id, parts in rows.fetchall()}


def _rebuild_view(con: duckdb.DuckDBPyConnection, layout: _Layout) -> dict[date, tuple[str, int]]:
    """Recreate ``scores`` over the part files of ``score_runs``; the runs it was built from."""
    published = _published(con)
    files = [
        str(layout.run_dir(d, run_id) / part_name(i))
        for d, (run_id, parts) in published.items()
        for i in range(parts)
    ]
    con.execute(_scores_view_sql(files))
    return published


# --------------------------------------------------------------------------- staging


@dataclass(frozen=True)
class StagedRun:
    """A scoring run's private staging folder; picklable, so it can travel to workers."""

    root: Path
    run_date: date
    run_id: str

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        run_date: date,
        run_id: str,
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> StagedRun:
        """Create (or reopen) the staging folder of ``run_id`` for ``run_date``.

        Staging runs of the same date left by killed or abandoned runs are swept first: one
        run per date is live at a time, the newest. Reopening a staging run keeps the parts
        it has. Opening a run id that stages another date, or that is the committed run of
        the date, is an error.
        """
        layout = _Layout.of(root)
        _check_date(run_date)
        _check_run_id(run_id)
        stage_dir = layout.stage_dir(run_id)
        with _writer(layout, lock_timeout) as work:
            published = _published(work.con)
            if published.get(run_date, ("",))[0] == run_id:
                raise StorageError(
                    f"run {run_id} is already the committed run of {run_date}; use a new run id"
                )
            _reconcile(published, layout, strict=False, supersede=run_date, keep=run_id)
            marker = _read_marker(stage_dir)
            if marker is not None:
                if marker.get("run_date") != run_date.isoformat():
                    raise StorageError(f"run {run_id} is staging {marker.get('run_date')}, not {run_date}")
            else:
                # Build the folder with its marker aside, then rename: every staging
                # folder a sweeper sees says which date it belongs to.
                layout.staging.mkdir(parents=True, exist_ok=True)
                tmp = layout.staging / f".{run_id}.{uuid.uuid4().hex}.tmp"
                tmp.mkdir()
                _write_json_atomic(tmp / STAGE_MARKER, _marker(run_date, run_id))
                _remove_tree(stage_dir)  # a marker-less leftover of the same id
                os.rename(tmp, stage_dir)
                _fsync_dir(layout.staging)
        return cls(layout.root, run_date, run_id)

    def write_part(self, index: int, table: pa.Table, *, distinct_columns: Sequence[str] = ()) -> PartInfo:
        """Write part ``index`` atomically; see the module function ``write_part``."""
        return write_part(
            self.root, self.run_date, self.run_id, index, table, distinct_columns=distinct_columns
        )

    def commit(
        self,
        expected_parts: Iterable[PartInfo],
        run_record: RunRecord,
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> CommitInfo:
        """Publish this run; see the module function ``commit``."""
        return commit(
            self.root,
            self.run_date,
            self.run_id,
            expected_parts,
            run_record,
            lock_timeout=lock_timeout,
        )

    def abort(self, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        """Drop this staging run; what is published for the date stays as it is."""
        layout = _Layout.of(self.root)
        with _writer(layout, lock_timeout):
            _remove_tree(layout.stage_dir(self.run_id))


def _dictionary_columns(table: pa.Table, distinct_columns: Sequence[str]) -> bool | list[str]:
    """``use_dictionary`` for pyarrow: every column of ``table`` but ``distinct_columns``."""
    if not distinct_columns:
        return True
    skip = set(distinct_columns)
    return [name for name in table.column_names if name not in skip]


def write_part(
    root: str | os.PathLike[str],
    run_date: date,
    run_id: str,
    index: int,
    table: pa.Table,
    *,
    distinct_columns: Sequence[str] = (),
) -> PartInfo:
    """Write ``table`` as part ``index`` of a staging run, atomically and durably.

    pyarrow writes a temporary file in the staging folder, which is fsynced and renamed to
    ``part-<index>.parquet``, so the part is either absent or complete under its name.
    Writing the same index again replaces the part (safe for task retries). Needs no
    warehouse lock, so any process may call it once ``StagedRun.open`` has run.

    ``distinct_columns`` names columns whose values are (nearly) all different, such as row
    ids and event times: they are written without Parquet's dictionary encoding, which
    pyarrow would otherwise build for every column and abandon for these once it outgrows
    its page, at a cost of about a quarter of the write. Other columns keep it.
    """
    layout = _Layout.of(root)
    _check_date(run_date)
    _check_run_id(run_id)
    name = part_name(index)
    if not isinstance(table, pa.Table):
        raise TypeError(f"a part must be a pyarrow.Table, got {type(table).__name__}")
    if PARTITION_KEY in table.column_names:
        raise DataError(f"a scores part must not have a {PARTITION_KEY!r} column: it comes from the folder")
    stage_dir = layout.stage_dir(run_id)
    marker = _read_marker(stage_dir)
    if marker is None or marker.get("run_date") != run_date.isoformat():
        raise StagingMissing(
            f"no staging run {run_id} for {run_date} under {layout.staging} "
            "(never opened, superseded by a newer run of that date, or swept)"
        )
    final = stage_dir / name
    tmp = stage_dir / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, use_dictionary=_dictionary_columns(table, distinct_columns))
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, final)
        _fsync_dir(stage_dir)
    except FileNotFoundError as exc:
        _remove_tree(tmp)
        raise StagingMissing(f"staging run {run_id} disappeared while writing {name}") from exc
    except OSError as exc:
        _remove_tree(tmp)
        raise StorageError(f"cannot write {final}: {exc}") from exc
    except BaseException:
        _remove_tree(tmp)
        raise
    return PartInfo(index=index, path=str(final), rows=table.num_rows, bytes=size)


# --------------------------------------------------------------------------- commit


def _expected_by_index(expected_parts: Iterable[PartInfo]) -> dict[int, PartInfo]:
    by_index: dict[int, PartInfo] = {}
    for part in expected_parts:
        if part.index in by_index:
            raise ValueError(f"part {part.index} is listed twice")
        by_index[part.index] = part
    if not by_index:
        raise ValueError("a run needs at least one part (write an empty one for no rows)")
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"part indices must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
    return by_index


def _verify(run_dir: Path, expected: Mapping[int, PartInfo]) -> tuple[int, int, list[str]]:
    """Rows, bytes and the problems of the expected parts in ``run_dir``."""
    problems: list[str] = []
    rows = size = 0
    schema: pa.Schema | None = None
    for index, part in sorted(expected.items()):
        path = run_dir / part_name(index)
        try:
            meta = pq.read_metadata(path)
            part_schema = meta.schema.to_arrow_schema().remove_metadata()
            size += path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path.name}: missing")
            continue
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{path.name}: unreadable ({exc})")
            continue
        if meta.num_rows != part.rows:
            problems.append(f"{path.name}: {meta.num_rows} rows, expected {part.rows}")
        if schema is None:
            schema = part_schema
        elif not part_schema.equals(schema):
            problems.append(f"{path.name}: schema differs from part-00000")
        rows += meta.num_rows
    return rows, size, problems


def _unstage(layout: _Layout, run_date: date, run_id: str) -> None:
    """Give an unpublished run folder back to staging, marker included, for a retry."""
    stage_dir = layout.stage_dir(run_id)
    os.rename(layout.run_dir(run_date, run_id), stage_dir)
    if _read_marker(stage_dir) is None:
        _write_json_atomic(stage_dir / STAGE_MARKER, _marker(run_date, run_id))


def _marker(run_date: date, run_id: str) -> dict[str, str]:
    return {
        "run_date": run_date.isoformat(),
        "run_id": run_id,
        "opened_at": datetime.now(UTC).isoformat(),
    }


def _as_utc(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC)


def commit(
    root: str | os.PathLike[str],
    run_date: date,
    run_id: str,
    expected_parts: Iterable[PartInfo],
    run_record: RunRecord,
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> CommitInfo:
    """Publish a staged run as *the* run of ``run_date``, all at once.

    Under the warehouse write lock: the staging folder becomes the immutable run folder;
    every expected part must be there, readable, of its row count and of one schema
    (``IncompleteRun`` otherwise, and the folder goes back to staging untouched); one
    transaction replaces the date's ``score_runs`` row and recreates the ``scores`` view;
    then the ``scores/run_date=D`` pointer is swapped and superseded runs and abandoned
    staging runs of the date are swept. Committing again a run that is already the
    published one returns its ``CommitInfo`` (safe for task retries).
    """
    layout = _Layout.of(root)
    _check_date(run_date)
    _check_run_id(run_id)
    expected = _expected_by_index(expected_parts)
    started_at = _as_utc(run_record.started_at, "started_at")
    finished_at = _as_utc(run_record.finished_at, "finished_at")
    phase_seconds = json.dumps({str(k): float(v) for k, v in run_record.phase_seconds.items()})
    stage_dir = layout.stage_dir(run_id)
    run_dir = layout.run_dir(run_date, run_id)

    with _writer(layout, lock_timeout) as work:
        con = work.con
        row = con.execute(
            "SELECT run_id, rows_out, parts, bytes, committed_at FROM score_runs WHERE run_date = ?",
            [run_date],
        ).fetchall()
        if row and row[0][0] == run_id:
            _, rows_out, parts, size, committed_at = row[0]
            _reconcile(_published(con), layout, strict=False, supersede=run_date, keep=None)
            return CommitInfo(run_date, run_id, rows_out, parts, size, committed_at, str(run_dir))

        marker = _read_marker(stage_dir)
        if marker is not None:
            if marker.get("run_date") != run_date.isoformat():
                raise StorageError(f"run {run_id} staged {marker.get('run_date')}, not {run_date}")
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            _remove_tree(run_dir)  # unpublished leftover of an earlier, killed commit
            os.rename(stage_dir, run_dir)
            _fsync_dir(layout.staging)
            _fsync_dir(run_dir.parent)
        elif not run_dir.is_dir():
            raise StagingMissing(
                f"no staging run {run_id} for {run_date} under {layout.staging} "
                "(never opened, superseded by a newer run of that date, or swept)"
            )
        # From here on no worker can write into the run: its folder left staging.

        rows_out, size, problems = _verify(run_dir, expected)
        if problems:
            _unstage(layout, run_date, run_id)
            raise IncompleteRun(f"run {run_id} for {run_date} is incomplete", problems)
        for entry in run_dir.iterdir():
            match = _PART_NAME.fullmatch(entry.name)
            if match is None or int(match.group(1)) not in expected:
                _remove_tree(entry)  # temp files of late retries, surplus parts

        committed_at = datetime.now(UTC)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM score_runs WHERE run_date = ?", [run_date])
            con.execute(
                "INSERT INTO score_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?::JSON, ?)",
                [
                    run_date,
                    run_id,
                    run_record.model_name,
                    str(run_record.model_version),
                    run_record.alias,
                    run_record.flow_run_id,
                    int(run_record.rows_in),
                    rows_out,
                    len(expected),
                    size,
                    started_at,
                    finished_at,
                    phase_seconds,
                    committed_at,
                ],
            )
            published = _rebuild_view(con, layout)
            con.execute("COMMIT")
            work.publish()  # the commit point: one rename of the warehouse file
        except BaseException:
            if not work.published:
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error as exc:  # ended by the failed statement, or committed
                    log.debug("rollback after a failed commit of %s: %s", run_id, exc)
                _unstage(layout, run_date, run_id)
            raise
        # Published. What follows only derives from score_runs; a failure is repaired by
        # the next sweep and must not make the caller retry a commit that happened.
        try:
            _reconcile(published, layout, strict=False, supersede=run_date, keep=None)
        except (OSError, StorageError) as exc:
            log.warning("run %s of %s is committed; cleanup failed: %s", run_id, run_date, exc)
        return CommitInfo(run_date, run_id, rows_out, len(expected), size, committed_at, str(run_dir))


# --------------------------------------------------------------------------- sweep


def _abandoned(entry: Path, *, supersede: date | None, stale_after: timedelta, now: float) -> bool:
    """Whether a staging folder belongs to no live run (see the module docstring)."""
    if entry.name.startswith("."):
        # Half built by an open() that died, or half removed by a sweep that died: opens
        # and sweeps hold the write lock, as do we.
        return True
    marker = _read_marker(entry)
    if marker is None:
        # Every live staging folder has its marker: open() renames it into place with
        # one, and _unstage() writes it back under the write lock we hold. A folder
        # without one was left by a process killed between those steps.
        return True
    if supersede is not None:
        if marker.get("run_date") == supersede.isoformat():
            return True
    try:
        idle = now - _last_change(entry)
    except (FileNotFoundError, NotADirectoryError):
        return True
    return idle >= stale_after.total_seconds()


def _reconcile(
    published: Mapping[date, tuple[str, int]],
    layout: _Layout,
    *,
    strict: bool,
    supersede: date | None,
    keep: str | None,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
) -> SweepReport:
    """Make the folders agree with ``published`` (score_runs as the caller just published
    or found it); the caller holds the write lock.

    Pointers are set to the published runs first, then every run folder that is not
    published is deleted (superseded runs, orphans of killed commits), then abandoned
    staging runs other than ``keep``; staging runs of ``supersede`` count as abandoned.
    ``strict`` raises on a pointer that cannot be set instead of logging it.
    """
    removed: list[str] = []
    repointed: list[str] = []
    layout.scores.mkdir(parents=True, exist_ok=True)

    for run_date, (run_id, _) in published.items():
        link = layout.link(run_date)
        try:
            if _point(link, layout.link_target(run_date, run_id)):
                repointed.append(link.name)
        except StorageError:
            if strict:
                raise
            log.warning("%s is not a pointer; left as it is", link)
    for entry in layout.scores.iterdir():
        name = entry.name
        if name.startswith(f".{PARTITION_KEY}=") and name.endswith(".tmp"):
            _remove_tree(entry)  # the new symlink of a swap that was killed
            removed.append(name)
        elif entry.is_symlink():
            run_date = _parse_partition(name)
            if run_date is not None and run_date not in published:
                _remove_tree(entry)
                removed.append(name)

    if layout.runs.is_dir():
        for date_dir in sorted(layout.runs.iterdir()):
            run_date = _parse_partition(date_dir.name)
            keep_run = published[run_date][0] if run_date in published else None
            if date_dir.is_dir() and not date_dir.is_symlink():
                for run_dir in sorted(date_dir.iterdir()):
                    if run_dir.name != keep_run:
                        _remove_tree(run_dir)
                        removed.append(str(run_dir.relative_to(layout.scores)))
            if keep_run is None:
                _remove_tree(date_dir)

    if layout.staging.is_dir():
        now = time.time()
        for entry in sorted(layout.staging.iterdir()):
            if entry.name != keep and _abandoned(
                entry, supersede=supersede, stale_after=stale_after, now=now
            ):
                _discard(entry)
                removed.append(str(entry.relative_to(layout.scores)))
    return SweepReport(tuple(removed), tuple(repointed))


def sweep(
    root: str | os.PathLike[str],
    *,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> SweepReport:
    """Repair and tidy the score store; run it at the start of every scoring run.

    Recreates the ``scores`` view from ``score_runs`` (so a moved MLOPS_HOME heals), points
    every ``scores/run_date=D`` at its published run, and deletes what no reader can see:
    superseded and orphaned run folders, leftovers of killed swaps, and staging runs with
    no change for ``stale_after``. Creates the warehouse if there is none.
    """
    layout = _Layout.of(root)
    with _writer(layout, lock_timeout) as work:
        published = _rebuild_view(work.con, layout)
        work.publish()
        return _reconcile(published, layout, strict=True, supersede=None, keep=None, stale_after=stale_after)


# --------------------------------------------------------------------------- readers


def query(
    root: str | os.PathLike[str],
    sql: str,
    params: Sequence[object] | None = None,
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> pa.Table:
    """Run ``sql`` on the warehouse opened read-only, returning the whole result as Arrow.

    ``scores`` (every committed run, with ``run_date``) and ``score_runs`` are there. Only
    one read statement is accepted, and it runs confined to the store's files
    (``adapters.warehouse_query``). The connection lives for this call only, so writers are
    kept waiting no longer.
    """
    sql = warehouse_query.check_read_only(sql)
    layout = _Layout.of(root)
    with _reader(layout, lock_timeout) as con:
        warehouse_query.confine(con, [layout.scores])
        return warehouse_query.run(con, sql, params)


def committed_dates(
    root: str | os.PathLike[str], *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> list[date]:
    """The run dates that have a committed run, ascending (what a backfill may skip)."""
    layout = _Layout.of(root)
    if not layout.warehouse.exists():
        return []
    with _reader(layout, lock_timeout) as con:
        has_table = con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'score_runs'"
        ).fetchall()[0][0]
        if not has_table:
            return []
        rows = con.execute("SELECT run_date FROM score_runs ORDER BY run_date").fetchall()
        return [d for (d,) in rows]
