"""Pure edge logic: the variant gate and selection, cohorts, telemetry gate maths, the OTA state machine,
and the distillation/pruning maths, tested directly (no Prefect, no files)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mlops.edge import neural
from mlops.edge.budget import EdgeLimits
from mlops.edge.cohorts import bucket, cohort, in_cohort
from mlops.edge.errors import RolloutConflict
from mlops.edge.ota import OtaEffect, RolloutStatus, decide, start
from mlops.edge.telemetry import (
    StageObservation,
    assess_stage,
    histogram,
    observe,
    psi,
    reference_distribution,
)
from mlops.edge.variants import Measurement, VariantResult, gate_variant, select_variant, skip_reason
from mlops.gates import CheckResult, GateResult, Outcome
from mlops.rollout.vocabulary import Action, Counters, Phase
from mlops.settings import EdgeConfig, OtaGates

LIMITS = EdgeLimits(
    max_size_bytes=10_000, max_latency_p99_ms=5.0, max_metric_drop=0.005, max_abs_dp=0.05, max_mean_dp=0.002
)


def measurement(**over: float) -> Measurement:
    base = dict(
        rows=1000,
        size_bytes=5000,
        latency_p50_ms=0.1,
        latency_p99_ms=0.3,
        batch_rows_per_s=1e5,
        metric="roc_auc",
        value=0.90,
        teacher_value=0.901,
        max_abs_dp=0.01,
        mean_abs_dp=0.0005,
        max_abs_dp_teacher=0.02,
        mean_abs_dp_teacher=0.001,
    )
    return Measurement(**(base | over))  # type: ignore[arg-type]


def result(name: str, gate: GateResult | None, m: Measurement | None, status: str = "built") -> VariantResult:
    return VariantResult(name, "quantize", "t", "s", "neural", True, status, measurement=m, gate=gate)


# --------------------------------------------------------------------------- variant gate


def test_variant_within_budget_passes_with_numbers_in_every_reason() -> None:
    """A variant inside every limit passes, and each check says its value against its limit."""
    gate = gate_variant(measurement(), LIMITS, preserves_function=True)
    assert gate.outcome is Outcome.PASS
    assert "roc_auc drop 0.0010 <= max 0.0050" in gate.reason
    assert {c.metric for c in gate.checks} == {
        "size_bytes",
        "latency_p99_ms",
        "metric_drop",
        "max_abs_dp",
        "mean_abs_dp",
    }


def test_variant_over_the_metric_drop_budget_fails_and_says_why() -> None:
    """A variant that loses more than max_metric_drop is a FAIL whose reason carries both numbers."""
    gate = gate_variant(measurement(value=0.89), LIMITS, preserves_function=False)
    assert gate.outcome is Outcome.FAIL
    assert gate.reason == "roc_auc drop 0.0110 > max 0.0050"


def test_probability_drift_is_gated_only_for_function_preserving_techniques() -> None:
    """One probability moving by 0.26 fails a quantized variant even when its AUC is fine;
    a retrained (distilled) variant is judged on the metric drop instead."""
    m = measurement(max_abs_dp=0.26)
    assert gate_variant(m, LIMITS, preserves_function=True).reason == "max |dp| 0.2600 > max 0.0500"
    assert gate_variant(m, LIMITS, preserves_function=False).passed


def test_non_finite_measurement_is_an_error_not_a_pass() -> None:
    gate = gate_variant(measurement(value=math.nan), LIMITS, preserves_function=False)
    assert gate.outcome is Outcome.ERROR


def test_best_passing_variant_is_selected_by_the_budget_criterion() -> None:
    """Among passing variants: smallest by size, fastest by latency, most accurate by metric; failures never."""
    ok = GateResult((CheckResult("x", Outcome.PASS, "ok"),))
    bad = GateResult((CheckResult("x", Outcome.FAIL, "no"),))
    small = result("small", ok, measurement(size_bytes=3000, latency_p50_ms=0.3, value=0.899))
    fast = result("fast", ok, measurement(size_bytes=6000, latency_p50_ms=0.05, value=0.898))
    exact = result("exact", ok, measurement(size_bytes=8000, latency_p50_ms=0.2, value=0.901))
    tiny_but_failed = result("tiny", bad, measurement(size_bytes=100))
    skipped = result("skip", None, None, status="skipped")
    pool = [tiny_but_failed, small, fast, exact, skipped]
    assert select_variant(pool, "size").name == "small"  # type: ignore[union-attr]
    assert select_variant(pool, "latency").name == "fast"  # type: ignore[union-attr]
    assert select_variant(pool, "metric").name == "exact"  # type: ignore[union-attr]
    assert select_variant([tiny_but_failed, skipped], "size") is None


@pytest.mark.parametrize(
    ("technique", "family", "trainable", "expect"),
    [
        ("quantize", "tree", False, "no weight matrices"),
        ("quantize", "linear", False, "raised an error on logistic regression"),
        ("quantize", "neural", False, None),
        ("prune", "tree", False, "trees have none"),
        ("prune", "neural", False, "imported ONNX network"),
        ("prune", "neural", True, None),
    ],
)
def test_each_model_type_says_why_a_technique_is_skipped(
    technique: str, family: str, trainable: bool, expect: str | None
) -> None:
    reason = skip_reason(technique, family, trainable)
    assert reason is None if expect is None else expect in reason


# --------------------------------------------------------------------------- cohorts


def test_cohorts_are_stable_nested_and_sized_by_percentage() -> None:
    """A device's bucket never changes for a release; 1% is inside 10%; about percent% of devices are in."""
    ids = [f"dev-{i:05d}" for i in range(20_000)]
    assert bucket("dev-00001", "salt") == bucket("dev-00001", "salt")
    one, ten = set(cohort(ids, "m:2", 1.0)), set(cohort(ids, "m:2", 10.0))
    assert one <= ten
    assert abs(len(one) / len(ids) - 0.01) < 0.003 and abs(len(ten) / len(ids) - 0.10) < 0.01
    assert set(cohort(ids, "m:3", 1.0)) != one  # a new release picks a different first 1%
    assert not in_cohort("dev-00001", "m:2", 0.0) and in_cohort("dev-00001", "m:2", 100.0)


# --------------------------------------------------------------------------- telemetry maths


def test_reference_bins_are_quantiles_and_psi_is_zero_for_the_same_distribution() -> None:
    rng = np.random.default_rng(0)
    p = rng.beta(0.5, 30, 20_000)
    edges, fractions = reference_distribution(p, 10)
    assert edges[0] == 0.0 and edges[-1] == 1.0 and len(fractions) == len(edges) - 1
    assert abs(sum(fractions) - 1) < 1e-9 and max(fractions) < 0.12
    same = histogram(rng.beta(0.5, 30, 5000), edges)
    shifted = histogram(np.sqrt(rng.beta(0.5, 30, 5000)), edges)
    assert psi(fractions, same) < 0.02
    assert psi(fractions, shifted) > 1.0


GATES = OtaGates(
    min_reporting_fraction=0.9,
    max_failure_rate=0.02,
    max_latency_p99_ms=20.0,
    max_prediction_psi=0.2,
    min_predictions=100,
)


def test_stage_with_no_reports_is_inconclusive_never_pass() -> None:
    obs = StageObservation(
        stage_percent=1.0, targeted=10, reported=0, failed=0, serving=0, latency_p99_ms=None
    )
    assert assess_stage(obs, [0.5, 0.5], GATES).outcome is Outcome.INCONCLUSIVE
    empty = StageObservation(
        stage_percent=1.0, targeted=0, reported=0, failed=0, serving=0, latency_p99_ms=None
    )
    assert "no device in the cohort" in assess_stage(empty, [0.5, 0.5], GATES).reason


def test_failed_health_checks_fail_the_stage_with_counts() -> None:
    """Ten of ten devices failing is a FAIL that says how many, whatever else is unknown."""
    obs = StageObservation(
        stage_percent=1.0, targeted=10, reported=10, failed=10, serving=0, latency_p99_ms=None
    )
    gate = assess_stage(obs, [0.5, 0.5], GATES)
    assert gate.outcome is Outcome.FAIL
    assert "failure rate 100.0% (10 of 10 devices) > max 2.0%" in gate.reason


def test_prediction_shift_and_latency_fail_the_stage() -> None:
    shifted = StageObservation(1.0, 10, 10, 0, 10, 1.0, prediction_counts=(0, 640))
    slow = StageObservation(1.0, 10, 10, 0, 10, 45.0, prediction_counts=(320, 320))
    assert "prediction PSI" in assess_stage(shifted, [0.5, 0.5], GATES).reason
    assert "device p99 45.00 ms > max 20 ms" in assess_stage(slow, [0.5, 0.5], GATES).reason
    healthy = StageObservation(1.0, 10, 10, 0, 10, 1.0, prediction_counts=(320, 320))
    assert assess_stage(healthy, [0.5, 0.5], GATES).passed


def test_observation_takes_each_cohort_devices_latest_event_for_the_release() -> None:
    events = [
        {
            "device_id": "a",
            "release_version": 2,
            "event": "installed",
            "latency_p99_ms": 1.0,
            "prediction_counts": [3, 1],
        },
        {
            "device_id": "b",
            "release_version": 2,
            "event": "health_failed",
            "latency_p99_ms": None,
            "prediction_counts": None,
        },
        {
            "device_id": "c",
            "release_version": 2,
            "event": "rejected",
            "latency_p99_ms": None,
            "prediction_counts": None,
        },
        {
            "device_id": "c",
            "release_version": 2,
            "event": "installed",
            "latency_p99_ms": 2.0,
            "prediction_counts": [1, 3],
        },
        {
            "device_id": "z",
            "release_version": 2,
            "event": "installed",
            "latency_p99_ms": 9.0,
            "prediction_counts": [9, 9],
        },
        {
            "device_id": "a",
            "release_version": 1,
            "event": "installed",
            "latency_p99_ms": 7.0,
            "prediction_counts": [9, 9],
        },
    ]
    obs = observe(events, ["a", "b", "c", "d"], version=2, percent=10.0)
    assert (obs.targeted, obs.reported, obs.failed, obs.serving) == (4, 3, 1, 2)
    assert obs.prediction_counts == (4, 4)
    assert obs.latency_p99_ms == pytest.approx(np.percentile([1.0, 2.0], 99))


# --------------------------------------------------------------------------- OTA state machine

PLAN = EdgeConfig()


def gate(outcome: Outcome, reason: str = "r") -> GateResult:
    return GateResult((CheckResult("m", outcome, reason),))


def test_passing_stages_widen_the_cohort_then_promote() -> None:
    """1% -> 10% -> 50% -> 100%, each stage served as an effect, then the rollout succeeds
    and records the release as the last good one."""
    first = start("r1", "m", 2, PLAN)
    assert first.effects == (OtaEffect("serve_cohort", 2, 1.0),)
    s, seen, served = first.status, [], []
    while not s.done:
        seen.append(s.percent)
        d = decide(s, gate(Outcome.PASS), PLAN)
        served += [e.percent for e in d.effects if e.kind == "serve_cohort"]
        s = d.status
    assert seen == [1.0, 10.0, 50.0, 100.0] and served == [10.0, 50.0, 100.0]
    assert s.phase is Phase.SUCCEEDED and s.history[-1].action == "promote"
    assert d.effects == (OtaEffect("mark_good", 2),)


def test_a_failed_stage_rolls_back_at_once_and_restores_the_last_good_release() -> None:
    """With failure_limit 0 the first FAIL halts the rollout at its stage and rolls back: the
    decision carries the restore of the last good release as its effect."""
    s = start("r1", "m", 2, PLAN, last_good=1).status
    d = decide(s, gate(Outcome.FAIL, "stage 1%: failure rate 100.0%"), PLAN)
    assert d.action is Action.ROLLBACK
    assert d.reason == ("stage 1%: failure rate 100.0% (failures 1 > limit 0); restoring v1 on every device")
    assert d.effects == (OtaEffect("restore", 1),)
    s = d.status
    assert s.phase is Phase.ROLLED_BACK and s.phase.value == "rolled_back" and s.percent == 1.0
    with pytest.raises(RolloutConflict):
        decide(s, gate(Outcome.PASS), PLAN)


def test_a_rollback_without_an_earlier_good_release_halts_where_it_stands() -> None:
    """The first release of a model has nothing to restore: rollback, no effect, and the reason says so."""
    d = decide(start("r1", "m", 1, PLAN).status, gate(Outcome.FAIL, "bad"), PLAN)
    assert d.action is Action.ROLLBACK and d.effects == ()
    assert "no earlier good release to restore" in d.reason


def test_failures_and_errors_within_their_limits_hold_and_are_counted_apart() -> None:
    """FAIL and ERROR are counted in the rollout vocabulary's counters (failures, errors), each
    against the failure limit; a hold serves the same cohort again to observe it afresh."""
    plan = EdgeConfig(failure_limit=1)
    s = start("r1", "m", 2, plan).status
    d1 = decide(s, gate(Outcome.FAIL), plan)
    assert d1.action is Action.HOLD and d1.status.counters == Counters(failures=1) and d1.status.stage == 0
    assert d1.effects == (OtaEffect("serve_cohort", 2, 1.0),)
    d2 = decide(d1.status, gate(Outcome.ERROR), plan)
    assert d2.action is Action.HOLD and d2.status.counters == Counters(failures=1, errors=1)
    d3 = decide(d2.status, gate(Outcome.ERROR), plan)
    assert d3.action is Action.ROLLBACK and "errors 2 > limit 1" in d3.reason


def test_inconclusive_stages_hold_then_abort_past_the_limit() -> None:
    s = start("r1", "m", 2, PLAN).status
    actions = []
    while not s.done:
        d = decide(s, gate(Outcome.INCONCLUSIVE, "no reports"), PLAN)
        actions.append(d.action)
        s = d.status
    assert actions == [Action.HOLD, Action.HOLD, Action.ABORT]
    assert s.phase is Phase.ABORTED and d.effects == ()


def test_status_round_trips_through_json_and_refuses_a_changed_plan() -> None:
    s = decide(start("r1", "m", 2, PLAN, last_good=1).status, gate(Outcome.PASS), PLAN).status
    assert type(s).from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(RolloutConflict, match="plan now has"):
        decide(s, gate(Outcome.PASS), EdgeConfig(stages=(5.0, 100.0)))


@pytest.mark.parametrize(
    ("old", "new"),
    [("rolled-back", Phase.ROLLED_BACK), ("completed", Phase.SUCCEEDED), ("progressing", Phase.RUNNING)],
)
def test_a_status_file_of_the_old_spelling_still_loads(old: str, new: Phase) -> None:
    """Status files written before the shared vocabulary (phase ``rolled-back``, counters as
    ``failures``/``inconclusives``) load into today's phases and counters."""
    legacy = {
        "rollout_id": "fraud-v2-acceptance-20261201T000000",
        "model": "fraud",
        "version": 2,
        "stages": [1.0, 10.0, 50.0, 100.0],
        "stage": 0,
        "phase": old,
        "failures": 1,
        "inconclusives": 2,
        "history": [
            {"stage": 0, "percent": 1.0, "action": "rollback", "outcome": "FAIL", "reason": "failure rate"}
        ],
    }
    s = RolloutStatus.from_dict(json.loads(json.dumps(legacy)))
    assert s.phase is new and s.counters == Counters(failures=1, inconclusives=2) and s.last_good is None
    assert s.history[0].action == "rollback"
    assert RolloutStatus.from_dict(s.to_dict()) == s


def test_server_and_device_rollouts_share_one_vocabulary() -> None:
    """Both targets use the same phase, action and counter types: one spelling of each."""
    from mlops.rollout import machine

    assert machine.Phase is Phase and machine.Action is Action
    assert {a.value for a in Action} >= {"advance", "hold", "pause", "rollback", "abort", "promote"}
    assert all("-" not in p.value for p in Phase)


# --------------------------------------------------------------------------- distillation and pruning maths


def test_distillation_gradient_is_the_derivative_of_the_loss() -> None:
    """The analytic dL/dz_s matches central finite differences of the loss (soft targets at T plus hard labels)."""
    rng = np.random.default_rng(1)
    z_s, z_t = rng.normal(size=50) * 3, rng.normal(size=50) * 3
    y = (rng.random(50) < 0.3).astype(float)
    for t, alpha in [(1.0, 0.5), (4.0, 0.7), (2.0, 1.0)]:
        grad = neural.distillation_gradient(z_s, z_t, y, t, alpha)
        eps = 1e-5
        for i in range(0, 50, 7):
            up, down = z_s.copy(), z_s.copy()
            up[i] += eps
            down[i] -= eps
            numeric = (
                (
                    neural.distillation_loss(up, z_t, y, t, alpha)
                    - neural.distillation_loss(down, z_t, y, t, alpha)
                )
                * 50
                / (2 * eps)
            )
            assert grad[i] == pytest.approx(numeric, rel=1e-4, abs=1e-6)


def test_training_on_soft_targets_fits_the_teacher() -> None:
    """A network distilled from a known teacher function reproduces its probabilities."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4000, 5)).astype(np.float32)
    z_t = 2.0 * x[:, 0] - 1.5 * np.maximum(x[:, 1], 0) - 2.0
    y = (rng.random(4000) < neural.sigmoid(z_t)).astype(float)
    mlp = neural.distill(
        x,
        z_t,
        y,
        neural.init_mlp(5, (8,), 0),
        neural.DistillConfig(temperature=2.0, alpha=1.0, epochs=30, batch_size=64, learning_rate=1e-2),
    )
    assert np.mean(np.abs(mlp.predict_proba(x) - neural.sigmoid(z_t))) < 0.02


def test_structured_pruning_removes_whole_units_and_keeps_the_important_ones() -> None:
    """Pruning deletes columns/rows of the weight matrices (smaller shapes), keeping the highest-importance units."""
    rng = np.random.default_rng(3)
    mlp = neural.init_mlp(6, (8, 4), 0)
    w = [m.copy() for m in mlp.weights]
    w[0][:, [1, 5]] *= 10  # units 1 and 5 of layer 0 are the strong ones
    mlp = neural.Mlp(tuple(w), mlp.biases)
    pruned, kept = neural.prune_units(mlp, rng.normal(size=(200, 6)).astype(np.float32), 0.25, "weight_norm")
    assert [a.shape for a in pruned.weights] == [(6, 2), (2, 1), (1, 1)]
    assert list(kept[0]) == [1, 5]
    assert pruned.n_params < mlp.n_params


def test_a_trained_network_becomes_a_scikit_learn_pipeline_with_the_same_outputs() -> None:
    """The MLPClassifier built from the numpy weights predicts exactly what the numpy network does."""
    import pandas as pd

    from mlops.datagen import fraud_schema, generate
    from mlops.modeling import features_frame

    schema = fraud_schema()
    frame = features_frame(generate(300, seed=4), schema)
    pre = neural.student_preprocessor(schema, 3.0)
    x = pre.fit_transform(frame).astype(np.float32)
    assert np.abs(x[:, : len(schema.numeric_names)]).max() <= 3.0  # outliers clipped
    mlp = neural.init_mlp(x.shape[1], (4,), 1)
    pipe = neural.to_pipeline(pre, mlp)
    np.testing.assert_allclose(pipe.predict_proba(pd.DataFrame(frame))[:, 1], mlp.predict_proba(x), atol=1e-6)


def test_a_tiny_cohort_is_not_failed_on_sampling_noise_alone() -> None:
    """128 predictions over 10 bins reach PSI ~0.2 by chance; the gate raises its bar to the noise level
    for so little evidence, and uses the configured limit once the cohort is large."""
    from mlops.edge.telemetry import psi_noise

    ref = [0.1] * 10
    noisy_small = StageObservation(
        1.0, 2, 2, 0, 2, 1.0, prediction_counts=(24, 10, 12, 9, 16, 14, 8, 15, 11, 9)
    )
    small = assess_stage(noisy_small, ref, GATES)
    assert psi(ref, noisy_small.prediction_counts) > GATES.max_prediction_psi * 0.5
    assert small.passed and "sampling noise alone reaches" in small.reason
    assert psi_noise(10, 128) > 0.2 > psi_noise(10, 6400)
    shifted_large = StageObservation(
        10.0, 100, 100, 0, 100, 1.0, prediction_counts=(3200, 0, 0, 0, 0, 0, 0, 0, 0, 3200)
    )
    assert not assess_stage(shifted_large, ref, GATES).passed
