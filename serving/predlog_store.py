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

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from mlops.errors import DataError
from mlops.predlog import FEEDBACK_SCHEMA, log_schema, part_commit_time
from mlops.settings import DatasetSchema, Settings

PREDICTIONS = "predictions"
FEEDBACK = "feedback"
# A file named part-<commit time>-... holds no row younger than its commit time. The margin
# only guards against a clock stepped back between answering and committing.
COMMIT_MARGIN = timedelta(seconds=5)


_SQL_TYPES = {pa.bool_(): "BOOLEAN", pa.string(): "VARCHAR", pa.float64(): "DOUBLE", pa.int64(): "BIGINT"}


def predictions_dir(settings: Settings) -> Path:
    return settings.home_path / PREDICTIONS


def feedback_dir(settings: Settings) -> Path:
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
        return cls(predictions_dir(settings), feedback_dir(settings), settings.dataset)

    def _source(
        self, con: duckdb.DuckDBPyConnection, view: str, root: Path, schema: pa.Schema, since: datetime | None
    ) -> None:
        if since is None:  # everything: the glob
            present, source = any(root.glob("date=*/*.parquet")), _sql_str(str(root / "date=*" / "*.parquet"))
        else:  # a window: only the files that can hold it
            files = _committed_since(root, since)
            present, source = bool(files), "[" + ", ".join(_sql_str(str(f)) for f in files) + "]"
        if present:
            con.execute(
                f"CREATE VIEW _{view}_files AS SELECT * FROM read_parquet({source}, "
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
        con = self.connect(since)
        try:
            return con.execute(sql, params or []).df()
        except duckdb.Error as exc:
            raise DataError(f"prediction-log query failed: {exc}") from exc
        finally:
            con.close()

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


def _committed_since(root: Path, since: datetime) -> list[Path]:
    """The committed files under ``root`` that may hold rows with ``ts >= since``, oldest first."""
    since = since if since.tzinfo else since.replace(tzinfo=UTC)
    cutoff = since - COMMIT_MARGIN
    first_day = f"date={cutoff.astimezone(UTC).date().isoformat()}"
    files = []
    for day in sorted(d for d in root.glob("date=*") if d.is_dir() and d.name >= first_day):
        for f in day.glob("*.parquet"):
            committed = part_commit_time(f.name)
            if committed is None or committed >= cutoff:
                files.append(f)
    return sorted(files)
