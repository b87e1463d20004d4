"""Data validation with Great Expectations (GX Core 1.x).

A ``DatasetSchema`` becomes one GX ``ExpectationSuite``; a pandas frame is validated by a
GX batch run of that suite (a second run, for the details, only when it fails), on one
ephemeral Data Context per process. GX's result is then condensed into a
``ValidationSummary`` of one readable line per problem, for example::

    column 'amount': values must be between 0.0 and 100000.0 (12 of 1000 rows outside, e.g. -5.0)

A column that is missing, or has the wrong type, gives one line for that column: the
checks that depend on it (range, allowed values) cannot say anything useful and are folded
into that line instead of being listed as a cascade of errors.

``great_expectations`` takes seconds to import, so it is imported on first use, never when
this module is imported.
"""

from __future__ import annotations

import functools
import gc
import os
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlops.errors import DataError, ValidationFailed
from mlops.settings import DatasetSchema

if TYPE_CHECKING:
    import great_expectations as gx
    import pandas as pd
    import pyarrow as pa
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult

# Dtype names GX accepts as "numeric": numpy dtypes for typed columns, and ``int``/``float``
# for object columns, whose values GX then checks one by one.
NUMERIC_TYPES: tuple[str, ...] = (
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "Int8Dtype",
    "Int16Dtype",
    "Int32Dtype",
    "Int64Dtype",
    "UInt8Dtype",
    "UInt16Dtype",
    "UInt32Dtype",
    "UInt64Dtype",
    "Float32Dtype",
    "Float64Dtype",
    "int",
    "float",
)
# ``str`` matches pandas' string dtypes ("str", "string", either storage) and, value by value,
# object columns holding Python strings. A pandas ``category`` column does not match.
STRING_TYPE = "str"

# Each expectation carries what it checks in ``meta``, so results can be grouped per column.
_CHECK = "check"
_COLUMN = "column"
# Checks that say nothing useful when the column's type is wrong.
_TYPE_DEPENDENT = frozenset({"range", "allowed"})
# How many offending values GX returns per failed expectation, and how many we quote.
_PARTIAL_UNEXPECTED = 3
_RESULT_FORMAT: dict[str, Any] = {
    "result_format": "BASIC",
    "partial_unexpected_count": _PARTIAL_UNEXPECTED,
}
# The first run of a frame asks GX for the verdict alone: the same counts decide each
# expectation, but no examples of offending values are collected (see validate_frame).
_VERDICT_FORMAT: dict[str, Any] = {"result_format": "BOOLEAN_ONLY"}
_MAX_LISTED_VALUES = 6
# GX reports a dtype by its scalar type's name; a few read better under pandas' own name.
_GX_TYPE_NAMES = {"CategoricalDtypeType": "category", "object_": "object"}

_DATASOURCE = "frames"
_ASSET = "frame"
_BATCH_DEFINITION = "whole-frame"


@dataclass(frozen=True)
class ValidationSummary:
    """The outcome of validating one frame: counts and one readable line per problem."""

    suite: str
    source: str
    rows: int
    success: bool
    evaluated: int
    failed: int
    failures: tuple[str, ...]


# --------------------------------------------------------------------------- suite


def _meta(check: str, column: str | None = None) -> dict[str, str]:
    return {_CHECK: check, _COLUMN: column} if column else {_CHECK: check}


def _mostly(max_null_fraction: float) -> float:
    return round(1.0 - max_null_fraction, 12)


def _suite_name(schema: DatasetSchema, require_label: bool) -> str:
    return f"{schema.name}.{'labelled' if require_label else 'unlabelled'}"


@dataclass(frozen=True)
class Check:
    """One expectation of a schema's suite, as plain data: what it checks, on which column.

    ``build_suite`` turns each into its GX expectation; ``table_passes`` evaluates the same
    list on an Arrow table without GX. ``check`` is one of rows, exists, numeric, string,
    nulls, range, allowed; ``params`` are the GX expectation's arguments.
    """

    check: str
    column: str | None
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        """``params`` as a dict."""
        return dict(self.params)


def checks(schema: DatasetSchema, *, require_label: bool) -> tuple[Check, ...]:
    """The checks a frame of ``schema`` must pass, in suite order.

    Every declared column must exist (key columns, features, and the label when
    ``require_label``); numeric features must have a numeric type and lie in their declared
    range; categoricals must be strings from their declared categories; each column's null
    fraction must stay within its ``max_null_fraction`` (zero for keys and the label); the
    label takes only ``label_values``; the frame has at least ``min_rows`` rows. Extra columns
    are allowed.
    """
    out: list[Check] = [Check("rows", None, (("min_value", schema.min_rows),))]

    def not_null(column: str, max_null_fraction: float) -> None:
        if max_null_fraction < 1.0:
            out.append(Check("nulls", column, (("mostly", _mostly(max_null_fraction)),)))

    for key in schema.key_columns:
        out.append(Check("exists", key))
        not_null(key, 0.0)
    for num in schema.numeric:
        out.append(Check("exists", num.name))
        out.append(Check("numeric", num.name, (("type_list", NUMERIC_TYPES),)))
        not_null(num.name, num.max_null_fraction)
        if num.min is not None or num.max is not None:
            out.append(Check("range", num.name, (("min_value", num.min), ("max_value", num.max))))
    for cat in schema.categorical:
        out.append(Check("exists", cat.name))
        out.append(Check("string", cat.name, (("type_", STRING_TYPE),)))
        not_null(cat.name, cat.max_null_fraction)
        out.append(Check("allowed", cat.name, (("value_set", tuple(cat.categories)),)))
    if require_label:
        label = schema.label_column
        out.append(Check("exists", label))
        not_null(label, 0.0)
        out.append(Check("allowed", label, (("value_set", tuple(schema.label_values)),)))
    return tuple(out)


def _expectation(check: Check) -> Any:
    import great_expectations as gx

    E = gx.expectations
    kw = check.kwargs
    meta = _meta(check.check, check.column)
    if check.check == "rows":
        return E.ExpectTableRowCountToBeBetween(min_value=kw["min_value"], meta=meta)
    if check.check == "exists":
        return E.ExpectColumnToExist(column=check.column, meta=meta)
    if check.check == "numeric":
        return E.ExpectColumnValuesToBeInTypeList(
            column=check.column, type_list=list(kw["type_list"]), meta=meta
        )
    if check.check == "string":
        return E.ExpectColumnValuesToBeOfType(column=check.column, type_=kw["type_"], meta=meta)
    if check.check == "nulls":
        return E.ExpectColumnValuesToNotBeNull(column=check.column, mostly=kw["mostly"], meta=meta)
    if check.check == "range":
        return E.ExpectColumnValuesToBeBetween(
            column=check.column, min_value=kw["min_value"], max_value=kw["max_value"], meta=meta
        )
    if check.check == "allowed":
        return E.ExpectColumnValuesToBeInSet(column=check.column, value_set=list(kw["value_set"]), meta=meta)
    raise ValueError(f"unknown check {check.check!r}")


def build_suite(schema: DatasetSchema, *, require_label: bool) -> gx.ExpectationSuite:
    """The GX expectation suite a frame of ``schema`` must pass: one expectation per ``checks``."""
    import great_expectations as gx

    return gx.ExpectationSuite(
        name=_suite_name(schema, require_label),
        expectations=[_expectation(c) for c in checks(schema, require_label=require_label)],
        meta={"dataset": schema.name, "require_label": require_label},
    )


@functools.lru_cache(maxsize=32)
def _cached_suite(schema: DatasetSchema, require_label: bool) -> gx.ExpectationSuite:
    # Read-only once built: validate_frame never mutates it.
    return build_suite(schema, require_label=require_label)


# --------------------------------------------------------------------------- GX runtime


@dataclass(frozen=True)
class _GxRun:
    """GX's verdict on one frame: each expectation's result, and the suite's statistics."""

    results: list[ExpectationValidationResult]
    success: bool
    evaluated: int
    failed: int


class _Runtime:
    """The process's ephemeral GX Data Context, made once and reused."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        # Offline and quiet. GX Core 1.24 no longer ships an analytics client, but both
        # documented switches are set so that a later 1.x cannot turn it back on (either
        # one set to False disables it). Progress bars would print a line per run to stderr.
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        )
        self.context = gx.get_context(mode="ephemeral", project_config=config)

    def run(self, df: pd.DataFrame, suite: gx.ExpectationSuite, result_format: Mapping[str, Any]) -> _GxRun:
        """One GX validation of ``suite`` on ``df`` through GX's public batch API.

        Each run gets a pandas data source of its own, deleted afterwards: a data source's
        execution engine keeps the batches it loaded, which would keep the last (possibly
        1M-row) frame alive, and two threads never share one. ``Batch.validate`` keeps no
        result in the context (``ValidationDefinition.run`` would, and its store would grow
        for as long as a scoring worker lives).
        """
        name = f"{_DATASOURCE}-{uuid.uuid4().hex}"
        source = self.context.data_sources.add_pandas(name)
        try:
            definition = source.add_dataframe_asset(_ASSET).add_batch_definition_whole_dataframe(
                _BATCH_DEFINITION
            )
            batch = definition.get_batch(batch_parameters={"dataframe": df})
            result = batch.validate(suite, result_format=dict(result_format))
        finally:
            self.context.data_sources.delete(name)
        stats = result.statistics
        return _GxRun(
            list(result.results),
            bool(result.success),
            int(stats["evaluated_expectations"]),
            int(stats["unsuccessful_expectations"]),
        )


_runtime: _Runtime | None = None
_runtime_lock = threading.Lock()


def _get_runtime() -> _Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = _Runtime()
        return _runtime


# --------------------------------------------------------------------------- messages


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if hasattr(value, "item"):  # numpy scalar -> Python scalar for a clean repr
        value = value.item()
    return repr(value)


def _fmt_set(values: Sequence[Any]) -> str:
    shown = ", ".join(_fmt(v) for v in values[:_MAX_LISTED_VALUES])
    more = len(values) - _MAX_LISTED_VALUES
    return f"[{shown}{f', +{more} more' if more > 0 else ''}]"


def _examples(result: Mapping[str, Any]) -> str:
    values = list(result.get("partial_unexpected_list") or ())
    if not values:
        return ""
    return ", e.g. " + ", ".join(_fmt(v) for v in dict.fromkeys(map(_hashable, values)))


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _rows(result: Mapping[str, Any], verb: str = "") -> str:
    counted = f"{result.get('unexpected_count', '?')} of {result.get('element_count', '?')} rows"
    return f"{counted} {verb}" if verb else counted


def _type_names(values: Iterable[Any]) -> str:
    return ", ".join(dict.fromkeys(type(v).__name__ for v in values)) or "other values"


def _range_text(kwargs: Mapping[str, Any]) -> str:
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is not None and hi is not None:
        return f"between {_fmt(lo)} and {_fmt(hi)}"
    return f">= {_fmt(lo)}" if lo is not None else f"<= {_fmt(hi)}"


def _describe(check: str, column: str | None, kwargs: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    where = f"column {column!r}"
    if check == "rows":
        return f"table: expected at least {kwargs['min_value']} rows, got {result.get('observed_value')}"
    if check == "exists":
        return f"{where} is missing"
    if check in ("numeric", "string"):
        wanted = "a numeric" if check == "numeric" else "a string"
        if "observed_value" in result:  # typed column: GX compared the dtype
            observed = str(result["observed_value"])
            return f"{where}: expected {wanted} type, got {_GX_TYPE_NAMES.get(observed, observed)}"
        # object column: GX checked each value
        values = result.get("partial_unexpected_list") or ()
        return (
            f"{where}: expected {wanted} type, got {_type_names(values)} ({_rows(result)}{_examples(result)})"
        )
    if check == "nulls":
        allowed = 1.0 - float(kwargs.get("mostly", 1.0))
        nulls = f"{_rows(result, 'null')}, {float(result.get('unexpected_percent') or 0.0):.2f}%"
        if allowed <= 0.0:
            return f"{where}: must not be null ({nulls})"
        return f"{where}: at most {allowed:.2%} nulls allowed ({nulls})"
    if check == "range":
        return (
            f"{where}: values must be {_range_text(kwargs)} ({_rows(result, 'outside')}{_examples(result)})"
        )
    if check == "allowed":
        return (
            f"{where}: values must be one of {_fmt_set(list(kwargs.get('value_set') or ()))} "
            f"({_rows(result, 'outside')}{_examples(result)})"
        )
    return f"{where}: {check} check failed"


def _exception_message(res: ExpectationValidationResult) -> str | None:
    info = res.exception_info or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for nested in info.values():  # GX keys errors by the metric that raised them
        if isinstance(nested, Mapping) and nested.get("raised_exception"):
            return str(nested.get("exception_message"))
    return None


def _summarize(results: Sequence[ExpectationValidationResult]) -> list[str]:
    """One line per problem, from GX's expectation results, in suite order.

    A missing column gets only its ``is missing`` line, and a column of the wrong type drops
    its range and allowed-value failures: those follow from the first problem.
    """
    failed = [r for r in results if not r.success]
    meta = [dict(r.expectation_config.meta or {}) for r in failed]
    missing = {m.get(_COLUMN) for m in meta if m.get(_CHECK) == "exists"}
    mistyped = {m.get(_COLUMN) for m in meta if m.get(_CHECK) in ("numeric", "string")}
    lines: list[str] = []
    for res, m in zip(failed, meta, strict=True):
        check, column = m.get(_CHECK, "unknown"), m.get(_COLUMN)
        if column in missing and check != "exists":
            continue
        if column in mistyped and check in _TYPE_DEPENDENT:
            continue
        config = res.expectation_config
        error = _exception_message(res)
        if error is not None:
            subject = f"column {column!r}" if column else "table"
            lines.append(f"{subject}: {config.type} could not be evaluated: {error}")
            continue
        lines.append(_describe(check, column, config.kwargs, res.result or {}))
    return lines


# --------------------------------------------------------------------------- API


def validate_frame(
    df: pd.DataFrame,
    schema: DatasetSchema,
    *,
    require_label: bool = True,
    source: str = "batch",
    expect_failure: bool = False,
) -> ValidationSummary:
    """Validate ``df`` against ``schema`` with a GX batch run of the schema's suite.

    ``require_label=False`` is for scoring inputs, which have no label yet. ``source`` names
    the frame in messages (a file, a partition). Raises ``DataError`` only when GX itself
    cannot run; a frame that fails its expectations is reported, not raised
    (see ``raise_for_failures``).

    The suite first runs for its verdict only (GX's ``BOOLEAN_ONLY``): every expectation
    is still decided on every row by the same counts, but GX skips a second pass per
    column check that collects examples of offending values, about a sixth of a passing
    run. Only a frame that fails is validated again with ``BASIC`` results, which give the
    counts and examples its failure lines quote. ``expect_failure`` (a frame that already
    failed cheaper checks) skips the verdict run: one ``BASIC`` run decides and reports.
    """
    from great_expectations.exceptions import GreatExpectationsError

    suite = _cached_suite(schema, require_label)
    runtime = _get_runtime()
    try:
        result = None if expect_failure else runtime.run(df, suite, _VERDICT_FORMAT)
        if result is None or not result.success:
            result = runtime.run(df, suite, _RESULT_FORMAT)
    except GreatExpectationsError as exc:
        raise DataError(f"{source}: Great Expectations could not validate the frame: {exc}") from exc
    finally:
        # GX's validator, execution engine and batch refer to each other, and with them the
        # metrics computed on the frame (column-sized masks and series). Only a full garbage
        # collection frees such cycles, and a few big arrays hardly count towards triggering
        # one: a scoring worker grew by ~180 MB per 500,000-row partition until it ran out.
        # Collected here (a full collection: ~0.25 s of CPU in a scoring worker, a tenth of a
        # 500,000-row partition's work), a worker's memory follows the partition size.
        gc.collect()
    return ValidationSummary(
        suite=suite.name,
        source=source,
        rows=len(df),
        success=bool(result.success),
        evaluated=int(result.evaluated),
        failed=int(result.failed),
        failures=tuple(_summarize(result.results)),
    )


def _column_passes(column: pa.ChunkedArray, check: Check) -> bool:
    import pyarrow as pa
    import pyarrow.compute as pc

    kw = check.kwargs
    kind = column.type
    if check.check == "numeric":
        return pa.types.is_integer(kind) or pa.types.is_floating(kind)
    if check.check == "string":
        return _is_string(kind)
    if check.check == "nulls":
        # pandas (and so GX) counts NaN as null.
        nulls = column.null_count + (_nan_count(column) if pa.types.is_floating(kind) else 0)
        return (1.0 - nulls / len(column)) >= kw["mostly"]
    if check.check == "range":
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            return False
        bounds = pc.min_max(column)
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        if lo is None:  # all null: nothing outside
            return True
        if lo != lo or hi != hi:  # NaN: leave it to GX
            return False
        return (kw["min_value"] is None or lo >= kw["min_value"]) and (
            kw["max_value"] is None or hi <= kw["max_value"]
        )
    if check.check == "allowed":
        values = list(kw["value_set"])
        if pa.types.is_dictionary(kind):
            # Rows hold indices into the chunks' dictionaries: when every dictionary value
            # is allowed, so is every row (nulls are neither in nor out).
            if not (_is_string(kind) and all(isinstance(v, str) for v in values)):
                return False
            allowed = pa.array(values, kind.value_type)
            if all(
                pc.all(pc.is_in(c.dictionary, value_set=allowed)).as_py() is not False for c in column.chunks
            ):
                return True
            column, kind = column.cast(kind.value_type), kind.value_type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            if not all(isinstance(v, str) for v in values):
                return False
        elif pa.types.is_integer(kind):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                return False
        else:
            return False
        outside = pc.and_(pc.is_valid(column), pc.invert(pc.is_in(column, value_set=pa.array(values, kind))))
        return not pc.any(outside).as_py()
    return False


def _is_string(kind: pa.DataType) -> bool:
    """A string type, or a dictionary of strings (how scoring reads categorical columns)."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def decode_dictionaries(table: pa.Table) -> pa.Table:
    """``table`` with every dictionary-encoded column decoded to its plain values."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(field.type.value_type))
    return table


def _nan_count(column: pa.ChunkedArray) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.is_nan(column)).as_py() or 0)


def table_passes(table: pa.Table, schema: DatasetSchema, *, require_label: bool = True) -> bool:
    """Whether ``table`` passes every check of the schema's suite, computed with Arrow.

    The same declaration (``checks``) that ``build_suite`` gives GX, evaluated with
    vectorised pyarrow compute on the Arrow columns, with pandas' reading of the data that
    GX validates (NaN counts as null; nulls are neither in nor out of a range or set). It
    is conservative: True only when GX's verdict on the frame is a pass as well; anything it
    cannot decide for sure (a type pandas would convert, NaN in a range column, an empty
    table) is False, and GX then decides.
    """
    if table.num_rows == 0:
        return False
    names = set(table.column_names)
    for check in checks(schema, require_label=require_label):
        if check.check == "rows":
            if table.num_rows < check.kwargs["min_value"]:
                return False
        elif check.column not in names:
            return False
        elif check.check != "exists" and not _column_passes(table.column(check.column), check):
            return False
    return True


def validate_table(
    table: pa.Table,
    schema: DatasetSchema,
    *,
    require_label: bool = True,
    source: str = "batch",
) -> ValidationSummary:
    """Validate an Arrow table: the Arrow checks decide a pass, GX reports a failure.

    A table that ``table_passes`` is a pass with every expectation evaluated, at the cost
    of a few vectorised scans (no pandas frame, no GX import). Any other table is
    converted to pandas (dictionary columns decoded first) and validated by GX
    (``validate_frame``, in one run with the results its lines need), so a failure's
    verdict and its lines are GX's, exactly as for a frame.
    """
    if table_passes(table, schema, require_label=require_label):
        evaluated = len(checks(schema, require_label=require_label))
        return ValidationSummary(
            suite=_suite_name(schema, require_label),
            source=source,
            rows=table.num_rows,
            success=True,
            evaluated=evaluated,
            failed=0,
            failures=(),
        )
    # Dictionary columns would become pandas categoricals, which GX types differently.
    frame = decode_dictionaries(table).to_pandas(use_threads=False)
    return validate_frame(frame, schema, require_label=require_label, source=source, expect_failure=True)


def raise_for_failures(summary: ValidationSummary) -> ValidationSummary:
    """Raise ``ValidationFailed`` listing each problem unless the frame passed; else return it."""
    if summary.success:
        return summary
    raise ValidationFailed(
        f"{summary.source}: {summary.failed} of {summary.evaluated} expectations failed",
        list(summary.failures),
    )


def validate_or_raise(
    df: pd.DataFrame,
    schema: DatasetSchema,
    *,
    require_label: bool = True,
    source: str = "batch",
) -> ValidationSummary:
    """``validate_frame`` then ``raise_for_failures``: the summary of a frame that passed."""
    return raise_for_failures(validate_frame(df, schema, require_label=require_label, source=source))
