"""Versions as the training flow registers them, on data a test chooses: a real ONNX model,
its holdout and training-row hashes as artifacts, and metrics honestly computed on its own holdout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlops import evaluation, modeling
from mlops.datagen import generate
from mlops.onnx_model import OnnxScorer
from mlops.settings import DatasetSchema, LogisticRegressionSpec, Settings


@dataclass(frozen=True)
class World:
    """A good model, a noisier copy of it, the rows they trained on and three holdouts."""

    good: bytes
    noisy: bytes
    train: pd.DataFrame
    normal: pd.DataFrame  # held-out rows as they come
    easy: pd.DataFrame  # the same rows without the ones the good model finds hard
    spare: pd.DataFrame  # more unseen rows


def world(schema: DatasetSchema) -> World:
    """Models and row sets for gate tests (a few seconds)."""
    from mlops.rollout.degrade import degrade
    from mlops.rollout.simulator import Pathology

    data = generate(9000, seed=3)
    train, normal, spare = data.iloc[:4000], data.iloc[4000:6000], data.iloc[6000:]
    good = modeling.to_onnx_bytes(
        modeling.fit(LogisticRegressionSpec(max_iter=200), train, schema, 0), schema
    )
    noisy = degrade(good, schema, Pathology(extra_noise=1.5))
    p, y = OnnxScorer(good, schema).predict_proba(normal), modeling.labels(normal, schema)
    easy = normal[
        ((y == 1) & (p > np.quantile(p[y == 1], 0.3))) | ((y == 0) & (p < np.quantile(p[y == 0], 0.9)))
    ]
    return World(good, noisy, train, normal.reset_index(drop=True), easy.reset_index(drop=True), spare)


def register_trained(
    settings: Settings,
    onnx_model: bytes,
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    name: str | None = None,
) -> tuple[int, str]:
    """Register ``onnx_model`` as the training flow does: metrics on ``holdout`` logged, holdout
    and training-row hashes stored and named by the version's tags, an evaluation record signed
    with the home's key. Returns (version, run id)."""
    from bench.support import log_onnx_model
    from registry.mlflow_registry import ModelRegistry
    from registry.tracking import log_evaluation_record

    schema = settings.dataset
    name = name or settings.training.model_name
    files, tags = evaluation.evidence(train, holdout, schema)
    metrics = evaluation.metrics_on(
        OnnxScorer(onnx_model, schema), holdout, schema, settings.training.decision_threshold
    )
    logged = log_onnx_model(settings, onnx_model, "gate-fixture", files=files, metrics=metrics)
    tags |= log_evaluation_record(settings, name, logged, tags)
    version = ModelRegistry(settings).register(name, logged.model_uri, logged.run_id, tags, "gate fixture")
    return version.version, logged.run_id
