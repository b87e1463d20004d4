"""Partition planning: pure, from Parquet metadata only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlops.partitions import FileLayout, Partition, plan_partitions


def rows_covered(plan: tuple[Partition, ...]) -> list[tuple[str, int, int]]:
    """Every (file, row group, row) the plan reads, in plan order."""
    return [(p.path, p.row_group, r) for part in plan for p in part.pieces for r in range(p.start, p.stop)]


def test_whole_row_groups_are_gathered_up_to_the_target() -> None:
    """Given 250k-row row groups and a 500k target, each partition is two whole row groups."""
    plan = plan_partitions([FileLayout("a.parquet", (250_000,) * 4)], 500_000)
    assert [p.rows for p in plan] == [500_000, 500_000]
    assert all(piece.whole for p in plan for piece in p.pieces)
    assert [p.first_row for p in plan] == [0, 500_000]
    assert plan[1].describe() == "partition 1 (input rows 500000-999999)"


def test_a_row_group_larger_than_the_target_is_cut_into_equal_slices() -> None:
    """A 1M-row row group and a 300k target give four slices of 250k, none whole."""
    plan = plan_partitions([FileLayout("a.parquet", (1_000_000,))], 300_000)
    assert [p.rows for p in plan] == [250_000] * 4
    assert [(p.pieces[0].start, p.pieces[0].stop) for p in plan][:2] == [(0, 250_000), (250_000, 500_000)]
    assert not any(p.pieces[0].whole for p in plan)


def test_partitions_span_files_and_never_fall_below_min_rows() -> None:
    """A short file between big ones is merged into a neighbour, not left as a tiny partition."""
    files = [FileLayout("a", (1000,)), FileLayout("b", (30,)), FileLayout("c", (1000,))]
    plan = plan_partitions(files, 1000, min_rows=100)
    assert all(p.rows >= 100 for p in plan)
    assert sum(p.rows for p in plan) == 2030


def test_an_input_smaller_than_min_rows_is_one_partition_and_empty_groups_are_skipped() -> None:
    """Fewer rows than min_rows in total: one partition with all of them; no rows: no partitions."""
    plan = plan_partitions([FileLayout("a", (0, 20, 0, 30))], 10, min_rows=100)
    assert [p.rows for p in plan] == [50]
    assert plan_partitions([FileLayout("a", (0,))], 10) == ()


def test_bad_arguments_are_refused() -> None:
    """A non-positive target or min_rows, or a negative row count, is a ValueError."""
    with pytest.raises(ValueError):
        plan_partitions([], 0)
    with pytest.raises(ValueError):
        plan_partitions([], 10, min_rows=0)
    with pytest.raises(ValueError):
        plan_partitions([FileLayout("a", (-1,))], 10)


@settings(deadline=None, max_examples=150)
@given(
    files=st.lists(st.lists(st.integers(0, 500), min_size=0, max_size=6), min_size=1, max_size=4),
    target=st.integers(1, 400),
    min_rows=st.integers(1, 60),
)
def test_every_input_row_is_read_exactly_once_in_order(
    files: list[list[int]], target: int, min_rows: int
) -> None:
    """For any layout, the plan reads each row once, in input order, numbered 0..n-1."""
    layouts = [FileLayout(f"f{i}", tuple(groups)) for i, groups in enumerate(files)]
    plan = plan_partitions(layouts, target, min_rows=min_rows)
    expected = [
        (f"f{i}", g, r) for i, groups in enumerate(files) for g, n in enumerate(groups) for r in range(n)
    ]
    assert rows_covered(plan) == expected
    assert [p.index for p in plan] == list(range(len(plan)))
    total = len(expected)
    if total >= min_rows:
        assert all(p.rows >= min_rows for p in plan)
    starts = [0]
    for p in plan[:-1]:
        starts.append(starts[-1] + p.rows)
    assert [p.first_row for p in plan] == starts[: len(plan)]
