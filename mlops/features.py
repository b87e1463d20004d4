"""Entity-keyed rolling-window features: one implementation for training, batch, stream and online.

The features are declared once (``FeaturesConfig`` in the settings). A row of entity ``e``
at time ``t`` sees the events of ``e`` with ``t - window <= time < t``: strictly before
``t``, so a training row never sees its own event, a simultaneous one or a later one.

Two computations share that definition and must agree:

* ``compute_offline`` works over a whole frame of events at once (training sets, batch
  scoring, backfills): events are sorted by entity and time, window bounds are found with
  ``searchsorted`` and aggregates come from cumulative sums (counts, sums, means), a sparse
  table (maxima) and the bound itself (last value, seconds since last). It is vectorised:
  a million events take about a second.
* ``StreamFeatures`` keeps, per entity, the events of the longest window (plus the allowed
  lateness) and answers ``update(event)`` (the event's features, then the event joins its
  windows) and ``lookup(entity, t)`` (the online read). Events may arrive out of order by
  up to ``allowed_lateness_seconds``; older ones are counted as late and left out.

``check_point_in_time`` recomputes the features of any training set from its events and
names the rows whose values could only come from an event at or after the row's time.

Timestamps are handled as int64 nanoseconds; entity ids of the stream are strings.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mlops.errors import ConfigError, DataError
from mlops.settings import DatasetSchema, FeaturesConfig, NumericFeature, Settings, WindowFeature

NS_PER_SECOND = 1_000_000_000
STATE_FORMAT = "mlops-window-state/1"

Frame = pa.Table | pd.DataFrame


class LeakDetected(DataError):
    """A training set holds feature values that only events at or after a row's time explain."""


class StateMismatch(DataError):
    """A saved window state was built for other feature declarations than the current ones."""


class FeatureViewMismatch(ConfigError):
    """A model version was trained on a feature view that the configuration does not declare."""


VIEW_TAG = "lineage.feature_view"  # the view's digest, on the training run and the model version
WINDOWS_TAG = "lineage.feature_windows"  # the view's windows as JSON, on the same


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class FeatureSet:
    """The declared window features, resolved against the dataset (entity and time columns)."""

    entity_column: str
    timestamp_column: str
    windows: tuple[WindowFeature, ...]
    lateness_ns: int

    @classmethod
    def from_settings(cls, settings: Settings) -> FeatureSet:
        """The feature set a platform config declares (``features:``); an error if it declares none."""
        fc: FeaturesConfig = settings.features
        if not fc.windows:
            raise ConfigError("features.windows: no window features are declared")
        ts = fc.timestamp_column or settings.dataset.timestamp_column
        assert ts is not None  # Settings validates a timestamp column exists when windows are declared
        return cls(
            entity_column=fc.entity_column or settings.dataset.entity_column,
            timestamp_column=ts,
            windows=fc.windows,
            lateness_ns=_seconds_to_ns(fc.allowed_lateness_seconds),
        )

    @property
    def names(self) -> tuple[str, ...]:
        """The output feature columns, in declaration order."""
        return tuple(w.name for w in self.windows)

    @property
    def source_columns(self) -> tuple[str, ...]:
        """The event columns the features aggregate (besides entity and time)."""
        seen: dict[str, None] = {}
        for w in self.windows:
            if w.column is not None:
                seen.setdefault(w.column)
        return tuple(seen)

    @property
    def max_window_ns(self) -> int:
        """The longest window, in nanoseconds: how much history the stream keeps."""
        return max(_seconds_to_ns(w.window_seconds) for w in self.windows)

    def with_windows(self, windows: Iterable[WindowFeature]) -> FeatureSet:
        """Another view over the same entity, time and lateness."""
        return replace(self, windows=tuple(windows))

    def lineage_tags(self) -> dict[str, str]:
        """What a model version records of the view it was trained on: digest and windows."""
        windows = [w.model_dump(mode="json", exclude_none=True) for w in self.windows]
        return {VIEW_TAG: self.digest(), WINDOWS_TAG: json.dumps(windows, separators=(",", ":"))}

    def digest(self) -> str:
        """A fingerprint of what the features compute (saved state is only valid for the same one)."""
        return self._digest

    @cached_property
    def _digest(self) -> str:
        data = {
            "entity": self.entity_column,
            "time": self.timestamp_column,
            "lateness_ns": self.lateness_ns,
            "windows": [w.model_dump(mode="json") for w in self.windows],
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _seconds_to_ns(seconds: float) -> int:
    return round(seconds * NS_PER_SECOND)


def feature_views(settings: Settings) -> tuple[FeatureSet, ...]:
    """Every view a config declares: ``features.windows`` first, then ``features.extra_views``
    (empty when it declares no features)."""
    if not settings.features.windows:
        return ()
    main = FeatureSet.from_settings(settings)
    return (main, *(main.with_windows(v.windows) for v in settings.features.extra_views))


def model_schema(schema: DatasetSchema, fs: FeatureSet | None) -> DatasetSchema:
    """The columns a model of view ``fs`` takes: the dataset's, then the window features as
    numeric inputs named as declared (``schema`` itself without a view)."""
    if fs is None:
        return schema
    return schema.model_copy(
        update={"numeric": schema.numeric + tuple(NumericFeature(name=n) for n in fs.names)}
    )


@dataclass(frozen=True)
class FeatureView:
    """The feature view a model version was trained on, as its lineage tags record it."""

    digest: str
    windows: tuple[WindowFeature, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The window features the model takes as inputs."""
        return tuple(w.name for w in self.windows)


def model_view(tags: Mapping[str, str]) -> FeatureView | None:
    """The feature view in a model version's tags, or None for a model trained without one."""
    digest = tags.get(VIEW_TAG)
    if not digest:
        return None
    try:
        windows = tuple(WindowFeature.model_validate(w, strict=False) for w in json.loads(tags[WINDOWS_TAG]))
    except (KeyError, ValueError, TypeError):
        raise DataError(f"model tag {WINDOWS_TAG}: missing or unreadable for feature view {digest}") from None
    return FeatureView(digest, windows)


def check_view(
    configured: FeatureSet | Sequence[FeatureSet] | None, view: FeatureView | None, model: str = "the model"
) -> FeatureSet | None:
    """The configured view a model was trained on (None for a model without window features).

    Raises ``FeatureViewMismatch``, one line naming both digests, when the model's view is not
    among the configured ones: its inputs would be computed differently from training's.
    """
    if view is None:
        return None
    views = (
        ()
        if configured is None
        else (configured,)
        if isinstance(configured, FeatureSet)
        else tuple(configured)
    )
    for fs in views:
        if fs.digest() == view.digest:
            return fs
    have = ", ".join(fs.digest() for fs in views) or "none"
    raise FeatureViewMismatch(
        f"{model} was trained on feature view {view.digest} ({', '.join(view.names)}); the config declares "
        f"{have}: declare its windows in features.windows or features.extra_views"
    )


# --------------------------------------------------------------------------- column access


def _column(frame: Frame, name: str) -> Any:
    if isinstance(frame, pa.Table):
        if name not in frame.column_names:
            raise DataError(f"events: no column {name!r}")
        return frame.column(name)
    if name not in frame.columns:
        raise DataError(f"events: no column {name!r}")
    return frame[name]


def timestamps_ns(values: Any, what: str = "time") -> np.ndarray:
    """Event times as int64 nanoseconds (UTC wall clock for zone-aware ones), from Arrow or pandas."""
    if isinstance(values, pa.ChunkedArray | pa.Array):
        if not pa.types.is_timestamp(values.type):
            raise DataError(f"{what}: expected timestamps, got {values.type}")
        if values.null_count:
            raise DataError(f"{what}: {values.null_count} null timestamps")
        return pc.cast(values, pa.timestamp("ns", values.type.tz)).to_numpy().view("int64").copy()
    series = pd.Series(values) if not isinstance(values, pd.Series) else values
    if not pd.api.types.is_datetime64_any_dtype(series.dtype):
        raise DataError(f"{what}: expected timestamps, got {series.dtype}")
    if series.isna().any():
        raise DataError(f"{what}: {int(series.isna().sum())} null timestamps")
    if getattr(series.dt, "tz", None) is not None:
        series = series.dt.tz_convert("UTC").dt.tz_localize(None)
    return series.to_numpy(dtype="datetime64[ns]").view("int64")


def _values(frame: Frame, name: str) -> np.ndarray:
    col = _column(frame, name)
    arr = col.to_numpy() if isinstance(col, pa.ChunkedArray) else col.to_numpy()
    try:
        out = np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"events: column {name!r} is not numeric") from None
    if np.isnan(out).any():
        raise DataError(f"events: column {name!r} has {int(np.isnan(out).sum())} missing values")
    return out


def _entities(frame: Frame, name: str) -> Any:
    col = _column(frame, name)
    if (isinstance(col, pa.ChunkedArray) and col.null_count) or (
        isinstance(col, pd.Series) and col.isna().any()
    ):
        raise DataError(f"events: column {name!r} has missing entity ids")
    return col


def _entity_codes(*cols: Any) -> list[np.ndarray]:
    """One integer code per distinct entity id, shared by all the given columns (Arrow or pandas)."""
    if all(isinstance(c, pd.Series) for c in cols):
        codes = pd.factorize(pd.concat(cols, ignore_index=True))[0]
    elif all(isinstance(c, pa.ChunkedArray) for c in cols) and len({c.type for c in cols}) == 1:
        both = pa.chunked_array([ch for c in cols for ch in c.chunks], cols[0].type)
        codes = pc.dictionary_encode(both.combine_chunks()).indices.to_numpy()
    else:
        as_obj = [
            c.to_numpy(zero_copy_only=False) if isinstance(c, pa.ChunkedArray) else c.to_numpy() for c in cols
        ]
        codes = pd.factorize(np.concatenate([np.asarray(a, dtype=object) for a in as_obj]))[0]
    codes = np.asarray(codes, dtype=np.int64)
    out, at = [], 0
    for c in cols:
        out.append(codes[at : at + len(c)])
        at += len(c)
    return out


# --------------------------------------------------------------------------- offline


@dataclass(frozen=True)
class _Sorted:
    """Events sorted by (entity, time), and the query rows in the same order with their window bounds."""

    ts: np.ndarray  # sorted event times
    values: dict[str, np.ndarray]  # sorted source columns
    q_order: np.ndarray  # query rows sorted by (entity, time): the order of everything below
    q_ts: np.ndarray  # query times, in q_order
    right: np.ndarray  # per query: index past the last event strictly before t
    left: dict[int, np.ndarray]  # per window length: index of the first event at or after t - w


def _sorted_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct sorted values, the sorting permutation, each value's rank among the distinct)."""
    order = np.argsort(values, kind="stable")
    srt = values[order]
    new = np.ones(len(srt), dtype=bool)
    new[1:] = srt[1:] != srt[:-1]
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.cumsum(new) - 1
    return srt[new], order, rank


def _time_rank(uniq: np.ndarray, times: np.ndarray, by_time: np.ndarray, side: str) -> np.ndarray:
    """How many distinct event times lie below each time (``<`` or ``<=``), searched in time order."""
    out = np.empty(len(times), dtype=np.int64)
    out[by_time] = np.searchsorted(uniq, times[by_time], side)  # sorted needles: cache-friendly
    return out


def _bounds(
    fs: FeatureSet,
    ev_ent: Any,
    ev_ts: np.ndarray,
    q_ent: Any,
    q_ts: np.ndarray,
    ev_vals: dict[str, np.ndarray],
    inclusive: bool = False,
) -> _Sorted:
    same = q_ent is None  # the queries are the events themselves (a training set)
    if same:
        (ev_code,) = _entity_codes(ev_ent)
        q_code = ev_code
    else:
        ev_code, q_code = _entity_codes(ev_ent, q_ent)
    # Times become ranks among the distinct event times, so (entity, rank) packs into one int64
    # key ordered by (entity, time); a query time maps to the number of event times below it.
    # Every search runs with sorted needles (queries in key order), which keeps it in cache.
    uniq, ev_by_time, ev_rank = _sorted_unique(ev_ts)
    stride = np.int64(len(uniq) + 1)
    ev_key = ev_code * stride + ev_rank
    order = np.argsort(ev_key, kind="stable")
    key = ev_key[order]
    if same:
        q_by_time, q_rank = ev_by_time, ev_rank + (1 if inclusive else 0)
    else:
        q_by_time = np.argsort(q_ts, kind="stable")
        q_rank = _time_rank(uniq, q_ts, q_by_time, "right" if inclusive else "left")
    q_key = q_code * stride + q_rank
    q_order = order if same and not inclusive else np.argsort(q_key, kind="stable")
    right = np.searchsorted(key, q_key[q_order], "left")
    left: dict[int, np.ndarray] = {}
    for w in {_seconds_to_ns(w.window_seconds) for w in fs.windows}:
        w_rank = _time_rank(uniq, q_ts - w, q_by_time, "left")
        left[w] = np.searchsorted(key, (q_code * stride + w_rank)[q_order], "left")
    return _Sorted(
        ts=ev_ts[order],
        values={c: v[order] for c, v in ev_vals.items()},
        q_order=q_order,
        q_ts=q_ts[q_order],
        right=right,
        left=left,
    )


def _range_max(values: np.ndarray, left: np.ndarray, right: np.ndarray, empty: float) -> np.ndarray:
    """max(values[left:right]) per row, via a sparse table only as deep as the longest range."""
    length = right - left
    out = np.full(len(left), empty, dtype=np.float64)
    if not len(values) or not length.max(initial=0):
        return out
    levels = [values]
    longest = int(length.max())
    while (1 << len(levels)) <= longest:
        prev, half = levels[-1], 1 << (len(levels) - 1)
        levels.append(np.maximum(prev[:-half], prev[half:]))
    has = length > 0
    k = np.zeros(len(left), dtype=np.int64)
    k[has] = np.floor(np.log2(length[has])).astype(np.int64)
    for level in np.unique(k[has]):
        rows = has & (k == level)
        table, span = levels[level], 1 << int(level)
        out[rows] = np.maximum(table[left[rows]], table[right[rows] - span])
    return out


def _aggregate(fs: FeatureSet, s: _Sorted) -> dict[str, np.ndarray]:
    """Every declared feature per query row (in the rows' own order)."""
    cums = {
        c: np.concatenate([np.zeros(1, np.longdouble), np.cumsum(v, dtype=np.longdouble)])
        for c, v in s.values.items()
    }
    out: dict[str, np.ndarray] = {}
    right = s.right
    for w in fs.windows:
        left = s.left[_seconds_to_ns(w.window_seconds)]
        count = right - left
        empty = count == 0
        last = np.where(empty, 0, right - 1)
        if w.agg == "count":
            value = count.astype(np.float64)
        elif w.agg in ("sum", "mean"):
            cum = cums[w.column]  # type: ignore[index]
            total = cum[right] - cum[left]
            if w.agg == "sum":
                value = total.astype(np.float64)
            else:
                value = np.where(empty, w.empty_value, (total / np.maximum(count, 1)).astype(np.float64))
        elif w.agg == "max":
            value = _range_max(s.values[w.column], left, right, w.empty_value)  # type: ignore[index]
        elif w.agg == "last":
            vals = s.values[w.column]  # type: ignore[index]
            value = np.where(empty, w.empty_value, vals[last] if len(vals) else 0.0)
        else:  # seconds_since_last
            ts = s.ts[last] if len(s.ts) else 0
            value = np.where(empty, w.empty_value, (s.q_ts - ts) / NS_PER_SECOND)
        result = np.empty(len(right), dtype=np.float64)
        result[s.q_order] = value
        out[w.name] = result
    return out


def compute_offline(fs: FeatureSet, events: Frame, rows: Frame | None = None) -> pa.Table:
    """The declared features of each row, from the events strictly before it (point-in-time).

    ``rows`` needs the entity and time columns; without it the rows are the events
    themselves (a training set whose rows are events). The result has one float64 column per
    feature, aligned with the rows.
    """
    ev_ent = _entities(events, fs.entity_column)
    ev_ts = timestamps_ns(_column(events, fs.timestamp_column), f"events.{fs.timestamp_column}")
    ev_vals = {c: _values(events, c) for c in fs.source_columns}
    if rows is None:
        q_ent, q_ts = None, ev_ts
    else:
        q_ent = _entities(rows, fs.entity_column)
        q_ts = timestamps_ns(_column(rows, fs.timestamp_column), f"rows.{fs.timestamp_column}")
    out = _aggregate(fs, _bounds(fs, ev_ent, ev_ts, q_ent, q_ts, ev_vals))
    return pa.table({name: out[name] for name in fs.names})


def with_features(fs: FeatureSet, events: Frame, rows: Frame | None = None) -> pa.Table:
    """``rows`` (default: the events) with the feature columns appended, as an Arrow table."""
    base = rows if rows is not None else events
    table = base if isinstance(base, pa.Table) else pa.Table.from_pandas(base, preserve_index=False)
    feats = compute_offline(fs, events, rows)
    for name in fs.names:
        table = table.append_column(name, feats.column(name))
    return table


def _kind(t: pa.DataType) -> str:
    """The family of an Arrow type a history column may be converted within."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "time"
    return str(t)


def _event_columns(fs: FeatureSet, table: pa.Table, like: pa.Table | None = None) -> pa.Table:
    """The entity, time (ns) and source columns of ``table``, typed like ``like``'s when given.

    A column is converted only within its family (text widths, number widths, time units),
    or from text to time (ISO 8601 parsed): numbers as entity ids or times (unit unknown) and
    text as amounts are a ``DataError`` naming the column, not a silent reinterpretation."""
    cols = {}
    for name in (fs.entity_column, fs.timestamp_column, *fs.source_columns):
        col = _column(table, name)
        if like is not None and col.type != like.schema.field(name).type:
            want = like.schema.field(name).type
            src, dst = _kind(col.type), _kind(want)
            problem = f"feature history: column {name!r} is {col.type}, the input's is {want}"
            if src != dst and (src, dst) != ("text", "time"):
                raise DataError(problem)
            try:
                col = pc.cast(col, want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError(f"{problem}, and its values do not convert") from None
        cols[name] = col
    return pa.table(cols)


def batch_features(views: Sequence[FeatureSet], rows: pa.Table, history: pa.Table | None = None) -> pa.Table:
    """``rows`` with the window features of every view appended, the way training computes them.

    The events are the rows themselves plus ``history``'s events strictly before the rows'
    earliest time (so a history that overlaps the rows counts nothing twice); each row sees
    its entity's events strictly before it. Two views may share a feature only if they
    define it the same way.
    """
    defined: dict[str, WindowFeature] = {}
    for fs in views:
        for w in fs.windows:
            if defined.setdefault(w.name, w) != w:
                raise ConfigError(f"feature {w.name!r} is defined differently by two feature views")
    out = rows
    for fs in views:
        wanted = [n for n in fs.names if n not in out.column_names]
        if not wanted:
            continue
        events = _event_columns(fs, rows)
        if history is not None and history.num_rows and rows.num_rows:
            first = int(timestamps_ns(_column(rows, fs.timestamp_column)).min())
            past = _event_columns(fs, history, events)
            keep = timestamps_ns(_column(past, fs.timestamp_column), "feature history") < first
            events = pa.concat_tables([past.filter(pa.array(keep)), events])
        feats = compute_offline(fs, events, rows)
        for name in wanted:
            out = out.append_column(name, feats.column(name))
    return out


# --------------------------------------------------------------------------- point in time


@dataclass(frozen=True)
class FeatureCheck:
    """How one feature column of a training set compares with its point-in-time value."""

    name: str
    mismatched: int
    leaked: int  # of the mismatched rows, those that an event at or after the row's time explains
    max_abs_diff: float
    example_rows: tuple[int, ...]


@dataclass(frozen=True)
class PointInTimeReport:
    """The verdict of ``check_point_in_time`` over a training set."""

    rows: int
    checks: tuple[FeatureCheck, ...]

    @property
    def ok(self) -> bool:
        """True when every feature value equals its point-in-time value."""
        return all(c.mismatched == 0 for c in self.checks)

    def reasons(self) -> list[str]:
        """One line per feature that is not point-in-time correct."""
        return [
            f"{c.name}: {c.mismatched} of {self.rows} rows differ from the point-in-time value "
            f"(max abs diff {c.max_abs_diff:.6g}; {c.leaked} explained by events at or after the "
            f"row's time; rows {list(c.example_rows)})"
            for c in self.checks
            if c.mismatched
        ]


def check_point_in_time(
    fs: FeatureSet,
    training: Frame,
    events: Frame | None = None,
    tolerance: float = 1e-9,
) -> PointInTimeReport:
    """Compare a training set's feature columns with values recomputed from events before each row.

    ``events`` defaults to the training set itself (rows that are events). A value that
    differs is reported; when the same window computed *including* events at the row's time
    reproduces it, the row is counted as a leak (a feature built with ``<=`` instead of ``<``,
    or from a later snapshot). Tolerance is relative to the value's magnitude (at least 1).
    """
    src = training if events is None else events
    missing = [
        n
        for n in fs.names
        if n not in (training.column_names if isinstance(training, pa.Table) else training.columns)
    ]
    if missing:
        raise DataError(f"training set: no feature column {', '.join(missing)}")
    ev_ent = _entities(src, fs.entity_column)
    ev_ts = timestamps_ns(_column(src, fs.timestamp_column), f"events.{fs.timestamp_column}")
    ev_vals = {c: _values(src, c) for c in fs.source_columns}
    q_ent = None if events is None else _entities(training, fs.entity_column)
    q_ts = timestamps_ns(_column(training, fs.timestamp_column), f"training.{fs.timestamp_column}")
    correct = _aggregate(fs, _bounds(fs, ev_ent, ev_ts, q_ent, q_ts, ev_vals))
    leaky = _aggregate(fs, _bounds(fs, ev_ent, ev_ts, q_ent, q_ts, ev_vals, inclusive=True))
    checks = []
    for name in fs.names:
        got = _values(training, name)
        diff = np.abs(got - correct[name])
        bad = diff > tolerance * np.maximum(1.0, np.abs(correct[name]))
        leak = bad & (np.abs(got - leaky[name]) <= tolerance * np.maximum(1.0, np.abs(leaky[name])))
        checks.append(
            FeatureCheck(
                name=name,
                mismatched=int(bad.sum()),
                leaked=int(leak.sum()),
                max_abs_diff=float(diff.max(initial=0.0)),
                example_rows=tuple(int(i) for i in np.flatnonzero(bad)[:5]),
            )
        )
    return PointInTimeReport(rows=len(q_ts), checks=tuple(checks))


def assert_point_in_time(fs: FeatureSet, training: Frame, events: Frame | None = None) -> PointInTimeReport:
    """``check_point_in_time``, raising ``LeakDetected`` with every reason when a value is wrong."""
    report = check_point_in_time(fs, training, events)
    if not report.ok:
        raise LeakDetected("training set is not point-in-time correct: " + "; ".join(report.reasons()))
    return report


# --------------------------------------------------------------------------- stream / online


@dataclass
class _EntityWindow:
    """The retained events of one entity, in time order (equal times in arrival order)."""

    ts: list[int] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)  # one list per source column


@dataclass(frozen=True)
class FeatureUpdate:
    """What ``StreamFeatures.update`` returns for one event."""

    features: dict[str, float]
    late: bool  # older than the watermark: features are best effort and the event was not kept


class StreamFeatures:
    """Incremental per-entity window state: ``update(event) -> features`` and ``lookup(entity, t)``.

    The watermark is the newest event time seen minus the allowed lateness. An event at or
    after the watermark joins its entity's windows (in time order, even if it arrived out of
    order); an older one is late: counted, answered from the state as it is, not kept. Events
    older than ``watermark - longest window`` can no longer matter and are pruned, so the
    state holds about one longest window of events per active entity. ``lookup`` at times at
    or after the watermark gives exactly what ``compute_offline`` gives over the same events.

    ``extra_views`` (other windows over the same entity, time and lateness) are served from
    the same raw events: the state keeps the source columns of every view and the longest
    window of them all, and ``lookup``/``update`` answer for any of them (``view=``).
    """

    def __init__(self, fs: FeatureSet, extra_views: Sequence[FeatureSet] = ()):
        self.fs = fs
        views = {fs.digest(): fs}
        for v in extra_views:
            if (v.entity_column, v.timestamp_column, v.lateness_ns) != (
                fs.entity_column,
                fs.timestamp_column,
                fs.lateness_ns,
            ):
                raise ConfigError("extra feature views must share the entity, time and lateness of the first")
            views.setdefault(v.digest(), v)
        self.views = tuple(views.values())
        self._cols = tuple(dict.fromkeys(c for v in self.views for c in v.source_columns))
        self._col_index = {c: i for i, c in enumerate(self._cols)}
        self._keep_ns = fs.lateness_ns + max(v.max_window_ns for v in self.views)  # history any view can see
        self._view_specs = {digest: self._specs_of(v) for digest, v in views.items()}
        self._view_empty = {digest: self._empty_of(specs) for digest, specs in self._view_specs.items()}
        self._specs = self._view_specs[fs.digest()]
        self._empty = self._empty_of(self._specs)
        self._entities: dict[str, _EntityWindow] = {}
        self.max_ts: int | None = None
        self.late_events = 0
        self.events_seen = 0
        self._changed: set[str] = set()  # entities whose window changed since take_changed()

    def _specs_of(self, fs: FeatureSet) -> list[tuple[str, str, int, int, float]]:
        return [
            (
                w.name,
                w.agg,
                _seconds_to_ns(w.window_seconds),
                self._col_index.get(w.column, -1),  # type: ignore[arg-type]
                0.0 if w.agg == "sum" else w.empty_value,
            )
            for w in fs.windows
        ]

    @staticmethod
    def _empty_of(specs: list[tuple[str, str, int, int, float]]) -> dict[str, float]:
        return {name: (0.0 if agg == "count" else empty) for name, agg, _, _, empty in specs}

    @property
    def digest(self) -> str:
        """What the retained events serve: the view's digest, or one over every view served."""
        if len(self.views) == 1:
            return self.fs.digest()
        joined = ",".join(sorted(v.digest() for v in self.views))
        return hashlib.sha256(joined.encode()).hexdigest()[:16]

    @property
    def source_columns(self) -> tuple[str, ...]:
        """The event columns the state keeps (those of every view it serves)."""
        return self._cols

    @property
    def watermark(self) -> int | None:
        """The oldest event time still accepted (ns), or None before the first event."""
        return None if self.max_ts is None else self.max_ts - self.fs.lateness_ns

    @property
    def entities(self) -> int:
        """How many entities currently hold events."""
        return len(self._entities)

    @property
    def retained_events(self) -> int:
        """How many events the state holds in all."""
        return sum(len(e.ts) for e in self._entities.values())

    def lookup(self, entity: str, ts_ns: int, view: FeatureSet | None = None) -> dict[str, float]:
        """The features of ``entity`` at ``ts_ns`` from the retained events strictly before it
        (of ``view``, one of the views served; default the first)."""
        return self.lookup_events(self._entities.get(str(entity)), ts_ns, view)

    def lookup_events(
        self, win: _EntityWindow | None, ts_ns: int, view: FeatureSet | None = None
    ) -> dict[str, float]:
        """The features at ``ts_ns`` (of ``view``) over the events of one window (``window_of``),
        strictly before ``ts_ns``; None is an entity without events. The state is not touched."""
        if view is None or view is self.fs:
            specs, empty_row = self._specs, self._empty
        else:
            digest = view.digest()
            try:
                specs, empty_row = self._view_specs[digest], self._view_empty[digest]
            except KeyError:
                raise ConfigError(f"feature view {digest} is not served by this window state") from None
        if win is None:
            return dict(empty_row)
        ts = win.ts
        right = bisect.bisect_left(ts, ts_ns)
        if right == 0:  # no event before ts_ns: every window is empty
            return dict(empty_row)
        values = win.values
        bisect_left, fsum = bisect.bisect_left, math.fsum
        lefts: dict[int, int] = {}
        out: dict[str, float] = {}
        for name, agg, w_ns, col, empty in specs:
            left = lefts.get(w_ns)
            if left is None:
                left = lefts[w_ns] = bisect_left(ts, ts_ns - w_ns, 0, right)
            count = right - left
            if agg == "count":
                out[name] = float(count)
            elif count == 0:
                out[name] = empty
            elif agg == "seconds_since_last":
                out[name] = (ts_ns - ts[right - 1]) / NS_PER_SECOND
            elif agg == "last":
                out[name] = values[col][right - 1]
            elif count == 1:  # sum, mean and max of one value
                out[name] = values[col][left]
            elif agg == "sum":
                out[name] = fsum(values[col][left:right])
            elif agg == "mean":
                out[name] = fsum(values[col][left:right]) / count
            else:  # max
                out[name] = max(values[col][left:right])
        return out

    def update(
        self, entity: str, ts_ns: int, values: Mapping[str, float], view: FeatureSet | None = None
    ) -> FeatureUpdate:
        """The event's features (of ``view``, from the events before it); then the event joins its windows."""
        key = str(entity)
        try:
            row = [float(values[c]) for c in self._cols]
        except KeyError as exc:
            raise DataError(f"event: no value for {exc.args[0]!r}") from None
        if any(math.isnan(v) for v in row):
            raise DataError(f"event of {key}: missing value in {', '.join(self._cols)}")
        feats = self.lookup(key, ts_ns, view)
        self.events_seen += 1
        max_ts = self.max_ts
        if max_ts is not None and ts_ns < max_ts - self.fs.lateness_ns:
            self.late_events += 1
            return FeatureUpdate(feats, late=True)
        win = self._entities.get(key)
        if win is None:
            win = self._entities[key] = _EntityWindow(values=[[] for _ in self._cols])
        self._changed.add(key)
        wts = win.ts
        if not wts or ts_ns >= wts[-1]:  # in order: the common case
            wts.append(ts_ns)
            for col, v in zip(win.values, row, strict=True):
                col.append(v)
        else:
            at = bisect.bisect_right(wts, ts_ns)
            wts.insert(at, ts_ns)
            for col, v in zip(win.values, row, strict=True):
                col.insert(at, v)
        if max_ts is None or ts_ns > max_ts:
            self.max_ts = max_ts = ts_ns
        if wts[0] < max_ts - self._keep_ns:
            self._prune_entity(key, win)
        return FeatureUpdate(feats, late=False)

    def _horizon(self) -> int | None:
        return None if self.max_ts is None else self.max_ts - self._keep_ns

    def _prune_entity(self, key: str, win: _EntityWindow) -> None:
        horizon = self._horizon()
        if horizon is None:
            return
        cut = bisect.bisect_left(win.ts, horizon)
        if cut:
            self._changed.add(key)
            del win.ts[:cut]
            for col in win.values:
                del col[:cut]
        if not win.ts:
            del self._entities[key]

    def prune(self) -> int:
        """Drop every event no future lookup can see (idle entities included); returns how many."""
        before = self.retained_events
        for key in list(self._entities):
            self._prune_entity(key, self._entities[key])
        return before - self.retained_events

    def replay(
        self, entities: Iterable[str], ts_ns: Iterable[int], values: Mapping[str, Iterable[float]]
    ) -> list[FeatureUpdate]:
        """``update`` over columns of events, in the given (arrival) order."""
        cols = {c: list(values[c]) for c in self._cols}
        out = []
        for i, (e, t) in enumerate(zip(entities, ts_ns, strict=True)):
            out.append(self.update(e, int(t), {c: cols[c][i] for c in self._cols}))
        return out

    # ------------------------------------------------------------------ persistence

    def take_changed(self) -> set[str]:
        """The entities whose windows changed (or emptied) since the last call, and forget them."""
        changed, self._changed = self._changed, set()
        return changed

    def mark_changed(self, entities: Iterable[str]) -> None:
        """Count ``entities`` as changed again (their last save did not go through)."""
        self._changed.update(entities)

    def entity_window(self, entity: str) -> dict[str, Any] | None:
        """One entity's retained events as plain data (``ts_ns`` and one list per source column)."""
        win = self._entities.get(str(entity))
        if win is None:
            return None
        return {
            "ts_ns": list(win.ts),
            "values": {c: list(v) for c, v in zip(self._cols, win.values, strict=True)},
        }

    def set_entity_window(self, entity: str, window: Mapping[str, Any]) -> None:
        """Put back one entity's events as ``entity_window`` gave them (times must be sorted)."""
        win = self.window_of(entity, window)
        if win is not None:
            self._entities[str(entity)] = win
        else:
            self._entities.pop(str(entity), None)

    def window_of(self, entity: str, window: Mapping[str, Any]) -> _EntityWindow | None:
        """One entity's events as ``entity_window`` gives them, checked (sorted times, every
        source column, equal lengths), for ``lookup_events``; None when it holds no event.
        ``StateMismatch`` names what is wrong."""
        try:
            ts = [int(t) for t in window["ts_ns"]]
            vals = [[float(v) for v in window["values"][c]] for c in self._cols]
        except KeyError as exc:
            raise StateMismatch(f"window state of {entity}: no column {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise StateMismatch(f"window state of {entity}: malformed ({exc})") from None
        if any(b < a for a, b in zip(ts, ts[1:], strict=False)):
            raise StateMismatch(f"window state of {entity}: event times are not sorted")
        if any(len(v) != len(ts) for v in vals):
            raise StateMismatch(f"window state of {entity}: columns of different lengths")
        return _EntityWindow(ts=ts, values=vals) if ts else None

    def counters(self) -> dict[str, Any]:
        """What the state knows besides the windows: format, declaration digest, newest time, counts."""
        return {
            "format": STATE_FORMAT,
            "digest": self.digest,
            "max_ts": self.max_ts,
            "late_events": self.late_events,
            "events_seen": self.events_seen,
        }

    def restore_counters(self, counters: Mapping[str, Any]) -> None:
        """Take back ``counters()``; ``StateMismatch`` if they belong to other feature declarations."""
        if counters.get("format") != STATE_FORMAT:
            raise StateMismatch(f"window state: unknown format {counters.get('format')!r}")
        if counters.get("digest") != self.digest:
            raise StateMismatch(
                f"window state was built for features {counters.get('digest')}, the declaration is now "
                f"{self.digest}: rebuild it from the events"
            )
        self.max_ts = None if counters.get("max_ts") is None else int(counters["max_ts"])
        self.late_events = int(counters.get("late_events", 0))
        self.events_seen = int(counters.get("events_seen", 0))

    def to_table(self) -> pa.Table:
        """The state as an Arrow table (one row per retained event) with its counters as metadata."""
        self.prune()
        ents, ts = [], []
        cols: list[list[float]] = [[] for _ in self._cols]
        for key, win in self._entities.items():
            ents.extend([key] * len(win.ts))
            ts.extend(win.ts)
            for dst, src in zip(cols, win.values, strict=True):
                dst.extend(src)
        data: dict[str, pa.Array] = {
            "entity": pa.array(ents, pa.string()),
            "ts_ns": pa.array(ts, pa.int64()),
        }
        for c, vals in zip(self._cols, cols, strict=True):
            data["value:" + c] = pa.array(vals, pa.float64())
        return pa.table(data).replace_schema_metadata({"counters": json.dumps(self.counters())})

    @classmethod
    def from_table(
        cls, fs: FeatureSet, table: pa.Table, extra_views: Sequence[FeatureSet] = ()
    ) -> StreamFeatures:
        """Rebuild the state ``to_table`` saved; ``StateMismatch`` if it was built for other features."""
        meta = table.schema.metadata or {}
        state = cls(fs, extra_views)
        try:
            counters = json.loads(meta[b"counters"])
        except (KeyError, ValueError):
            raise StateMismatch("window state: no counters in the saved table") from None
        state.restore_counters(counters)
        missing = [
            c
            for c in ("entity", "ts_ns", *("value:" + c for c in state._cols))
            if c not in table.column_names
        ]
        if missing:
            raise StateMismatch(f"window state: no column {', '.join(missing)}")
        ents = table.column("entity").to_pylist()
        ts = table.column("ts_ns").to_pylist()
        vals = [table.column("value:" + c).to_pylist() for c in state._cols]
        for i, (e, t) in enumerate(zip(ents, ts, strict=True)):
            win = state._entities.setdefault(e, _EntityWindow(values=[[] for _ in state._cols]))
            win.ts.append(t)
            for dst, src in zip(win.values, vals, strict=True):
                dst.append(src[i])
        return state
