"""The Great Expectations adapter: real GX runs on small generated frames."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adapters.validation import (
    ValidationSummary,
    build_suite,
    raise_for_failures,
    table_passes,
    validate_frame,
    validate_or_raise,
    validate_table,
)
from mlops.datagen import fraud_schema, generate
from mlops.errors import DataError, ValidationFailed
from mlops.settings import CategoricalFeature, DatasetSchema, NumericFeature

ROWS = 2_000


@pytest.fixture(scope="module")
def schema() -> DatasetSchema:
    return fraud_schema()


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    return generate(ROWS, seed=11)


@pytest.fixture
def frame(clean: pd.DataFrame) -> pd.DataFrame:
    return clean.copy()


def lines_about(summary: ValidationSummary, column: str) -> list[str]:
    return [line for line in summary.failures if f"column {column!r}" in line]


# --------------------------------------------------------------------------- suite


def test_suite_is_named_after_the_schema_and_covers_every_declared_column(schema: DatasetSchema) -> None:
    """A schema's suite is named after it and checks that each declared column exists."""
    suite = build_suite(schema, require_label=True)
    assert suite.name == "card-transactions.labelled"
    existing = {e.column for e in suite.expectations if type(e).__name__ == "ExpectColumnToExist"}
    assert existing == set(schema.key_columns + schema.feature_names + (schema.label_column,))


def test_suite_without_label_has_no_label_expectation(schema: DatasetSchema) -> None:
    """Given require_label=False, no expectation of the suite is about the label column."""
    suite = build_suite(schema, require_label=False)
    assert suite.name == "card-transactions.unlabelled"
    assert all(getattr(e, "column", None) != schema.label_column for e in suite.expectations)


# --------------------------------------------------------------------------- passing frames


def test_generated_frame_passes(frame: pd.DataFrame, schema: DatasetSchema) -> None:
    """A frame from the generator passes every expectation of its schema."""
    summary = validate_frame(frame, schema)
    assert summary.success, summary.failures
    assert summary.failures == ()
    assert summary.failed == 0
    assert summary.evaluated == len(build_suite(schema, require_label=True).expectations)
    assert summary.rows == ROWS


def test_frame_without_label_passes_when_label_not_required(
    frame: pd.DataFrame, schema: DatasetSchema
) -> None:
    """A scoring frame without the label column passes with require_label=False."""
    summary = validate_frame(frame.drop(columns=[schema.label_column]), schema, require_label=False)
    assert summary.success, summary.failures


def test_frame_without_label_fails_when_label_required(frame: pd.DataFrame, schema: DatasetSchema) -> None:
    """A frame without the label column fails with require_label=True, naming the label."""
    summary = validate_frame(frame.drop(columns=[schema.label_column]), schema)
    assert summary.failures == ("column 'is_fraud' is missing",)


# --------------------------------------------------------------------------- defects
# One GX run covers them all: a frame carrying one defect in each of these columns. Each
# test then checks the line(s) about its own column.


def _negative_amounts(df: pd.DataFrame) -> None:
    df.loc[df.index[:12], "amount"] = -5.0


def _unknown_channel(df: pd.DataFrame) -> None:
    df.loc[df.index[:4], "channel"] = "teleport"


def _null_geo(df: pd.DataFrame) -> None:
    df.loc[df.index[:3], "geo"] = None


def _null_ids(df: pd.DataFrame) -> None:
    df.loc[df.index[:2], "transaction_id"] = None


def _null_credit_limits(df: pd.DataFrame) -> None:
    df.loc[df.index[:7], "credit_limit"] = np.nan


def _bad_label(df: pd.DataFrame) -> None:
    df.loc[df.index[:5], "is_fraud"] = 2


def _numeric_category(df: pd.DataFrame) -> None:
    df["card_type"] = 1


def _hours_as_strings(df: pd.DataFrame) -> None:
    df["hour_of_day"] = df["hour_of_day"].astype(str)


def _stray_string_in_object_column(df: pd.DataFrame) -> None:
    df["utilization"] = df["utilization"].astype(object)
    df.loc[df.index[0], "utilization"] = "n/a"


def _missing_column(df: pd.DataFrame) -> None:
    del df["email_age_days"]


DEFECTS: dict[str, tuple[Callable[[pd.DataFrame], None], str, str]] = {
    "out-of-range values": (
        _negative_amounts,
        "amount",
        "column 'amount': values must be between 0.0 and 100000.0 (12 of 2000 rows outside, e.g. -5.0)",
    ),
    "unknown category": (
        _unknown_channel,
        "channel",
        "column 'channel': values must be one of ['pos', 'ecommerce', 'atm', 'mobile_app'] "
        "(4 of 2000 rows outside, e.g. 'teleport')",
    ),
    "nulls in a categorical": (
        _null_geo,
        "geo",
        "column 'geo': must not be null (3 of 2000 rows null, 0.15%)",
    ),
    "nulls in the id column": (
        _null_ids,
        "transaction_id",
        "column 'transaction_id': must not be null (2 of 2000 rows null, 0.10%)",
    ),
    "nulls in a numeric feature": (
        _null_credit_limits,
        "credit_limit",
        "column 'credit_limit': must not be null (7 of 2000 rows null, 0.35%)",
    ),
    "bad label value": (
        _bad_label,
        "is_fraud",
        "column 'is_fraud': values must be one of [0, 1] (5 of 2000 rows outside, e.g. 2)",
    ),
    "categorical holding numbers": (
        _numeric_category,
        "card_type",
        "column 'card_type': expected a string type, got int64",
    ),
    # Wrong type only: the range check, which cannot compare strings, is not listed too.
    "numbers stored as strings": (
        _hours_as_strings,
        "hour_of_day",
        "column 'hour_of_day': expected a numeric type, got str",
    ),
    "stray string in an object column": (
        _stray_string_in_object_column,
        "utilization",
        "column 'utilization': expected a numeric type, got str (1 of 2000 rows, e.g. 'n/a')",
    ),
    # Missing only: the column's type, null and range checks, which GX also fails, are not listed.
    "missing column": (
        _missing_column,
        "email_age_days",
        "column 'email_age_days' is missing",
    ),
}


@pytest.fixture(scope="module")
def broken(clean: pd.DataFrame, schema: DatasetSchema) -> ValidationSummary:
    df = clean.copy()
    for mutate, _, _ in DEFECTS.values():
        mutate(df)
    return validate_frame(df, schema, source="broken")


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_fails_with_one_line_naming_column_and_problem(
    defect: str, broken: ValidationSummary
) -> None:
    """A defective column gives exactly one failure line, naming the column and the problem."""
    _, column, expected = DEFECTS[defect]
    assert not broken.success
    assert lines_about(broken, column) == [expected]


def test_defects_are_listed_once_each_in_suite_order(
    broken: ValidationSummary, schema: DatasetSchema
) -> None:
    """A frame with defects in ten columns lists exactly ten lines, in the suite's column order."""
    order = {c: i for i, c in enumerate(schema.key_columns + schema.feature_names + (schema.label_column,))}
    expected = sorted((line for _, _, line in DEFECTS.values()), key=lambda line: order[line.split("'")[1]])
    assert list(broken.failures) == expected
    # GX counts every failed expectation, including those folded into a 'missing' line.
    assert broken.failed > len(DEFECTS)


# --------------------------------------------------------------------------- a tiny schema with nullable columns


@pytest.fixture(scope="module")
def nullable_schema() -> DatasetSchema:
    return DatasetSchema(
        name="tiny",
        id_column="id",
        entity_column="user",
        timestamp_column=None,
        label_column="y",
        numeric=(NumericFeature(name="x", min=0.0, max=1.0, max_null_fraction=0.1),),
        categorical=(CategoricalFeature(name="c", categories=("a", "b"), max_null_fraction=0.1),),
        min_rows=10,
    )


def _tiny(null_x: int, null_c: int, rows: int = 100) -> pd.DataFrame:
    x = np.linspace(0.0, 1.0, rows)
    x[:null_x] = np.nan
    c = np.array(["a", "b"] * (rows // 2), dtype=object)
    c[:null_c] = None
    return pd.DataFrame({"id": [f"r{i}" for i in range(rows)], "user": "u", "x": x, "c": c, "y": 0})


def test_nulls_within_max_null_fraction_pass(nullable_schema: DatasetSchema) -> None:
    """Given max_null_fraction 0.1, a column with 10% nulls passes."""
    summary = validate_frame(_tiny(null_x=10, null_c=10), nullable_schema)
    assert summary.success, summary.failures


def test_nulls_beyond_max_null_fraction_fail(nullable_schema: DatasetSchema) -> None:
    """Given max_null_fraction 0.1, a column with 20% nulls fails, saying what is allowed."""
    summary = validate_frame(_tiny(null_x=20, null_c=0), nullable_schema)
    assert summary.failures == ("column 'x': at most 10.00% nulls allowed (20 of 100 rows null, 20.00%)",)


# --------------------------------------------------------------------------- raising


def test_raise_for_failures_returns_a_passing_summary() -> None:
    """raise_for_failures hands a passing summary back unchanged."""
    passed = ValidationSummary(
        suite="s", source="day-1.parquet", rows=10, success=True, evaluated=3, failed=0, failures=()
    )
    assert raise_for_failures(passed) is passed


def test_raise_for_failures_raises_with_counts_and_lines() -> None:
    """raise_for_failures on a failed summary raises ValidationFailed: source, counts, each line."""
    failed = ValidationSummary(
        suite="s",
        source="day-1.parquet",
        rows=10,
        success=False,
        evaluated=3,
        failed=2,
        failures=("column 'a' is missing",),
    )
    with pytest.raises(ValidationFailed) as caught:
        raise_for_failures(failed)
    assert str(caught.value) == "day-1.parquet: 2 of 3 expectations failed\n  - column 'a' is missing"
    assert caught.value.failures == ["column 'a' is missing"]


def test_validate_or_raise_returns_the_summary_of_a_passing_frame(nullable_schema: DatasetSchema) -> None:
    """validate_or_raise on a valid frame returns its passing summary."""
    summary = validate_or_raise(_tiny(null_x=0, null_c=0), nullable_schema, source="day-1.parquet")
    assert summary.success
    assert summary.source == "day-1.parquet"


def test_validate_or_raise_raises_validation_failed_naming_source_and_counts(
    nullable_schema: DatasetSchema,
) -> None:
    """validate_or_raise on a bad frame raises ValidationFailed (a DataError) with every line."""
    df = _tiny(null_x=0, null_c=0)
    df.loc[df.index[:2], "x"] = 7.5
    with pytest.raises(ValidationFailed) as caught:
        validate_or_raise(df, nullable_schema, source="partition 7")
    evaluated = len(build_suite(nullable_schema, require_label=True).expectations)
    assert str(caught.value).splitlines()[0] == f"partition 7: 1 of {evaluated} expectations failed"
    assert caught.value.failures == [
        "column 'x': values must be between 0.0 and 1.0 (2 of 100 rows outside, e.g. 7.5)"
    ]
    assert isinstance(caught.value, DataError)


def test_too_few_rows_fail_the_row_count(nullable_schema: DatasetSchema) -> None:
    """A frame shorter than min_rows fails with a table-level line giving both counts."""
    summary = validate_frame(_tiny(null_x=0, null_c=0, rows=6), nullable_schema)
    assert summary.failures == ("table: expected at least 10 rows, got 6",)


# --------------------------------------------------------------------------- runtime


def test_validated_frame_is_not_kept_alive_by_gx(nullable_schema: DatasetSchema) -> None:
    """After validate_frame returns, nothing of GX's run refers to the frame, not even
    garbage waiting for a collection: the frame goes the moment its owner drops it (a
    long-lived scoring worker otherwise grew by the GX metrics of every partition)."""
    df = _tiny(null_x=0, null_c=0)
    ref = weakref.ref(df)
    validate_frame(df, nullable_schema)
    del df
    assert ref() is None


def test_frames_validated_on_two_threads_get_their_own_results(
    clean: pd.DataFrame, schema: DatasetSchema
) -> None:
    """A good and a bad frame validated at the same time on two threads each get their own verdict."""
    bad = clean.copy()
    _negative_amounts(bad)
    results: dict[str, ValidationSummary] = {}

    def run(name: str, df: pd.DataFrame) -> None:
        results[name] = validate_frame(df, schema, source=name)

    threads = [threading.Thread(target=run, args=(n, df)) for n, df in (("good", clean), ("bad", bad))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["good"].success, results["good"].failures
    assert results["bad"].failures == (DEFECTS["out-of-range values"][2],)


# --------------------------------------------------------------------------- Arrow tables


ARROW_DEFECTS = [d for d in DEFECTS if d != "stray string in an object column"]  # not one Arrow type


def test_a_clean_table_passes_the_arrow_checks_with_every_expectation_evaluated(
    clean: pd.DataFrame, schema: DatasetSchema
) -> None:
    """A generated table passes ``table_passes`` (no GX run) and its summary counts every
    expectation of the suite, as GX's would."""
    table = pa.Table.from_pandas(clean, preserve_index=False)
    assert table_passes(table, schema)
    summary = validate_table(table, schema, source="part 0")
    assert summary.success and summary.failures == () and summary.rows == ROWS
    assert summary.evaluated == len(build_suite(schema, require_label=True).expectations)
    assert summary == validate_frame(table.to_pandas(), schema, source="part 0")
    # A frame expected to fail but passing gets the same verdict from its one GX run.
    assert summary == validate_frame(table.to_pandas(), schema, source="part 0", expect_failure=True)


@pytest.mark.parametrize("defect", ARROW_DEFECTS)
def test_a_defective_table_fails_with_the_same_lines_as_the_frame_validated_by_gx(
    defect: str, clean: pd.DataFrame, schema: DatasetSchema
) -> None:
    """Each defect makes the Arrow checks fail, and the table's summary (GX's verdict and
    lines, from its one GX run) is the one GX's verdict-then-results runs give the same
    rows as a pandas frame."""
    df = clean.copy()
    mutate, _, expected = DEFECTS[defect]
    mutate(df)
    table = pa.Table.from_pandas(df, preserve_index=False)
    assert not table_passes(table, schema)
    summary = validate_table(table, schema, source="part 3")
    assert summary == validate_frame(table.to_pandas(), schema, source="part 3")
    assert summary.failures == (expected,)


def test_nulls_and_nan_count_alike_in_the_arrow_checks(nullable_schema: DatasetSchema) -> None:
    """NaN is a null for GX on pandas, so for the Arrow checks too: within max_null_fraction
    it passes, beyond it it fails."""
    ok = pa.Table.from_pandas(_tiny(null_x=10, null_c=10), preserve_index=False)
    assert table_passes(ok, nullable_schema)
    too_many = pa.Table.from_pandas(_tiny(null_x=11, null_c=0), preserve_index=False)
    assert not table_passes(too_many, nullable_schema)
    assert not validate_table(too_many, nullable_schema).success


@pytest.mark.parametrize("defect", [None, "unknown category", "nulls in a categorical"])
def test_categoricals_read_dictionary_encoded_validate_as_plain_strings(
    defect: str | None, clean: pd.DataFrame, schema: DatasetSchema, tmp_path: Path
) -> None:
    """Scoring workers read categorical columns dictionary-encoded from Parquet: such a table
    passes the Arrow checks when its rows do, and a defective one gets GX's very lines for
    the plain frame."""
    from adapters import parquet_input
    from mlops.partitions import plan_partitions

    df = clean.copy()
    if defect:
        DEFECTS[defect][0](df)
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    (part,) = plan_partitions(parquet_input.layouts(path), ROWS, min_rows=1)
    table = parquet_input.read_partition(part, df.columns, dictionary=schema.categorical_names)
    assert all(pa.types.is_dictionary(table.schema.field(c).type) for c in schema.categorical_names)
    assert table_passes(table, schema) is (defect is None)
    summary = validate_table(table, schema, source="part 1")
    assert summary == validate_frame(df, schema, source="part 1")
    assert summary.failures == ((DEFECTS[defect][2],) if defect else ())
