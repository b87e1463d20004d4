"""Agreement statistics: array functions and the mergeable summary behind the replay report."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest

from mlops.stats import (
    agreement_report,
    agreement_stats,
    decision_agreement,
    ks_statistic,
    merge_all,
    pearson,
    psi,
    psi_counts,
)


@pytest.fixture(scope="module")
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.beta(1, 20, 20_000)
    b = np.clip(a + rng.normal(0, 0.01, a.size), 0, 1)
    return a, b


def test_psi_of_a_histogram_matches_the_formula() -> None:
    """PSI is sum((q - p) ln(q / p)) over bucket shares: 0 when equal, known value otherwise."""
    assert psi_counts([10, 20, 70], [1, 2, 7]) == pytest.approx(0.0)
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    assert psi_counts([50, 50], [25, 75]) == pytest.approx(float(np.sum((q - p) * np.log(q / p))))


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    """Two samples of one distribution: PSI < 0.01; a shifted sample: PSI > 0.25 (a major shift)."""
    rng = np.random.default_rng(1)
    ref = rng.normal(0, 1, 50_000)
    assert psi(ref, rng.normal(0, 1, 50_000)) < 0.01
    assert psi(ref, rng.normal(1, 1, 50_000)) > 0.25


def test_empty_bucket_is_finite_and_empty_input_refused() -> None:
    """A bucket empty on one side costs a large finite amount; no observations is an error."""
    assert math.isfinite(psi_counts([10, 0], [0, 10]))
    with pytest.raises(ValueError):
        psi_counts([0, 0], [1, 1])
    with pytest.raises(ValueError):
        psi([1.0, 2.0], [])


def test_ks_correlation_and_agreement_on_known_inputs() -> None:
    """KS of disjoint samples is 1, of one sample with itself 0; correlation and agreement by hand."""
    assert ks_statistic([0, 1, 2], [5, 6]) == 1.0
    assert ks_statistic([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == 0.0
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert decision_agreement([True, False, True, True], [True, True, True, False]) == 0.5


def test_merged_partition_summaries_equal_the_whole_data(scores: tuple[np.ndarray, np.ndarray]) -> None:
    """Summaries of chunks, merged in any order, give the report computed on all rows at once."""
    a, b = scores
    seg = np.where(np.arange(a.size) % 3 == 0, "x", "y")
    whole = agreement_report(agreement_stats(a, b, 0.1, 0.1, {"s": seg}))
    cuts = [0, 1, 5000, 5001, 12_000, a.size]
    chunks = [agreement_stats(a[i:j], b[i:j], 0.1, 0.1, {"s": seg[i:j]}) for i, j in pairwise(cuts)]
    merged = agreement_report(merge_all(chunks[::-1]))
    assert merged.rows == whole.rows == a.size
    assert merged.correlation == pytest.approx(pearson(a, b), rel=1e-9)
    assert merged.correlation == pytest.approx(whole.correlation, rel=1e-9)
    assert merged.decision_agreement == decision_agreement(a >= 0.1, b >= 0.1)
    assert merged.psi == pytest.approx(whole.psi) and merged.ks == pytest.approx(whole.ks)
    assert [(s.column, s.value, s.rows) for s in merged.segments] == [
        (s.column, s.value, s.rows) for s in whole.segments
    ]
    assert sum(s.rows for s in merged.segments) == a.size


def test_histogram_psi_and_ks_track_the_exact_ones(scores: tuple[np.ndarray, np.ndarray]) -> None:
    """PSI over fine-histogram deciles and KS at fine-bin edges agree with the exact array versions."""
    a, b = scores
    rng = np.random.default_rng(2)
    shifted = np.clip(a * 1.5 + rng.normal(0, 0.01, a.size), 0, 1)
    for other in (b, shifted):
        report = agreement_report(agreement_stats(a, other, 0.1, 0.1))
        assert report.psi == pytest.approx(psi(a, other), abs=0.02)
        assert report.ks == pytest.approx(ks_statistic(a, other), abs=0.01)


def test_segments_report_the_largest_differences_first() -> None:
    """A segment where the models disagree comes first, with its rates and mean difference."""
    a = np.array([0.1, 0.1, 0.5, 0.5])
    b = np.array([0.1, 0.1, 0.9, 0.2])
    report = agreement_report(agreement_stats(a, b, 0.3, 0.3, {"channel": ["pos", "pos", "web", "web"]}))
    top = report.segments[0]
    assert (top.column, top.value, top.rows) == ("channel", "web", 2)
    assert top.mean_diff == pytest.approx(0.05)
    assert top.decision_rate_a == 1.0 and top.decision_rate_b == 0.5 and top.agreement == 0.5
    assert report.decision_agreement == 0.75
    assert report.decision_rate_a == 0.5 and report.decision_rate_b == 0.25


def test_training_and_rollouts_measure_calibration_with_one_definition() -> None:
    """Training metrics and rollout observations compute expected calibration error with the
    same function, so a model's ECE at registration and during its rollout are comparable;
    tied scores are binned in input order."""
    from mlops import modeling, stats
    from mlops.rollout.observe import calibration_error as observed

    assert modeling.calibration_error is stats.calibration_error is observed
    y = np.array([1.0, 0.0, 0.0, 0.0])
    p = np.full(4, 0.5)
    assert stats.calibration_error(y, p, bins=2) == pytest.approx(0.25)
    assert math.isnan(stats.calibration_error(np.array([]), np.array([])))
    metrics = modeling.classification_metrics(y.astype(int), p, 0.5)
    assert metrics["ece"] == pytest.approx(0.5)  # ten bins of at most one row each
