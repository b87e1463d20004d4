"""Building edge variants for real: ONNX Runtime graph optimisation and INT8 quantization, numpy
distillation and structured pruning, skl2onnx export, all measured and gated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from mlops import modeling
from mlops.datagen import generate
from mlops.edge import graph
from mlops.edge.budget import BaselineSpec, DistillSpec, EdgeBudget, EdgeLimits, PruneSpec, QuantizeSpec
from mlops.edge.compress import CALIBRATORS, VariantBuilder, calibrate, calibration_feeds, prepare_data
from mlops.onnx_model import OnnxScorer
from mlops.settings import GradientBoostingSpec, LogisticRegressionSpec, load_settings

SETTINGS = load_settings(environ={})
SCHEMA = SETTINGS.dataset

BUDGET = EdgeBudget(
    limits=EdgeLimits(
        max_size_bytes=64_000, max_latency_p99_ms=50.0, max_metric_drop=0.05, max_abs_dp=0.2, max_mean_dp=0.01
    ),
    eval_rows=2000,
    calibration_rows=256,
    latency_repeats=20,
    variants=(
        BaselineSpec(name="float"),
        QuantizeSpec(name="float-int8", source="float"),
        DistillSpec(name="student", epochs=4, restarts=1, compression=2.5, max_width=16),
        DistillSpec(name="wide", hidden=(24, 12), epochs=4, restarts=1, compression=1.0),
        PruneSpec(name="wide-pruned", source="wide", keep_fraction=0.5, finetune_epochs=2),
        QuantizeSpec(name="wide-int8", source="wide"),
        QuantizeSpec(
            name="wide-int8-entropy", source="wide", mode="static", calibration="entropy", per_channel=True
        ),
    ),
)


@pytest.fixture(scope="module")
def frames():
    frame = generate(6000, seed=5)
    return modeling.split(frame, SCHEMA, SETTINGS.training)


@pytest.fixture(scope="module")
def gbm(frames) -> bytes:
    pipe = modeling.fit(GradientBoostingSpec(n_estimators=20, max_depth=3), frames[0], SCHEMA, 0)
    return modeling.to_onnx_bytes(pipe, SCHEMA)


@pytest.fixture(scope="module")
def built(gbm: bytes, frames):
    builder = VariantBuilder(gbm, prepare_data(frames[0], frames[1], SCHEMA, BUDGET), SCHEMA, BUDGET)
    return builder, {spec.name: builder.build(spec) for spec in BUDGET.variants}


def test_baseline_is_optimised_checked_and_identical_in_function(built) -> None:
    """The float baseline passes the ONNX checker, keeps the feature contract and moves no probability."""
    builder, results = built
    r = results["float"]
    assert r.status == "built" and r.family == "tree"
    assert r.measurement.max_abs_dp < 1e-6 and r.measurement.drop == pytest.approx(0.0, abs=1e-9)
    graph.check(builder.model("float"))
    scorer = OnnxScorer(builder.model("float"), SCHEMA)
    assert [s.name for s in scorer.inputs] == list(SCHEMA.feature_names)


def test_quantizing_a_tree_model_is_skipped_with_the_reason_for_trees(built) -> None:
    _, results = built
    r = results["float-int8"]
    assert r.outcome == "SKIPPED" and "tree ensemble" in r.reason and r.measurement is None


def test_quantizing_a_linear_model_is_skipped_with_the_reason_for_linear_models(frames) -> None:
    lr = modeling.to_onnx_bytes(
        modeling.fit(LogisticRegressionSpec(max_iter=200), frames[0], SCHEMA, 0), SCHEMA
    )
    budget = BUDGET.model_copy(update={"variants": BUDGET.variants[:2]})
    builder = VariantBuilder(lr, prepare_data(frames[0], frames[1], SCHEMA, budget), SCHEMA, budget)
    builder.build(budget.variants[0])
    r = builder.build(budget.variants[1])
    assert r.outcome == "SKIPPED" and "LinearClassifier" in r.reason


def test_distilled_student_is_sized_for_the_budget_and_keeps_the_contract(built, gbm: bytes) -> None:
    """The student is the widest layer that fits teacher/compression, passes parity with scikit-learn,
    and is scored through the same one-input-per-feature contract."""
    builder, results = built
    r = results["student"]
    assert r.status == "built", r.reason
    assert r.measurement.size_bytes <= len(gbm) / 2.5
    assert r.measurement.parity_max_abs_diff < 1e-4
    assert "widest layer" in r.notes[0]
    scorer = OnnxScorer(builder.model("student"), SCHEMA)
    assert [(s.name, s.datatype) for s in scorer.inputs] == [
        (s.name, s.datatype) for s in OnnxScorer(gbm, SCHEMA).inputs
    ]
    assert scorer.predict_proba(builder.data.eval).shape == (len(builder.data.eval),)


def test_structured_pruning_shrinks_the_onnx_weight_matrices(built) -> None:
    """Pruning removes units from the exported graph itself: smaller weight shapes, fewer parameters, smaller file."""
    builder, results = built
    wide, pruned = results["wide"].measurement, results["wide-pruned"].measurement
    n_in = wide.weight_shapes[0][0]
    assert wide.weight_shapes == ((n_in, 24), (24, 12), (12, 1))
    assert pruned.weight_shapes == ((n_in, 12), (12, 6), (6, 1))
    assert graph.parameter_count(builder.model("wide-pruned")) < graph.parameter_count(builder.model("wide"))
    assert pruned.size_bytes < wide.size_bytes


def test_dynamic_int8_stores_int8_weights_and_is_smaller(built) -> None:
    builder, results = built
    q = onnx.load_from_string(builder.model("wide-int8"))
    int8 = [
        i for i in q.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2
    ]  # weights, not zero points
    assert len(int8) == 3
    assert results["wide-int8"].measurement.size_bytes < results["wide"].measurement.size_bytes
    assert {"max_abs_dp", "mean_abs_dp"} <= {c.metric for c in results["wide-int8"].gate.checks}


def test_static_entropy_calibration_clips_ranges_minmax_does_not(built, tmp_path: Path) -> None:
    """Entropy calibration searches for a clipping threshold (ONNX Runtime's default leaves it equal to MinMax)."""
    builder, results = built
    source = builder.built["wide"].quant_source or builder.model("wide")
    feeds = calibration_feeds(source, builder.calibration_rows(), SCHEMA, 64)
    ranges = {}
    for method in ("minmax", "entropy"):
        calibrate(source, method, feeds, tmp_path / f"{method}.json")
        ranges[method] = json.loads((tmp_path / f"{method}.json").read_text())
    assert ranges["minmax"] != ranges["entropy"]
    assert CALIBRATORS["entropy"][1]["num_bins"] > CALIBRATORS["entropy"][1]["num_quantized_bins"]
    assert (
        results["wide-int8-entropy"].status == "built"
        and "entropy calibration" in results["wide-int8-entropy"].technique
    )


def test_calibration_rows_include_the_teachers_riskiest_rows(built) -> None:
    builder, _ = built
    rows = builder.calibration_rows()
    top = np.argsort(-builder.teacher_train_p)[: int(round(len(rows) * BUDGET.calibration_tail_fraction))]
    assert set(builder.data.train.index[top]) <= set(rows.index)


def test_a_sensitive_layer_is_kept_in_float_when_drift_is_over_budget(built, gbm: bytes, frames) -> None:
    """With a drift budget nothing can meet, the search keeps the most sensitive dense layer in float and says so."""
    builder, _ = built
    strict = BUDGET.model_copy(
        update={"limits": BUDGET.limits.model_copy(update={"max_abs_dp": 1e-9, "max_mean_dp": 1e-9})}
    )
    b = VariantBuilder(gbm, builder.data, SCHEMA, strict)
    b.built["wide"] = builder.built["wide"]
    r = b.build(QuantizeSpec(name="q", source="wide", mode="dynamic", auto_exclude=1))
    assert r.status == "built" and "kept in float: dense" in r.technique
    assert "kept in float" in r.notes[0] and "2 of 3 dense layers in INT8" in r.notes[-1]
    assert r.outcome == "FAIL" and "max |dp|" in r.verdict


def test_a_variant_over_the_metric_drop_budget_fails_its_gate(built, gbm: bytes) -> None:
    """A one-unit student trained for one epoch loses too much AUC: FAIL, with the drop and the budget in the reason."""
    builder, _ = built
    tight = BUDGET.model_copy(update={"limits": BUDGET.limits.model_copy(update={"max_metric_drop": 0.0})})
    b = VariantBuilder(gbm, builder.data, SCHEMA, tight)
    r = b.build(DistillSpec(name="weak", hidden=(1,), epochs=1, restarts=1, learning_rate=1e-4))
    assert r.outcome == "FAIL" and "roc_auc drop" in r.verdict and "> max 0.0000" in r.verdict
    assert not r.passed


def test_unknown_excluded_node_is_an_error_naming_the_layers(built, gbm: bytes) -> None:
    builder, _ = built
    r = builder.build(QuantizeSpec(name="bad", source="wide", exclude_nodes=("dense9",)))
    assert r.outcome == "ERROR" and "dense9" in r.reason and "dense0" in r.reason
