"""The promotion gate's evidence: one evaluation set, both versions' metrics recomputed on it.

A training run stores its held-out test rows as a content-addressed Parquet file and the
hashes of the rows it trained on; the version's lineage tags carry both SHA-256s. At gate
time the candidate and the champion are scored on the same evaluation rows (the
candidate's holdout, or a declared dataset), with rows either version trained on left out,
and the gate compares those metrics instead of the ones the runs logged.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mlops import modeling
from mlops.errors import DataError, ModelError, PlatformError
from mlops.onnx_model import OnnxScorer
from mlops.settings import DatasetSchema

HOLDOUT_TAG = "lineage.holdout_sha256"
HOLDOUT_ROWS_TAG = "lineage.holdout_rows"
TRAIN_ROWS_TAG = "lineage.train_rows_sha256"
ARTIFACT_DIR = "evaluation"
GATED_METRICS = ("roc_auc", "pr_auc", "log_loss", "brier", "ece")


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def holdout_file(digest: str) -> str:
    """The artifact file name of a holdout with SHA-256 ``digest``."""
    return f"holdout-{digest}.parquet"


def train_rows_file(digest: str) -> str:
    """The artifact file name of a training-row hash list with SHA-256 ``digest``."""
    return f"train-rows-{digest}.u64"


def _columns(schema: DatasetSchema) -> list[str]:
    return [*schema.numeric_names, *schema.categorical_names, schema.label_column]


def _model_rows(frame: pd.DataFrame, schema: DatasetSchema) -> pd.DataFrame:
    """The model's feature columns and the label of ``frame``, as the model sees them."""
    x = modeling.features_frame(frame, schema)
    x[schema.label_column] = modeling.labels(frame, schema)
    return x


def _hashes(frame: pd.DataFrame, schema: DatasetSchema) -> np.ndarray:
    """One 64-bit hash per row of ``frame``'s model features and label."""
    return pd.util.hash_pandas_object(_model_rows(frame, schema), index=False).to_numpy(dtype=np.uint64)


def holdout_bytes(frame: pd.DataFrame, schema: DatasetSchema) -> bytes:
    """The model's feature columns and the label of ``frame`` as Parquet bytes (same rows, same bytes)."""
    buf = io.BytesIO()
    pq.write_table(
        pa.Table.from_pandas(_model_rows(frame, schema), preserve_index=False), buf, compression="zstd"
    )
    return buf.getvalue()


def row_hashes(frame: pd.DataFrame, schema: DatasetSchema) -> np.ndarray:
    """Sorted distinct 64-bit hashes of each row's model features and label, as the model sees them."""
    return np.unique(_hashes(frame, schema))


def evidence(
    train: pd.DataFrame, test: pd.DataFrame, schema: DatasetSchema
) -> tuple[dict[str, bytes], dict[str, str]]:
    """A training run's evaluation files (holdout Parquet, training-row hashes) and the lineage tags naming them."""
    holdout = holdout_bytes(test, schema)
    trained = row_hashes(train, schema).astype("<u8").tobytes()
    h, t = sha256(holdout), sha256(trained)
    files = {holdout_file(h): holdout, train_rows_file(t): trained}
    tags = {HOLDOUT_TAG: h, HOLDOUT_ROWS_TAG: str(len(test)), TRAIN_ROWS_TAG: t}
    return files, tags


def recorded_digest(tags: Mapping[str, str], tag: str, what: str) -> str:
    """The SHA-256 a version's tag records; ``DataError`` when it is not 64 hex digits."""
    digest = tags.get(tag, "")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise DataError(f"{what}: tag {tag} is not a SHA-256 ({digest[:20]!r})")
    return digest


def verified(data: bytes, digest: str, what: str) -> bytes:
    """``data`` when its SHA-256 is ``digest``; else ``DataError`` naming ``what``."""
    got = sha256(data)
    if got != digest:
        raise DataError(f"{what} is corrupt: sha256 {got[:12]} != recorded {digest[:12]}")
    return data


def read_holdout(data: bytes, schema: DatasetSchema, what: str) -> pd.DataFrame:
    """The rows of a holdout Parquet file; ``DataError`` when it is unreadable or lacks a model column."""
    try:
        frame = pq.read_table(io.BytesIO(data)).to_pandas()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{what} is not readable Parquet: {str(exc).splitlines()[0][:200]}") from None
    return checked_frame(frame, schema, what)


def checked_frame(frame: pd.DataFrame, schema: DatasetSchema, what: str) -> pd.DataFrame:
    """``frame`` when it has every model column and a 0/1 label without gaps; else ``DataError``."""
    missing = [c for c in _columns(schema) if c not in frame.columns]
    if missing:
        raise DataError(f"{what} lacks model column(s): {', '.join(missing[:5])}")
    label = frame[schema.label_column]
    if label.isna().any() or not label.isin([0, 1]).all():
        raise DataError(f"{what}: label column '{schema.label_column}' must be 0 or 1 on every row")
    numeric = frame[list(schema.numeric_names)]
    try:
        bad = ~np.isfinite(numeric.to_numpy(dtype=np.float64))
    except (TypeError, ValueError):
        raise DataError(f"{what}: a numeric model column holds non-numbers") from None
    if bad.any():
        col = numeric.columns[bad.any(axis=0)][0]
        raise DataError(f"{what}: numeric column '{col}' has missing or infinite values")
    return frame.reset_index(drop=True)


def read_row_hashes(data: bytes, what: str) -> np.ndarray:
    """A training-row hash list; ``DataError`` when its length is not a whole number of hashes."""
    if len(data) % 8:
        raise DataError(f"{what} is corrupt: {len(data)} bytes is not a list of 64-bit hashes")
    return np.frombuffer(data, dtype="<u8")


@dataclass(frozen=True)
class EvaluationSet:
    """The rows a gate scored both versions on: where they came from, their SHA-256 and counts."""

    source: str
    sha256: str
    rows: int
    excluded: int = 0
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line: source, hash, rows scored, rows excluded as training rows, and any notes."""
        text = f"{self.source} sha256 {self.sha256[:12]}, {self.rows} rows"
        if self.excluded:
            text += f" ({self.excluded} excluded: a version trained on them)"
        return text + "".join(f"; {n}" for n in self.notes)


def exclude_trained(
    frame: pd.DataFrame, schema: DatasetSchema, trained: Mapping[str, np.ndarray | None]
) -> tuple[pd.DataFrame, int, tuple[str, ...]]:
    """``frame`` without the rows any version in ``trained`` trained on, how many were dropped,
    and a note for each version whose training rows are unknown (None): overlap not checked."""
    hashes = _hashes(frame, schema)
    keep = np.ones(len(frame), dtype=bool)
    notes = []
    for label, rows in trained.items():
        if rows is None:
            notes.append(f"{label}'s training rows unknown: overlap not checked")
        else:
            keep &= ~np.isin(hashes, rows)
    return frame[keep].reset_index(drop=True), int((~keep).sum()), tuple(notes)


def usable(frame: pd.DataFrame, schema: DatasetSchema, min_rows: int, before: int, what: str) -> pd.DataFrame:
    """``frame`` when it has both classes and leaving out training rows kept at least ``min_rows``
    of the ``before`` rows (all of them when ``before`` is smaller); else ``DataError`` saying which."""
    if len(frame) < min(min_rows, before):
        raise DataError(
            f"{what} has {len(frame)} of {before} rows left without training rows, fewer than "
            f"promotion.min_evaluation_rows {min_rows}: declare promotion.evaluation_data"
        )
    y = modeling.labels(frame, schema)
    if len(y) == 0 or y.min() == y.max():
        raise DataError(f"{what} has a single class in its {len(frame)} rows: no metric to compare")
    return frame


def metrics_on(
    scorer: OnnxScorer, frame: pd.DataFrame, schema: DatasetSchema, threshold: float
) -> dict[str, float]:
    """The training run's evaluation metrics of ``scorer`` on ``frame`` (ONNX Runtime, same metric code)."""
    try:
        scores = scorer.predict_proba(modeling.features_frame(frame, schema))
    except PlatformError:
        raise
    except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses
        raise ModelError(
            f"ONNX model cannot score the evaluation rows: {str(exc).splitlines()[0][:200]}"
        ) from exc
    return modeling.classification_metrics(modeling.labels(frame, schema), scores, threshold)


def metrics_line(label: str, metrics: Mapping[str, float]) -> str:
    """``label`` and its gated metrics, four decimals each."""
    shown = " ".join(f"{k} {metrics[k]:.4f}" for k in GATED_METRICS if k in metrics)
    return f"{label}: {shown}"
