"""Statistics of the A/B step: sample size, an always-valid sequential test, and SRM.

``evaluate_primary`` reads the primary metric with the mixture sequential probability
ratio test (mSPRT) and its confidence sequence, valid at every tick;
``sequential_sample_size`` is the sample size that gives the configured power for that
test (``fixed_horizon_sample_size`` is the fixed-horizon one, for comparison); ``evaluate_srm`` is
the sample-ratio-mismatch check, a sequential Dirichlet-multinomial test that is also valid at
every tick. Why sequential tests, and their formulas: docs/design/rollout-model.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import chdtrc, gammaln

from mlops.gates import Outcome
from mlops.rollout.plan import SequentialTest, SrmCheck

_Z = NormalDist()

# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Arm:
    """Sufficient statistics of one arm's per-request metric values."""

    n: int = 0
    mean: float = math.nan
    var: float = math.nan  # unbiased sample variance

    @classmethod
    def of(cls, values: np.ndarray) -> Arm:
        """The sufficient statistics of one arm's per-request values."""
        x = np.asarray(values, dtype=np.float64)
        if x.size == 0:
            return cls()
        var = float(x.var(ddof=1)) if x.size > 1 else math.nan
        return cls(int(x.size), float(x.mean()), var)


@dataclass(frozen=True)
class Arms:
    """The two arms of an A/B experiment on one metric: ``stable`` (control) and ``candidate``.

    ``entities_*`` count distinct entities (users) answered by each arm, for the SRM check.
    """

    metric: str
    stable: Arm
    candidate: Arm
    entities_stable: int = 0
    entities_candidate: int = 0


# --------------------------------------------------------------------------- mSPRT core


def mixture_half_width(v: np.ndarray | float, tau: float, alpha: float) -> np.ndarray | float:
    """Half-width of the mSPRT confidence sequence at effect variance ``v`` (vectorised).

    ``{theta0 : Lambda(theta0) < 1/alpha}`` is ``theta_hat +- sqrt(2 V (V + tau^2) / tau^2 *
    (ln(1/alpha) + ln((V + tau^2) / V) / 2))``.
    """
    t2 = tau * tau
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.sqrt(2.0 * v * (v + t2) / t2 * (math.log(1.0 / alpha) + 0.5 * np.log((v + t2) / v)))
    return float(out) if out.ndim == 0 else out


def log_likelihood_ratio(
    theta_hat: np.ndarray | float, v: np.ndarray | float, tau: float, theta0: float = 0.0
):
    """``ln Lambda(theta0)`` of the normal-mixture SPRT (vectorised)."""
    t2 = tau * tau
    v = np.asarray(v, dtype=np.float64)
    d = np.asarray(theta_hat, dtype=np.float64) - theta0
    out = 0.5 * np.log(v / (v + t2)) + t2 * d * d / (2.0 * v * (v + t2))
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class SequentialResult:
    """One look at the experiment: effect ``candidate - stable`` with its always-valid CI."""

    effect: float
    std_error: float
    ci_low: float
    ci_high: float
    likelihood_ratio: float
    p_value: float  # always-valid at this look: min(1, 1 / Lambda(0))
    rejected: bool  # Lambda(0) >= 1 / alpha: the arms differ


def msprt(arms: Arms, alpha: float, tau: float) -> SequentialResult:
    """The mSPRT of ``candidate - stable = 0`` at the current look (needs 2+ rows per arm)."""
    s, c = arms.stable, arms.candidate
    if s.n < 2 or c.n < 2:
        raise ValueError("the sequential test needs at least two values per arm")
    v = s.var / s.n + c.var / c.n
    effect = c.mean - s.mean
    if not v > 0:  # both arms constant: no evidence either way unless the means differ
        v = 1e-300
    llr = log_likelihood_ratio(effect, v, tau)
    half = mixture_half_width(v, tau, alpha)
    lr = math.exp(min(llr, 700.0))
    return SequentialResult(
        effect=effect,
        std_error=math.sqrt(v),
        ci_low=effect - half,
        ci_high=effect + half,
        likelihood_ratio=lr,
        p_value=min(1.0, 1.0 / lr),
        rejected=llr >= math.log(1.0 / alpha),
    )


# --------------------------------------------------------------------------- sample size


def fixed_horizon_sample_size(mde: float, sigma: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Per-arm n of a two-sided fixed-horizon z-test (read once) to detect ``mde`` with ``power``."""
    z = _Z.inv_cdf(1 - alpha / 2) + _Z.inv_cdf(power)
    return math.ceil(2.0 * (sigma * z / mde) ** 2)


@lru_cache(maxsize=256)
def required_std_error(mde: float, alpha: float, power: float, tau: float) -> float:
    """The effect standard error at which the mSPRT has ``power`` against an effect of ``mde``.

    Power at a look with standard error ``u`` is about ``Phi((mde - half_width(u^2)) / u)``;
    it grows as ``u`` shrinks, and the root of ``mde = u * z_power + half_width(u^2)`` is
    found by bisection on ``log u``. It does not depend on the metric's spread, only on the
    effect size, so the required sample follows as ``2 sigma^2 / u^2`` for any ``sigma``.
    """
    z = _Z.inv_cdf(power)

    def slack(u: float) -> float:
        return mde - u * z - float(mixture_half_width(u * u, tau, alpha))

    lo, hi = mde * 1e-6, mde  # slack(lo) > 0 > slack(hi)
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if slack(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    return lo


def sequential_sample_size(
    mde: float, sigma: float, alpha: float = 0.05, power: float = 0.8, tau: float | None = None
) -> int:
    """Per-arm n (equal arms) at which the mSPRT detects ``mde`` with ``power``."""
    u = required_std_error(mde, alpha, power, tau or mde)
    return math.ceil(2.0 * sigma * sigma / (u * u))


# --------------------------------------------------------------------------- SRM


def srm_test(observed: Sequence[int], shares: Sequence[float]) -> tuple[float, float]:
    """Chi-square statistic and p-value of ``observed`` counts against expected ``shares``
    (one look; the gate uses ``sequential_srm_p``, which stays valid over every tick)."""
    obs = np.asarray(observed, dtype=np.float64)
    p = np.asarray(shares, dtype=np.float64)
    total = obs.sum()
    if total <= 0:
        raise ValueError("no observations")
    exp = total * p / p.sum()
    chi2 = float(np.sum((obs - exp) ** 2 / exp))
    return chi2, float(chdtrc(len(obs) - 1, chi2))


def sequential_srm_p(observed: ArrayLike, shares: Sequence[float], prior_strength: float) -> np.ndarray:
    """Always-valid p-value of ``observed`` counts (arms on the last axis) against
    ``shares``: ``min(1, 1 / BF)``, one per row of counts.

    BF is the Bayes factor of a Dirichlet(``prior_strength`` x shares) mixture over the
    arms' probabilities against the configured split. Under the configured split BF is a
    martingale as entities arrive, so the chance that ``p < alpha`` at ANY tick of a step is
    at most ``alpha`` (Ville's inequality), however often the gate looks.
    """
    x = np.asarray(observed, dtype=np.float64)
    p = np.asarray(shares, dtype=np.float64)
    if np.any(x.sum(axis=-1) <= 0) or np.any(p <= 0):
        raise ValueError("no observations, or an arm with no share")
    p = p / p.sum()
    a = prior_strength * p
    log_bf = (
        gammaln(prior_strength)
        - gammaln(prior_strength + x.sum(axis=-1))
        + np.sum(gammaln(a + x) - gammaln(a), axis=-1)
        - np.sum(x * np.log(p), axis=-1)
    )
    return np.exp(-np.maximum(log_bf, 0.0))


# --------------------------------------------------------------------------- gate verdicts


@dataclass(frozen=True)
class ABVerdict:
    """The primary test's verdict at one look, with everything the report plots.

    ``improvement`` and its interval are oriented so that positive means the candidate is
    better (for a lower-is-better metric they are ``stable - candidate``).
    """

    outcome: Outcome
    reason: str
    n_stable: int = 0
    n_candidate: int = 0
    n_required: int | None = None
    improvement: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None


def _g(x: float) -> str:
    return f"{x:+.4g}"


def evaluate_primary(spec: SequentialTest, arms: Arms | None) -> ABVerdict:
    """PASS, FAIL or INCONCLUSIVE for the pre-registered primary metric at this look.

    - fewer than ``min_samples`` per arm: INCONCLUSIVE;
    - the candidate significantly worse (the interval is below 0): FAIL, at any look;
    - the arms' information below what ``power`` at ``mde`` needs: INCONCLUSIVE;
    - then ``superiority`` PASSes when the interval is above 0 and ``non_inferiority`` when
      it is above ``-mde``; otherwise INCONCLUSIVE (no winner yet, or none to find).
    """
    name = spec.metric
    if arms is None or arms.metric != name:
        return ABVerdict(Outcome.INCONCLUSIVE, f"ab {name}: no per-request values for the primary metric")
    s, c = arms.stable, arms.candidate
    if min(s.n, c.n) < spec.min_samples:
        return ABVerdict(
            Outcome.INCONCLUSIVE,
            f"ab {name}: {s.n} stable / {c.n} candidate values < min_samples {spec.min_samples} per arm",
            s.n,
            c.n,
        )
    sigma = spec.sigma if spec.sigma is not None else math.sqrt(s.var)
    if not sigma > 0:
        sigma = math.sqrt(0.5 * (s.var + c.var))
    if not sigma > 0:
        return ABVerdict(Outcome.INCONCLUSIVE, f"ab {name}: no variance in either arm yet", s.n, c.n)
    tau = spec.tau or spec.mde
    res = msprt(arms, spec.alpha, tau)
    sign = 1.0 if spec.higher_is_better else -1.0
    imp = sign * res.effect
    lo, hi = sorted((sign * res.ci_low, sign * res.ci_high))
    u = required_std_error(spec.mde, spec.alpha, spec.power, tau)
    n_req = math.ceil(2.0 * sigma * sigma / (u * u))
    powered = sigma * sigma * (1.0 / s.n + 1.0 / c.n) <= u * u
    direction = "higher is better" if spec.higher_is_better else "lower is better"
    numbers = (
        f"ab {name} ({direction}): improvement {_g(imp)} (stable {s.mean:.4g}, candidate {c.mean:.4g}), "
        f"always-valid {1 - spec.alpha:.0%} CI [{_g(lo)}, {_g(hi)}], p {res.p_value:.3g}, "
        f"n {s.n}/{c.n} of {n_req} per arm for power {spec.power:.0%} at mde {spec.mde:.4g}"
    )
    verdict = dict(
        n_stable=s.n,
        n_candidate=c.n,
        n_required=n_req,
        improvement=imp,
        ci_low=lo,
        ci_high=hi,
        p_value=res.p_value,
    )
    if hi < 0:
        return ABVerdict(Outcome.FAIL, f"{numbers}: candidate significantly worse", **verdict)
    if not powered:
        return ABVerdict(Outcome.INCONCLUSIVE, f"{numbers}: not enough samples to conclude yet", **verdict)
    if spec.hypothesis == "superiority":
        if lo > 0:
            return ABVerdict(Outcome.PASS, f"{numbers}: candidate better", **verdict)
        why = "no winner: candidate not better by the mde" if hi < spec.mde else "no winner yet"
        return ABVerdict(Outcome.INCONCLUSIVE, f"{numbers}: {why}", **verdict)
    if lo > -spec.mde:
        return ABVerdict(Outcome.PASS, f"{numbers}: candidate not worse by more than the mde", **verdict)
    return ABVerdict(Outcome.INCONCLUSIVE, f"{numbers}: non-inferiority not shown yet", **verdict)


def evaluate_srm(
    spec: SrmCheck, arms: Arms | None, candidate_pct: float
) -> tuple[Outcome, str, float | None]:
    """Outcome, reason and p-value of the sample-ratio check on the arms' entity counts."""
    if arms is None:
        return Outcome.INCONCLUSIVE, "sample ratio: no arms observed", None
    ns, nc = arms.entities_stable, arms.entities_candidate
    split = f"{100 - candidate_pct:g}/{candidate_pct:g}"
    if ns + nc < spec.min_samples:
        return (
            Outcome.INCONCLUSIVE,
            f"sample ratio: {ns + nc} entities < min_samples {spec.min_samples}",
            None,
        )
    p = float(sequential_srm_p([ns, nc], [100 - candidate_pct, candidate_pct], spec.prior_strength))
    text = f"sample ratio: {ns} stable / {nc} candidate entities for a {split} split (always-valid p {p:.3g}"
    if p < spec.alpha:
        return Outcome.FAIL, f"{text} < {spec.alpha:g}): the split is not what was configured", p
    return Outcome.PASS, f"{text} >= {spec.alpha:g})", p
