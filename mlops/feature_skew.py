"""Training-serving skew of the window features: the same events offline, through the stream, online.

``measure_skew`` takes a frame of events and computes each event's features three ways:

* offline: ``compute_offline`` over the whole frame (what training and batch scoring use);
* stream: ``StreamFeatures.update`` event by event, in time order (what the stream scores with);
* online: after each checkpoint of that state to a store (``save``), ``store.lookup`` of every
  event of the checkpoint at its own time (what ``/predict`` fills a raw transaction with).

Checkpoints cover at most ``allowed_lateness_seconds`` of event time (and ``segment_events``
events), so every lookup is at or after the state's watermark, where the stream promises
the offline values. The report holds the largest absolute difference per feature; counts
must agree exactly, other features within ``tolerance`` relative to their magnitude (at
least 1). The store is injected (anything with ``save`` and ``lookup``), so this runs against
the embedded checkpoint file and Redis alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mlops.errors import DataError
from mlops.features import (
    FeatureSet,
    Frame,
    StreamFeatures,
    _column,
    _entities,
    _values,
    compute_offline,
    timestamps_ns,
)


class SkewExceeded(DataError):
    """Offline and stream/online feature values of the same events differ beyond the tolerance."""


class SkewStore(Protocol):
    """The part of a feature store the skew measurement uses."""

    def save(self, state: StreamFeatures, positions: Mapping[str, int]) -> None:
        """Checkpoint ``state``."""
        ...

    def lookup(self, entity: str, ts_ns: int) -> dict[str, float]:
        """Features of ``entity`` at ``ts_ns`` from the last checkpoint."""
        ...


@dataclass(frozen=True)
class FeatureSkew:
    """Largest absolute differences of one feature over every event."""

    name: str
    agg: str
    stream: float  # offline vs StreamFeatures.update
    online: float  # offline vs store lookup after a checkpoint
    exceeded: bool


@dataclass(frozen=True)
class SkewReport:
    """What ``measure_skew`` found."""

    events: int
    checkpoints: int
    tolerance: float
    features: tuple[FeatureSkew, ...]

    @property
    def ok(self) -> bool:
        """Whether every feature agrees (counts exactly, the others within the tolerance)."""
        return not any(f.exceeded for f in self.features)

    def reasons(self) -> list[str]:
        """One line per feature that disagrees."""
        return [
            f"{f.name} ({f.agg}): max abs diff stream {f.stream:.3g}, online {f.online:.3g}"
            + (" (counts must agree exactly)" if f.agg == "count" else f" (tolerance {self.tolerance:g})")
            for f in self.features
            if f.exceeded
        ]


def checkpoint_segments(ts_sorted: np.ndarray, span_ns: int, max_events: int) -> list[tuple[int, int]]:
    """Ranges ``[a, b)`` of time-sorted events, each within ``span_ns`` of its first event's time
    and at most ``max_events`` long (at least one event)."""
    out = []
    a, n = 0, len(ts_sorted)
    while a < n:
        b = int(np.searchsorted(ts_sorted, ts_sorted[a] + span_ns, "right"))
        b = max(a + 1, min(b, a + max_events))
        out.append((a, b))
        a = b
    return out


def measure_skew(
    fs: FeatureSet,
    events: Frame,
    store: SkewStore,
    *,
    tolerance: float = 1e-9,
    segment_events: int = 1000,
) -> SkewReport:
    """Offline vs stream vs online features of ``events`` (see module doc), through ``store``."""
    if segment_events < 1:
        raise DataError("segment_events must be at least 1")
    ent_col = _entities(events, fs.entity_column)
    entities = [str(e) for e in (ent_col.to_pylist() if hasattr(ent_col, "to_pylist") else ent_col.tolist())]
    ts = timestamps_ns(_column(events, fs.timestamp_column), f"events.{fs.timestamp_column}")
    values = {c: _values(events, c) for c in fs.source_columns}
    if not len(ts):
        raise DataError("events: no rows")
    offline_table = compute_offline(fs, events)
    offline = {n: offline_table.column(n).to_numpy() for n in fs.names}
    stream = {n: np.empty(len(ts)) for n in fs.names}
    online = {n: np.empty(len(ts)) for n in fs.names}
    order = np.argsort(ts, kind="stable")
    state = StreamFeatures(fs)
    segments = checkpoint_segments(ts[order], fs.lateness_ns, segment_events)
    for a, b in segments:
        rows = order[a:b].tolist()
        for k in rows:
            update = state.update(entities[k], int(ts[k]), {c: v[k] for c, v in values.items()})
            for name, value in update.features.items():
                stream[name][k] = value
        store.save(state, {"skew": b})
        for k in rows:
            for name, value in store.lookup(entities[k], int(ts[k])).items():
                online[name][k] = value
    out = []
    for w in fs.windows:
        ref = offline[w.name]
        d_stream = np.abs(stream[w.name] - ref)
        d_online = np.abs(online[w.name] - ref)
        if w.agg == "count":
            exceeded = bool(d_stream.max() > 0 or d_online.max() > 0)
        else:
            limit = tolerance * np.maximum(1.0, np.abs(ref))
            exceeded = bool((d_stream > limit).any() or (d_online > limit).any())
        out.append(FeatureSkew(w.name, w.agg, float(d_stream.max()), float(d_online.max()), exceeded))
    return SkewReport(len(ts), len(segments), tolerance, tuple(out))
