"""Score store: staged Parquet parts, an atomic publish per run date, DuckDB views.

Exactly once per run date: a scoring run writes its partitions into a private staging
folder, and ``commit`` publishes the whole run in one step; a reader sees the whole
previous run of a date or the whole new one, never a mix. Layout under ``root``::

    warehouse.duckdb                          tables score_runs, score_schemas, views scores, scores_on(d)
    scores/_staging/<run_id>/part-*.parquet   staging runs (with _stage.json)
    scores/_runs/run_date=D/<run_id>/         committed runs, immutable, with _manifest.json
    scores/run_date=D -> _runs/run_date=D/<run_id>    pointer for Hive-style readers

The warehouse file and its lock are ``adapters.warehouse``; the design (commit point,
pointers, sweeping, the lock) is in docs/design/score-store.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from adapters import warehouse_query
from adapters.files import fsync_dir
from adapters.warehouse import (
    LOCK_FILE,
    WAREHOUSE_FILE,
    StorageError,
    Warehouse,
    WarehouseBusy,
    WorkingCopy,
    attach_read_only,
    sql_literal,
)
from mlops.errors import DataError
from mlops.settings import QueryConfig

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_STALE_AFTER",
    "CommitInfo",
    "LOCK_FILE",
    "MANIFEST",
    "WAREHOUSE_FILE",
    "IncompleteRun",
    "PartInfo",
    "RunRecord",
    "SchemaConflict",
    "ScoreLayout",
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
    "read_manifest",
    "reader",
    "rebuild",
    "sweep",
    "write_part",
    "writer",
]

log = logging.getLogger(__name__)

SCORES_DIR = "scores"
STAGING_DIR = "_staging"
RUNS_DIR = "_runs"
PENDING_DIR = "_pending"
STAGE_MARKER = "_stage.json"
MANIFEST = "_manifest.json"
PARTITION_KEY = "run_date"

MANIFEST_FORMAT = 2
"""The store format a commit writes. 1: parts hold plain columns. 2: parts may hold string
columns dictionary-encoded (batch scoring's constant provenance columns), which readers
see as strings (DuckDB; ``logical_schema`` for the commit's schema checks)."""
MANIFEST_FORMATS = (1, 2)
"""Formats this version reads (``read_manifest``, ``rebuild``)."""

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

_SCORE_SCHEMAS_DDL = """
CREATE TABLE IF NOT EXISTS score_schemas (
    run_date    DATE PRIMARY KEY,
    fingerprint VARCHAR NOT NULL,
    columns     JSON NOT NULL
)
"""
"""The logical schema of each committed run, as ``[[name, type], ...]`` and a fingerprint of
that list: what the views need (one schema, or several read by name) and what a commit's
type check compares against, without reading a footer of every date."""

# --------------------------------------------------------------------------- errors

# StorageError and WarehouseBusy come from adapters.warehouse (re-exported here).


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


class SchemaConflict(IncompleteRun):
    """``commit`` found a column that a committed run of another date also has, with another
    logical type; nothing was published and the staging run is left as it was. The message
    is one line naming the column and both types."""

    def __str__(self) -> str:
        return Exception.__str__(self)


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
class ScoreLayout:
    """Where the score store keeps what under ``root`` (the caller's MLOPS_HOME)."""

    root: Path

    @classmethod
    def of(cls, root: str | os.PathLike[str]) -> ScoreLayout:
        """The layout of ``root``, spelled one way (DuckDB caches instances by path)."""
        return cls(Warehouse.at(root).root)

    @property
    def warehouse(self) -> Warehouse:
        """The DuckDB warehouse file and its lock."""
        return Warehouse(self.root)

    @property
    def scores(self) -> Path:
        """The folder of staging runs, committed runs and date pointers."""
        return self.root / SCORES_DIR

    @property
    def staging(self) -> Path:
        """The folder of staging runs."""
        return self.scores / STAGING_DIR

    @property
    def runs(self) -> Path:
        """The folder of committed runs, one folder per date."""
        return self.scores / RUNS_DIR

    @property
    def pending(self) -> Path:
        """The folder of dates whose folders a commit may have left untidy (one empty file each)."""
        return self.scores / PENDING_DIR

    def stage_dir(self, run_id: str) -> Path:
        """The staging folder of ``run_id``."""
        return self.staging / run_id

    def date_dir(self, run_date: date) -> Path:
        """The folder of the committed runs of ``run_date``."""
        return self.runs / f"{PARTITION_KEY}={run_date.isoformat()}"

    def run_dir(self, run_date: date, run_id: str) -> Path:
        """The folder of committed run ``run_id`` of ``run_date``."""
        return self.date_dir(run_date) / run_id

    def link(self, run_date: date) -> Path:
        """The Hive-style pointer ``scores/run_date=D`` to the published run of the date."""
        return self.scores / f"{PARTITION_KEY}={run_date.isoformat()}"

    @staticmethod
    def link_target(run_date: date, run_id: str) -> str:
        """What the pointer of ``run_date`` holds when ``run_id`` is published."""
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


def _mark_pending(layout: ScoreLayout, run_date: date) -> None:
    """Note that the folders of ``run_date`` are about to change (a sweep tidies them)."""
    layout.pending.mkdir(parents=True, exist_ok=True)
    entry = layout.pending / f"{PARTITION_KEY}={run_date.isoformat()}"
    if not entry.exists():
        entry.touch()
        fsync_dir(layout.pending)


def _pending_dates(layout: ScoreLayout) -> list[date]:
    if not layout.pending.is_dir():
        return []
    return sorted(d for d in (_parse_partition(e.name) for e in layout.pending.iterdir()) if d is not None)


def _clear_pending(layout: ScoreLayout, dates: Iterable[date]) -> None:
    for run_date in dates:
        (layout.pending / f"{PARTITION_KEY}={run_date.isoformat()}").unlink(missing_ok=True)


def _point(link: Path, target: str) -> bool:
    """Make ``link`` a symlink to ``target`` with one atomic rename; True if it changed."""
    if link.is_symlink() and os.readlink(link) == target:
        return False
    if link.exists() and not link.is_symlink():
        raise StorageError(f"{link} is a real folder, not a pointer to a committed run")
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)
    return True


# --------------------------------------------------------------------------- warehouse

_FILE_COLUMN = "_score_file"
_RESERVED = (PARTITION_KEY, _FILE_COLUMN)


def _read_sql(layout: ScoreLayout, dates: str, *, by_name: bool) -> str:
    """Committed rows under ``_runs/run_date=<dates>``: parts of the runs score_runs names.

    The run folders are globbed (no file list to rebuild per commit) and rows of folders
    that are not the published run of their date (a run being committed, an orphan of a
    killed commit, a superseded run not yet swept) are left out by the join on score_runs.
    With ``by_name`` false (every committed run has one schema) only the first file's
    footer is read to bind; with it true the files are read with ``union_by_name``, which
    reads every footer and gives the union of their columns, NULL where a file lacks one.
    """
    glob = f"{sql_literal(str(layout.runs) + '/' + PARTITION_KEY + '=')} || {dates} || '/*/part-*.parquet'"
    union = "union_by_name = true, " if by_name else ""
    return (
        f"SELECT s.* EXCLUDE ({_FILE_COLUMN}) FROM read_parquet({glob}, {union}hive_partitioning = true, "
        f"hive_types = {{'{PARTITION_KEY}': DATE}}, filename = '{_FILE_COLUMN}') AS s "
        f"SEMI JOIN score_runs AS r ON s.{PARTITION_KEY} = r.{PARTITION_KEY} "
        f"AND string_split(s.{_FILE_COLUMN}, '/')[-2] = r.run_id"
    )


def _view_ddl(layout: ScoreLayout, empty: bool, mixed: bool = False) -> list[str]:
    """The DDL of ``scores`` (every committed run) and ``scores_on(d)`` (one date's run);
    ``mixed``: the committed runs have more than one schema (read by name)."""
    if empty:
        body = f"SELECT CAST(NULL AS DATE) AS {PARTITION_KEY} WHERE false"
        return [
            f"CREATE OR REPLACE VIEW scores AS {body}",
            f"CREATE OR REPLACE MACRO scores_on(d) AS TABLE {body}",
        ]
    return [
        "CREATE OR REPLACE VIEW scores AS " + _read_sql(layout, "'*'", by_name=mixed),
        "CREATE OR REPLACE MACRO scores_on(d) AS TABLE "
        + _read_sql(layout, "strftime(CAST(d AS DATE), '%Y-%m-%d')", by_name=mixed),
    ]


def _ensure_views(con: duckdb.DuckDBPyConnection, layout: ScoreLayout, *, force: bool = False) -> None:
    """Create the views if they are missing, name another folder (a moved home) or read one
    schema where score_schemas has several (or the other way round).

    Otherwise they do not depend on which runs are committed, so a commit of a run whose
    schema the store already has does not touch them: its cost does not grow with history.
    """
    empty = not con.execute("SELECT count(*) FROM score_runs").fetchall()[0][0]
    mixed = not empty and len(_fingerprints(con)) > 1
    wanted = _view_ddl(layout, empty, mixed)
    current = con.execute(
        "SELECT sql FROM duckdb_views() WHERE view_name = 'scores' AND NOT internal"
    ).fetchall()
    # The glob's folder literal, as DuckDB keeps it in the view's SQL.
    marker = sql_literal(f"{layout.runs}/{PARTITION_KEY}=") if not empty else "WHERE false"
    stale = not current or marker not in current[0][0] or ("union_by_name" in current[0][0]) != mixed
    if force or stale:
        for statement in wanted:
            con.execute(statement)


# --------------------------------------------------------------------------- schemas


def _columns(schema: pa.Schema) -> list[list[str]]:
    """The logical columns of ``schema`` as ``[name, type]`` pairs, in order (what
    score_schemas keeps; nullability and metadata are not part of it)."""
    return [[f.name, str(f.type)] for f in logical_schema(schema)]


def _record_schema(con: duckdb.DuckDBPyConnection, run_date: date, columns: list[list[str]]) -> None:
    """Set the schema of the run committed for ``run_date`` in score_schemas."""
    text = json.dumps(columns)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    con.execute("DELETE FROM score_schemas WHERE run_date = ?", [run_date])
    con.execute("INSERT INTO score_schemas VALUES (?, ?, ?::JSON)", [run_date, fingerprint, text])


def _fingerprints(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The distinct schemas of the committed runs, by fingerprint."""
    return {f for (f,) in con.execute("SELECT DISTINCT fingerprint FROM score_schemas").fetchall()}


def _fill_schemas(con: duckdb.DuckDBPyConnection, layout: ScoreLayout) -> None:
    """Record the schema of committed runs score_schemas lacks (a warehouse written before
    it existed, whose runs all have one schema): one footer read per such run, once."""
    missing = con.execute(
        "SELECT run_date, run_id FROM score_runs ANTI JOIN score_schemas USING (run_date) ORDER BY run_date"
    ).fetchall()
    for run_date, run_id in missing:
        try:
            schema = _part_schema(layout.run_dir(run_date, run_id) / part_name(0))
        except (OSError, pa.ArrowException) as exc:
            log.warning("cannot read the schema of the run of %s: %s", run_date, exc)
            continue
        _record_schema(con, run_date, _columns(schema))


def _type_conflict(con: duckdb.DuckDBPyConnection, run_date: date, columns: list[list[str]]) -> str | None:
    """A one-line description of the first column of ``columns`` whose type differs from the
    same-named column of a committed run of another date, or None. Columns only one side
    has are no conflict: the views read the runs by name."""
    types = dict(columns)
    rows = con.execute(
        "SELECT min(run_date), any_value(columns) FROM score_schemas WHERE run_date <> ? "
        "GROUP BY fingerprint ORDER BY 1",
        [run_date],
    ).fetchall()
    for other_date, other in rows:
        for name, committed in json.loads(other):
            if name in types and types[name] != committed:
                return (
                    f"schema differs from the committed runs: column {name!r} is {types[name]} "
                    f"in this run, {committed} in the run of {other_date}"
                )
    return None


def _published(con: duckdb.DuckDBPyConnection) -> dict[date, tuple[str, int]]:
    rows = con.execute("SELECT run_date, run_id, parts FROM score_runs ORDER BY run_date")
    return {d: (run_id, parts) for d, run_id, parts in rows.fetchall()}


@contextmanager
def writer(root: str | os.PathLike[str], lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[WorkingCopy]:
    """The score store's write lock and a working copy of its warehouse (``score_runs``,
    ``score_schemas`` and the views exist in it), published on a clean exit; for tables that live beside the
    scores and must change under the same lock (agreement reports)."""
    layout = ScoreLayout.of(root)
    with layout.warehouse.writer(lock_timeout, ddl=[_SCORE_RUNS_DDL, _SCORE_SCHEMAS_DDL]) as work:
        _fill_schemas(work.con, layout)
        _ensure_views(work.con, layout)
        yield work


@contextmanager
def reader(
    root: str | os.PathLike[str], lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> Iterator[duckdb.DuckDBPyConnection]:
    """The score store's lock, shared, and a read-only connection to its warehouse."""
    with ScoreLayout.of(root).warehouse.reader(lock_timeout) as con:
        yield con


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
        layout = ScoreLayout.of(root)
        _check_date(run_date)
        _check_run_id(run_id)
        stage_dir = layout.stage_dir(run_id)
        with writer(layout.root, lock_timeout) as work:
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
                fsync_dir(layout.staging)
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
        layout = ScoreLayout.of(self.root)
        with writer(layout.root, lock_timeout):
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
    layout = ScoreLayout.of(root)
    _check_date(run_date)
    _check_run_id(run_id)
    name = part_name(index)
    if not isinstance(table, pa.Table):
        raise TypeError(f"a part must be a pyarrow.Table, got {type(table).__name__}")
    for reserved in _RESERVED:
        if reserved in table.column_names:
            raise DataError(f"a scores part must not have a {reserved!r} column: the store adds it")
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
        fsync_dir(stage_dir)
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


def _verify(run_dir: Path, expected: Mapping[int, PartInfo]) -> tuple[int, int, pa.Schema | None, list[str]]:
    """Rows, bytes, schema and the problems of the expected parts in ``run_dir``."""
    problems: list[str] = []
    rows = size = 0
    schema: pa.Schema | None = None
    for index, part in sorted(expected.items()):
        path = run_dir / part_name(index)
        try:
            meta = pq.read_metadata(path)
            part_schema = logical_schema(meta.schema.to_arrow_schema())
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
    return rows, size, schema, problems


def logical_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` as readers of the store see it: a dictionary-encoded column as its values'
    type (Parquet stores both alike; only pyarrow's footer metadata tells them apart), no
    metadata. Parts of format 1 and 2 runs of one shape have the same logical schema."""
    fields = [f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema]
    return pa.schema(fields)


def _part_schema(path: Path) -> pa.Schema:
    return logical_schema(pq.read_metadata(path).schema.to_arrow_schema())


def _manifest(
    run_date: date,
    run_id: str,
    record: RunRecord,
    rows_out: int,
    parts: int,
    size: int,
    committed_at: datetime,
) -> dict[str, object]:
    return {
        "format": MANIFEST_FORMAT,
        "run_date": run_date.isoformat(),
        "run_id": run_id,
        "model_name": record.model_name,
        "model_version": str(record.model_version),
        "alias": record.alias,
        "flow_run_id": record.flow_run_id,
        "rows_in": int(record.rows_in),
        "rows_out": rows_out,
        "parts": parts,
        "bytes": size,
        "started_at": _as_utc(record.started_at, "started_at").isoformat(),
        "finished_at": _as_utc(record.finished_at, "finished_at").isoformat(),
        "phase_seconds": {str(k): float(v) for k, v in record.phase_seconds.items()},
        "committed_at": committed_at.isoformat(),
    }


def _unstage(layout: ScoreLayout, run_date: date, run_id: str) -> None:
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
    (``IncompleteRun`` otherwise, and the folder goes back to staging untouched). The run
    may add or lack columns against the committed runs of other dates, but a column they
    also have must have the same logical type (``SchemaConflict`` otherwise, likewise). One
    transaction replaces the date's ``score_runs`` and ``score_schemas`` rows, and recreates
    the views when the set of schemas in the store changed (``_ensure_views``); then the ``scores/run_date=D`` pointer is swapped and superseded runs and abandoned
    staging runs of the date are swept. Committing again a run that is already the
    published one returns its ``CommitInfo`` (safe for task retries).
    """
    layout = ScoreLayout.of(root)
    _check_date(run_date)
    _check_run_id(run_id)
    expected = _expected_by_index(expected_parts)
    started_at = _as_utc(run_record.started_at, "started_at")
    finished_at = _as_utc(run_record.finished_at, "finished_at")
    phase_seconds = json.dumps({str(k): float(v) for k, v in run_record.phase_seconds.items()})
    stage_dir = layout.stage_dir(run_id)
    run_dir = layout.run_dir(run_date, run_id)

    with writer(layout.root, lock_timeout) as work:
        con = work.con
        row = con.execute(
            "SELECT run_id, rows_out, parts, bytes, committed_at FROM score_runs WHERE run_date = ?",
            [run_date],
        ).fetchall()
        if row and row[0][0] == run_id:
            _, rows_out, parts, size, committed_at = row[0]
            _reconcile(_published(con), layout, strict=False, supersede=run_date, keep=None)
            _clear_pending(layout, [run_date])
            return CommitInfo(run_date, run_id, rows_out, parts, size, committed_at, str(run_dir))

        marker = _read_marker(stage_dir)
        if marker is not None:
            if marker.get("run_date") != run_date.isoformat():
                raise StorageError(f"run {run_id} staged {marker.get('run_date')}, not {run_date}")
            _mark_pending(layout, run_date)  # a kill from here on leaves work for sweep
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            _remove_tree(run_dir)  # unpublished leftover of an earlier, killed commit
            os.rename(stage_dir, run_dir)
            fsync_dir(layout.staging)
            fsync_dir(run_dir.parent)
        elif not run_dir.is_dir():
            raise StagingMissing(
                f"no staging run {run_id} for {run_date} under {layout.staging} "
                "(never opened, superseded by a newer run of that date, or swept)"
            )
        # From here on no worker can write into the run: its folder left staging.

        rows_out, size, schema, problems = _verify(run_dir, expected)
        if problems or schema is None:
            _unstage(layout, run_date, run_id)
            raise IncompleteRun(f"run {run_id} for {run_date} is incomplete", problems)
        columns = _columns(schema)
        conflict = _type_conflict(con, run_date, columns)
        if conflict:
            _unstage(layout, run_date, run_id)
            raise SchemaConflict(f"run {run_id} for {run_date}: {conflict}", [conflict])
        for entry in run_dir.iterdir():
            match = _PART_NAME.fullmatch(entry.name)
            if match is None or int(match.group(1)) not in expected:
                _remove_tree(entry)  # temp files of late retries, surplus parts

        committed_at = datetime.now(UTC)
        # The run's manifest, beside its parts: the warehouse can be rebuilt from the
        # folders (``rebuild``). It is written before the commit point; a run folder that
        # never got published is swept with it.
        manifest = _manifest(run_date, run_id, run_record, rows_out, len(expected), size, committed_at)
        _write_json_atomic(run_dir / MANIFEST, manifest)
        con.execute("BEGIN TRANSACTION")
        try:
            schemas_before = _fingerprints(con)
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
            _record_schema(con, run_date, columns)
            published = _published(con)
            # A schema the store did not have, or the last run of one replaced: rebind.
            _ensure_views(con, layout, force=_fingerprints(con) != schemas_before)
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
            _clear_pending(layout, [run_date])
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
    layout: ScoreLayout,
    *,
    strict: bool,
    supersede: date | None,
    keep: str | None,
    dates: Iterable[date] | None = None,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
) -> SweepReport:
    """Make the folders agree with ``published`` (score_runs as the caller just published
    or found it); the caller holds the write lock.

    Pointers are set to the published runs first, then every run folder that is not
    published is deleted (superseded runs, orphans of killed commits), then abandoned
    staging runs other than ``keep``; staging runs of ``supersede`` count as abandoned.
    Only ``dates`` are tidied (every date if None; ``supersede`` is always one of them),
    so that a commit's or a sweep's cost does not grow with history. ``strict`` raises on
    a pointer that cannot be set instead of logging it.
    """
    removed: list[str] = []
    repointed: list[str] = []
    layout.scores.mkdir(parents=True, exist_ok=True)
    scope: set[date] | None = None
    if dates is not None or supersede is not None:
        scope = set(dates or ()) | ({supersede} if supersede is not None else set())

    for run_date, (run_id, _) in published.items():
        if scope is not None and run_date not in scope:
            continue
        link = layout.link(run_date)
        try:
            if _point(link, layout.link_target(run_date, run_id)):
                repointed.append(link.name)
        except StorageError:
            if strict:
                raise
            log.warning("%s is not a pointer; left as it is", link)
    if scope is None:
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
        date_dirs = sorted(layout.runs.iterdir()) if layout.runs.is_dir() else []
    else:
        for run_date in sorted(scope - set(published)):
            link = layout.link(run_date)
            if link.is_symlink():
                _remove_tree(link)
                removed.append(link.name)
        date_dirs = [layout.date_dir(d) for d in sorted(scope)]
        for tmp in layout.scores.glob(f".{PARTITION_KEY}=*.tmp"):
            _remove_tree(tmp)  # the new symlink of a swap that was killed
            removed.append(tmp.name)

    for date_dir in date_dirs:
        run_date = _parse_partition(date_dir.name)
        keep_run = published[run_date][0] if run_date in published else None
        if date_dir.is_dir() and not date_dir.is_symlink():
            for run_dir in sorted(date_dir.iterdir()):
                if run_dir.name != keep_run:
                    _remove_tree(run_dir)
                    removed.append(str(run_dir.relative_to(layout.scores)))
        if keep_run is None and (date_dir.exists() or date_dir.is_symlink()):
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
    full: bool = False,
) -> SweepReport:
    """Repair and tidy the score store; run it at the start of every scoring run.

    Recreates the ``scores`` views if they are missing or name another folder (so a moved
    MLOPS_HOME heals), and for every date a commit may have left untidy (killed, or its
    cleanup failed) points ``scores/run_date=D`` at its published run and deletes what no
    reader can see: superseded and orphaned run folders and leftovers of killed swaps.
    Staging runs with no change for ``stale_after`` go too. ``full`` goes over every
    committed date instead (for folders changed by hand); otherwise the cost does not grow
    with the number of dates. Creates the warehouse if there is none.
    """
    layout = ScoreLayout.of(root)
    with writer(layout.root, lock_timeout) as work:
        published = _published(work.con)  # writer() made the views if they were missing
        work.publish()
        pending = _pending_dates(layout)
        report = _reconcile(
            published,
            layout,
            strict=True,
            supersede=None,
            keep=None,
            dates=None if full else pending,
            stale_after=stale_after,
        )
        _clear_pending(layout, pending)
        return report


# --------------------------------------------------------------------------- readers


def query(
    root: str | os.PathLike[str],
    sql: str,
    params: Sequence[object] | None = None,
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    limits: QueryConfig | None = None,
) -> pa.Table:
    """Run ``sql`` on the warehouse opened read-only, returning the whole result as Arrow.

    ``scores`` (every committed run, with ``run_date``), ``scores_on(date)`` (one date's
    run; its cost does not grow with the number of dates) and ``score_runs`` are there. Only
    one read statement is accepted, and it runs confined to the store's files
    (``adapters.warehouse_query``) and within ``limits`` (time, memory, result rows). The
    connection lives for this call only, so writers are kept waiting no longer.
    """
    sql = warehouse_query.check_read_only(sql)
    with reader(root, lock_timeout) as con:
        warehouse_query.confine(con, [ScoreLayout.of(root).scores], limits)
        return warehouse_query.run(con, sql, params, limits=limits)


def committed_dates(
    root: str | os.PathLike[str], *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> list[date]:
    """The run dates that have a committed run, ascending (what a backfill may skip)."""
    layout = ScoreLayout.of(root)
    if not layout.warehouse.path.exists():
        return []
    with reader(root, lock_timeout) as con:
        has_table = con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'score_runs'"
        ).fetchall()[0][0]
        if not has_table:
            return []
        rows = con.execute("SELECT run_date FROM score_runs ORDER BY run_date").fetchall()
        return [d for (d,) in rows]


# --------------------------------------------------------------------------- rebuild


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, object] | None:
    """The manifest a commit wrote beside a run's parts, or None if it has none."""
    try:
        with open(Path(run_dir) / MANIFEST, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") in MANIFEST_FORMATS else None


def _manifest_row(manifest: Mapping[str, object]) -> list[object]:
    return [
        date.fromisoformat(str(manifest["run_date"])),
        manifest["run_id"],
        manifest["model_name"],
        manifest["model_version"],
        manifest["alias"],
        manifest["flow_run_id"],
        manifest["rows_in"],
        manifest["rows_out"],
        manifest["parts"],
        manifest["bytes"],
        datetime.fromisoformat(str(manifest["started_at"])),
        datetime.fromisoformat(str(manifest["finished_at"])),
        json.dumps(manifest["phase_seconds"]),
        datetime.fromisoformat(str(manifest["committed_at"])),
    ]


def _whole(run_dir: Path, parts: int, rows_out: int) -> bool:
    """Whether ``run_dir`` has parts 0..parts-1, all readable, with ``rows_out`` rows in all."""
    rows = 0
    try:
        for index in range(parts):
            rows += pq.read_metadata(run_dir / part_name(index)).num_rows
    except (OSError, pa.ArrowException):
        return False
    return rows == rows_out


def _rebuild_choice(layout: ScoreLayout, date_dir: Path) -> dict[str, object] | None:
    """The run of one date folder to restore: the one its pointer names if that run is
    whole, else the whole run committed last; None if no run there is whole."""
    run_date = _parse_partition(date_dir.name)
    if run_date is None or not date_dir.is_dir():
        return None
    candidates: list[dict[str, object]] = []
    for run_dir in date_dir.iterdir():
        manifest = read_manifest(run_dir)
        if manifest is None or manifest.get("run_id") != run_dir.name:
            continue
        if _whole(run_dir, int(manifest["parts"]), int(manifest["rows_out"])):  # type: ignore[call-overload]
            candidates.append(manifest)
    if not candidates:
        return None
    link = layout.link(run_date)
    pointed = os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None
    for manifest in candidates:
        if manifest["run_id"] == pointed:
            return manifest
    return max(candidates, key=lambda m: str(m["committed_at"]))


def rebuild(root: str | os.PathLike[str], *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> list[date]:
    """Recreate ``score_runs``, ``score_schemas`` and the views from the run folders'
    manifests and parts; the dates restored.

    For a warehouse that was lost or damaged: every date folder under ``scores/_runs``
    gives back the run its pointer names (or, without a usable pointer, the whole run
    committed last), provided its parts are all there with the manifest's row count.
    A damaged warehouse file is moved aside to ``warehouse.duckdb.damaged-<time>``; other
    tables of the warehouse (agreement reports) are not in the folders and are not
    restored. Then the folders are tidied as by ``sweep``.
    """
    layout = ScoreLayout.of(root)
    path = layout.warehouse.path
    if path.exists():
        try:
            probe = attach_read_only(path)
            try:
                probe.execute("SELECT count(*) FROM score_runs").fetchall()
            finally:
                probe.close()
        except duckdb.Error as exc:
            aside = path.with_name(f"{path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
            log.warning("warehouse %s is unreadable (%s); moved to %s", path, exc, aside)
            os.replace(path, aside)
    with writer(layout.root, lock_timeout) as work:
        manifests = []
        if layout.runs.is_dir():
            for date_dir in sorted(layout.runs.iterdir()):
                chosen = _rebuild_choice(layout, date_dir)
                if chosen is not None:
                    run_dir = date_dir / str(chosen["run_id"])
                    manifests.append((chosen, _part_schema(run_dir / part_name(0))))
        con = work.con
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM score_runs")
        con.execute("DELETE FROM score_schemas")
        for manifest, schema in manifests:
            row = _manifest_row(manifest)
            con.execute("INSERT INTO score_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?::JSON, ?)", row)
            _record_schema(con, row[0], _columns(schema))  # type: ignore[arg-type]
        _ensure_views(con, layout, force=True)
        con.execute("COMMIT")
        published = _published(con)
        work.publish()
        _reconcile(published, layout, strict=False, supersede=None, keep=None)
        _clear_pending(layout, _pending_dates(layout))
    return sorted(published)
