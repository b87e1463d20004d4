"""The training flow on a real Prefect API, real MLflow on SQLite and real Great Expectations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from adapters.datasets import write_parquet
from mlops.datagen import generate
from mlops.errors import ValidationFailed
from mlops.registry_model import CHALLENGER, CHAMPION
from mlops.settings import Settings
from registry.mlflow_registry import ModelRegistry

pytestmark = pytest.mark.integration


def _data(settings: Settings, frame: pd.DataFrame, name: str = "train.parquet") -> str:
    path = settings.data_dir / name
    write_parquet([frame], path)
    return str(path)


def test_first_training_registers_challenger_and_champion_with_lineage(flow_home: Settings) -> None:
    """Given valid data, training registers v1 as challenger and champion, with lineage, metrics,
    plots and an evaluation record signed for its run and model."""
    from flows.train import train_flow

    path = _data(flow_home, generate(8000, seed=11))
    summary = train_flow(path)
    registry = ModelRegistry(flow_home)
    name = flow_home.training.model_name
    assert summary.version == 1 and summary.promoted_to_champion
    assert registry.aliases(name) == {CHALLENGER: 1, CHAMPION: 1}
    v1 = registry.version(name, 1)
    for key in (
        "lineage.data_fingerprint",
        "lineage.config_hash",
        "lineage.code_version",
        "lineage.mlflow_run_id",
        "lineage.flow_run_id",
        "signature.inputs",
    ):
        assert v1.tags.get(key), key
    assert v1.tags["lineage.mlflow_run_id"] == summary.run_id
    assert {"roc_auc", "pr_auc", "log_loss", "ece", "latency_p99_ms", "batch_rows_per_s"} <= set(v1.metrics)
    assert set(summary.candidates) == {"gradient_boosting", "logistic_regression"}
    artifacts = {
        a.path for a in MlflowClient(flow_home.tracking_uri).list_artifacts(summary.run_id, "evaluation")
    }
    assert {
        "evaluation/roc.png",
        "evaluation/precision_recall.png",
        "evaluation/calibration.png",
        f"evaluation/holdout-{v1.tags['lineage.holdout_sha256']}.parquet",
        f"evaluation/train-rows-{v1.tags['lineage.train_rows_sha256']}.u64",
        f"evaluation/record-{v1.tags['lineage.evaluation_record_sha256']}.json",
    } <= artifacts
    # The record is signed with the home's key, created private on first use, for v1's model.
    key = flow_home.evaluation_keys_dir / "signing-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    record = MlflowClient(flow_home.tracking_uri).download_artifacts(
        summary.run_id,
        f"evaluation/record-{v1.tags['lineage.evaluation_record_sha256']}.json",
        str(key.parent.parent),
    )
    signed = json.loads(Path(record).read_text())["signed"]
    assert signed["run_id"] == summary.run_id and signed["model"] == name
    assert signed["model_sha256"] == hashlib.sha256(registry.onnx_bytes(name, 1)).hexdigest()
    assert [m.alias for m in registry.history(name)] == [CHALLENGER, CHAMPION]

    # A second training on the same data is a new challenger; champion stays until promoted.
    second = train_flow(path)
    assert second.version == 2 and not second.promoted_to_champion
    # Its gate scored v2 and champion v1 on v2's stored holdout: the same split, so no v1 training row.
    holdout = registry.version(name, 2).tags["lineage.holdout_sha256"]
    assert f"evaluated on holdout of v2 sha256 {holdout[:12]}, " in second.gate
    assert f"record signed by training key {signed['keyid'][:12]}" in second.gate  # the same home key
    assert "excluded" not in second.gate and "champion v1: roc_auc" in second.gate
    assert registry.aliases(name) == {CHALLENGER: 2, CHAMPION: 1}
    assert registry.version(name, 2).tags["lineage.data_fingerprint"] == v1.tags["lineage.data_fingerprint"]


def _missing_column(f: pd.DataFrame) -> pd.DataFrame:
    return f.drop(columns=["merchant_risk_score"])


def _wrong_dtype(f: pd.DataFrame) -> pd.DataFrame:
    return f.assign(amount=f["amount"].astype(str))


def _out_of_range(f: pd.DataFrame) -> pd.DataFrame:
    return f.assign(utilization=np.where(np.arange(len(f)) % 10 == 0, 7.5, f["utilization"]))


def test_invalid_data_stops_before_anything_is_registered(flow_home: Settings) -> None:
    """Given a dataset with a missing column, a column of the wrong type and out-of-range values,
    the flow fails listing each failed expectation and registers nothing."""
    from flows.train import train_flow

    corrupt = _out_of_range(_wrong_dtype(_missing_column(generate(3000, seed=12))))
    path = _data(flow_home, corrupt, "bad.parquet")
    with pytest.raises(ValidationFailed) as info:
        train_flow(path)
    for expected in (
        "column 'merchant_risk_score' is missing",
        "column 'amount': expected a numeric type",
        "column 'utilization': values must be between 0.0 and 2.0",
    ):
        assert any(expected in line for line in info.value.failures), (expected, info.value.failures)
    assert not ModelRegistry(flow_home).exists(flow_home.training.model_name)


def test_bring_your_own_dataset_trains_without_code_changes(flow_home: Settings, tmp_path: Path) -> None:
    """A different CSV table, declared only in config, validates, trains and registers."""
    from flows.train import train_flow

    rng = np.random.default_rng(0)
    n = 4000
    tenure = rng.uniform(0, 72, n)
    charges = rng.uniform(20, 120, n)
    plan = rng.choice(["monthly", "yearly", "two_year"], n)
    logit = -1.0 - 0.05 * tenure + 0.02 * charges + 1.5 * (plan == "monthly")
    churned = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    csv = tmp_path / "churn.csv"
    pd.DataFrame(
        {
            "customer": [f"c{i}" for i in range(n)],
            "account": [f"a{i % 500}" for i in range(n)],
            "tenure_months": tenure,
            "monthly_charges": charges,
            "plan": plan,
            "churned": churned,
        }
    ).to_csv(csv, index=False)
    config = tmp_path / "churn.yaml"
    config.write_text(
        """
dataset:
  name: churn
  id_column: customer
  entity_column: account
  timestamp_column: null
  label_column: churned
  numeric:
    - {name: tenure_months, min: 0, max: 100}
    - {name: monthly_charges, min: 0, max: 500}
  categorical:
    - {name: plan, categories: [monthly, yearly, two_year]}
training:
  model_name: churn-model
  experiment: churn
  candidates:
    - {kind: logistic_regression}
    - {kind: random_forest, n_estimators: 20}
promotion:
  gates:
    - {metric: roc_auc, min_value: 0.6}
"""
    )
    summary = train_flow(str(csv), str(config))
    assert summary.model_name == "churn-model" and summary.version == 1 and summary.metrics["roc_auc"] > 0.6
    assert ModelRegistry(flow_home).aliases("churn-model") == {CHALLENGER: 1, CHAMPION: 1}


FEATURES_YAML = str(Path(__file__).resolve().parent.parent / "configs" / "features.yaml")


@pytest.mark.slow
def test_training_with_declared_windows_feeds_them_to_the_model_and_records_the_view(
    flow_home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given `features.windows`, the model's ONNX inputs are the dataset's plus the window
    features, computed point-in-time from the dataset's own events; the version's lineage
    records the feature view (digest and windows). A training set that carries leaky window
    columns fails the point-in-time check in one line and registers nothing."""
    import json

    import onnx

    from flows.train import train_flow
    from mlops.features import FeatureSet, LeakDetected, compute_offline, model_view
    from mlops.settings import load_settings

    monkeypatch.setenv("MLOPS_CONFIG", FEATURES_YAML)
    monkeypatch.setenv("MLOPS__TRAINING__CANDIDATES", '[{"kind": "logistic_regression"}]')
    fs = FeatureSet.from_settings(load_settings())
    frame = generate(4000, seed=21)
    leaky = frame.copy()
    later = frame.assign(event_time=frame["event_time"] + pd.Timedelta(nanoseconds=1))
    feats = compute_offline(fs, frame, later)  # each row sees its own event: a leak
    for name in fs.names:
        leaky[name] = feats.column(name).to_numpy()
    with pytest.raises(LeakDetected) as info:
        train_flow(_data(flow_home, leaky, "leaky.parquet"))
    assert "\n" not in str(info.value) and "user_txn_count_1h: 4000 of 4000 rows" in str(info.value)
    registry = ModelRegistry(flow_home)
    assert not registry.exists(flow_home.training.model_name)

    summary = train_flow(_data(flow_home, frame))
    name = flow_home.training.model_name
    tags = registry.version(name, summary.version).tags
    assert tags["lineage.feature_view"] == fs.digest()
    assert [w["name"] for w in json.loads(tags["lineage.feature_windows"])] == list(fs.names)
    view = model_view(tags)
    assert view is not None and view.digest == fs.digest() and view.names == fs.names
    graph = onnx.load_from_string(registry.onnx_bytes(name, summary.version)).graph
    inputs = {i.name for i in graph.input}
    assert inputs == set(flow_home.dataset.input_names.values()) | set(fs.names)
    assert set(fs.names) <= set(json.loads(tags["signature.inputs"]))
    run = MlflowClient(flow_home.tracking_uri).get_run(summary.run_id)
    assert run.data.params["feature_view"] == fs.digest()
    assert run.data.tags["lineage.feature_view"] == fs.digest()
