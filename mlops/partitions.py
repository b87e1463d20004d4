"""Partition planning for batch scoring: which rows of the input each Dask task reads.

Pure: the plan is computed from Parquet metadata alone (files and the row count of each
row group), so the driver never reads data and every worker reads only its own rows.

A partition is a run of consecutive input rows made of *pieces*; a piece is a range of
rows inside one row group of one file. The planner keeps row groups whole whenever it
can: Parquet is read a row group at a time, so cutting one in two makes each half decode
the rows before it. Only a row group larger than the target is cut, into equal slices.
Partitions are numbered 0..n-1 in input order, which is also the index of the part each
one writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_PARTITIONS = 100_000
"""The score store numbers parts with five digits."""


@dataclass(frozen=True)
class FileLayout:
    """One Parquet file of the input: its path and the row count of each row group."""

    path: str
    row_groups: tuple[int, ...]

    @property
    def rows(self) -> int:
        """Rows in the file (the sum of its row groups)."""
        return sum(self.row_groups)


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of row group ``row_group`` of ``path``."""

    path: str
    row_group: int
    start: int
    stop: int
    row_group_rows: int

    @property
    def rows(self) -> int:
        """Rows in this slice."""
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        """Whether the piece is its entire row group (read without slicing)."""
        return self.start == 0 and self.stop == self.row_group_rows


@dataclass(frozen=True)
class Partition:
    """What one task scores: pieces in input order, starting at input row ``first_row``."""

    index: int
    pieces: tuple[Piece, ...]
    first_row: int

    @property
    def rows(self) -> int:
        """Rows in the partition, over all its pieces."""
        return sum(p.rows for p in self.pieces)

    def describe(self) -> str:
        """``partition 3 (input rows 750000-999999)``: how messages name a partition."""
        last = self.first_row + self.rows - 1
        return f"partition {self.index} (input rows {self.first_row}-{last})"


def _slices(rows: int, target: int) -> list[tuple[int, int]]:
    """``rows`` cut into ``ceil(rows / target)`` ranges whose sizes differ by at most one."""
    count = -(-rows // target)
    base, extra = divmod(rows, count)
    out, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def plan_partitions(
    files: Sequence[FileLayout],
    rows_per_partition: int,
    *,
    min_rows: int = 1,
) -> tuple[Partition, ...]:
    """Cut the input into partitions of about ``rows_per_partition`` rows.

    Whole row groups are gathered, in order, while they fit the target; a row group larger
    than the target becomes equal slices of at most the target. A partition smaller than
    ``min_rows`` (a short row group between two big ones, a short last file) is merged into
    its neighbour, so every partition has at least ``min_rows`` rows unless the whole input
    has fewer, in which case it is one partition. Empty row groups are skipped; an empty
    input has no partitions.
    """
    if rows_per_partition < 1:
        raise ValueError(f"rows_per_partition must be at least 1, got {rows_per_partition}")
    if min_rows < 1:
        raise ValueError(f"min_rows must be at least 1, got {min_rows}")

    groups: list[list[Piece]] = []
    current: list[Piece] = []
    current_rows = 0
    for layout in files:
        for rg, rows in enumerate(layout.row_groups):
            if rows < 0:
                raise ValueError(f"{layout.path}: row group {rg} has a negative row count")
            if rows == 0:
                continue
            if current and current_rows + rows > rows_per_partition:
                groups.append(current)
                current, current_rows = [], 0
            if rows > rows_per_partition:
                for start, stop in _slices(rows, rows_per_partition):
                    groups.append([Piece(layout.path, rg, start, stop, rows)])
                continue
            current.append(Piece(layout.path, rg, 0, rows, rows))
            current_rows += rows
    if current:
        groups.append(current)

    merged: list[list[Piece]] = []
    pending: list[Piece] = []  # small groups waiting for a neighbour
    for group in groups:
        group = pending + group
        pending = []
        if sum(p.rows for p in group) < min_rows:
            if merged:
                merged[-1].extend(group)
            else:
                pending = group
            continue
        merged.append(group)
    if pending:
        merged.append(pending)

    if len(merged) > MAX_PARTITIONS:
        raise ValueError(
            f"{len(merged)} partitions exceed the limit of {MAX_PARTITIONS}; raise rows_per_partition"
        )
    out: list[Partition] = []
    first = 0
    for index, group in enumerate(merged):
        part = Partition(index=index, pieces=tuple(group), first_row=first)
        out.append(part)
        first += part.rows
    return tuple(out)
