"""Reading a scoring input by partition: Parquet metadata for the plan, row groups for workers.

The driver only lists files and reads their footers (``layouts``); each Dask worker reads
the rows of its own partition (``read_partition``), so nothing big ever travels through
the driver and memory follows the partition size. A row group cut into slices is streamed
in batches and only the slice's rows are kept.

A CSV input has no footer to plan from and cannot be cut by rows without reading it, so
``parquet_input`` first streams each CSV file once into a Parquet copy (typed as training
types it, row groups of a partition's size, memory bounded by one row group) in a work
folder the caller removes afterwards; a CSV that cannot be parsed stops the run there.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from adapters.datasets import arrow_error, csv_convert_options
from mlops.errors import DataError
from mlops.partitions import FileLayout, Partition, Piece
from mlops.settings import DatasetSchema

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
_STREAM_BATCH = 65_536
_CSV_BLOCK_BYTES = 4 << 20


def input_files(path: str | Path) -> list[Path]:
    """The files of an input: a Parquet or CSV file itself, or a folder's ones in sorted order."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    suffixes = PARQUET_SUFFIXES + CSV_SUFFIXES
    if p.is_file():
        if p.suffix.lower() not in suffixes:
            raise DataError(
                f"{p}: batch scoring reads Parquet or CSV (a .parquet/.csv file or a folder of them)"
            )
        return [p]
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and f.suffix.lower() in suffixes and not f.name.startswith((".", "_"))
    )
    if not files:
        raise DataError(f"{p}: the folder holds no .parquet or .csv files")
    return files


def is_csv(path: Path) -> bool:
    """Whether ``path`` is read as CSV."""
    return path.suffix.lower() in CSV_SUFFIXES


def csv_to_parquet(src: Path, dest: Path, rows_per_group: int, schema: DatasetSchema) -> int:
    """Stream the CSV file ``src`` into the Parquet file ``dest`` in row groups of
    ``rows_per_group`` rows; the rows written.

    Raises ``DataError`` naming the file (and pyarrow's row and column) when the CSV cannot
    be parsed or a value does not convert to its column's type; nothing is left at ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    writer: pq.ParquetWriter | None = None
    pending: list[pa.RecordBatch] = []
    held = rows = 0

    def flush(limit: int) -> None:
        nonlocal pending, held, writer, rows
        table = pa.Table.from_batches(pending)
        while table.num_rows >= limit:
            chunk, table = table.slice(0, limit), table.slice(limit)
            if writer is None:
                writer = pq.ParquetWriter(str(tmp), chunk.schema, compression="zstd")
            writer.write_table(chunk, row_group_size=limit)
            rows += chunk.num_rows
        pending, held = table.to_batches(), table.num_rows

    try:
        reader = pacsv.open_csv(
            src,
            read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
            convert_options=csv_convert_options(schema),
        )
        for batch in reader:
            pending.append(batch)
            held += batch.num_rows
            if held >= rows_per_group:
                flush(rows_per_group)
        if held:
            flush(held)
        if writer is None:  # a header and no rows: an empty file of the header's columns
            writer = pq.ParquetWriter(str(tmp), reader.schema, compression="zstd")
        writer.close()
        writer = None
        os.replace(tmp, dest)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{src}: not a readable CSV file ({_name_column(arrow_error(exc), src)})") from None
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return rows


def _name_column(message: str, src: Path) -> str:
    """pyarrow's "In CSV column #3: ..." with the column's name, read from the header."""
    match = re.match(r"In CSV column #(\d+): ", message)
    if not match:
        return message
    try:
        with open(src, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return message
    index = int(match.group(1))
    if index >= len(header):
        return message
    return f"column {header[index]!r}: {message[match.end() :]}"


def parquet_input(path: str | Path, workdir: str | Path, rows_per_group: int, schema: DatasetSchema) -> Path:
    """A Parquet input to plan and score: ``path`` itself when it holds only Parquet, else
    ``workdir`` holding a Parquet copy of each CSV file (and a link to each Parquet file)."""
    src = Path(path)
    files = input_files(src)
    if not any(is_csv(f) for f in files):
        return src
    out = Path(workdir)
    for f in files:
        rel = Path(f.name) if src.is_file() else f.relative_to(src)
        if is_csv(f):
            csv_to_parquet(f, out / rel.with_name(rel.name + ".parquet"), rows_per_group, schema)
        else:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).symlink_to(f.resolve())
    return out


def layouts(path: str | Path) -> list[FileLayout]:
    """Row counts of every row group of every input file, from the footers alone."""
    out = []
    for f in input_files(path):
        try:
            meta = pq.read_metadata(f)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{f}: not a readable Parquet file ({exc})") from None
        out.append(FileLayout(str(f), tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))))
    return out


def _read_piece_group(pf: pq.ParquetFile, pieces: Sequence[Piece], columns: list[str]) -> pa.Table:
    if all(p.whole for p in pieces):
        return pf.read_row_groups([p.row_group for p in pieces], columns=columns, use_threads=False)
    tables = []
    for piece in pieces:
        if piece.whole:
            tables.append(pf.read_row_group(piece.row_group, columns=columns, use_threads=False))
            continue
        # A slice of a big row group: stream it, keep the slice's rows only.
        offset, kept = 0, []
        for batch in pf.iter_batches(
            batch_size=_STREAM_BATCH, row_groups=[piece.row_group], columns=columns, use_threads=False
        ):
            lo, hi = max(piece.start - offset, 0), min(piece.stop - offset, batch.num_rows)
            if lo < hi:
                kept.append(batch.slice(lo, hi - lo))
            offset += batch.num_rows
            if offset >= piece.stop:
                break
        tables.append(pa.Table.from_batches(kept, schema=kept[0].schema if kept else None))
    return pa.concat_tables(tables)


def read_partition(partition: Partition, columns: Sequence[str], dictionary: Sequence[str] = ()) -> pa.Table:
    """The rows of ``partition``, with those of ``columns`` that the input has, read on the
    calling thread (on a Dask worker, that thread is already one of the cluster's lanes).

    String columns named in ``dictionary`` (the categorical features) come out
    dictionary-encoded, straight from Parquet's dictionary pages: each distinct value is
    decoded once and rows are integer indices, instead of one string per row. Columns the
    input lacks are left out, not invented: validation reports them. Files of one input
    may differ in their optional columns; missing ones become nulls.
    """
    tables = []
    for path, pieces in groupby(partition.pieces, key=lambda p: p.path):
        try:
            meta = pq.read_metadata(path)
            # pyarrow refuses names the file lacks and leaves non-string columns as they are.
            as_dictionary = [c for c in dictionary if c in meta.schema.names]
            pf = pq.ParquetFile(path, metadata=meta, read_dictionary=as_dictionary or None)
            present = set(pf.schema_arrow.names)
            tables.append(_read_piece_group(pf, list(pieces), [c for c in columns if c in present]))
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}: cannot read {partition.describe()} ({exc})") from None
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")
