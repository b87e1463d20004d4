"""Thompson-sampling allocation: posterior bookkeeping, floors, the stopping rule, and seeded simulations."""

import numpy as np
import pytest

from mlops.rollout.bandit import ArmStats, BanditPolicy, assess, floored, simulate

POLICY = BanditPolicy(threshold=0.99, max_expected_loss=0.001, min_samples=500, draws=2000)
RUNS = dict(confirm_ticks=2, max_ticks=150, horizon_ticks=300)


def test_arm_statistics_add_up_batch_by_batch() -> None:
    """Statistics built tick by tick equal those of all rewards at once."""
    rewards = np.random.default_rng(1).normal(3.0, 2.0, 1000)
    tickwise = ArmStats()
    for chunk in np.array_split(rewards, 7):
        tickwise = tickwise + ArmStats.of(chunk)
    whole = ArmStats.of(rewards)
    assert tickwise.n == whole.n == 1000
    assert tickwise.total == pytest.approx(whole.total)
    assert tickwise.total_sq == pytest.approx(whole.total_sq)


def test_every_arm_keeps_its_floor_and_shares_sum_to_one() -> None:
    """No arm is starved: each gets at least the floor, even when P(best) gives it nothing."""
    shares = floored(np.array([1.0, 0.0, 0.0]), 0.05)
    assert shares.sum() == pytest.approx(1.0)
    assert shares.min() == pytest.approx(0.05)
    assert floored(np.zeros(2), 0.1).tolist() == [0.5, 0.5]


def test_no_winner_before_every_arm_has_min_samples() -> None:
    """A clearly better arm does not win while the other has fewer than min_samples rewards."""
    stats = [ArmStats.of(np.zeros(100)), ArmStats.of(np.ones(5000))]
    verdict = assess(stats, POLICY, np.random.default_rng(0))
    assert verdict.winner is None and "below 500 rewards" in verdict.reason
    assert verdict.weights[1] > 0.9 and verdict.weights[0] >= POLICY.floor


def test_a_clearly_better_arm_wins_with_its_reason() -> None:
    """With enough rewards a better Bernoulli arm wins, and the reason carries the numbers."""
    rng = np.random.default_rng(3)
    stats = [ArmStats.of(rng.random(20000) < 0.10), ArmStats.of(rng.random(20000) < 0.13)]
    verdict = assess(stats, POLICY, rng)
    assert verdict.winner == 1
    assert verdict.prob_best[1] >= 0.99 and "arm 1 best with P" in verdict.reason


def test_lower_is_better_rewards_pick_the_lower_mean() -> None:
    """A Gaussian reward where lower is better (log loss) picks the arm with the lower mean."""
    rng = np.random.default_rng(4)
    policy = BanditPolicy(reward="gaussian", higher_is_better=False, min_samples=200, max_expected_loss=0.01)
    stats = [ArmStats.of(rng.normal(0.30, 0.2, 5000)), ArmStats.of(rng.normal(0.25, 0.2, 5000))]
    verdict = assess(stats, policy, rng)
    assert verdict.winner == 1 and verdict.expected_loss[1] < 0.01


def test_gaussian_arms_without_data_are_unknown_not_bad() -> None:
    """An arm with no rewards yet still gets real traffic beyond the floor."""
    rng = np.random.default_rng(5)
    policy = BanditPolicy(reward="gaussian", floor=0.0)
    verdict = assess([ArmStats.of(rng.normal(1.0, 1.0, 300)), ArmStats()], policy, rng)
    assert 0.2 < verdict.weights[1] < 0.8


def test_policy_rejects_impossible_settings() -> None:
    """A threshold at or below a coin flip, or a floor of 1, is refused when the policy is made."""
    with pytest.raises(ValueError, match="threshold"):
        BanditPolicy(threshold=0.5)
    with pytest.raises(ValueError, match="floor"):
        BanditPolicy(floor=1.0)


def test_a_known_better_candidate_is_promoted_in_at_least_95_percent_of_seeded_runs() -> None:
    """Candidate rate 0.12 against stable 0.10: the bandit promotes it in >= 95 % of 100 runs."""
    winners = [simulate((0.10, 0.12), POLICY, seed=s, **RUNS).winner for s in range(100)]
    assert winners.count(1) >= 95, winners


def test_equal_arms_promote_nothing_wrongly_in_at_least_95_percent_of_seeded_runs() -> None:
    """Equal rates: the candidate is promoted in <= 5 % of 100 runs (stable kept otherwise)."""
    winners = [simulate((0.10, 0.10), POLICY, seed=s, **RUNS).winner for s in range(100)]
    assert winners.count(1) <= 5, winners


def test_three_arms_find_the_best_one() -> None:
    """With three variants the best one is the one promoted."""
    winners = [simulate((0.10, 0.11, 0.14), POLICY, seed=s, **RUNS).winner for s in range(20)]
    assert winners.count(2) >= 19, winners
