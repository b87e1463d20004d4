"""Degraded models (mlops.rollout.degrade) and the live-traffic driver's guard rails."""

from __future__ import annotations

import numpy as np
import pytest

from mlops.datagen import generate
from mlops.onnx_model import OnnxScorer
from mlops.rollout.degrade import _time_ms, degrade
from mlops.rollout.observe import auc
from mlops.rollout.simulator import Pathology, SimulatorConfig
from mlops.settings import load_settings

SCHEMA = load_settings(environ={}).dataset


@pytest.fixture(scope="module")
def rows():
    frame = generate(20_000, seed=8)
    return frame, frame[SCHEMA.label_column].to_numpy()


def test_a_neutral_pathology_leaves_every_score_unchanged(small_model: bytes, rows) -> None:
    """The rewritten graph with no pathology scores exactly like the original model."""
    frame, _ = rows
    before = OnnxScorer(small_model, SCHEMA).predict_proba(frame)
    after = OnnxScorer(degrade(small_model, SCHEMA, Pathology()), SCHEMA).predict_proba(frame)
    assert np.allclose(before, after, atol=1e-5)


def test_erroring_and_less_accurate_models_are_so_deterministically(small_model: bytes, rows) -> None:
    """error_share 5 %: about 5 % of inputs get a non-finite score, the same ones every time,
    and the warm-up row of zeros is not among them; extra noise lowers the AUC clearly."""
    frame, y = rows
    erroring = OnnxScorer(degrade(small_model, SCHEMA, Pathology(error_share=0.05)), SCHEMA)
    a, b = erroring.predict_proba(frame), erroring.predict_proba(frame)
    failed = ~np.isfinite(a)
    assert 0.04 < failed.mean() < 0.06 and np.array_equal(failed, ~np.isfinite(b))
    zeros = frame.head(1).copy()
    zeros[list(SCHEMA.numeric_names)] = 0.0
    assert np.isfinite(erroring.predict_proba(zeros)).all()
    clean = auc(y, OnnxScorer(small_model, SCHEMA).predict_proba(frame))
    noisy = auc(
        y, OnnxScorer(degrade(small_model, SCHEMA, Pathology(extra_noise=4.0)), SCHEMA).predict_proba(frame)
    )
    assert noisy < clean - 0.1


def test_a_slower_model_spends_about_the_extra_milliseconds(small_model: bytes) -> None:
    """extra_latency_ms is calibrated on this machine: a call takes clearly longer (a loaded
    machine makes the calibration rough, so only a quarter of it is asserted)."""
    base = _time_ms(small_model, SCHEMA)
    slow = _time_ms(degrade(small_model, SCHEMA, Pathology(extra_latency_ms=40)), SCHEMA)
    assert slow - base > 10
    with pytest.raises(ValueError, match="extra_latency_ms"):
        degrade(small_model, SCHEMA, Pathology(latency_factor=3.0))


def test_live_traffic_only_drives_loopback_services() -> None:
    """The simulator refuses any address but loopback."""
    from adapters.traffic import LiveTraffic, TrafficRefused

    with pytest.raises(TrafficRefused):
        LiveTraffic("http://10.1.2.3:3000", SimulatorConfig(), feedback_token="not-used-0123456789")
