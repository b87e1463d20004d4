"""Agreement statistics between two models scoring the same rows (champion/challenger replay).

Pure functions over arrays, plus a mergeable summary: each scoring partition condenses its
two score columns into an ``AgreementStats`` (moments, a fine score histogram per model,
the decision confusion counts and per-segment sums), partitions are merged in any order,
and ``agreement_report`` turns the total into the numbers a rollout gate reads. Nothing
here grows with the number of rows, so a replay of any size is summarised on the driver.

Vocabulary: ``a`` is the reference (the alias being scored, usually ``champion``), ``b``
the compared one (usually ``challenger``); differences are ``b - a``.

``calibration_error`` is the one definition of expected calibration error that training
metrics and rollout observations share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

PSI_EPSILON = 1e-4
"""Floor of a bucket's share in PSI, so an empty bucket costs a large but finite amount."""

# Fine histogram edges, uniform in logit space: a resolution of 0.01 in log-odds, so scores
# that crowd near 0 (fraud) or 1 still spread over many bins. Scores outside [0, 1]
# (never produced by a probability output) land in the first or last bin.
_LOGIT = np.linspace(-15.0, 15.0, 3001)
FINE_EDGES = 1.0 / (1.0 + np.exp(-_LOGIT))
FINE_BINS = len(FINE_EDGES) + 1


# --------------------------------------------------------------------------- array functions


def _as_float(x: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError("scores must be finite")
    return arr


def calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-frequency bins of the scores ``p``
    (ties kept in input order): the row-weighted mean of |mean score - positive rate|.
    NaN without rows."""
    n = y.size
    if n == 0:
        return math.nan
    order = np.argsort(p, kind="stable")
    k = min(bins, n)
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    sp = np.add.reduceat(p[order], starts)
    sy = np.add.reduceat(y[order].astype(np.float64), starts)
    return float(np.abs(sp - sy).sum() / n)


def psi_counts(expected: Sequence[float], actual: Sequence[float], eps: float = PSI_EPSILON) -> float:
    """Population stability index of two histograms over the same buckets.

    ``sum((q - p) * ln(q / p))`` over the buckets' shares ``p`` (expected) and ``q``
    (actual), each share floored at ``eps``. 0 for identical shares; by convention < 0.1 is
    stable, 0.1-0.25 a moderate shift, > 0.25 a major one.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1 or e.size == 0:
        raise ValueError("expected and actual must be non-empty histograms of the same buckets")
    if e.sum() <= 0 or a.sum() <= 0:
        raise ValueError("a histogram with no observations has no PSI")
    p = np.maximum(e / e.sum(), eps)
    q = np.maximum(a / a.sum(), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def quantile_edges(expected: Sequence[float] | np.ndarray, bins: int) -> np.ndarray:
    """Inner bucket edges at the quantiles of ``expected`` (duplicates dropped)."""
    if bins < 2:
        raise ValueError("PSI needs at least 2 buckets")
    e = _as_float(expected)
    if e.size == 0:
        raise ValueError("no expected values")
    return np.unique(np.quantile(e, np.linspace(0, 1, bins + 1)[1:-1]))


def psi(
    expected: Sequence[float], actual: Sequence[float], bins: int = 10, eps: float = PSI_EPSILON
) -> float:
    """PSI of ``actual`` against ``expected`` over ``bins`` quantile buckets of ``expected``."""
    e, a = _as_float(expected), _as_float(actual)
    if a.size == 0:
        raise ValueError("no actual values")
    edges = quantile_edges(e, bins)
    n = len(edges) + 1
    ce = np.bincount(np.searchsorted(edges, e, side="right"), minlength=n)
    ca = np.bincount(np.searchsorted(edges, a, side="right"), minlength=n)
    return psi_counts(ce, ca, eps)


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two ECDFs."""
    x, y = np.sort(_as_float(a)), np.sort(_as_float(b))
    if x.size == 0 or y.size == 0:
        raise ValueError("KS needs values on both sides")
    grid = np.concatenate([x, y])
    cx = np.searchsorted(x, grid, side="right") / x.size
    cy = np.searchsorted(y, grid, side="right") / y.size
    return float(np.max(np.abs(cx - cy)))


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of paired scores; NaN when either side is constant."""
    x, y = _as_float(a), _as_float(b)
    if x.size != y.size or x.size < 2:
        raise ValueError("correlation needs at least two pairs")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denom if denom > 0 else math.nan


def decision_agreement(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Share of rows on which two sets of decisions agree."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.size == 0:
        raise ValueError("decisions must be non-empty and paired")
    return float(np.mean(x == y))


# --------------------------------------------------------------------------- mergeable summary


def fine_histogram(scores: np.ndarray) -> np.ndarray:
    """Counts of ``scores`` in the ``FINE_EDGES`` bins."""
    return np.bincount(np.searchsorted(FINE_EDGES, _as_float(scores), side="right"), minlength=FINE_BINS)


@dataclass(frozen=True)
class SegmentStats:
    """Sums over the rows of one segment value (mergeable by addition)."""

    rows: int = 0
    sum_a: float = 0.0
    sum_b: float = 0.0
    positive_a: int = 0
    positive_b: int = 0
    agree: int = 0

    def __add__(self, other: SegmentStats) -> SegmentStats:
        return SegmentStats(
            self.rows + other.rows,
            self.sum_a + other.sum_a,
            self.sum_b + other.sum_b,
            self.positive_a + other.positive_a,
            self.positive_b + other.positive_b,
            self.agree + other.agree,
        )


@dataclass(frozen=True)
class AgreementStats:
    """Everything the agreement report needs, for any number of rows, in constant space.

    Moments are kept as means and centred sums of squares and products, merged with Chan's
    parallel formulas, so the correlation stays exact for billions of rows.
    """

    rows: int
    mean_a: float
    mean_b: float
    m2_a: float
    m2_b: float
    c_ab: float
    # decisions: [a and b, a only, b only, neither]
    confusion: tuple[int, int, int, int]
    hist_a: np.ndarray = field(repr=False)
    hist_b: np.ndarray = field(repr=False)
    segments: Mapping[tuple[str, str], SegmentStats] = field(default_factory=dict, repr=False)


def agreement_stats(
    a: np.ndarray,
    b: np.ndarray,
    threshold_a: float,
    threshold_b: float,
    segments: Mapping[str, Sequence[object]] | None = None,
) -> AgreementStats:
    """Summarise paired scores ``a``, ``b`` (decisions at each model's threshold).

    ``segments`` maps a column name to that column's values for the same rows; each
    distinct value becomes a segment ``(column, str(value))``.
    """
    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError("a and b must score the same rows")
    n = int(x.size)
    da, db = x >= threshold_a, y >= threshold_b
    confusion = (
        int(np.sum(da & db)),
        int(np.sum(da & ~db)),
        int(np.sum(~da & db)),
        int(np.sum(~da & ~db)),
    )
    if n:
        mx, my = float(x.mean()), float(y.mean())
        dx, dy = x - mx, y - my
        m2a, m2b, cab = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    else:
        mx = my = m2a = m2b = cab = 0.0
    segs: dict[tuple[str, str], SegmentStats] = {}
    agree = da == db
    for column, values in (segments or {}).items():
        codes, uniques = pd.factorize(pd.Series(np.asarray(values, dtype=object)), use_na_sentinel=False)
        k = len(uniques)
        rows = np.bincount(codes, minlength=k)
        sa = np.bincount(codes, weights=x, minlength=k)
        sb = np.bincount(codes, weights=y, minlength=k)
        pa_ = np.bincount(codes, weights=da, minlength=k)
        pb_ = np.bincount(codes, weights=db, minlength=k)
        ag = np.bincount(codes, weights=agree, minlength=k)
        for i, value in enumerate(uniques):
            segs[(column, str(value))] = SegmentStats(
                int(rows[i]), float(sa[i]), float(sb[i]), int(pa_[i]), int(pb_[i]), int(ag[i])
            )
    return AgreementStats(
        rows=n,
        mean_a=mx,
        mean_b=my,
        m2_a=m2a,
        m2_b=m2b,
        c_ab=cab,
        confusion=confusion,
        hist_a=fine_histogram(x),
        hist_b=fine_histogram(y),
        segments=segs,
    )


def merge_agreement(left: AgreementStats, right: AgreementStats) -> AgreementStats:
    """The summary of the rows of both (order does not matter)."""
    n1, n2 = left.rows, right.rows
    n = n1 + n2
    if n1 == 0:
        return right
    if n2 == 0:
        return left
    d_a, d_b = right.mean_a - left.mean_a, right.mean_b - left.mean_b
    w = n1 * n2 / n
    segs = dict(left.segments)
    for key, value in right.segments.items():
        segs[key] = segs[key] + value if key in segs else value
    return AgreementStats(
        rows=n,
        mean_a=left.mean_a + d_a * n2 / n,
        mean_b=left.mean_b + d_b * n2 / n,
        m2_a=left.m2_a + right.m2_a + d_a * d_a * w,
        m2_b=left.m2_b + right.m2_b + d_b * d_b * w,
        c_ab=left.c_ab + right.c_ab + d_a * d_b * w,
        confusion=tuple(x + y for x, y in zip(left.confusion, right.confusion, strict=True)),  # type: ignore[arg-type]
        hist_a=left.hist_a + right.hist_a,
        hist_b=left.hist_b + right.hist_b,
        segments=segs,
    )


def merge_all(stats: Sequence[AgreementStats]) -> AgreementStats:
    """All partition summaries merged into one."""
    if not stats:
        raise ValueError("nothing to merge")
    out = stats[0]
    for s in stats[1:]:
        out = merge_agreement(out, s)
    return out


def coarsen(reference: np.ndarray, other: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Group fine-histogram bins into about ``bins`` buckets of equal ``reference`` mass.

    The histogram analogue of quantile buckets: bucket boundaries fall on fine-bin edges
    where the reference's cumulative share crosses k / bins.
    """
    ref = np.asarray(reference, dtype=np.int64)
    oth = np.asarray(other, dtype=np.int64)
    total = ref.sum()
    if total <= 0:
        raise ValueError("the reference histogram is empty")
    cum = np.cumsum(ref)
    targets = total * np.arange(1, bins) / bins
    cuts = np.unique(np.searchsorted(cum, targets, side="left") + 1)
    cuts = cuts[(cuts > 0) & (cuts < len(ref))]
    return np.add.reduceat(ref, np.r_[0, cuts]), np.add.reduceat(oth, np.r_[0, cuts])


def histogram_ks(hist_a: np.ndarray, hist_b: np.ndarray) -> float:
    """The KS statistic measured at the fine-bin edges (exact to within one fine bin)."""
    ca = np.cumsum(hist_a) / max(int(np.sum(hist_a)), 1)
    cb = np.cumsum(hist_b) / max(int(np.sum(hist_b)), 1)
    return float(np.max(np.abs(ca - cb)))


@dataclass(frozen=True)
class SegmentDiff:
    """How the two models differ on one segment value."""

    column: str
    value: str
    rows: int
    mean_a: float
    mean_b: float
    mean_diff: float
    decision_rate_a: float
    decision_rate_b: float
    agreement: float


@dataclass(frozen=True)
class AgreementReport:
    """The offline comparison of two models on the same rows."""

    rows: int
    correlation: float
    decision_agreement: float
    psi: float
    ks: float
    mean_a: float
    mean_b: float
    decision_rate_a: float
    decision_rate_b: float
    segments: tuple[SegmentDiff, ...] = ()


def agreement_report(stats: AgreementStats, psi_bins: int = 10) -> AgreementReport:
    """Correlation, decision agreement, PSI and KS of ``b`` against ``a``, and per-segment diffs.

    Segments are ordered by the size of their mean score difference, largest first.
    """
    n = stats.rows
    if n == 0:
        raise ValueError("no rows were compared")
    denom = math.sqrt(stats.m2_a * stats.m2_b)
    correlation = stats.c_ab / denom if denom > 0 else math.nan
    both, a_only, b_only, neither = stats.confusion
    ra, rb = coarsen(stats.hist_a, stats.hist_b, psi_bins)
    segments = [
        SegmentDiff(
            column=col,
            value=val,
            rows=s.rows,
            mean_a=s.sum_a / s.rows,
            mean_b=s.sum_b / s.rows,
            mean_diff=(s.sum_b - s.sum_a) / s.rows,
            decision_rate_a=s.positive_a / s.rows,
            decision_rate_b=s.positive_b / s.rows,
            agreement=s.agree / s.rows,
        )
        for (col, val), s in stats.segments.items()
        if s.rows
    ]
    segments.sort(key=lambda d: (-abs(d.mean_diff), d.column, d.value))
    return AgreementReport(
        rows=n,
        correlation=correlation,
        decision_agreement=(both + neither) / n,
        psi=psi_counts(ra, rb),
        ks=histogram_ks(stats.hist_a, stats.hist_b),
        mean_a=stats.mean_a,
        mean_b=stats.mean_b,
        decision_rate_a=(both + a_only) / n,
        decision_rate_b=(both + b_only) / n,
        segments=tuple(segments),
    )
