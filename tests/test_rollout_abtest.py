"""A/B statistics (mlops.rollout.abtest): sample size, the always-valid mSPRT, SRM.

The seeded simulations here are the evidence for the A/B gate's claims: with a look at
every tick, two identical models are declared different at most about ``alpha`` of the
time (where a fixed-horizon test read at every tick is far above it), and a real effect of
the minimum detectable size is found with about the configured power.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import chdtrc

from mlops.gates import Outcome
from mlops.rollout.abtest import (
    Arm,
    Arms,
    evaluate_primary,
    evaluate_srm,
    fixed_horizon_sample_size,
    mixture_half_width,
    msprt,
    sequential_sample_size,
    sequential_srm_p,
    srm_test,
)
from mlops.rollout.plan import SequentialTest, SrmCheck

ALPHA, POWER = 0.05, 0.8
EXPERIMENTS, TICKS, PER_TICK = 400, 64, 200  # per arm: 12,800 values after the last tick
MDE = 0.02
SPEC = SequentialTest(metric="log_loss", alpha=ALPHA, power=POWER, mde=MDE, min_samples=1000)


def _log_losses(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Per-request log loss of a calibrated fraud model (1.1 % positives): heavy-tailed,
    like the real primary metric, not a convenient normal."""
    y = rng.random(shape) < 0.011
    d, s = 2.5, 1.0
    r = d * y + s * rng.standard_normal(shape)
    logit = math.log(0.011 / 0.989) + d / s**2 * (r - d / 2)
    p = 1 / (1 + np.exp(-logit))
    return np.where(y, -np.log(p), -np.log1p(-p))


def _run(
    effect: float,
    seed: int,
    spec: SequentialTest = SPEC,
    experiments: int = EXPERIMENTS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``experiments`` experiments, each looked at after every tick through ``evaluate_primary``.

    ``effect`` lowers the candidate's loss (an improvement). Returns, per experiment, the
    first tick with a PASS and with a FAIL (-1: never), and the tick from which the
    sample was powered.
    """
    rng = np.random.default_rng(seed)
    sums = np.zeros((2, experiments))
    sq = np.zeros((2, experiments))
    first_pass = np.full(experiments, -1)
    first_fail = np.full(experiments, -1)
    powered = np.full(experiments, -1)
    for tick in range(TICKS):
        if np.all((first_pass >= 0) | (first_fail >= 0)):
            break
        batch = _log_losses(rng, (2, experiments, PER_TICK))
        batch[1] -= effect
        sums += batch.sum(axis=2)
        sq += (batch**2).sum(axis=2)
        n = (tick + 1) * PER_TICK
        mean = sums / n
        var = (sq - n * mean**2) / (n - 1)
        for e in range(experiments):
            if first_pass[e] >= 0 or first_fail[e] >= 0:
                continue  # a concluded experiment stops, as the rollout does
            arms = Arms("log_loss", Arm(n, mean[0, e], var[0, e]), Arm(n, mean[1, e], var[1, e]))
            verdict = evaluate_primary(spec, arms)
            if powered[e] < 0 and verdict.n_required is not None and n >= verdict.n_required:
                powered[e] = tick
            if verdict.outcome is Outcome.PASS:
                first_pass[e] = tick
            elif verdict.outcome is Outcome.FAIL:
                first_fail[e] = tick
    return first_pass, first_fail, powered


def test_fixed_horizon_sample_size_matches_the_textbook_formula() -> None:
    """n = 2 (z_{1-a/2} + z_power)^2 sigma^2 / mde^2 per arm: 1570 for sigma 1, mde 0.1."""
    assert fixed_horizon_sample_size(0.1, 1.0, 0.05, 0.8) == 1570


def test_sequential_sample_size_pays_for_looking_at_every_tick() -> None:
    """The mSPRT needs more samples than one look would (the price of validity at every
    look), and like any z-test its n scales with sigma^2 / mde^2."""
    fixed = fixed_horizon_sample_size(0.01, 0.2)
    seq = sequential_sample_size(0.01, 0.2)
    assert 1.3 * fixed < seq < 3 * fixed
    assert sequential_sample_size(0.01, 0.4) == pytest.approx(4 * seq, rel=1e-3)
    assert sequential_sample_size(0.02, 0.4) == pytest.approx(seq, rel=1e-3)
    assert sequential_sample_size(0.01, 0.2, alpha=0.01) > seq
    assert sequential_sample_size(0.01, 0.2, power=0.9) > seq


def test_msprt_interval_and_rejection_agree() -> None:
    """The test rejects exactly when 0 is outside its always-valid interval, and the
    interval is centred on the observed difference."""
    for diff in (0.0, 0.005, 0.02, -0.03):
        arms = Arms("m", Arm(5000, 0.10, 0.04), Arm(5000, 0.10 + diff, 0.04))
        res = msprt(arms, ALPHA, tau=0.01)
        assert res.effect == pytest.approx(diff)
        assert res.ci_low < diff < res.ci_high
        assert res.rejected == (not res.ci_low < 0 < res.ci_high)
        assert (res.p_value <= ALPHA) == res.rejected
    # the interval is wider than a fixed-horizon 95% interval at the same sample
    v = 2 * 0.04 / 5000
    assert mixture_half_width(v, 0.01, ALPHA) > 1.96 * math.sqrt(v)


def test_aa_experiments_checked_every_tick_keep_false_positives_near_alpha() -> None:
    """Given 400 A/A experiments of heavy-tailed per-request log loss, looked at after
    every one of 64 ticks (200 values per arm each), when the gate may stop at any look,
    then at most alpha + 3 points of them ever declare a winner or a loser; a
    fixed-horizon z-test read at every look would stop far more often."""
    first_pass, first_fail, powered = _run(effect=0.0, seed=11)
    false_positive = np.mean((first_pass >= 0) | (first_fail >= 0))
    winners = np.mean(first_pass >= 0)
    assert false_positive <= ALPHA + 0.03, f"A/A false-positive rate {false_positive:.3f}"
    assert winners <= ALPHA / 2 + 0.02, f"A/A winner rate {winners:.3f}"
    assert np.mean(powered >= 0) >= 0.95, "the A/A runs went past the powered sample"
    # the peeking problem the sequential test avoids: a z-test at alpha at every look
    rng = np.random.default_rng(11)
    a = np.cumsum(_log_losses(rng, (TICKS, 200, PER_TICK)).sum(axis=2), axis=0)
    b = np.cumsum(_log_losses(rng, (TICKS, 200, PER_TICK)).sum(axis=2), axis=0)
    n = PER_TICK * np.arange(1, TICKS + 1)[:, None]
    sigma = 0.28  # spread of the per-request loss above
    z = (b - a) / n / (sigma * np.sqrt(2 / n))
    naive = np.mean(np.any(np.abs(z) > 1.96, axis=0))
    assert naive > 2 * ALPHA, f"naive peeking false-positive rate {naive:.3f}"


def test_real_effect_of_the_mde_is_found_with_the_configured_power() -> None:
    """Given 300 experiments whose candidate is better by exactly the mde:

    - with sigma pre-registered, the gate PASSes in at least power - 7 points of them by
      the planned sample (``sequential_sample_size``; 2.5 binomial standard errors plus the
      normal approximation of a heavy-tailed mean), and never before it;
    - with sigma estimated from the stable arm (the demo plan), whether the sample is
      powered is itself noisy, so some pass later: at least power of them by twice it;
    - none of them ever FAILs."""
    sigma = float(np.std(_log_losses(np.random.default_rng(0), (1_000_000,))))
    planned = sequential_sample_size(MDE, sigma, ALPHA, POWER)
    last_planned_tick = math.ceil(planned / PER_TICK) - 1
    assert 2 * planned <= TICKS * PER_TICK
    registered = SPEC.model_copy(update={"sigma": sigma})
    first_pass, first_fail, powered = _run(MDE, 12, registered, experiments=300)
    assert np.all(powered == last_planned_tick)
    power = np.mean((first_pass >= 0) & (first_pass <= last_planned_tick))
    assert power >= POWER - 0.07, f"power at the planned sample {power:.3f}"
    assert np.all(first_fail < 0) and np.all(first_pass[first_pass >= 0] >= last_planned_tick)

    first_pass, first_fail, powered = _run(MDE, 13, experiments=300)
    by_twice = np.mean((first_pass >= 0) & (first_pass < 2 * (last_planned_tick + 1)))
    assert by_twice >= POWER, f"power by twice the planned sample {by_twice:.3f}"
    assert np.all(first_fail < 0)
    passed = first_pass >= 0
    assert np.all(first_pass[passed] >= powered[passed])


def test_primary_verdicts_name_their_numbers() -> None:
    """Too few samples, a significantly worse candidate, an unpowered sample and a winner
    each give their own outcome and a reason with the numbers."""
    few = evaluate_primary(SPEC, Arms("log_loss", Arm(500, 0.03, 0.08), Arm(400, 0.03, 0.08)))
    assert (
        few.outcome is Outcome.INCONCLUSIVE
        and "500 stable / 400 candidate values < min_samples 1000" in few.reason
    )
    worse = evaluate_primary(SPEC, Arms("log_loss", Arm(5000, 0.03, 0.08), Arm(5000, 0.06, 0.16)))
    assert worse.outcome is Outcome.FAIL and "significantly worse" in worse.reason
    assert worse.improvement == pytest.approx(-0.03) and worse.ci_high < 0
    early = evaluate_primary(SPEC, Arms("log_loss", Arm(2000, 0.03, 0.08), Arm(2000, 0.025, 0.08)))
    assert early.outcome is Outcome.INCONCLUSIVE and "not enough samples" in early.reason
    assert f"of {early.n_required} per arm" in early.reason
    win = evaluate_primary(SPEC, Arms("log_loss", Arm(40000, 0.03, 0.08), Arm(40000, 0.01, 0.03)))
    assert win.outcome is Outcome.PASS and "candidate better" in win.reason and win.ci_low > 0
    wrong_metric = evaluate_primary(SPEC, Arms("brier", Arm(40000, 0.03, 0.08), Arm(40000, 0.01, 0.03)))
    assert wrong_metric.outcome is Outcome.INCONCLUSIVE


def test_higher_is_better_and_non_inferiority() -> None:
    """Accuracy is oriented so that higher is better; non-inferiority passes an equal
    candidate once the interval excludes a loss of more than the mde."""
    acc = SequentialTest(metric="accuracy", mde=0.01, min_samples=100)
    better = evaluate_primary(acc, Arms("accuracy", Arm(50000, 0.90, 0.09), Arm(50000, 0.93, 0.065)))
    assert better.outcome is Outcome.PASS and better.improvement == pytest.approx(0.03)
    ni = SequentialTest(metric="log_loss", hypothesis="non_inferiority", mde=0.01, min_samples=100)
    same = evaluate_primary(ni, Arms("log_loss", Arm(60000, 0.03, 0.08), Arm(60000, 0.03, 0.08)))
    assert same.outcome is Outcome.PASS and "not worse by more than the mde" in same.reason
    sup = evaluate_primary(
        SequentialTest(metric="log_loss", mde=0.01, min_samples=100),
        Arms("log_loss", Arm(60000, 0.03, 0.08), Arm(60000, 0.03, 0.08)),
    )
    assert sup.outcome is Outcome.INCONCLUSIVE and "no winner" in sup.reason


def test_srm_fails_a_split_that_is_not_the_configured_one() -> None:
    """Entity counts near the configured split pass; 52/48 over 20,000 entities and 62/38
    over 450 fail with the counts and the always-valid p-value; too few entities is
    INCONCLUSIVE."""
    spec = SrmCheck(alpha=0.001, min_samples=200)
    ok = evaluate_srm(spec, Arms("m", Arm(), Arm(), 10_040, 9_960), 50)
    assert ok[0] is Outcome.PASS
    bad = evaluate_srm(spec, Arms("m", Arm(), Arm(), 10_400, 9_600), 50)
    assert bad[0] is Outcome.FAIL and "10400 stable / 9600 candidate entities for a 50/50 split" in bad[1]
    assert "always-valid p" in bad[1] and bad[2] is not None and bad[2] < 1e-5
    assert evaluate_srm(spec, Arms("m", Arm(), Arm(), 279, 171), 50)[0] is Outcome.FAIL
    assert evaluate_srm(spec, Arms("m", Arm(), Arm(), 60, 50), 50)[0] is Outcome.INCONCLUSIVE
    skewed = evaluate_srm(spec, Arms("m", Arm(), Arm(), 9_000, 1_000), 10)
    assert skewed[0] is Outcome.PASS  # 90/10 is what a 10 % split should give
    assert evaluate_srm(spec, Arms("m", Arm(), Arm(), 9_300, 700), 10)[0] is Outcome.FAIL
    chi2, p = srm_test([100, 100], [1, 1])
    assert chi2 == 0 and p == pytest.approx(1.0)


def test_srm_false_alarm_rate_over_every_tick_stays_under_alpha() -> None:
    """Honest 50/50 entity splits of 5,000 entities, checked every 25 entities (200 looks, as a
    check at every tick does), raise a false SRM alarm in at most alpha = 0.1 % of 5,000
    rollouts; the one-look chi-square at the same alpha, checked as often, alarms in over 1 %.
    The gate's verdict is the same test."""
    rng = np.random.default_rng(5)
    alpha, rollouts = 0.001, 5000
    looks = np.arange(100, 5001, 25)
    candidates = np.cumsum(rng.random((rollouts, 5000)) < 0.5, axis=1)[:, looks - 1]
    counts = np.stack([looks - candidates, candidates], axis=-1)
    p = sequential_srm_p(counts, [1, 1], SrmCheck().prior_strength)
    assert (p < alpha).any(axis=1).mean() <= alpha
    expected = looks / 2
    chi2 = ((counts - expected[:, None]) ** 2 / expected[:, None]).sum(axis=-1)
    assert (chdtrc(1, chi2) < alpha).any(axis=1).mean() > 0.01
    k, c = int(looks[-1]), int(candidates[0, -1])
    verdict = evaluate_srm(SrmCheck(alpha=alpha), Arms("m", Arm(), Arm(), k - c, c), 50)
    assert verdict[2] == pytest.approx(float(p[0, -1]))
