"""Reading a scoring input by partition: Parquet metadata for the plan, row groups for workers.

The driver only lists files and reads their footers (``layouts``); each Dask worker reads
the rows of its own partition (``read_partition``), so nothing big ever travels through
the driver and memory follows the partition size. A row group cut into slices is streamed
in batches and only the slice's rows are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mlops.errors import DataError
from mlops.partitions import FileLayout, Partition, Piece

PARQUET_SUFFIXES = (".parquet", ".pq")
_STREAM_BATCH = 65_536


def input_files(path: str | Path) -> list[Path]:
    """The Parquet files of an input: the file itself, or a folder's files in sorted order."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() not in PARQUET_SUFFIXES:
            raise DataError(f"{p}: batch scoring reads Parquet (a .parquet file or a folder of them)")
        return [p]
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and f.suffix.lower() in PARQUET_SUFFIXES and not f.name.startswith((".", "_"))
    )
    if not files:
        raise DataError(f"{p}: the folder holds no .parquet files")
    return files


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


def read_partition(partition: Partition, columns: Sequence[str]) -> pa.Table:
    """The rows of ``partition``, with those of ``columns`` that the input has, read on the
    calling thread (on a Dask worker, that thread is already one of the cluster's lanes).

    Columns the input lacks are left out, not invented: validation reports them. Files of
    one input may differ in their optional columns; missing ones become nulls.
    """
    tables = []
    for path, pieces in groupby(partition.pieces, key=lambda p: p.path):
        try:
            pf = pq.ParquetFile(path)
            present = set(pf.schema_arrow.names)
            tables.append(_read_piece_group(pf, list(pieces), [c for c in columns if c in present]))
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}: cannot read {partition.describe()} ({exc})") from None
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")
