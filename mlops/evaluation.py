"""The promotion gate's evidence: one evaluation set, both versions' metrics recomputed on it.

A training run stores its held-out test rows as a content-addressed Parquet file and the
hashes of the rows it trained on; the version's lineage tags carry both SHA-256s. At gate
time the candidate and the champion are scored on the same evaluation rows (the
candidate's holdout, or a declared dataset), with rows either version trained on left out,
and the gate compares those metrics instead of the ones the runs logged.

The training flow signs an evaluation record (Ed25519) binding the model name, run id, the
SHA-256 of the registered ONNX model and of both evaluation files; the gate uses a version's
files only through a record signed by a trusted key that matches the version.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, ValidationError

from mlops import modeling
from mlops.edge import manifest
from mlops.edge.errors import MetadataInvalid, SignatureInvalid
from mlops.errors import DataError, EvidenceUntrusted, ModelError, PlatformError
from mlops.onnx_model import OnnxScorer
from mlops.settings import DatasetSchema, StrictModel

HOLDOUT_TAG = "lineage.holdout_sha256"
HOLDOUT_ROWS_TAG = "lineage.holdout_rows"
TRAIN_ROWS_TAG = "lineage.train_rows_sha256"
RECORD_TAG = "lineage.evaluation_record_sha256"
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


def record_file(digest: str) -> str:
    """The artifact file name of a signed evaluation record with SHA-256 ``digest``."""
    return f"record-{digest}.json"


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


class EvaluationRecord(StrictModel):
    """What a training run signs: its model, run and ONNX file, and the evaluation files it stored."""

    kind: Literal["evaluation-record"] = "evaluation-record"
    model: str
    run_id: str
    model_sha256: str = Field(pattern=manifest.HEX64)
    holdout_sha256: str = Field(pattern=manifest.HEX64)
    holdout_rows: int = Field(ge=0)
    train_rows_sha256: str = Field(pattern=manifest.HEX64)
    created: str
    keyid: str = Field(pattern=manifest.HEX64)


def signed_record(
    model: str,
    run_id: str,
    onnx_model: bytes,
    evidence_tags: Mapping[str, str],
    key: Ed25519PrivateKey,
    created: datetime,
) -> tuple[dict[str, bytes], dict[str, str]]:
    """The signed evaluation record of a training run (envelope file) and the tag naming it.

    ``onnx_model`` is the file as the tracking store holds it; ``evidence_tags`` those of ``evidence``.
    """
    record = EvaluationRecord(
        model=model,
        run_id=run_id,
        model_sha256=sha256(onnx_model),
        holdout_sha256=evidence_tags[HOLDOUT_TAG],
        holdout_rows=int(evidence_tags[HOLDOUT_ROWS_TAG]),
        train_rows_sha256=evidence_tags[TRAIN_ROWS_TAG],
        created=manifest.iso(created),
        keyid=manifest.key_id(key.public_key()),
    )
    envelope = manifest.sign(record.model_dump(), [key])
    digest = sha256(envelope)
    return {record_file(digest): envelope}, {RECORD_TAG: digest}


def verified_record(
    data: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    name: str,
    version: int,
    run_id: str,
    onnx_model: bytes,
    what: str,
) -> EvaluationRecord:
    """The record in envelope ``data`` when a trusted key signed it for this version's model name,
    run and ONNX file; else ``EvidenceUntrusted`` with one line (``what`` names the use, e.g.
    "holdout of v3")."""
    try:
        signed, sigs = manifest.open_envelope(data)
        good = manifest.verify_signatures(signed, sigs, trusted, 1)
        record = EvaluationRecord.model_validate_json(manifest.canonical(signed))
    except SignatureInvalid as exc:
        why = str(exc).partition(": ")[2]
        raise EvidenceUntrusted(f"{what} is not signed by a trusted training key ({why})") from None
    except (MetadataInvalid, ValidationError) as exc:
        first = str(exc).splitlines()[0][:160]
        raise EvidenceUntrusted(f"evaluation record of v{version} is malformed: {first}") from None
    if record.keyid not in good:
        raise EvidenceUntrusted(
            f"{what} is not signed by a trusted training key (record names key {record.keyid[:16]})"
        )
    if record.run_id != run_id:
        raise EvidenceUntrusted(
            f"evaluation record of v{version} names run {record.run_id}, the version's run is {run_id}"
        )
    if record.model != name:
        raise EvidenceUntrusted(f"evaluation record of v{version} names model '{record.model}', not '{name}'")
    if record.model_sha256 != sha256(onnx_model):
        raise EvidenceUntrusted(f"model of v{version} is not the model its evaluation record was signed for")
    return record


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
    frame: pd.DataFrame, schema: DatasetSchema, trained: Mapping[str, np.ndarray | str]
) -> tuple[pd.DataFrame, int, tuple[str, ...]]:
    """``frame`` without the rows any version in ``trained`` trained on, how many were dropped,
    and a note for each version whose training rows are unknown (a string saying why): overlap
    not checked."""
    hashes = _hashes(frame, schema)
    keep = np.ones(len(frame), dtype=bool)
    notes = []
    for label, rows in trained.items():
        if isinstance(rows, str):
            notes.append(f"{label}'s training rows unknown: overlap not checked ({rows})")
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
