"""Reading and writing tabular datasets (Parquet or CSV), with errors that name the file.

A CSV file is read with the column types its dataset declares (numeric features as
float64, categorical ones as strings, empty cells as nulls), the same way for training
and for batch scoring, so both validate the very same values; other columns are inferred.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mlops.errors import DataError
from mlops.settings import DatasetSchema

SUFFIXES = {".parquet", ".pq", ".csv"}
_MAX_ERROR_CHARS = 300


def csv_convert_options(schema: DatasetSchema | None) -> pacsv.ConvertOptions:
    """How CSV cells become typed values: declared features get their declared type; empty
    cells and the usual markers (``NA``, ``null``, ...) are nulls, which the dataset's null
    checks then judge, except a marker that is one of the declared categories."""
    types: dict[str, pa.DataType] = {}
    nulls = pacsv.ConvertOptions().null_values
    if schema is not None:
        types |= {name: pa.float64() for name in schema.numeric_names}
        types |= {name: pa.string() for name in schema.categorical_names}
        categories = {c for f in schema.categorical for c in f.categories}
        nulls = [n for n in nulls if n not in categories]
    return pacsv.ConvertOptions(column_types=types, strings_can_be_null=True, null_values=nulls)


def arrow_error(exc: BaseException) -> str:
    """pyarrow's message on one short line (CSV errors quote whole rows)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _check(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported format (expected .parquet or .csv)")
    return path


def _dataset(path: Path, schema: DatasetSchema | None = None) -> pads.Dataset:
    if path.suffix.lower() == ".csv":
        fmt: str | pads.FileFormat = pads.CsvFileFormat(convert_options=csv_convert_options(schema))
        kind = "CSV"
    else:
        fmt, kind = "parquet", "Parquet"
    try:
        return pads.dataset(str(path), format=fmt)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot be read as {kind} ({arrow_error(exc)})") from None


def read_frame(path: str | Path, schema: DatasetSchema | None = None) -> pd.DataFrame:
    """A whole dataset in memory (a CSV typed by ``schema``, see ``csv_convert_options``)."""
    path = _check(Path(path))
    try:
        return _dataset(path, schema).to_table().to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot be read ({arrow_error(exc)})") from None


def read_table(
    pattern: str | Path, columns: Sequence[str] | None = None, schema: DatasetSchema | None = None
) -> pa.Table:
    """Every row of a file, a folder of files or a glob (``events/2026-*.parquet``), Parquet or
    CSV, as one Arrow table of ``columns`` (all when None)."""
    text = str(pattern)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{text}: matches no .parquet or .csv file")
    else:
        path = _check(Path(text))
        files = (
            sorted(
                f
                for f in path.rglob("*")
                if f.suffix.lower() in SUFFIXES and not f.name.startswith((".", "_"))
            )
            if path.is_dir()
            else [path]
        )
        if not files:
            raise DataError(f"{path}: the folder holds no .parquet or .csv files")
    tables = []
    for f in files:
        try:
            data = _dataset(f, schema)
            if columns is not None:
                missing = [c for c in columns if c not in data.schema.names]
                if missing:
                    raise DataError(
                        f"{f}: no column {', '.join(map(repr, missing))} (needs {', '.join(columns)})"
                    )
            tables.append(data.to_table(columns=None if columns is None else list(columns)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{f}: cannot be read ({arrow_error(exc)})") from None
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{text}: files of different column types ({arrow_error(exc)})") from None


def count_rows(path: str | Path) -> int:
    """The number of rows of a dataset."""
    return _dataset(_check(Path(path))).count_rows()


def iter_batches(path: str | Path, rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """Stream a dataset as frames of at most ``rows`` rows (memory bounded by ``rows``)."""
    path = _check(Path(path))
    try:
        for batch in _dataset(path).to_batches(columns=columns, batch_size=rows):
            if batch.num_rows:
                yield batch.to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot be read ({arrow_error(exc)})") from None


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
