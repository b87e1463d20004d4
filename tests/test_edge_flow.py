"""The edge flows end to end on a real MLflow registry, real files and DuckDB, under Prefect.

Export a champion for a budget, publish the selected variant as a signed release, and roll
releases out to a fleet of simulated devices in gated stages, including deliberately bad
ones that must be stopped at the first cohort.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlops import modeling
from mlops.datagen import generate
from mlops.edge.manifest import verified_manifest
from mlops.onnx_model import OnnxScorer
from mlops.settings import GradientBoostingSpec, Settings, load_settings
from tests.conftest import register_versions

pytestmark = pytest.mark.slow
MODEL = "fraud-detector"

TEST_BUDGET = """
name: test-terminal
device_classes: [pos-terminal]
limits: {max_size_bytes: 6000, max_latency_p99_ms: 50.0, max_metric_drop: 0.03, max_abs_dp: 0.1, max_mean_dp: 0.01}
eval_rows: 2000
calibration_rows: 256
latency_repeats: 30
fallback_rows: 8000
variants:
  - {kind: baseline, name: float}
  - {kind: quantize, name: float-int8, source: float}
  - {kind: distill, name: student, compression: 2.0, max_width: 12, epochs: 40, batch_size: 128, restarts: 1}
  - {kind: quantize, name: student-int8, source: student}
  - {kind: distill, name: wide, hidden: [24, 12], compression: 1.0, epochs: 25, batch_size: 128, restarts: 1}
  - {kind: prune, name: wide-pruned, source: wide, keep_fraction: 0.5, finetune_epochs: 10}
  - {kind: quantize, name: wide-int8-minmax, source: wide, mode: static, calibration: minmax, per_channel: true}
"""


@pytest.fixture(scope="module")
def gbm() -> bytes:
    settings = load_settings(environ={})
    frame = generate(8000, seed=12)
    pipe = modeling.fit(GradientBoostingSpec(n_estimators=20, max_depth=3), frame, settings.dataset, 0)
    return modeling.to_onnx_bytes(pipe, settings.dataset)


def test_export_builds_every_variant_publishes_only_passing_ones_and_reports_each(
    flow_home: Settings, gbm: bytes, tmp_path: Path
) -> None:
    """On a gradient-boosted champion: every variant is built or skipped with a reason, only variants that
    passed their gate are kept as files, the best passing one is selected, and the report (table, chart,
    JSON) lists each with its figures, in the export folder and in MLflow. Publishing signs the selection."""
    from flows.edge import edge_export_flow, edge_publish_flow
    from registry.mlflow_registry import ModelRegistry

    [version] = register_versions(flow_home, gbm, [{"roc_auc": 0.9, "pr_auc": 0.2, "log_loss": 0.05}])
    ModelRegistry(flow_home).move_alias(MODEL, "champion", version, reason="edge test")
    budget = tmp_path / "test-terminal.yaml"
    budget.write_text(TEST_BUDGET)

    summary = edge_export_flow("champion", str(budget))

    rows = {r["variant"]: r for r in summary.variants}
    assert list(rows) == [
        "float",
        "float-int8",
        "student",
        "student-int8",
        "wide",
        "wide-pruned",
        "wide-int8-minmax",
    ]
    assert rows["float-int8"]["outcome"] == "SKIPPED" and "tree ensemble" in rows["float-int8"]["verdict"]
    assert (
        rows["float"]["outcome"] == "FAIL" and "size (B)" in rows["float"]["verdict"]
    )  # the GBM is over 6,000 B
    out = Path(summary.export_dir)
    passing = {name for name, r in rows.items() if r["outcome"] == "PASS"}
    assert passing and summary.selected in passing
    assert {p.stem for p in out.glob("*.onnx")} == passing  # a variant over budget is never published
    assert rows["wide-pruned"]["weight_shapes"][0][1] == rows["wide"]["weight_shapes"][0][1] // 2
    report = (out / "report.md").read_text()
    for name, r in rows.items():
        assert f"`{name}`" in report and r["verdict"] in report
        if r["size_bytes"] is not None:
            assert f"{r['size_bytes']:,}" in report
    assert (out / "variants.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((out / "report.json").read_text())
    assert doc["selected"] == summary.selected and doc["source_version"] == version

    client = MlflowClient(tracking_uri=flow_home.tracking_uri)
    run = client.get_run(summary.run_id)
    assert {a.path for a in client.list_artifacts(summary.run_id, "edge")} >= {
        "edge/report.md",
        "edge/variants.png",
    }
    assert run.data.metrics[f"{summary.selected}.passed"] == 1.0

    published = edge_publish_flow()
    assert published.variant == summary.selected and published.version == 1
    from tasks.edge import key_store, paths

    release = verified_manifest(
        (paths(flow_home).repo / MODEL / "targets.json").read_bytes(), key_store(flow_home).root()
    )
    assert release.target.sha256 == published.sha256 and release.cohort_percent == 0.0
    with pytest.raises(Exception, match="not publishable"):
        edge_publish_flow(variant="float")


def _publish(settings: Settings, model: bytes) -> int:
    from tasks import edge as t

    rows = modeling.features_frame(generate(600, seed=13), settings.dataset)
    return t.publish.fn(
        settings,
        model_name=MODEL,
        variant="lr",
        model=model,
        rows=rows,
        device_classes=("pos-terminal",),
        min_runtime_version="1.20.0",
        source_version=1,
    ).version


def _all_devices_serve(settings: Settings, model: bytes, fleet: str) -> None:
    """Every device serves a working model: finite probabilities equal to ``model``'s on golden rows."""
    import pandas as pd

    from tasks.edge import fleet_for

    rows = modeling.features_frame(generate(30, seed=14), settings.dataset)
    expected = OnnxScorer(model, settings.dataset).predict_proba(rows)
    roster = fleet_for(settings, fleet, pd.DataFrame())
    for device in roster.devices():
        np.testing.assert_allclose(device.predict(rows), expected, atol=1e-6, err_msg=device.device_id)


def test_a_thousand_devices_update_in_stages_and_a_broken_model_is_halted_at_the_first_cohort(
    flow_home: Settings, small_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A good release reaches 1,000 devices through 1% -> 10% -> 50% -> 100%. Then a deliberately broken
    release fails its health check on the 1% cohort: the rollout halts there, the devices that took it have
    already fallen back, a rollback release restores the last good model, and every device ends on it."""
    from flows.edge import edge_rollout_flow

    monkeypatch.setenv("MLOPS__EDGE__FLEET_FSYNC", "false")
    _publish(flow_home, small_model)

    good = edge_rollout_flow(devices=1000, fleet="acceptance")
    assert good.phase == "succeeded"
    assert [h["percent"] for h in good.history] == [1.0, 10.0, 50.0, 100.0]
    assert [h["action"] for h in good.history] == ["advance", "advance", "advance", "promote"]
    assert good.versions == {"v1": 1000} and good.events == {"installed:update": 1000}

    broken = edge_rollout_flow(devices=1000, fleet="acceptance", drill="broken-model")
    assert broken.version == 2 and broken.phase == "rolled_back"
    [stage] = broken.history
    assert (
        stage["percent"] == 1.0 and stage["action"] == "rollback" and "failure rate 100.0%" in stage["reason"]
    )
    failed = broken.events["health_failed:health"]
    assert 0 < failed < 30  # only the 1% cohort ever saw the broken model
    assert broken.rollback_version == 3
    assert broken.versions == {"v3": 1000}
    _all_devices_serve(flow_home, small_model, "acceptance")


def test_a_model_that_shifts_predictions_passes_health_checks_but_is_rolled_back(
    flow_home: Settings, small_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release that answers plausibly but differently (sqrt of the probabilities) passes the golden check,
    fails the prediction-distribution gate on the first cohort, and the devices that installed it are restored."""
    from flows.edge import edge_rollout_flow

    monkeypatch.setenv("MLOPS__EDGE__FLEET_FSYNC", "false")
    monkeypatch.setenv(
        "MLOPS__EDGE__STAGES", "[5.0, 50.0, 100.0]"
    )  # a small fleet needs a wider first cohort
    _publish(flow_home, small_model)
    assert edge_rollout_flow(devices=150, fleet="shift").phase == "succeeded"

    shifted = edge_rollout_flow(devices=150, fleet="shift", drill="shifted-model")
    assert shifted.phase == "rolled_back"
    assert "prediction PSI" in shifted.history[0]["reason"] and shifted.history[0]["percent"] == 5.0
    assert (
        shifted.events.get("installed:update", 0) > 0 and shifted.events.get("restored:previous-bytes", 0) > 0
    )
    assert shifted.versions == {"v3": 150}
    _all_devices_serve(flow_home, small_model, "shift")
