"""Thompson-sampling traffic allocation over two or more variants, and when to stop.

Each arm keeps the sufficient statistics of its rewards (count, sum, sum of squares), so a
tick's observations are added without keeping rows. The reward is one of:

``bernoulli``  a 0/1 outcome per labelled answer (the decision was right, a conversion):
               the posterior of the arm's rate is Beta(1 + successes, 1 + failures).
``gaussian``   a continuous outcome (e.g. minus the log loss of each labelled answer):
               the posterior of the arm's mean is Student t around the sample mean with
               scale s / sqrt(n) (Jeffreys prior), so the variance is learned, not assumed.

``assess`` draws from every posterior at once, counts how often each arm is the best
(P(best), the Thompson allocation) and how much reward choosing it would leave on the table
(expected loss, the "value remaining" of Scott 2015). Traffic follows P(best) with a floor
per arm, so no arm is starved before it is judged. An arm wins when every arm has
``min_samples`` rewards, its P(best) is at least ``threshold`` and its expected loss is at
most ``max_expected_loss``; the caller asks for the same winner on ``confirm_ticks``
consecutive ticks before promoting it. Everything here is deterministic given the
generator it is handed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Reward = Literal["bernoulli", "gaussian"]


@dataclass(frozen=True)
class ArmStats:
    """Sufficient statistics of one arm's rewards: how many, their sum, their sum of squares."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    @classmethod
    def of(cls, rewards: np.ndarray | Sequence[float]) -> ArmStats:
        """The statistics of a batch of rewards."""
        r = np.asarray(rewards, dtype=np.float64)
        return cls(int(r.size), float(r.sum()), float(np.square(r).sum()))

    def __add__(self, other: ArmStats) -> ArmStats:
        return ArmStats(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> float:
        """The mean reward so far (NaN with none)."""
        return self.total / self.n if self.n else math.nan


@dataclass(frozen=True)
class BanditPolicy:
    """How rewards are modelled, how traffic is floored and when an arm wins."""

    reward: Reward = "bernoulli"
    higher_is_better: bool = True
    floor: float = 0.05
    threshold: float = 0.99
    max_expected_loss: float = 0.001
    min_samples: int = 500
    draws: int = 4000

    def __post_init__(self) -> None:
        if not 0 <= self.floor < 1:
            raise ValueError(f"floor {self.floor} must be in [0, 1)")
        if not 0.5 < self.threshold < 1:
            raise ValueError(f"threshold {self.threshold} must be in (0.5, 1)")
        if self.max_expected_loss < 0 or self.min_samples < 1 or self.draws < 100:
            raise ValueError("max_expected_loss >= 0, min_samples >= 1 and draws >= 100 are required")


@dataclass(frozen=True)
class BanditVerdict:
    """One tick's reading of the arms: next traffic shares, P(best), expected loss, a winner."""

    weights: tuple[float, ...]
    prob_best: tuple[float, ...]
    expected_loss: tuple[float, ...]
    winner: int | None
    reason: str
    means: tuple[float, ...] = field(default=())


def posterior_draws(stats: Sequence[ArmStats], policy: BanditPolicy, rng: np.random.Generator) -> np.ndarray:
    """``draws`` samples of every arm's mean reward from its posterior: shape (arms, draws).

    Gaussian arms with fewer than two rewards are drawn around the pooled mean with the pooled
    spread widened tenfold: unknown, not known to be bad.
    """
    out = np.empty((len(stats), policy.draws))
    if policy.reward == "bernoulli":
        for i, s in enumerate(stats):
            successes = min(max(s.total, 0.0), float(s.n))
            out[i] = rng.beta(1.0 + successes, 1.0 + s.n - successes, policy.draws)
        return out
    pooled = ArmStats()
    for s in stats:
        pooled = pooled + s
    pooled_mean = pooled.mean if pooled.n else 0.0
    pooled_sd = _sd(pooled) if pooled.n >= 2 else 1.0
    for i, s in enumerate(stats):
        if s.n < 2:
            out[i] = pooled_mean + 10.0 * max(pooled_sd, 1e-9) * rng.standard_normal(policy.draws)
        else:
            scale = max(_sd(s), 1e-12) / math.sqrt(s.n)
            out[i] = s.mean + scale * rng.standard_t(s.n - 1, policy.draws)
    return out


def _sd(s: ArmStats) -> float:
    var = (s.total_sq - s.n * s.mean**2) / (s.n - 1)
    return math.sqrt(max(var, 0.0))


def floored(shares: np.ndarray, floor: float) -> np.ndarray:
    """Traffic shares with at least ``floor`` each (floor * arms <= 1), summing to one."""
    k = len(shares)
    floor = min(floor, 1.0 / k)
    total = shares.sum()
    base = shares / total if total > 0 else np.full(k, 1.0 / k)
    return floor + (1.0 - k * floor) * base


def assess(stats: Sequence[ArmStats], policy: BanditPolicy, rng: np.random.Generator) -> BanditVerdict:
    """Next tick's traffic shares and, once the evidence is in, the winning arm."""
    if len(stats) < 2:
        raise ValueError("a bandit needs at least two arms")
    draws = posterior_draws(stats, policy, rng)
    if not policy.higher_is_better:
        draws = -draws
    best = draws.argmax(axis=0)
    prob_best = np.bincount(best, minlength=len(stats)) / policy.draws
    expected_loss = (draws.max(axis=0) - draws).mean(axis=1)
    weights = floored(prob_best, policy.floor)
    means = tuple(s.mean for s in stats)
    leader = int(prob_best.argmax())
    short = [i for i, s in enumerate(stats) if s.n < policy.min_samples]
    if short:
        reason = (
            f"arm(s) {', '.join(map(str, short))} below {policy.min_samples} rewards "
            f"(have {', '.join(str(stats[i].n) for i in short)})"
        )
        winner = None
    elif prob_best[leader] < policy.threshold:
        reason = f"P(best) of arm {leader} {prob_best[leader]:.3f} < {policy.threshold:g}"
        winner = None
    elif expected_loss[leader] > policy.max_expected_loss:
        reason = f"expected loss of arm {leader} {expected_loss[leader]:.4g} > {policy.max_expected_loss:g}"
        winner = None
    else:
        reason = (
            f"arm {leader} best with P {prob_best[leader]:.3f} >= {policy.threshold:g}, "
            f"expected loss {expected_loss[leader]:.4g} <= {policy.max_expected_loss:g}"
        )
        winner = leader
    return BanditVerdict(
        weights=tuple(float(w) for w in weights),
        prob_best=tuple(float(p) for p in prob_best),
        expected_loss=tuple(float(x) for x in expected_loss),
        winner=winner,
        reason=reason,
        means=means,
    )


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class SimulationResult:
    """How one simulated experiment ended: the promoted arm (None: stable kept), when, and its regret."""

    winner: int | None
    ticks: int
    requests: int
    regret: float
    shares: tuple[float, ...]


def simulate(
    rates: Sequence[float],
    policy: BanditPolicy,
    *,
    seed: int,
    requests_per_tick: int = 400,
    max_ticks: int = 60,
    horizon_ticks: int = 120,
    confirm_ticks: int = 2,
    adaptive: bool = True,
) -> SimulationResult:
    """One seeded experiment over Bernoulli arms with true ``rates`` (arm 0 is stable).

    Each tick routes ``requests_per_tick`` requests by the current shares (Thompson shares when
    ``adaptive``, a fixed even split otherwise), observes their rewards and assesses. A winner
    confirmed on ``confirm_ticks`` consecutive ticks takes all traffic for the rest of the
    ``horizon_ticks``; with no winner by ``max_ticks`` stable keeps it. Regret is the reward
    lost against always serving the best arm, over the whole horizon.
    """
    rng = np.random.default_rng(seed)
    k = len(rates)
    truth = np.asarray(rates, dtype=np.float64)
    stats = [ArmStats() for _ in range(k)]
    shares = np.full(k, 1.0 / k)
    regret = 0.0
    streak: tuple[int | None, int] = (None, 0)
    served = np.zeros(k)
    for tick in range(1, max_ticks + 1):
        counts = rng.multinomial(requests_per_tick, shares)
        served += counts
        regret += float((truth.max() - truth) @ counts)
        for i, c in enumerate(counts):
            stats[i] = stats[i] + ArmStats.of(rng.random(c) < truth[i])
        verdict = assess(stats, policy, rng)
        if adaptive:
            shares = np.asarray(verdict.weights)
        streak = (verdict.winner, streak[1] + 1 if verdict.winner == streak[0] else 1)
        if verdict.winner is not None and streak[1] >= confirm_ticks:
            rest = (horizon_ticks - tick) * requests_per_tick
            regret += float(truth.max() - truth[verdict.winner]) * rest
            return SimulationResult(
                verdict.winner, tick, int(served.sum()), regret, tuple(served / served.sum())
            )
    rest = (horizon_ticks - max_ticks) * requests_per_tick
    regret += float(truth.max() - truth[0]) * rest
    return SimulationResult(None, max_ticks, int(served.sum()), regret, tuple(served / served.sum()))
