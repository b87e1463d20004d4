"""Model building, ONNX export, parity and evaluation: the computing half of training.

Plain functions over pandas frames and scikit-learn estimators; the training flow
sequences them and the registry adapter persists what they return.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import pandas as pd
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from mlops.errors import ModelError, ParityFailed
from mlops.onnx_model import OnnxScorer
from mlops.settings import (
    DatasetSchema,
    GradientBoostingSpec,
    LogisticRegressionSpec,
    ModelSpec,
    RandomForestSpec,
    TrainingConfig,
)
from mlops.stats import calibration_error

TARGET_OPSET = 17


def features_frame(frame: pd.DataFrame, schema: DatasetSchema) -> pd.DataFrame:
    """The feature columns as the model sees them: float32-exact numbers, plain strings.

    Rounding numbers through float32 here means scikit-learn and ONNX Runtime compare the
    very same inputs in the parity check.
    """
    out = pd.DataFrame(index=frame.index)
    for name in schema.numeric_names:
        out[name] = frame[name].to_numpy(dtype=np.float32).astype(np.float64)
    for name in schema.categorical_names:
        out[name] = frame[name].astype(str).to_numpy(dtype=object)
    return out


def labels(frame: pd.DataFrame, schema: DatasetSchema) -> np.ndarray:
    """The label column as int64."""
    return frame[schema.label_column].to_numpy(dtype=np.int64)


def split(
    frame: pd.DataFrame, schema: DatasetSchema, cfg: TrainingConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified train/test split, deterministic for the configured seed."""
    y = labels(frame, schema)
    if len(np.unique(y)) < 2:
        raise ModelError(f"label column '{schema.label_column}' has a single class; nothing to learn")
    train, test = train_test_split(frame, test_size=cfg.test_fraction, random_state=cfg.seed, stratify=y)
    return train.reset_index(drop=True), test.reset_index(drop=True)


def build_pipeline(spec: ModelSpec, schema: DatasetSchema, seed: int) -> Pipeline:
    """A preprocessing + classifier pipeline that skl2onnx converts whole."""
    scale = isinstance(spec, LogisticRegressionSpec)
    numeric = StandardScaler() if scale else "passthrough"
    pre = ColumnTransformer(
        [
            ("num", numeric, list(schema.numeric_names)),
            (
                "cat",
                OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                list(schema.categorical_names),
            ),
        ],
        sparse_threshold=0.0,
    )
    if isinstance(spec, GradientBoostingSpec):
        clf = GradientBoostingClassifier(
            n_estimators=spec.n_estimators,
            learning_rate=spec.learning_rate,
            max_depth=spec.max_depth,
            subsample=spec.subsample,
            random_state=seed,
        )
    elif isinstance(spec, LogisticRegressionSpec):
        clf = LogisticRegression(C=spec.C, max_iter=spec.max_iter, class_weight=spec.class_weight)
    elif isinstance(spec, RandomForestSpec):
        clf = RandomForestClassifier(
            n_estimators=spec.n_estimators,
            max_depth=spec.max_depth,
            min_samples_leaf=spec.min_samples_leaf,
            random_state=seed,
            n_jobs=-1,
        )
    else:  # pragma: no cover - the discriminated union admits nothing else
        raise ModelError(f"unknown model kind {spec!r}")
    return Pipeline([("pre", pre), ("clf", clf)])


def fit(spec: ModelSpec, train: pd.DataFrame, schema: DatasetSchema, seed: int) -> Pipeline:
    """Fit one candidate (on a deterministic subsample when the spec caps training rows)."""
    cap = getattr(spec, "max_train_rows", None)
    if cap is not None and len(train) > cap:
        train = train.sample(n=cap, random_state=seed)
    pipe = build_pipeline(spec, schema, seed)
    pipe.fit(features_frame(train, schema), labels(train, schema))
    return pipe


def to_onnx_bytes(pipe: Pipeline, schema: DatasetSchema) -> bytes:
    """Export a fitted pipeline: one input per feature, a ``probabilities`` output.

    The pipeline selects columns by their dataset names, so skl2onnx is given those; it
    renames inputs whose names are not identifiers its own way, and the exported graph's
    inputs are then renamed to the platform's ``schema.input_names``.
    """
    initial_types = [(n, FloatTensorType([None, 1])) for n in schema.numeric_names]
    initial_types += [(n, StringTensorType([None, 1])) for n in schema.categorical_names]
    try:
        model = to_onnx(
            pipe,
            initial_types=initial_types,
            target_opset=TARGET_OPSET,
            options={id(pipe.named_steps["clf"]): {"zipmap": False}},
        )
    except Exception as exc:  # skl2onnx raises many unrelated types for unsupported models
        raise ModelError(
            f"ONNX conversion of {type(pipe.named_steps['clf']).__name__} failed: {exc}"
        ) from exc
    names = schema.input_names
    rename_inputs(model.graph, [names[n] for n, _ in initial_types])
    return model.SerializeToString()


def rename_inputs(graph: onnx.GraphProto, names: Sequence[str]) -> None:
    """Rename the graph's inputs, in order, to ``names`` (and every use of them, in place).

    Raises ``ModelError`` when the counts differ or a new name is already taken by another
    value of the graph.
    """
    if len(graph.input) != len(names):
        raise ModelError(f"the exported graph has {len(graph.input)} inputs for {len(names)} features")
    renames = {i.name: new for i, new in zip(graph.input, names, strict=True) if i.name != new}
    if not renames:
        return
    taken = {o for node in graph.node for o in node.output} | {t.name for t in graph.initializer}
    taken |= {i.name for i in graph.input if i.name not in renames}
    clash = sorted(set(renames.values()) & taken)
    if clash:
        raise ModelError(f"ONNX input name {clash[0]!r} is already used inside the exported graph")
    for value in graph.input:
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(x, x) for x in node.input]
    for value in graph.output:
        value.name = renames.get(value.name, value.name)


@dataclass(frozen=True)
class Parity:
    """How closely ONNX Runtime reproduces scikit-learn on held-out rows."""

    rows: int
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        """Whether the largest difference is within tolerance."""
        return self.max_abs_diff <= self.tolerance


def parity(pipe: Pipeline, scorer: OnnxScorer, rows: pd.DataFrame, tolerance: float) -> Parity:
    """Compare probabilities of the fitted pipeline and its ONNX export."""
    x = features_frame(rows, scorer.schema)
    ref = pipe.predict_proba(x)[:, 1]
    got = scorer.predict_proba(x)
    diff = np.abs(ref - got)
    return Parity(len(rows), float(diff.max()), float(diff.mean()), tolerance)


def require_parity(result: Parity, label: str) -> None:
    """Raise ``ParityFailed`` for candidate ``label`` unless ``result`` is within tolerance."""
    if not result.ok:
        raise ParityFailed(
            f"{label}: ONNX and scikit-learn disagree on {result.rows} held-out rows "
            f"(max |dp| {result.max_abs_diff:.2e} > tolerance {result.tolerance:.2e}); not registered"
        )


def classification_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Ranking, probability and decision metrics of scores ``p`` against labels ``y``."""
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    decided = p >= threshold
    tp = float(np.sum(decided & (y == 1)))
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "brier": float(brier_score_loss(y, p)),
        "ece": calibration_error(y, p),
        "decision_rate": float(decided.mean()),
        "precision_at_threshold": tp / max(float(decided.sum()), 1.0),
        "recall_at_threshold": tp / max(float((y == 1).sum()), 1.0),
        "positive_rate": float(y.mean()),
    }


def latency(scorer: OnnxScorer, rows: pd.DataFrame, batch_rows: int, repeats: int) -> dict[str, float]:
    """Single-row p50/p99 latency (ms) and batch throughput (rows/s) of the ONNX model."""
    feeds = [scorer.feeds(rows.iloc[[i % len(rows)]]) for i in range(repeats)]
    scorer.run(feeds[0])  # warm up
    times = []
    for f in feeds:
        t0 = time.perf_counter()
        scorer.run(f)
        times.append((time.perf_counter() - t0) * 1e3)
    batch = rows.sample(n=batch_rows, replace=len(rows) < batch_rows, random_state=0)
    batch_feeds = scorer.feeds(batch)
    t0 = time.perf_counter()
    scorer.run(batch_feeds)
    elapsed = time.perf_counter() - t0
    return {
        "latency_p50_ms": float(np.percentile(times, 50)),
        "latency_p99_ms": float(np.percentile(times, 99)),
        "batch_rows_per_s": batch_rows / max(elapsed, 1e-9),
    }


LOWER_IS_BETTER = frozenset({"log_loss", "brier", "ece"})


def select_best(results: dict[str, dict[str, float]], by: str) -> str:
    """The candidate label with the best ``by`` metric (ties go to the first listed)."""
    if not results:
        raise ModelError("no candidate model was trained")
    sign = -1.0 if by in LOWER_IS_BETTER else 1.0
    return max(results, key=lambda label: sign * results[label][by])
