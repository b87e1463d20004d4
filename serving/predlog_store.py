"""Reading the prediction log and feedback: an in-memory DuckDB over their Parquet files.

The service writes (``serving.predlog_writer``); rollout gates, reports and people read
through here. Every call opens a fresh in-memory DuckDB with views over the committed
Parquet globs, so reading never contends with the service (which holds no database) or
with the scoring warehouse file, and only committed files are ever seen.

A read for a time window (``read_log``/``read_feedback`` with ``since``, what every rollout
tick does) opens only the files that can hold rows of it: day partitions from ``since``'s
UTC day on, and in them the files committed at or after ``since`` (the commit time is in
each file's name and no row is younger than its file). A tick therefore costs what the
window holds, not what the log has accumulated over the day.

Views:

``predictions``
    Every answer (``mlops.predlog.log_schema`` columns plus ``date``, the UTC day of its
    partition): ``role='primary'`` rows are what clients got; ``role='shadow'`` rows are a
    candidate's mirrored answers, paired with their primary row by ``request_id``.
``feedback``
    Labels as they arrived (``request_id``, ``label``, ``ts``). The service records one
    per request, but several services sharing one MLOPS_HOME each keep their own record.
``labelled``
    Primary answers with the first label of their request (``label`` null while none
    arrived; a later, different label never replaces it): the business view; shadow
    answers never appear in it. ``forced`` answers (the caller chose the variant) are
    in it; rollout gates leave them out.
``shadow_pairs``
    One row per mirrored request: the primary's and the shadow's version, score, decision,
    status and latency side by side.

Example::

    store = PredictionLogStore.for_settings(settings)
    store.query("SELECT variant, count(*) n, avg(score) FROM predictions "
                "WHERE role = 'primary' GROUP BY variant")
    log = store.read_log(since=step_started_at)     # frame for mlops.rollout.observe
    labels = store.read_feedback(since=step_started_at)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adapters.files import fsync_dir
from mlops.errors import DataError
from mlops.predlog import (
    COMPACTION_JOURNAL,
    FEEDBACK_SCHEMA,
    MERGED_PREFIX,
    Compaction,
    file_commit_time,
    log_schema,
    merged_name,
    visible_files,
)
from mlops.settings import DatasetSchema, Settings

PREDICTIONS = "predictions"
FEEDBACK = "feedback"
# A file named part-<commit time>-... holds no row younger than its commit time. The margin
# only guards against a clock stepped back between answering and committing.
COMMIT_MARGIN = timedelta(seconds=5)
_READ_ATTEMPTS = 3


_SQL_TYPES = {pa.bool_(): "BOOLEAN", pa.string(): "VARCHAR", pa.float64(): "DOUBLE", pa.int64(): "BIGINT"}


def predictions_dir(settings: Settings) -> Path:
    """The prediction log's folder under MLOPS_HOME."""
    return settings.home_path / PREDICTIONS


def feedback_dir(settings: Settings) -> Path:
    """The feedback folder under MLOPS_HOME."""
    return settings.home_path / FEEDBACK


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class PredictionLogStore:
    """Read access to the prediction log and feedback under one MLOPS_HOME."""

    predictions_root: Path
    feedback_root: Path
    dataset: DatasetSchema

    @classmethod
    def for_settings(cls, settings: Settings) -> PredictionLogStore:
        """The store of the settings' MLOPS_HOME."""
        return cls(predictions_dir(settings), feedback_dir(settings), settings.dataset)

    def _source(
        self, con: duckdb.DuckDBPyConnection, view: str, root: Path, schema: pa.Schema, since: datetime | None
    ) -> None:
        sources = (
            _all_files(root) if since is None else [_sql_str(str(f)) for f in _committed_since(root, since)]
        )
        if sources:
            con.execute(
                f"CREATE VIEW _{view}_files AS SELECT * FROM read_parquet([{', '.join(sources)}], "
                "hive_partitioning = true, union_by_name = true)"
            )
            have = {row[0] for row in con.execute(f"DESCRIBE _{view}_files").fetchall()}
            # Columns added to the schema later read as null in files written before them.
            added = "".join(
                f', CAST(NULL AS {_SQL_TYPES[f.type]}) AS "{f.name}"'
                for f in schema
                if f.name not in have and f.type in _SQL_TYPES
            )
            con.execute(f"CREATE VIEW {view} AS SELECT *{added} FROM _{view}_files")
        else:  # nothing flushed yet: an empty relation with the same columns
            empty = schema.empty_table().append_column("date", pa.array([], pa.date32()))
            con.register(f"_{view}_empty", empty)
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM _{view}_empty")

    def connect(self, since: datetime | None = None) -> duckdb.DuckDBPyConnection:
        """A fresh in-memory DuckDB with the views above (close it when done).

        With ``since``, the views hold at least every row with ``ts >= since`` (and skip the
        files that can only hold older ones): filter on ``ts`` as well."""
        con = duckdb.connect(":memory:")
        try:
            self._source(con, "predictions", self.predictions_root, log_schema(self.dataset), since)
            self._source(con, "feedback", self.feedback_root, FEEDBACK_SCHEMA, since)
            con.execute(
                """
                CREATE VIEW first_feedback AS
                SELECT request_id, arg_min(label, ts) AS label, min(ts) AS label_ts
                FROM feedback GROUP BY request_id
                """
            )
            con.execute(
                """
                CREATE VIEW labelled AS
                SELECT p.*, f.label, f.label_ts
                FROM predictions p LEFT JOIN first_feedback f USING (request_id)
                WHERE p.role = 'primary'
                """
            )
            con.execute(
                """
                CREATE VIEW shadow_pairs AS
                SELECT p.request_id, p.ts, p.entity_key, p.mode,
                       p.model_version AS primary_version, s.model_version AS shadow_version,
                       p.score AS primary_score, s.score AS shadow_score,
                       p.decision AS primary_decision, s.decision AS shadow_decision,
                       p.status AS primary_status, s.status AS shadow_status,
                       p.latency_ms AS primary_latency_ms, s.latency_ms AS shadow_latency_ms
                FROM predictions p JOIN predictions s USING (request_id)
                WHERE p.role = 'primary' AND s.role = 'shadow'
                """
            )
        except duckdb.Error as exc:
            con.close()
            raise DataError(
                f"cannot read the prediction log under {self.predictions_root.parent}: {exc}"
            ) from exc
        return con

    def query(
        self, sql: str, params: Sequence[Any] | None = None, since: datetime | None = None
    ) -> pd.DataFrame:
        """Run one SQL query over the views (``since``: see ``connect``); the result as a pandas frame."""
        for attempt in range(_READ_ATTEMPTS):
            last = attempt + 1 == _READ_ATTEMPTS
            try:
                con = self.connect(since)
            except DataError as exc:
                # A compaction deleted a listed file before the views read its schema: list again.
                if not last and isinstance(exc.__cause__, duckdb.Error) and _vanished(exc.__cause__):
                    continue
                raise
            try:
                return con.execute(sql, params or []).df()
            except duckdb.Error as exc:
                # ... or while the query read it.
                if not last and _vanished(exc):
                    continue
                raise DataError(f"prediction-log query failed: {exc}") from exc
            finally:
                con.close()
        raise AssertionError("unreachable")

    @staticmethod
    def _window(since: datetime | None, until: datetime | None) -> tuple[str, list[Any]]:
        where, params = [], []
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if until is not None:
            where.append("ts < ?")
            params.append(until)
        return (" WHERE " + " AND ".join(where)) if where else "", params

    def read_log(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        model_name: str | None = None,
    ) -> pd.DataFrame:
        """Prediction-log rows (both roles) with ``since <= ts < until``, oldest first, as the
        frame ``mlops.rollout.observe.observe`` takes. Datetimes should be timezone-aware."""
        where, params = self._window(since, until)
        if model_name is not None:
            where += (" AND " if where else " WHERE ") + "model_name = ?"
            params.append(model_name)
        columns = ", ".join(f'"{f.name}"' for f in log_schema(self.dataset))
        return self.query(
            f"SELECT {columns} FROM predictions{where} ORDER BY ts, request_id, role", params, since
        )

    def first_labels(self) -> dict[str, int]:
        """Every labelled request's first label (what the service refuses to overwrite)."""
        labels = self.query("SELECT request_id, label FROM first_feedback")
        return dict(zip(labels["request_id"], labels["label"].astype(int), strict=True))

    def read_feedback(self, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
        """Feedback rows (``request_id``, ``label``, ``ts``) that arrived in the window."""
        where, params = self._window(since, until)
        return self.query(f"SELECT request_id, label, ts FROM feedback{where} ORDER BY ts", params, since)


def _vanished(exc: duckdb.Error) -> bool:
    text = str(exc)
    return "No files found" in text or "No such file" in text


def _day_files(day: Path) -> list[Path]:
    """The files of one day folder to read: its writer parts, or what compaction made of them."""
    try:
        listing = [entry.name for entry in os.scandir(day)]  # listed first, journal read after
    except FileNotFoundError:
        return []
    return [day / name for name in visible_files(listing, _read_journal(day))]


def _read_journal(day: Path) -> Compaction | None:
    try:
        return Compaction.from_json((day / COMPACTION_JOURNAL).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _days(root: Path) -> list[Path]:
    return sorted(d for d in root.glob("date=*") if d.is_dir())


def _all_files(root: Path) -> list[str]:
    """SQL literals for every committed file: a day folder without a compaction journal is
    one glob over its writer parts; a compacted one lists its files."""
    out: list[str] = []
    for day in _days(root):
        if (day / COMPACTION_JOURNAL).exists():
            out.extend(_sql_str(str(f)) for f in _day_files(day))
        elif any(day.glob("part-*.parquet")):
            out.append(_sql_str(str(day / "part-*.parquet")))
    return out


def _committed_since(root: Path, since: datetime) -> list[Path]:
    """The committed files under ``root`` that may hold rows with ``ts >= since``, oldest first."""
    since = since if since.tzinfo else since.replace(tzinfo=UTC)
    cutoff = since - COMMIT_MARGIN
    first_day = f"date={cutoff.astimezone(UTC).date().isoformat()}"
    files = []
    for day in (d for d in _days(root) if d.name >= first_day):
        for f in _day_files(day):
            committed = file_commit_time(f.name)
            if committed is None or committed >= cutoff:
                files.append(f)
    return sorted(files)


# --------------------------------------------------------------------------- compaction

COMPACTION_LOCK = ".compaction.lock"
ROWS_PER_MERGED_FILE = 2_000_000
_TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class CompactionReport:
    """What compacting one day folder did: files merged into files, rows carried over."""

    day: str
    merged_files: int
    into: tuple[str, ...]
    rows: int


def _recover(day: Path) -> None:
    """Finish or undo a compaction of ``day`` that was killed (the caller holds the lock).

    Temporary files go; the sources a journal replaced are deleted (the switch happened);
    merged files that no journal names (written before a journal that never came) go.
    """
    journal = _read_journal(day)
    keep = set(journal.merged) if journal else set()
    for entry in os.scandir(day):
        name = entry.name
        if name.startswith(f".{MERGED_PREFIX}-") and name.endswith(_TMP_SUFFIX):
            os.unlink(entry.path)
        elif name.startswith(f".{COMPACTION_JOURNAL}") and name.endswith(_TMP_SUFFIX):
            os.unlink(entry.path)
        elif name.startswith(f"{MERGED_PREFIX}-") and name not in keep:
            os.unlink(entry.path)
        elif journal is not None and name in journal.sources and name not in keep:
            os.unlink(entry.path)
    fsync_dir(day)


def _aligned(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order: missing ones null, types promoted."""
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _write_merged(day: Path, name: str, tables: list[pa.Table], schema: pa.Schema) -> int:
    tmp = day / f".{name}{_TMP_SUFFIX}"
    rows = 0
    with open(tmp, "wb") as fh:
        with pq.ParquetWriter(fh, schema, compression="zstd") as writer:
            for table in tables:
                writer.write_table(table, row_group_size=256_000)
                rows += table.num_rows
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, day / name)
    return rows


def compact_day(
    root: str | os.PathLike[str],
    day: str,
    *,
    rows_per_file: int = ROWS_PER_MERGED_FILE,
    lock_timeout: float = 60.0,
) -> CompactionReport:
    """Merge the files of the closed day folder ``root/date=<day>`` into a few files, atomically.

    The merged files carry every column of every source (a union by name; a column some
    files lack is null there) and keep the rows in commit order. They are written under
    names readers ignore, then one atomic rename of the day's journal (``_compaction.json``)
    switches readers from the sources to them, and only then are the sources deleted: a
    reader sees every row exactly once at any moment, and a compaction killed anywhere
    loses and duplicates nothing (the next one finishes or undoes it). Each merged file is
    named after the newest commit time among its sources, so a windowed read opens it
    whenever it would have opened one of them. Compactions of one log exclude each other
    (a lock file); a day compacted already is left as it is.
    """
    from adapters import rwlock

    base = Path(root)
    folder = base / f"date={day}"
    if not folder.is_dir():
        return CompactionReport(day, 0, (), 0)
    try:
        with rwlock.locked(base / COMPACTION_LOCK, exclusive=True, timeout=lock_timeout):
            _recover(folder)
            journal = _read_journal(folder)
            sources = visible_files((e.name for e in os.scandir(folder)), journal)
            if not sources or (journal is not None and sources == sorted(journal.merged)):
                return CompactionReport(day, 0, tuple(sorted(journal.merged)) if journal else (), 0)
            schema = pa.unify_schemas(
                [pq.read_schema(folder / n).remove_metadata() for n in sources], promote_options="permissive"
            )
            compaction_id = uuid.uuid4().hex[:8]
            merged: list[str] = []
            rows = 0
            buffer: list[pa.Table] = []
            buffered = 0
            newest: datetime | None = None

            def flush() -> None:
                nonlocal rows, buffer, buffered, newest
                name = merged_name(newest or datetime.now(UTC), compaction_id, len(merged))
                rows += _write_merged(folder, name, buffer, schema)
                merged.append(name)
                buffer, buffered, newest = [], 0, None

            for name in sorted(
                sources, key=lambda n: (file_commit_time(n) or datetime.min.replace(tzinfo=UTC), n)
            ):
                table = _aligned(pq.read_table(folder / name, use_threads=False), schema)
                committed = file_commit_time(name)
                if committed is not None and (newest is None or committed > newest):
                    newest = committed
                buffer.append(table)
                buffered += table.num_rows
                if buffered >= rows_per_file:
                    flush()
            if buffer:
                flush()
            fsync_dir(folder)
            # The switch point: one rename of the journal.
            tmp = folder / f".{COMPACTION_JOURNAL}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(Compaction(tuple(merged), tuple(sources)).to_json())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / COMPACTION_JOURNAL)
            fsync_dir(folder)
            _recover(folder)  # delete the sources
            return CompactionReport(day, len(sources), tuple(merged), rows)
    except rwlock.LockTimeout as exc:
        raise DataError(f"another compaction of {base} kept its lock: {exc}") from exc
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot compact {folder}: {exc}") from exc


def log_days(root: str | os.PathLike[str]) -> list[str]:
    """The day folders (``YYYY-MM-DD``) under a log root, ascending."""
    return [d.name.split("=", 1)[1] for d in _days(Path(root))]
