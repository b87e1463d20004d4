"""The prediction log's writer: rows buffered off the response path, flushed to Parquet.

Request handlers append one tuple per answer to an in-memory buffer (a deque: appending
costs well under a microsecond and needs no lock). A background thread flushes the buffer
every ``flush_seconds`` (or as soon as ``flush_rows`` are waiting) into one Parquet file
per day partition, written under a hidden temporary name, fsynced, then renamed into place
and the folder fsynced. A crash therefore loses at most the rows not yet flushed, never a
file already committed, and readers never see a partial file (``*.parquet`` globs skip the
``.*.tmp`` names). The features hash and the feature columns are computed at flush time,
also off the response path.

Layout (``mlops.predlog`` schemas; ``date`` is the UTC day of ``ts``)::

    predictions/date=YYYY-MM-DD/part-<utc time>-<pid>-<seq>.parquet
    feedback/date=YYYY-MM-DD/part-<utc time>-<pid>-<seq>.parquet

The buffer is bounded (``max_buffer_rows``): if the disk cannot keep up, further rows are
counted in ``dropped`` and not buffered, so logging never grows memory without bound or
blocks scoring.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from adapters.files import fsync_dir
from mlops.predlog import FEATURE_PREFIX, FEEDBACK_SCHEMA, features_hash, log_schema, part_name
from mlops.settings import DatasetSchema

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
STALE_TMP_SECONDS = 3600.0


class LogRow(NamedTuple):
    """One answer as the handler records it (``features`` are hashed and split at flush)."""

    request_id: str
    ts: float  # unix seconds
    entity_key: str | None
    variant: str
    role: str
    mode: str
    model_name: str
    model_version: int
    score: float | None
    decision: bool | None
    latency_ms: float
    status: int
    error: str | None
    features: Mapping[str, Any]
    forced: bool = False  # the caller chose the variant: logged, never counted by a gate


class ParquetBatchSink:
    """Writes Arrow tables as day-partitioned Parquet files, each committed atomically."""

    def __init__(self, root: Path, schema: pa.Schema):
        self.root = root
        self.schema = schema
        self._seq = 0
        self._folders: set[Path] = set()  # day folders known to exist

    def sweep(self, older_than: float = STALE_TMP_SECONDS) -> int:
        """Remove temporary files a crashed writer left behind (older than ``older_than`` s)."""
        removed = 0
        cutoff = time.time() - older_than
        for tmp in self.root.glob(f"date=*/.*{TMP_SUFFIX}"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def write(self, table: pa.Table, days: list[str]) -> list[Path]:
        """Commit ``table`` (rows whose UTC day is ``days[i]``), one file per day."""
        written = []
        for day in sorted(set(days)):
            part = table if len(set(days)) == 1 else table.filter(pa.array([d == day for d in days]))
            written.append(self._commit(part, day))
        return written

    def _commit(self, table: pa.Table, day: str) -> Path:
        folder = self.root / f"date={day}"
        if folder not in self._folders:  # a mkdir per file cost ~10 % of a small file's write
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)
        self._seq += 1
        name = part_name(datetime.now(UTC), os.getpid(), self._seq)
        final = folder / name
        tmp = folder / f".{name}{TMP_SUFFIX}"
        try:
            out = open(tmp, "wb")
        except FileNotFoundError:  # the folder was removed meanwhile (e.g. by retention)
            folder.mkdir(parents=True, exist_ok=True)
            out = open(tmp, "wb")
        with out as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(folder)
        return final


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


ENCODING_ERRORS = (pa.ArrowException, UnicodeError, ValueError, TypeError, OverflowError)
"""What building an Arrow table raises for a row Arrow refuses."""


class Prepared(NamedTuple):
    """Rows at the head of one writer's buffer and their Arrow table (``prepare_flush``)."""

    rows: list[LogRow]
    table: pa.Table


def _starts_with(buffer: deque[LogRow], head: list[LogRow]) -> bool:
    return 0 < len(head) <= len(buffer) and all(
        a is b for a, b in zip(head, islice(buffer, len(head)), strict=True)
    )


def prepare_flush(writers: list[PredictionLogWriter]) -> list[Prepared | None]:
    """For each writer of ``writers`` (alike in dataset schema), the Arrow table of the
    prediction rows it buffers now, all converted in one pass: converting costs a fixed ~2 ms
    per table besides its rows, which with one writer per tenant and hundreds of tenants
    cost more CPU than their rows. Each writer still writes its own files (``flush``). None
    for a writer with nothing buffered; all None when a row does not convert (each writer
    then drops only its own bad rows) or the schemas differ."""
    heads = [[w._rows[i] for i in range(len(w._rows))] for w in writers]
    busy = [i for i, head in enumerate(heads) if head]
    out: list[Prepared | None] = [None] * len(writers)
    if len(busy) < 2 or any(writers[i].dataset is not writers[busy[0]].dataset for i in busy):
        return out
    try:
        table = writers[busy[0]]._table([row for i in busy for row in heads[i]])
    except ENCODING_ERRORS:
        return out
    start = 0
    for i in busy:
        out[i] = Prepared(heads[i], table.slice(start, len(heads[i])))
        start += len(heads[i])
    return out


class PredictionLogWriter:
    """Buffers prediction-log and feedback rows and flushes them from a background thread."""

    def __init__(
        self,
        predictions_dir: Path,
        feedback_dir: Path,
        dataset: DatasetSchema,
        *,
        flush_seconds: float = 2.0,
        flush_rows: int = 20_000,
        max_buffer_rows: int = 500_000,
        on_flush: Callable[[int, int], None] | None = None,
        on_feedback: Callable[[list[tuple[str, int, float]]], None] | None = None,
    ):
        self.dataset = dataset
        self.schema = log_schema(dataset)
        self.predictions = ParquetBatchSink(predictions_dir, self.schema)
        self.feedback_sink = ParquetBatchSink(feedback_dir, FEEDBACK_SCHEMA)
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        self.max_buffer_rows = max_buffer_rows
        self.on_flush = on_flush
        self.on_feedback = on_feedback  # told which labels are durable once their file is written
        self._rows: deque[LogRow] = deque()
        self._labels: deque[tuple[str, int, float]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.rows_written = 0
        self.files_written = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------ handler side

    def log(self, row: LogRow) -> bool:
        """Buffer one row; False (and counted in ``dropped``) when the buffer is full."""
        rows = self._rows
        if len(rows) >= self.max_buffer_rows:
            self.dropped += 1
            return False
        rows.append(row)
        if len(rows) >= self.flush_rows:
            self._wake.set()
        return True

    def feedback(self, items: list[tuple[str, int]], ts: float) -> bool:
        """Buffer every ``(request_id, label)`` of ``items``, or none when they do not all fit."""
        if len(self._labels) + len(items) > self.max_buffer_rows:
            return False
        self._labels.extend((rid, label, ts) for rid, label in items)
        return True

    @property
    def buffered(self) -> int:
        """Prediction and feedback rows waiting to be flushed."""
        return len(self._rows) + len(self._labels)

    # ------------------------------------------------------------ flushing

    def start(self, *, thread: bool = True) -> None:
        """Clear temporary files a crashed writer left, then start the flush thread (unless
        ``thread`` is False: the owner then calls ``flush`` itself, e.g. one thread for many)."""
        self.predictions.sweep()
        self.feedback_sink.sweep()
        if not thread:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="predlog-flush", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and flush everything still buffered."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        self.flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:
                self.last_error = str(exc)
                log.exception("prediction log flush failed (rows kept in the buffer, retrying)")
                self._stop.wait(min(self.flush_seconds, 5.0))

    def flush(self, prepared: Prepared | None = None) -> tuple[int, int]:
        """Write what is buffered now; (prediction rows, feedback rows) written. ``prepared``
        (from ``prepare_flush``) is the Arrow table of the rows at the head of the buffer,
        converted together with other writers' rows: when those rows are still buffered
        first, exactly they are written (rows buffered since wait for the next flush)."""
        with self._flush_lock:
            n_pred = self._flush_predictions(prepared)
            n_fb = self._flush_feedback()
        if (n_pred or n_fb) and self.on_flush is not None:
            self.on_flush(n_pred, n_fb)
        return n_pred, n_fb

    def _flush_predictions(self, prepared: Prepared | None = None) -> int:
        n = len(self._rows)
        if not n:
            return 0
        if prepared is not None and _starts_with(self._rows, prepared.rows):
            rows, table = prepared.rows, prepared.table  # rows buffered since: the next flush
            n = len(rows)
        else:
            rows = [self._rows[i] for i in range(n)]
            try:
                table = self._table(rows)
            except ENCODING_ERRORS:
                rows = [r for r in rows if self._encodable(r)]  # drop only the rows Arrow refuses
                self.dropped += n - len(rows)
                table = self._table(rows)
        if rows:
            self.files_written += len(self.predictions.write(table, [_day(r.ts) for r in rows]))
        for _ in range(n):  # only after the commit: a failed write keeps the rows
            self._rows.popleft()
        self.rows_written += len(rows)
        return len(rows)

    def _flush_feedback(self) -> int:
        n = len(self._labels)
        if not n:
            return 0
        items = [self._labels[i] for i in range(n)]
        table = pa.table(
            {
                "request_id": pa.array([i[0] for i in items], pa.string()),
                "label": pa.array([i[1] for i in items], pa.int64()),
                "ts": pa.array([int(i[2] * 1e6) for i in items], pa.int64()).cast(
                    pa.timestamp("us", tz="UTC")
                ),
            },
            schema=FEEDBACK_SCHEMA,
        )
        self.files_written += len(self.feedback_sink.write(table, [_day(i[2]) for i in items]))
        for _ in range(n):
            self._labels.popleft()
        if self.on_feedback is not None:
            try:
                self.on_feedback(items)
            except Exception:  # the labels are in the log; the next start's catch-up indexes them
                log.exception("recording %d written labels in the first-label index failed", n)
        return n

    def _encodable(self, row: LogRow) -> bool:
        try:
            self._table([row])
            return True
        except ENCODING_ERRORS as exc:
            log.error("prediction-log row %r dropped: cannot be written (%s)", row.request_id[:40], exc)
            return False

    def _table(self, rows: list[LogRow]) -> pa.Table:
        cols: dict[str, pa.Array] = {
            "request_id": pa.array([r.request_id for r in rows], pa.string()),
            "ts": pa.array([int(r.ts * 1e6) for r in rows], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "entity_key": pa.array([r.entity_key for r in rows], pa.string()),
            "variant": pa.array([r.variant for r in rows], pa.string()),
            "role": pa.array([r.role for r in rows], pa.string()),
            "mode": pa.array([r.mode for r in rows], pa.string()),
            "model_name": pa.array([r.model_name for r in rows], pa.string()),
            "model_version": pa.array([r.model_version for r in rows], pa.int64()),
            "score": pa.array([r.score for r in rows], pa.float64()),
            "decision": pa.array([r.decision for r in rows], pa.bool_()),
            "latency_ms": pa.array([r.latency_ms for r in rows], pa.float64()),
            "status": pa.array([r.status for r in rows], pa.int32()),
            "error": pa.array([r.error for r in rows], pa.string()),
            "features_hash": pa.array([features_hash(r.features) for r in rows], pa.string()),
            "forced": pa.array([r.forced for r in rows], pa.bool_()),
        }
        for name in self.dataset.numeric_names:
            cols[FEATURE_PREFIX + name] = pa.array([r.features.get(name) for r in rows], pa.float64())
        for name in self.dataset.categorical_names:
            cols[FEATURE_PREFIX + name] = pa.array([r.features.get(name) for r in rows], pa.string())
        return pa.table(cols, schema=self.schema)
