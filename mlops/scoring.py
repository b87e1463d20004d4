"""Batch scoring decisions and data shapes, free of any backend.

Which dates a run or a backfill scores, where their input is, which threshold decides,
how per-partition validation failures read as one list, and the Arrow shape of a scored
part. The scoring flow sequences these; none of them reads or writes anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from mlops.errors import ConfigError
from mlops.features import FeatureView

DATE_PLACEHOLDER = "{date}"
MAX_BACKFILL_DAYS = 3660
MAX_FAILURE_LINES = 40

SCORE = "score"
DECISION = "decision"


# --------------------------------------------------------------------------- dates


def parse_date(text: str, what: str = "date") -> date:
    """``2026-01-31`` -> date; anything else is a ``ConfigError`` naming ``what``."""
    try:
        return date.fromisoformat(text.strip())
    except (AttributeError, ValueError):
        raise ConfigError(f"{what} {text!r} is not a date (YYYY-MM-DD)") from None


def resolve_run_date(value: str | date | None, today: date) -> date:
    """The run date of a scoring run: the given one, else ``today``."""
    if value is None or value == "":
        return today
    return value if isinstance(value, date) else parse_date(value, "run date")


def date_range(start: date, end: date) -> list[date]:
    """Every date from ``start`` to ``end``, both included."""
    if end < start:
        raise ConfigError(f"--to {end} is before --from {start}")
    days = (end - start).days + 1
    if days > MAX_BACKFILL_DAYS:
        raise ConfigError(f"a backfill covers at most {MAX_BACKFILL_DAYS} days, not {days}")
    return [start + timedelta(days=i) for i in range(days)]


def dates_to_score(
    dates: Sequence[date], committed: Iterable[date], force: bool
) -> tuple[list[date], list[date]]:
    """``(to_run, skipped)``: committed dates are skipped unless ``force``."""
    done = set(committed)
    if force:
        return list(dates), []
    return [d for d in dates if d not in done], [d for d in dates if d in done]


# --------------------------------------------------------------------------- inputs


def default_input(data_dir: Path, run_date: date) -> Path:
    """Where a run date's input is expected when none is given: ``data/score/<date>.parquet``."""
    return data_dir / "score" / f"{run_date.isoformat()}.parquet"


def input_for(template: str | None, data_dir: Path, run_date: date) -> Path:
    """The input of ``run_date``: ``template`` with ``{date}`` filled in, or the default."""
    if template is None or template == "":
        return default_input(data_dir, run_date)
    return Path(template.replace(DATE_PLACEHOLDER, run_date.isoformat()))


def missing_input_message(path: Path, run_date: date) -> str:
    """The one line a user sees when a run date has no input, with how to make one."""
    return (
        f"{path}: no scoring input for {run_date} (generate one with "
        f"`mlops data generate --start {run_date} --rows 200000 --out {path}`, "
        "or pass --input)"
    )


# --------------------------------------------------------------------------- model


def decision_threshold(
    configured: float | None, version_tags: Mapping[str, str], training_default: float
) -> float:
    """The threshold that turns a score into a decision.

    The scoring config's, when set; else the one the version was registered with (its
    ``decision_threshold`` tag, written by training); else the training config's.
    """
    if configured is not None:
        return float(configured)
    tagged = version_tags.get("decision_threshold")
    if tagged is not None:
        try:
            value = float(tagged)
        except ValueError:
            value = -1.0
        if 0.0 < value < 1.0:
            return value
    return float(training_default)


@dataclass(frozen=True)
class ModelRef:
    """One pinned model version as workers see it: identity, threshold, content digest, and
    the feature view it was trained on (None for a model without window features)."""

    name: str
    version: int
    alias: str | None
    threshold: float
    digest: str
    view: FeatureView | None = None

    def label(self) -> str:
        """``name vN@alias`` for logs and reports."""
        at = f"@{self.alias}" if self.alias else ""
        return f"{self.name} v{self.version}{at}"


def session_threads(configured: int, hosts: Iterable[tuple[int, int]]) -> int:
    """ONNX Runtime intra-op threads per scoring session, from ``(cores, task threads)`` per
    worker host: the configured count, lowered so that the task threads of every worker on a
    host, each running a session, never ask for more threads than the host has cores."""
    return max(1, min([configured, *(cores // max(threads, 1) for cores, threads in hosts)]))


# --------------------------------------------------------------------------- feeds


def column_arrays(table: pa.Table, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns of ``table`` as numpy arrays, for ``OnnxScorer.feeds``.

    Numbers come out as they are stored. A string column without nulls, plain or
    dictionary-encoded, comes out as an object array built through its dictionary, so each
    distinct value is one Python ``str`` shared by its rows: five times faster than
    converting row by row, and the very values ``feeds`` would make. A column read
    dictionary-encoded (``read_partition``) skips even the hashing: its rows are already
    indices. Every string column comes out holding ``str`` only (a null as ``feeds`` would
    make it), so ``feeds(..., strings_checked=True)`` may skip its check. Columns the table
    lacks are left out.
    """
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name not in table.column_names:
            continue
        column = table.column(name)
        kind = column.type
        if pa.types.is_dictionary(kind) and column.null_count == 0 and _is_string(kind.value_type):
            out[name] = _through_dictionaries(column.chunks, len(column))
        elif _is_string(kind) and column.null_count == 0:
            out[name] = _through_dictionaries([column.combine_chunks().dictionary_encode()], len(column))
        elif _is_string(kind.value_type if pa.types.is_dictionary(kind) else kind):
            from mlops.onnx_model import string_values  # rare (nulls): keeps ONNX Runtime out of this import

            plain = column.cast(kind.value_type) if pa.types.is_dictionary(kind) else column
            out[name] = string_values(plain.to_numpy(zero_copy_only=False))
        else:
            out[name] = column.to_numpy()
    return out


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _through_dictionaries(chunks: Sequence[pa.DictionaryArray], rows: int) -> np.ndarray:
    """The rows of dictionary-encoded string chunks as one object array of ``str``."""
    out = np.empty(rows, dtype=object)
    at = 0
    for chunk in chunks:
        n = len(chunk)
        if n:
            values = np.asarray(chunk.dictionary.to_pylist(), dtype=object)
            out[at : at + n] = values[chunk.indices.to_numpy()]
        at += n
    return out


# --------------------------------------------------------------------------- outputs


def score_table(
    keys: pa.Table,
    scores: np.ndarray,
    model: ModelRef,
    flow_run_id: str | None,
) -> pa.Table:
    """A scored part: the key columns, then score, decision and the run's provenance."""
    n = keys.num_rows
    score = np.asarray(scores, dtype=np.float32)
    if score.shape != (n,):
        raise ValueError(f"{score.shape[0] if score.ndim else 0} scores for {n} rows")
    columns = {name: keys.column(name) for name in keys.column_names}
    columns[SCORE] = pa.array(score, type=pa.float32())
    columns[DECISION] = pa.array(score >= model.threshold, type=pa.bool_())
    columns["threshold"] = pa.repeat(pa.scalar(model.threshold, pa.float64()), n)
    columns["model_name"] = constant_strings(model.name, n)
    columns["model_version"] = pa.repeat(pa.scalar(model.version, pa.int32()), n)
    columns["alias"] = constant_strings(model.alias, n)
    columns["flow_run_id"] = constant_strings(flow_run_id, n)
    return pa.table(columns)


PROVENANCE_TYPE = pa.dictionary(pa.int32(), pa.string())


def constant_strings(value: str | None, n: int) -> pa.DictionaryArray:
    """``n`` rows of one string (or null) as a dictionary array: one dictionary value and
    ``n`` zero indices, which Parquet writes without hashing a string per row."""
    if value is None:
        return pa.nulls(n, PROVENANCE_TYPE)
    indices = pa.array(np.zeros(n, dtype=np.int32))
    return pa.DictionaryArray.from_arrays(indices, pa.array([value], pa.string()))


# --------------------------------------------------------------------------- validation


def _split_detail(line: str) -> tuple[str, str]:
    """``"column 'x': values ... (3 of 10 rows outside)"`` -> (problem, detail)."""
    if line.endswith(")") and " (" in line:
        head, _, detail = line.rpartition(" (")
        return head, detail[:-1]
    return line, ""


def merge_failures(per_partition: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """One line per distinct problem across partitions, in first-seen order.

    ``per_partition`` holds ``(partition description, failure lines)``. A problem found
    in several partitions is listed once, with the partitions it was found in and the
    detail (counts, examples) of the first.
    """
    order: list[str] = []
    seen: dict[str, list[tuple[str, str]]] = {}
    for where, lines in per_partition:
        for line in lines:
            head, detail = _split_detail(line)
            if head not in seen:
                seen[head] = []
                order.append(head)
            seen[head].append((where, detail))
    out = []
    for head in order:
        hits = seen[head]
        where, detail = hits[0]
        extra = f" and {len(hits) - 1} more partition{'s' if len(hits) > 2 else ''}" if len(hits) > 1 else ""
        out.append(f"{head} ({where}{extra}{': ' + detail if detail else ''})")
    if len(out) > MAX_FAILURE_LINES:
        out = out[:MAX_FAILURE_LINES] + [f"... and {len(out) - MAX_FAILURE_LINES} more problems"]
    return out
