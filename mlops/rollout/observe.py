"""Observations: what the gates read, computed from a window of the prediction log.

Pure and vectorised (it runs every tick over up to ~1e6 rows): the orchestrator reads the
prediction-log rows of the current step's window and the feedback that has arrived, hands
them over as pandas frames with the ``mlops.predlog`` columns, and gets back one
``Observations`` per tick:

- per variant (``stable``, ``candidate``): answers, errors, distinct entities, latency
  p50/p95/p99, decision rate; AUC, log loss and calibration error on answers whose label
  has arrived; score PSI/KS against the model's reference scores and the largest input
  PSI/KS of any feature against the training data;
- paired answers (a shadow answer and the primary answer to the same ``request_id``, or
  both models on the same replay row): decision agreement and score correlation;
- for the A/B step, the per-request values of the primary metric, condensed to each arm's
  sufficient statistics, and each arm's distinct entities for the SRM check;
- for the bandit step, each arm's rewards (one per labelled primary answer, e.g. 1 when the
  decision matched the label, or minus the answer's log loss) as sufficient statistics.
  Answers whose variant was forced by the caller (a ``forced`` column, when the log has one)
  are left out: they were not allocated by the bandit.

Evidence never leaks between versions: rows are kept only when their ``model_version`` is
the version pinned for their variant; rows of any other version are counted in
``foreign`` and otherwise ignored. Nor is it steered by callers: rows marked ``forced``
(the caller chose the variant instead of the router) are counted in ``forced`` and
otherwise ignored, so forcing traffic onto a variant and labelling it changes no gate and
no A/B arm. A request's first label is the one that counts. Drift statistics reuse ``mlops.stats`` (fine histograms,
``coarsen`` into equal-mass buckets, ``psi_counts``, ``histogram_ks``), so a reference is a
few hundred counts per feature, not a copy of the training data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pandas as pd

from mlops import stats
from mlops.predlog import FEATURE_PREFIX, PRIMARY, SHADOW
from mlops.rollout.abtest import Arm, Arms
from mlops.rollout.bandit import ArmStats
from mlops.rollout.plan import METRICS
from mlops.stats import calibration_error

STABLE, CANDIDATE = "stable", "candidate"
LOSS_CLIP = 1e-7
"""Scores are clipped to ``[1e-7, 1 - 1e-7]`` for log loss, as in training's evaluation."""
REFERENCE_FINE_BINS = 100
NAN = math.nan

# --------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class FeatureReference:
    """One input feature's training distribution, as counts over fixed buckets.

    Numeric: ``edges`` are the inner edges of ``REFERENCE_FINE_BINS`` equal-mass buckets of
    the training values. Categorical: ``categories``, with one extra bucket for values the
    training data never had. ``counts`` has one entry per bucket.
    """

    name: str
    counts: tuple[int, ...]
    edges: tuple[float, ...] | None = None
    categories: tuple[str, ...] | None = None

    def histogram(self, values: np.ndarray | pd.Series) -> np.ndarray:
        """Counts of ``values`` over this feature's buckets (missing values are skipped)."""
        if self.categories is not None:
            seen = pd.Series(values).value_counts(dropna=True)
            known = seen.reindex(list(self.categories), fill_value=0).to_numpy(dtype=np.int64)
            return np.append(known, int(seen.sum()) - int(known.sum()))
        x = np.asarray(values, dtype=np.float64)
        x = x[np.isfinite(x)]
        return np.bincount(
            np.searchsorted(np.asarray(self.edges), x, side="right"), minlength=len(self.counts)
        )


@dataclass(frozen=True)
class Reference:
    """What a variant's live traffic is compared with: its model's scores on the
    evaluation data (a ``stats.FINE_EDGES`` histogram) and the training inputs."""

    score_counts: np.ndarray | None = field(default=None, repr=False)
    features: tuple[FeatureReference, ...] = ()

    @classmethod
    def build(
        cls,
        scores: np.ndarray | None = None,
        frame: pd.DataFrame | None = None,
        numeric: Sequence[str] = (),
        categorical: Sequence[str] = (),
    ) -> Reference:
        """Condense reference scores and training columns into bucket counts."""
        feats: list[FeatureReference] = []
        if frame is not None:
            for name in numeric:
                x = frame[name].to_numpy(dtype=np.float64)
                edges = stats.quantile_edges(x[np.isfinite(x)], REFERENCE_FINE_BINS)
                ref = FeatureReference(name, (), edges=tuple(float(e) for e in edges))
                feats.append(FeatureReference(name, tuple(int(c) for c in ref.histogram(x)), edges=ref.edges))
            for name in categorical:
                values = frame[name].to_numpy(dtype=object)
                cats = tuple(sorted(str(v) for v in pd.unique(values[pd.notna(values)])))
                ref = FeatureReference(name, (0,) * (len(cats) + 1), categories=cats)
                feats.append(
                    FeatureReference(name, tuple(int(c) for c in ref.histogram(values)), categories=cats)
                )
        hist = stats.fine_histogram(np.asarray(scores)) if scores is not None else None
        return cls(score_counts=hist, features=tuple(feats))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (to store next to the model, e.g. as an MLflow artifact)."""
        return {
            "score_counts": None if self.score_counts is None else [int(c) for c in self.score_counts],
            "features": [
                {
                    "name": f.name,
                    "counts": list(f.counts),
                    "edges": None if f.edges is None else list(f.edges),
                    "categories": None if f.categories is None else list(f.categories),
                }
                for f in self.features
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reference:
        """A reference from its ``to_dict`` data."""
        counts = data.get("score_counts")
        feats = tuple(
            FeatureReference(
                f["name"],
                tuple(int(c) for c in f["counts"]),
                edges=None if f.get("edges") is None else tuple(float(e) for e in f["edges"]),
                categories=None if f.get("categories") is None else tuple(f["categories"]),
            )
            for f in data.get("features", ())
        )
        return cls(
            score_counts=None if counts is None else np.asarray(counts, dtype=np.int64), features=feats
        )


def _psi_ks(ref_counts: np.ndarray, counts: np.ndarray, bins: int, ordered: bool) -> tuple[float, float]:
    ref = np.asarray(ref_counts, dtype=np.int64)
    if ref.sum() <= 0 or counts.sum() <= 0:
        return NAN, NAN
    if ordered:
        r, c = stats.coarsen(ref, counts, bins)
        return stats.psi_counts(r, c), stats.histogram_ks(ref, counts)
    return stats.psi_counts(ref, counts), NAN


# --------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class VariantStats:
    """One variant's answers in the window (only rows of its pinned ``version``)."""

    version: int | None = None
    requests: int = 0
    errors: int = 0
    entities: int = 0
    latency_p50_ms: float = NAN
    latency_p95_ms: float = NAN
    latency_p99_ms: float = NAN
    decision_rate: float = NAN
    labelled: int = 0
    positives: int = 0
    auc: float = NAN
    log_loss: float = NAN
    calibration_error: float = NAN
    score_psi: float = NAN
    score_ks: float = NAN
    input_psi: float = NAN
    input_ks: float = NAN
    input_psi_feature: str | None = None
    input_ks_feature: str | None = None

    @property
    def ok(self) -> int:
        """Answers without an error."""
        return self.requests - self.errors

    @property
    def error_rate(self) -> float:
        """Share of answers that were errors (NaN without answers)."""
        return self.errors / self.requests if self.requests else NAN

    def metric(self, name: str) -> tuple[float, int]:
        """A metric's value and the number of samples behind it."""
        kind = METRICS[name][0]
        value = float(getattr(self, name))
        if kind == "labelled":
            return value, self.labelled
        if name in ("decision_rate", "score_psi", "score_ks"):
            return value, self.ok
        return value, self.requests


@dataclass(frozen=True)
class PairStats:
    """Both models' answers to the same requests (shadow) or rows (replay)."""

    pairs: int = 0
    agreement: float = NAN
    score_correlation: float = NAN
    mean_abs_diff: float = NAN

    def metric(self, name: str) -> tuple[float, int]:
        """A paired metric's value and the pairs it rests on."""
        return float(getattr(self, name)), self.pairs


@dataclass(frozen=True)
class Observations:
    """Everything the gates of one tick read.

    ``since``/``until`` bound the window of log rows (``source='log'``); a replay carries
    none. ``foreign`` lists ``(variant, version, rows)`` excluded because the version is not
    the one pinned for the variant; ``forced`` counts the rows excluded because the caller
    chose their variant.
    """

    source: Literal["log", "replay"] = "log"
    since: datetime | None = None
    until: datetime | None = None
    stable: VariantStats = VariantStats()
    candidate: VariantStats = VariantStats()
    pairs: PairStats = PairStats()
    ab: Arms | None = None
    foreign: tuple[tuple[str, int, int], ...] = ()
    forced: int = 0
    rewards: tuple[ArmStats, ArmStats] | None = None  # the bandit's (stable, candidate) rewards

    def variant(self, name: str) -> VariantStats:
        """The statistics of variant ``name`` (``stable`` or ``candidate``)."""
        return self.stable if name == STABLE else self.candidate

    def metric(self, name: str, variant: str = CANDIDATE) -> tuple[float, int]:
        """``(value, samples)`` of a plan metric for a variant (paired metrics ignore it)."""
        if METRICS[name][0] == "pairs":
            return self.pairs.metric(name)
        return self.variant(variant).metric(name)


# --------------------------------------------------------------------------- metric kernels


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC: the chance a positive outscores a negative (ties count half); NaN unless
    both classes are present."""
    pos = float(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        return NAN
    values, inverse = np.unique(p, return_inverse=True)
    total = np.bincount(inverse, minlength=values.size)
    positives = np.bincount(inverse, weights=y, minlength=values.size)
    negatives = total - positives
    below = np.cumsum(negatives) - negatives
    return float(np.sum(positives * (below + 0.5 * negatives)) / (pos * neg))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean log loss of scores ``p`` against labels ``y`` (NaN without rows)."""
    return float(np.mean(row_log_loss(y, p))) if y.size else NAN


def row_log_loss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Each row's log loss, scores clipped away from 0 and 1."""
    q = np.clip(p, LOSS_CLIP, 1.0 - LOSS_CLIP)
    return -(y * np.log(q) + (1.0 - y) * np.log1p(-q))


def _percentiles(x: np.ndarray) -> tuple[float, float, float]:
    if x.size == 0:
        return NAN, NAN, NAN
    p50, p95, p99 = np.percentile(x, (50, 95, 99))
    return float(p50), float(p95), float(p99)


def _floats(values: pd.Series) -> np.ndarray:
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _entities(keys: pd.Series) -> int:
    """Distinct entity keys; a row without one was split by request id, so counts alone."""
    return int(keys.nunique(dropna=True) + keys.isna().sum())


@dataclass(frozen=True)
class _Rows:
    """One variant's rows: numeric columns as arrays, string columns as (arrow) Series."""

    latency: np.ndarray | None
    ok: np.ndarray
    score: np.ndarray
    decision: np.ndarray
    label: np.ndarray
    entities: int
    features: Mapping[str, np.ndarray | pd.Series]


def _variant_stats(version: int | None, rows: _Rows, ref: Reference | None, psi_bins: int) -> VariantStats:
    n = int(rows.ok.size)
    if n == 0:
        return VariantStats(version=version)
    ok = rows.ok
    p50, p95, p99 = _percentiles(rows.latency) if rows.latency is not None else (NAN, NAN, NAN)
    dec = rows.decision[ok]
    dec = dec[np.isfinite(dec)]
    lab = ok & np.isfinite(rows.label)
    y, p = rows.label[lab], rows.score[lab]
    out: dict[str, Any] = dict(
        version=version,
        requests=n,
        errors=int(n - ok.sum()),
        entities=rows.entities,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
        decision_rate=float(dec.mean()) if dec.size else NAN,
        labelled=int(y.size),
        positives=int(y.sum()),
        auc=auc(y, p),
        log_loss=log_loss(y, p),
        calibration_error=calibration_error(y, p),
    )
    if ref is not None:
        if ref.score_counts is not None and ok.any():
            out["score_psi"], out["score_ks"] = _psi_ks(
                ref.score_counts, stats.fine_histogram(rows.score[ok]), psi_bins, True
            )
        worst_psi: tuple[float, str | None] = (NAN, None)
        worst_ks: tuple[float, str | None] = (NAN, None)
        for f in ref.features:
            values = rows.features.get(f.name)
            if values is None:
                continue
            psi, ks = _psi_ks(np.asarray(f.counts), f.histogram(values), psi_bins, f.categories is None)
            if math.isfinite(psi) and not psi <= worst_psi[0]:
                worst_psi = (psi, f.name)
            if math.isfinite(ks) and not ks <= worst_ks[0]:
                worst_ks = (ks, f.name)
        out["input_psi"], out["input_psi_feature"] = worst_psi
        out["input_ks"], out["input_ks_feature"] = worst_ks
    return VariantStats(**out)


def per_request_metric(metric: str, rows: _Rows) -> np.ndarray:
    """The A/B primary metric's value for each request it is defined on."""
    if metric == "latency_ms":
        return rows.latency if rows.latency is not None else np.empty(0)
    lab = rows.ok & np.isfinite(rows.label)
    y, p = rows.label[lab], rows.score[lab]
    if metric == "log_loss":
        return row_log_loss(y, p)
    if metric == "brier":
        return (p - y) ** 2
    if metric == "accuracy":
        d = rows.decision[lab]
        keep = np.isfinite(d)
        return (d[keep] == y[keep]).astype(np.float64)
    raise ValueError(f"unknown A/B metric {metric!r}")


def per_request_reward(reward: str, rows: _Rows) -> np.ndarray:
    """The bandit's reward for each labelled answer: ``correct`` (1.0 when the decision
    matched the label), ``neg_log_loss`` or ``neg_brier`` (higher is better)."""
    if reward == "correct":
        return per_request_metric("accuracy", rows)
    if reward == "neg_log_loss":
        return -per_request_metric("log_loss", rows)
    if reward == "neg_brier":
        return -per_request_metric("brier", rows)
    raise ValueError(f"unknown bandit reward {reward!r}")


# --------------------------------------------------------------------------- entry points


class _Log:
    """The window's log rows of the pinned versions, read column by column on demand.

    Request ids (of the rows and of the feedback) are factorised once into shared integer
    codes; labels and shadow/primary pairs are then joined by array indexing.
    """

    def __init__(self, frame: pd.DataFrame, feedback: pd.DataFrame | None) -> None:
        self.frame = frame
        n = len(frame)
        fb = feedback if feedback is not None and not feedback.empty else None
        ids = (
            frame["request_id"]
            if fb is None
            else pd.concat([frame["request_id"], fb["request_id"]], ignore_index=True)
        )
        codes, uniques = pd.factorize(ids)
        self.codes = codes[:n]
        self.label = np.full(n, np.nan)
        if fb is not None:
            by_code = np.full(len(uniques), np.nan)
            fb_codes, fb_labels = codes[n:], fb["label"].to_numpy(dtype=np.float64)
            first, at = np.unique(fb_codes, return_index=True)  # a request's first label
            by_code[first] = fb_labels[at]
            self.label = by_code[self.codes]
        self.n_codes = len(uniques)
        self.score = _floats(frame["score"])
        self.ok = (frame["status"].to_numpy() == 200) & np.isfinite(self.score)
        self.latency = _floats(frame["latency_ms"])
        self.decision = _floats(frame["decision"])

    def rows(self, idx: np.ndarray, feature_names: Sequence[str]) -> _Rows:
        f = self.frame
        feats: dict[str, np.ndarray | pd.Series] = {}
        for name in feature_names:
            col = FEATURE_PREFIX + name
            if col in f:
                values = f[col]
                feats[name] = (
                    values.to_numpy()[idx] if pd.api.types.is_numeric_dtype(values) else values.iloc[idx]
                )
        return _Rows(
            latency=self.latency[idx],
            ok=self.ok[idx],
            score=self.score[idx],
            decision=self.decision[idx],
            label=self.label[idx],
            entities=_entities(f["entity_key"].iloc[idx]),
            features=feats,
        )

    def pairs(self, primary: np.ndarray, shadow: np.ndarray) -> PairStats:
        """Shadow answers paired with the primary answer to the same request."""
        where = np.full(self.n_codes, -1, dtype=np.int64)
        where[self.codes[primary]] = primary
        match = where[self.codes[shadow]]
        found = match >= 0
        p_idx, s_idx = match[found], shadow[found]
        ok = self.ok[p_idx] & self.ok[s_idx]
        p_idx, s_idx = p_idx[ok], s_idx[ok]
        return _paired(self.score[p_idx], self.score[s_idx], self.decision[p_idx], self.decision[s_idx])


def observe(
    log: pd.DataFrame,
    feedback: pd.DataFrame | None = None,
    *,
    stable_version: int | None,
    candidate_version: int | None,
    since: datetime | None = None,
    until: datetime | None = None,
    references: Mapping[str, Reference] | None = None,
    ab_metric: str | None = None,
    reward: str | None = None,
    psi_bins: int = 10,
) -> Observations:
    """Observations of one tick from prediction-log rows and feedback rows.

    ``log`` has the ``mlops.predlog`` columns (feature columns and ``forced`` optional); rows
    outside ``[since, until)`` and ``forced`` rows are dropped. ``feedback`` has
    ``request_id`` and ``label``, oldest first (the first label of a request counts). ``references`` maps ``stable``/``candidate`` to the reference
    of that variant's model; without one, its drift metrics are NaN. ``ab_metric`` names
    the A/B primary metric whose per-request values to condense into ``Observations.ab``;
    ``reward`` the bandit reward to condense into ``Observations.rewards`` (forced answers
    excluded).
    """
    keep = np.ones(len(log), dtype=bool)
    if since is not None:
        keep &= (log["ts"] >= pd.Timestamp(since)).to_numpy()
    if until is not None:
        keep &= (log["ts"] < pd.Timestamp(until)).to_numpy()
    n_forced = 0
    if "forced" in log:
        forced = log["forced"].to_numpy(dtype=bool, na_value=False) & keep
        n_forced = int(forced.sum())
        keep &= ~forced
    version = log["model_version"].to_numpy()
    pinned = {STABLE: stable_version, CANDIDATE: candidate_version}
    is_variant = {v: (log["variant"] == v).to_numpy(dtype=bool, na_value=False) for v in (STABLE, CANDIDATE)}
    mine = {v: keep & is_variant[v] & (version == pinned[v]) for v in (STABLE, CANDIDATE)}
    foreign_mask = keep & ~(mine[STABLE] | mine[CANDIDATE])
    foreign: tuple[tuple[str, int, int], ...] = ()
    if foreign_mask.any():
        counts = log[foreign_mask].groupby(["variant", "model_version"]).size()
        foreign = tuple((str(v), int(ver), int(n)) for (v, ver), n in counts.items())
    frame = log[mine[STABLE] | mine[CANDIDATE]] if not (mine[STABLE] | mine[CANDIDATE]).all() else log
    window = _Log(frame, feedback)
    refs = references or {}
    feature_names = sorted({f.name for r in refs.values() for f in r.features})
    idx = {
        v: np.flatnonzero((frame["variant"] == v).to_numpy(dtype=bool, na_value=False))
        for v in (STABLE, CANDIDATE)
    }
    parts = {v: window.rows(idx[v], feature_names if v in refs else ()) for v in (STABLE, CANDIDATE)}
    variants = {v: _variant_stats(pinned[v], parts[v], refs.get(v), psi_bins) for v in (STABLE, CANDIDATE)}

    is_primary = (frame["role"] == PRIMARY).to_numpy(dtype=bool, na_value=False)
    is_shadow = (frame["role"] == SHADOW).to_numpy(dtype=bool, na_value=False)
    shadow = idx[CANDIDATE][is_shadow[idx[CANDIDATE]]]
    pairs = window.pairs(idx[STABLE][is_primary[idx[STABLE]]], shadow) if shadow.size else PairStats()
    ab = None
    if ab_metric is not None:
        arms = {}
        for v in (STABLE, CANDIDATE):
            rows = window.rows(idx[v][is_primary[idx[v]]], ())
            arms[v] = (Arm.of(per_request_metric(ab_metric, rows)), rows.entities)
        ab = Arms(ab_metric, arms[STABLE][0], arms[CANDIDATE][0], arms[STABLE][1], arms[CANDIDATE][1])
    rewards = None
    if reward is not None:  # forced rows are already out of the window
        per_arm = [
            ArmStats.of(per_request_reward(reward, window.rows(idx[v][is_primary[idx[v]]], ())))
            for v in (STABLE, CANDIDATE)
        ]
        rewards = (per_arm[0], per_arm[1])
    return Observations(
        source="log",
        since=since,
        until=until,
        stable=variants[STABLE],
        candidate=variants[CANDIDATE],
        pairs=pairs,
        ab=ab,
        foreign=foreign,
        rewards=rewards,
        forced=n_forced,
    )


def _paired(s: np.ndarray, c: np.ndarray, ds: np.ndarray, dc: np.ndarray) -> PairStats:
    n = int(s.size)
    if n == 0:
        return PairStats()
    both = np.isfinite(ds) & np.isfinite(dc)
    agree = stats.decision_agreement(ds[both] > 0.5, dc[both] > 0.5) if both.any() else NAN
    corr = stats.pearson(s, c) if n >= 2 else NAN
    return PairStats(
        pairs=n, agreement=agree, score_correlation=corr, mean_abs_diff=float(np.mean(np.abs(s - c)))
    )


def observe_replay(
    stable_scores: np.ndarray,
    candidate_scores: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    stable_version: int | None,
    candidate_version: int | None,
    thresholds: tuple[float, float] = (0.5, 0.5),
    frame: pd.DataFrame | None = None,
    references: Mapping[str, Reference] | None = None,
    psi_bins: int = 10,
) -> Observations:
    """Observations of the replay step: both models scored the same (labelled) rows offline.

    ``thresholds`` are the decision thresholds of stable and candidate; ``frame`` holds the
    rows' feature columns (by feature name) when input drift is checked.
    """
    s = np.asarray(stable_scores, dtype=np.float64)
    c = np.asarray(candidate_scores, dtype=np.float64)
    if s.shape != c.shape:
        raise ValueError("both models must score the same rows")
    y = np.full(s.size, np.nan) if labels is None else np.asarray(labels, dtype=np.float64)
    refs = references or {}
    names = sorted({f.name for r in refs.values() for f in r.features})
    feats = {n: frame[n].to_numpy() for n in names} if frame is not None else {}
    out = {}
    for v, scores, thr in ((STABLE, s, thresholds[0]), (CANDIDATE, c, thresholds[1])):
        rows = _Rows(
            latency=None,
            ok=np.isfinite(scores),
            score=scores,
            decision=(scores >= thr).astype(np.float64),
            label=y,
            entities=0,
            features=feats,
        )
        out[v] = _variant_stats(
            stable_version if v == STABLE else candidate_version, rows, refs.get(v), psi_bins
        )
    ok = np.isfinite(s) & np.isfinite(c)
    pairs = _paired(
        s[ok], c[ok], (s[ok] >= thresholds[0]).astype(float), (c[ok] >= thresholds[1]).astype(float)
    )
    return Observations(source="replay", stable=out[STABLE], candidate=out[CANDIDATE], pairs=pairs)
