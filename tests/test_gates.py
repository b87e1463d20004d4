"""The promotion gate: absolute bounds, regression against the champion, explicit outcomes."""

from __future__ import annotations

import math

from mlops.gates import Outcome, promotion_gate
from mlops.settings import MetricGate

GATES = (
    MetricGate(metric="roc_auc", min_value=0.75, max_regression=0.002),
    MetricGate(metric="log_loss", higher_is_better=False, max_regression=0.01),
)


def test_first_version_passes_on_bounds_alone() -> None:
    """With no champion, a candidate inside the bounds passes."""
    result = promotion_gate(GATES, {"roc_auc": 0.9, "log_loss": 0.05}, None)
    assert result.outcome is Outcome.PASS and result.passed


def test_below_minimum_fails_with_numbers() -> None:
    """A metric under its floor fails, and the reason carries both numbers."""
    result = promotion_gate(GATES, {"roc_auc": 0.70, "log_loss": 0.05}, None)
    assert result.outcome is Outcome.FAIL
    assert "roc_auc 0.7000 < min 0.7500" in result.reason


def test_regression_beyond_margin_fails_in_the_right_direction() -> None:
    """Higher-is-better and lower-is-better metrics both fail when worse than the champion by more than the margin."""
    champion = {"roc_auc": 0.90, "log_loss": 0.050}
    worse_auc = promotion_gate(GATES, {"roc_auc": 0.895, "log_loss": 0.05}, champion)
    assert worse_auc.outcome is Outcome.FAIL and "regression 0.0050, max 0.0020" in worse_auc.reason
    worse_loss = promotion_gate(GATES, {"roc_auc": 0.91, "log_loss": 0.07}, champion)
    assert worse_loss.outcome is Outcome.FAIL and "log_loss" in worse_loss.reason
    better = promotion_gate(GATES, {"roc_auc": 0.899, "log_loss": 0.045}, champion)
    assert better.outcome is Outcome.PASS


def test_missing_or_nan_metric_is_an_error_not_a_pass() -> None:
    """A metric the candidate lacks, or NaN, is ERROR: no data is never a pass."""
    assert promotion_gate(GATES, {"log_loss": 0.05}, None).outcome is Outcome.ERROR
    assert promotion_gate(GATES, {"roc_auc": math.nan, "log_loss": 0.05}, None).outcome is Outcome.ERROR


def test_champion_without_metric_is_inconclusive() -> None:
    """If the champion has no value to compare with, the check is INCONCLUSIVE, not PASS."""
    result = promotion_gate(GATES, {"roc_auc": 0.9, "log_loss": 0.05}, {"log_loss": 0.05})
    assert result.outcome is Outcome.INCONCLUSIVE


def test_an_outcome_formats_as_its_value() -> None:
    """An outcome prints as PASS/FAIL/..., so a reason or report can format it directly."""
    assert [f"{o}" for o in Outcome] == ["PASS", "FAIL", "INCONCLUSIVE", "ERROR"]
    assert str(Outcome.FAIL) == "FAIL" == Outcome.FAIL
