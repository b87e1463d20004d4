"""Reading and writing tabular datasets (Parquet or CSV), with errors that name the file."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mlops.errors import DataError

SUFFIXES = {".parquet", ".pq", ".csv"}


def _check(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported format (expected .parquet or .csv)")
    return path


def _dataset(path: Path) -> pads.Dataset:
    fmt = "csv" if path.suffix.lower() == ".csv" else "parquet"
    try:
        return pads.dataset(str(path), format=fmt)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot be read as {fmt} ({exc})") from None


def read_frame(path: str | Path) -> pd.DataFrame:
    """A whole dataset in memory."""
    path = _check(Path(path))
    try:
        return _dataset(path).to_table().to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None


def count_rows(path: str | Path) -> int:
    return _dataset(_check(Path(path))).count_rows()


def iter_batches(path: str | Path, rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """Stream a dataset as frames of at most ``rows`` rows (memory bounded by ``rows``)."""
    path = _check(Path(path))
    try:
        for batch in _dataset(path).to_batches(columns=columns, batch_size=rows):
            if batch.num_rows:
                yield batch.to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None


def write_parquet(frames: Iterable[pd.DataFrame], path: str | Path) -> int:
    """Write frames to one Parquet file atomically (temp file, fsync, rename); rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer: pq.ParquetWriter | None = None
    rows = 0
    try:
        for frame in frames:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(str(tmp), table.schema, compression="zstd")
            writer.write_table(table)
            rows += len(frame)
        if writer is None:
            raise DataError(f"{path}: nothing to write")
        writer.close()
        writer = None
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return rows
