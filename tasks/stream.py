"""Stream scoring: events from a broker -> window features -> ONNX Runtime scores -> Parquet.

``StreamConsumer`` consumes one topic for one consumer group. Per batch it updates the
per-entity window state (``mlops.features.StreamFeatures``) event by event, scores the
events with the model (dataset columns from the event; window features are computed,
written with the scores, and fed to the model when its graph has inputs of those names),
writes one Parquet part named by the batch's offset range (temporary file, fsync, rename;
a ``late`` column flags events older than the watermark, whose features are best effort),
and only then commits the group's offset. The committed offset is the commit point:

* a part whose first offset is at or after the committed offset was never committed; a
  restart deletes it and scores those events again, so each event is in exactly one part;
* the window state is checkpointed after the commit (every ``checkpoint_every`` batches) with
  the offset it covers; a restart loads it and replays the log from there up to the
  committed offset without scoring (the log is the truth, the checkpoint saves time).

With routes (``routes`` other than ``single`` and a pinned ``candidate``), each event is
routed by ``mlops.routing.route`` keyed by its entity key and transaction id: in canary, ab
and blue_green the chosen variant's score and decision (at its threshold) answer; in shadow
``stable`` answers and the mirrored share also gets the candidate's ``shadow_score``. Each
model scores only the rows it is routed (or mirrored). Routed parts add the columns
``variant``, ``shadow_score`` and ``shadow_version`` (``model_version`` is the answering
version) and carry the routes as JSON in their metadata; a run without routes writes the
columns it always did.

Routing is a pure function of the pinned table and the event, so the restarted consumer
writes exactly the rows, features and scores of a run that was never interrupted. Nothing
here imports Prefect: ``flows.stream`` wraps the consumer in a flow, and a long-running
process can drive it directly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adapters.broker import Broker, Message
from adapters.feature_store import FeatureStore
from adapters.files import fsync_dir, fsync_file
from mlops.errors import DataError
from mlops.features import (
    FeatureSet,
    FeatureViewMismatch,
    StateMismatch,
    StreamFeatures,
    check_view,
    timestamps_ns,
)
from mlops.onnx_model import OnnxScorer
from mlops.routing import CANDIDATE, STABLE, RouteTable, route
from mlops.scoring import ModelRef
from mlops.settings import DatasetSchema
from mlops.stream_routes import PART_METADATA_KEY, StreamRoutes

PART = re.compile(r"^part-(\d{20})-(\d{20})\.parquet$")


def frame_messages(
    frame: pd.DataFrame, schema: DatasetSchema, fs: FeatureSet
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Events of a frame as broker messages: keyed by entity, the time as int64 ns, other columns as is."""
    ts = timestamps_ns(frame[fs.timestamp_column], fs.timestamp_column)
    cols = [c for c in frame.columns if c != fs.timestamp_column]
    records = frame[cols].to_dict("records")
    for rec, t in zip(records, ts, strict=True):
        payload = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in rec.items()}
        payload[fs.timestamp_column] = int(t)
        yield str(payload[fs.entity_column]), payload


def part_name(first: int, next_offset: int) -> str:
    """The file name of the output part holding offsets ``first`` .. ``next_offset - 1``."""
    return f"part-{first:020d}-{next_offset:020d}.parquet"


def write_part(folder: Path, table: pa.Table, first: int, next_offset: int) -> Path:
    """Write one output part atomically and durably (temporary file, fsync, rename, folder fsync)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / part_name(first, next_offset)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        fsync_file(tmp)
        fsync_dir(folder)
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def sweep_uncommitted(folder: Path, committed: int) -> list[str]:
    """Delete parts (and temporary files) at or after the committed offset: they were never committed."""
    removed: list[str] = []
    if not folder.exists():
        return removed
    for p in sorted(folder.iterdir()):
        m = PART.match(p.name)
        if (m and int(m.group(1)) >= committed) or p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


@dataclass(frozen=True)
class BatchResult:
    """What one consumed batch produced."""

    first: int
    next_offset: int
    rows: int
    late: int
    part: str
    candidate: int = 0
    mirrored: int = 0


@dataclass(frozen=True)
class StartReport:
    """How a consumer resumed: the committed offset, the checkpoint it loaded, what it replayed and swept."""

    committed: int
    checkpoint: int
    replayed: int
    swept: tuple[str, ...]


class StreamConsumer:
    """One consumer group on one topic: features, scores, durable parts, then offsets (see module doc)."""

    def __init__(
        self,
        broker: Broker,
        store: FeatureStore,
        fs: FeatureSet,
        schema: DatasetSchema,
        scorer: OnnxScorer,
        model: ModelRef,
        out_dir: Path,
        topic: str,
        group: str,
        checkpoint_every: int = 1,
        extra_views: tuple[FeatureSet, ...] = (),
        routes: RouteTable | None = None,
        candidate: tuple[OnnxScorer, ModelRef] | None = None,
    ):
        self.broker, self.store, self.fs, self.schema = broker, store, fs, schema
        self.scorer, self.model = scorer, model
        self.out_dir = Path(out_dir)
        self.topic, self.group = topic, group
        self.checkpoint_every = max(1, checkpoint_every)
        self.state = StreamFeatures(fs, extra_views)
        # The view the model was trained on (refused when not declared); its features are written.
        self.view = check_view((fs, *extra_views), model.view, model.label()) or fs
        self.next_offset = 0
        self._batches_since_checkpoint = 0
        self._model_windows = self._graph_windows(scorer)
        table = routes or RouteTable()
        self.routes = StreamRoutes(table, model.version, candidate[1].version if candidate else None)
        # Routed: the candidate takes part; then its view must be the one the stream computes.
        self.candidate = candidate if self.routes.routed else None
        self._candidate_windows: list[str] = []
        if self.candidate:
            cand_scorer, cand_model = self.candidate
            cand_view = check_view((fs, *extra_views), cand_model.view, cand_model.label())
            if cand_view is not None and cand_view.digest() != self.view.digest():
                raise FeatureViewMismatch(
                    f"candidate {cand_model.label()} was trained on feature view {cand_view.digest()}, "
                    f"stable {model.label()} on {self.view.digest()}: the stream computes one view"
                )
            self._candidate_windows = self._graph_windows(cand_scorer)

    def _graph_windows(self, scorer: OnnxScorer) -> list[str]:
        graph_inputs = {i.name for i in scorer.session.get_inputs()}
        return [n for n in self.view.names if n in graph_inputs]

    def start(self, replay_batch: int = 10_000) -> StartReport:
        """Load the checkpoint, replay the log up to the committed offset, delete uncommitted parts."""
        committed = self.broker.committed(self.topic, self.group)
        state, positions = self.store.load()
        at = positions.get(self.topic, 0)
        if at > committed:
            raise StateMismatch(
                f"window state covers {self.topic!r} up to offset {at}, beyond the committed {committed}: "
                "it belongs to another consumer group"
            )
        replayed = 0
        while at < committed:
            msgs = self.broker.poll(self.topic, self.group, min(replay_batch, committed - at), start=at)
            if not msgs:
                raise DataError(
                    f"{self.topic!r}: the log ends at {at}, before the committed offset {committed}"
                )
            for m in msgs:
                self._update(state, m)
            at = msgs[-1].offset + 1
            replayed += len(msgs)
        self.state, self.next_offset = state, committed
        swept = sweep_uncommitted(self.out_dir, committed)
        return StartReport(committed, positions.get(self.topic, 0), replayed, tuple(swept))

    def _update(
        self, state: StreamFeatures, m: Message, view: FeatureSet | None = None
    ) -> tuple[dict[str, float], bool]:
        try:
            entity = m.payload[self.fs.entity_column]
            ts = int(m.payload[self.fs.timestamp_column])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{self.topic!r} offset {m.offset}: no valid entity or time ({exc})") from None
        update = state.update(str(entity), ts, m.payload, view)
        return update.features, update.late

    def step(self, max_messages: int) -> BatchResult | None:
        """Consume one batch: update windows, score, write the part, commit; None when caught up."""
        msgs = self.broker.poll(self.topic, self.group, max_messages, start=self.next_offset)
        if not msgs:
            return None
        feats, late = [], []
        for m in msgs:
            f, was_late = self._update(self.state, m, self.view)
            feats.append(f)
            late.append(was_late)
        table, on_candidate, mirrored = self._score(msgs, feats)
        table = table.append_column("late", pa.array(late, pa.bool_()))
        if self.candidate:
            table = table.replace_schema_metadata({PART_METADATA_KEY: self.routes.as_json().encode()})
        first, nxt = msgs[0].offset, msgs[-1].offset + 1
        path = write_part(self.out_dir, table, first, nxt)
        self.broker.commit(self.topic, self.group, nxt)  # the commit point: the part is durable
        self.next_offset = nxt
        self._batches_since_checkpoint += 1
        if self._batches_since_checkpoint >= self.checkpoint_every:
            self.checkpoint()
        return BatchResult(first, nxt, len(msgs), sum(late), path.name, on_candidate, mirrored)

    def checkpoint(self) -> None:
        """Save the window state as covering everything up to the current offset."""
        self.store.save(self.state, {self.topic: self.next_offset})
        self._batches_since_checkpoint = 0

    def _score(self, msgs: list[Message], feats: list[dict[str, float]]) -> tuple[pa.Table, int, int]:
        """The batch's output rows, and how many the candidate answered and was mirrored."""
        payloads = [m.payload for m in msgs]
        needed = (self.schema.id_column, self.fs.entity_column, *self.schema.feature_names)
        try:
            cols_in = {c: [p[c] for p in payloads] for c in needed}
        except KeyError:
            missing = [c for c in needed if any(c not in p for p in payloads)]
            raise DataError(
                f"{self.topic!r} offsets {msgs[0].offset}..: events lack {', '.join(missing)}"
            ) from None
        ts = np.fromiter((p[self.fs.timestamp_column] for p in payloads), np.int64, len(payloads))
        windows = {n: np.fromiter((f[n] for f in feats), np.float64, len(feats)) for n in self.view.names}
        ids = [str(v) for v in cols_in[self.schema.id_column]]
        entities = [str(v) for v in cols_in[self.fs.entity_column]]
        cols: dict[str, Any] = {
            "offset": pa.array([m.offset for m in msgs], pa.int64()),
            self.schema.id_column: pa.array(ids, pa.string()),
            self.fs.entity_column: pa.array(entities, pa.string()),
            self.fs.timestamp_column: pa.array(ts, pa.timestamp("ns")),
        }
        for name in self.view.names:
            cols[name] = pa.array(windows[name], pa.float64())
        n = len(msgs)
        if self.candidate is None:
            scores = self._run(self.scorer, self._model_windows, cols_in, windows, None)
            cols["score"] = pa.array(scores, pa.float64())
            cols["decision"] = pa.array(scores >= self.model.threshold, pa.bool_())
            cols["model_name"] = pa.repeat(pa.scalar(self.model.name, pa.string()), n)
            cols["model_version"] = pa.repeat(pa.scalar(self.model.version, pa.int32()), n)
            return pa.table(cols), 0, 0
        cand_scorer, cand_model = self.candidate
        table = self.routes.table
        decisions = [route(table, e, i) for e, i in zip(entities, ids, strict=True)]
        on_cand = np.fromiter((d.variant == CANDIDATE for d in decisions), np.bool_, n)
        mirror = np.fromiter((d.mirror for d in decisions), np.bool_, n)
        # Each model scores only the rows it answers (and the candidate the mirrored ones).
        scores = np.empty(n, np.float64)
        scores[~on_cand] = self._run(self.scorer, self._model_windows, cols_in, windows, ~on_cand)
        scores[on_cand] = self._run(cand_scorer, self._candidate_windows, cols_in, windows, on_cand)
        shadow = np.full(n, np.nan)
        shadow[mirror] = self._run(cand_scorer, self._candidate_windows, cols_in, windows, mirror)
        thresholds = np.where(on_cand, cand_model.threshold, self.model.threshold)
        cols["score"] = pa.array(scores, pa.float64())
        cols["decision"] = pa.array(scores >= thresholds, pa.bool_())
        cols["model_name"] = pa.repeat(pa.scalar(self.model.name, pa.string()), n)
        cols["model_version"] = pa.array(
            np.where(on_cand, cand_model.version, self.model.version).astype(np.int32), pa.int32()
        )
        cols["variant"] = pa.array(np.where(on_cand, CANDIDATE, STABLE).tolist(), pa.string())
        cols["shadow_score"] = pa.array(shadow, pa.float64(), mask=~mirror)
        cols["shadow_version"] = pa.array(np.full(n, cand_model.version, np.int32), pa.int32(), mask=~mirror)
        return pa.table(cols), int(on_cand.sum()), int(mirror.sum())

    @staticmethod
    def _run(
        scorer: OnnxScorer,
        model_windows: list[str],
        cols_in: dict[str, list[Any]],
        windows: dict[str, np.ndarray],
        rows: np.ndarray | None,
    ) -> np.ndarray:
        """``scorer``'s scores of every row, or of the rows where the mask ``rows`` is set."""
        if rows is None or rows.all():
            feeds = scorer.feeds(cols_in)
            picked = windows
        else:
            idx = np.flatnonzero(rows)
            if not len(idx):
                return np.empty(0, np.float64)
            take = itemgetter(*idx.tolist())
            if len(idx) == 1:
                feeds = scorer.feeds({c: [take(v)] for c, v in cols_in.items()})
            else:
                feeds = scorer.feeds({c: take(v) for c, v in cols_in.items()})
            picked = {name: windows[name][idx] for name in model_windows}
        for name in model_windows:
            feeds[name] = picked[name].astype(np.float32).reshape(-1, 1)
        return scorer.run(feeds).astype(np.float64)

    def run(self, max_events: int, batch_size: int) -> list[BatchResult]:
        """Consume until caught up or ``max_events`` are scored (bounded), then checkpoint."""
        results: list[BatchResult] = []
        done = 0
        while done < max_events:
            r = self.step(min(batch_size, max_events - done))
            if r is None:
                break
            results.append(r)
            done += r.rows
        if self._batches_since_checkpoint:
            self.checkpoint()
        return results


def read_parts(folder: Path) -> pa.Table:
    """Every committed part of an output folder, in offset order (one table); columns are
    unified by name, so a column some parts lack is null in their rows."""
    parts = sorted(p for p in folder.iterdir() if PART.match(p.name)) if folder.exists() else []
    if not parts:
        raise DataError(f"{folder}: no stream output")
    # Parts written without routes lack the routed columns: those rows read as nulls there.
    return pa.concat_tables((pq.read_table(p) for p in parts), promote_options="default")
