"""The computing half of a training run, as plain functions the training flow sequences.

Fit every configured candidate, export it to ONNX, refuse it on a parity failure, evaluate
the ONNX model itself, pick the best, and assemble what the run logs and the registered
version carries (parameters, metrics, report files, lineage and registry tags). Nothing
here reads or writes anything: the flow hands the results to the registry adapter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlops import modeling
from mlops.errors import DataError
from mlops.features import FeatureSet, assert_point_in_time, compute_offline
from mlops.lineage import config_hash, data_fingerprint
from mlops.onnx_model import OnnxScorer
from mlops.reports import evaluation_plots, metrics_markdown
from mlops.settings import DatasetSchema, ModelSpec, Settings, TrainingConfig, settings_digest

TAGGED_METRICS = ("roc_auc", "pr_auc", "log_loss")


@dataclass(frozen=True)
class Candidate:
    """One fitted candidate, exported and checked."""

    label: str
    spec: ModelSpec
    onnx_model: bytes
    metrics: dict[str, float]
    parity_max_abs_diff: float
    scores: np.ndarray


@dataclass(frozen=True)
class Selection:
    """Every candidate of a run by label, and the one chosen."""

    candidates: dict[str, Candidate]
    best: Candidate

    @property
    def results(self) -> dict[str, dict[str, float]]:
        """Each candidate's metrics by label."""
        return {label: c.metrics for label, c in self.candidates.items()}


def candidate_label(spec: ModelSpec, index: int, specs: tuple[ModelSpec, ...]) -> str:
    """A candidate's name: its kind, numbered by position when the kind occurs twice."""
    same = [s for s in specs if s.kind == spec.kind]
    return spec.kind if len(same) == 1 else f"{spec.kind}_{index}"


def train_candidate(
    spec: ModelSpec,
    label: str,
    train: pd.DataFrame,
    test: pd.DataFrame,
    schema: DatasetSchema,
    cfg: TrainingConfig,
) -> Candidate:
    """Fit, export to ONNX, refuse on parity failure, and evaluate the ONNX model itself."""
    pipe = modeling.fit(spec, train, schema, cfg.seed)
    onnx_model = modeling.to_onnx_bytes(pipe, schema)
    scorer = OnnxScorer(onnx_model, schema)
    parity = modeling.parity(pipe, scorer, test.head(cfg.parity_rows), cfg.parity_tolerance)
    modeling.require_parity(parity, label)
    scores = scorer.predict_proba(test)
    metrics = modeling.classification_metrics(modeling.labels(test, schema), scores, cfg.decision_threshold)
    metrics |= modeling.latency(scorer, test, cfg.latency_batch_rows, cfg.latency_repeats)
    metrics |= {"parity_max_abs_diff": parity.max_abs_diff, "onnx_bytes": float(len(onnx_model))}
    return Candidate(label, spec, onnx_model, metrics, parity.max_abs_diff, scores)


def select(candidates: Mapping[str, Candidate], cfg: TrainingConfig) -> Selection:
    """The candidates with the best by ``cfg.select_by`` chosen."""
    results = {label: c.metrics for label, c in candidates.items()}
    return Selection(dict(candidates), candidates[modeling.select_best(results, cfg.select_by)])


def training_frame(frame: pd.DataFrame, fs: FeatureSet | None, source: str) -> pd.DataFrame:
    """The rows training fits on: ``frame``, plus the window features of view ``fs``.

    Each row gets its features from the dataset's own events strictly before it; window
    columns the data already carries (all of them, or none) are kept as given. Either way
    the features must pass the point-in-time check before anything is fitted
    (``LeakDetected``, one line, otherwise).
    """
    if fs is None:
        return frame
    carried = [n for n in fs.names if n in frame.columns]
    if carried and len(carried) < len(fs.names):
        missing = [n for n in fs.names if n not in frame.columns]
        raise DataError(
            f"{source}: carries window features {', '.join(carried)} but not {', '.join(missing)}: give all or none"
        )
    if not carried:
        feats = compute_offline(fs, frame)
        frame = frame.assign(**{n: feats.column(n).to_numpy() for n in fs.names})
    assert_point_in_time(fs, frame)
    return frame


def lineage(
    data: str,
    frame: pd.DataFrame,
    settings: Settings,
    code: str,
    flow_run_id: str,
    fs: FeatureSet | None = None,
) -> dict[str, str]:
    """The ``lineage.*`` tags of a run: data path, fingerprint and rows, config, code, flow run,
    dataset, and the feature view (digest and windows) when the model takes window features."""
    schema = settings.dataset
    view = fs.lineage_tags() if fs is not None else {}
    return view | {
        "lineage.data_path": data,
        "lineage.data_fingerprint": data_fingerprint([frame], schema.feature_names + (schema.label_column,)),
        "lineage.data_rows": str(len(frame)),
        "lineage.config_hash": config_hash(settings_digest(settings)),
        "lineage.code_version": code,
        "lineage.flow_run_id": flow_run_id,
        "lineage.dataset": schema.name,
    }


def report_files(
    selection: Selection, test: pd.DataFrame, schema: DatasetSchema, title: str
) -> dict[str, bytes]:
    """The run's evaluation files: ROC, precision-recall and calibration plots, and the candidates table."""
    y_test = modeling.labels(test, schema)
    files = evaluation_plots(y_test, {label: c.scores for label, c in selection.candidates.items()})
    files["candidates.md"] = candidates_table(selection, title).encode()
    return files


def candidates_table(selection: Selection, title: str) -> str:
    """The candidates' metrics as a markdown table, the chosen one marked."""
    return metrics_markdown(f"{title}: candidates", selection.results, chosen=selection.best.label)


def run_metrics(selection: Selection) -> dict[str, float]:
    """The chosen candidate's metrics, plus every candidate's under ``<label>.<metric>``."""
    out = dict(selection.best.metrics)
    out |= {f"{label}.{k}": v for label, m in selection.results.items() for k, v in m.items()}
    return out


def run_params(
    selection: Selection, cfg: TrainingConfig, train_rows: int, test_rows: int
) -> dict[str, object]:
    """The run's parameters: the selection, the split sizes and each candidate's spec."""
    params: dict[str, object] = {
        "selected": selection.best.label,
        "select_by": cfg.select_by,
        "train_rows": train_rows,
        "test_rows": test_rows,
    }
    params |= {f"{label}.spec": c.spec.model_dump_json() for label, c in selection.candidates.items()}
    return params


def example_features(test: pd.DataFrame, schema: DatasetSchema, rows: int = 5) -> pd.DataFrame:
    """A few rows as the model sees them (numbers as float32), for the logged model's signature."""
    return modeling.features_frame(test.head(rows), schema).astype(
        {n: np.float32 for n in schema.numeric_names}
    )


def signature_tag(onnx_model: bytes, schema: DatasetSchema) -> str:
    """The model's inputs as JSON: each feature column's datatype, in input order."""
    return json.dumps({t.name: t.datatype for t in OnnxScorer(onnx_model, schema).inputs}, ensure_ascii=False)


def version_tags(
    selection: Selection,
    lineage_tags: Mapping[str, str],
    run_id: str,
    schema: DatasetSchema,
    threshold: float,
) -> dict[str, str]:
    """The registered version's tags: lineage, the run and candidate, signature, threshold, headline metrics."""
    best = selection.best
    return (
        dict(lineage_tags)
        | {
            "lineage.mlflow_run_id": run_id,
            "lineage.candidate": best.label,
            "signature.inputs": signature_tag(best.onnx_model, schema),
            "decision_threshold": str(threshold),
        }
        | {f"metric.{k}": f"{best.metrics[k]:.6g}" for k in TAGGED_METRICS}
    )
