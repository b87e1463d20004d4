"""Synthetic data and lineage fingerprints: deterministic, sensitive to every change."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from adapters.runtime import code_version
from mlops import modeling
from mlops.datagen import BLOCK_ROWS, fraud_schema, generate, generate_blocks
from mlops.errors import ParityFailed
from mlops.lineage import config_hash, data_fingerprint


def test_same_seed_same_data_other_seed_other_data() -> None:
    """Generation is deterministic per seed and differs across seeds."""
    a, b, c = generate(2000, seed=5), generate(2000, seed=5), generate(2000, seed=6)
    pd.testing.assert_frame_equal(a, b)
    assert not a["amount"].equals(c["amount"])


def test_data_matches_its_schema_and_is_imbalanced() -> None:
    """Every declared column is present, in range and in its category set; fraud is rare but present."""
    schema = fraud_schema()
    frame = generate(20_000, seed=1)
    for f in schema.numeric:
        assert frame[f.name].between(f.min, f.max).all(), f.name
    for f in schema.categorical:
        assert set(frame[f.name]) <= set(f.categories), f.name
    assert 0.003 < frame[schema.label_column].mean() < 0.05
    assert frame[schema.id_column].is_unique


def test_drift_moves_features_and_label_relationship() -> None:
    """Drift raises amounts and card-not-present share, and changes the fraud rate."""
    ref, drifted = generate(20_000, seed=1), generate(20_000, seed=1, drift=1.0)
    assert drifted["amount"].median() > 1.3 * ref["amount"].median()
    assert (drifted["entry_mode"] == "card_not_present").mean() > (
        ref["entry_mode"] == "card_not_present"
    ).mean() + 0.1
    assert drifted["is_fraud"].mean() > 2 * ref["is_fraud"].mean()
    with pytest.raises(ValueError, match="drift"):
        generate(10, drift=1.5)


def test_blocks_are_bounded_and_ids_unique_across_blocks() -> None:
    """Large datasets come in blocks of at most BLOCK_ROWS rows with globally unique ids."""
    sizes = [len(b) for b in generate_blocks(BLOCK_ROWS + 10, seed=2)]
    assert sizes == [BLOCK_ROWS, 10]


def test_fingerprint_ignores_blocking_but_not_content() -> None:
    """The data fingerprint is the same however the rows are split, and changes with any value or column."""
    frame = generate(3000, seed=1)
    cols = list(fraud_schema().feature_names)
    whole = data_fingerprint([frame], cols)
    assert data_fingerprint([frame.iloc[:1000], frame.iloc[1000:]], cols) == whole
    changed = frame.copy()
    changed.loc[17, "amount"] += 0.01
    assert data_fingerprint([changed], cols) != whole
    assert data_fingerprint([frame], cols[:-1]) != whole
    assert data_fingerprint([frame.iloc[::-1]], cols) != whole


def test_config_hash_is_order_independent() -> None:
    """Equal configs hash equally regardless of key order; any value change changes it."""
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert code_version().startswith(("git:", "pkg:"))


def test_parity_failure_refuses_registration() -> None:
    """A parity result over tolerance raises ParityFailed with both numbers; within tolerance passes."""
    modeling.require_parity(modeling.Parity(100, 1e-6, 1e-7, 1e-4), "ok")
    with pytest.raises(ParityFailed, match=r"max \|dp\| 2\.00e-03 > tolerance 1\.00e-04\); not registered"):
        modeling.require_parity(modeling.Parity(100, 2e-3, 1e-4, 1e-4), "gbm")


def test_onnx_export_matches_sklearn_for_each_candidate_kind() -> None:
    """Every configurable candidate kind converts to ONNX and reproduces scikit-learn's probabilities."""
    from mlops.onnx_model import OnnxScorer
    from mlops.settings import GradientBoostingSpec, LogisticRegressionSpec, RandomForestSpec

    schema = fraud_schema()
    frame = generate(4000, seed=4)
    for spec in (
        GradientBoostingSpec(n_estimators=10),
        LogisticRegressionSpec(),
        RandomForestSpec(n_estimators=10),
    ):
        pipe = modeling.fit(spec, frame, schema, 0)
        scorer = OnnxScorer(modeling.to_onnx_bytes(pipe, schema), schema)
        result = modeling.parity(pipe, scorer, frame.head(500), 1e-4)
        assert result.ok, (spec.kind, result)
        assert [t.name for t in scorer.inputs] == list(schema.feature_names)
        assert np.all(
            (scorer.predict_proba(frame.head(10)) >= 0) & (scorer.predict_proba(frame.head(10)) <= 1)
        )
