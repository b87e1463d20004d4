"""Observations from the prediction log (mlops.rollout.observe): per variant, per pair, per arm."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlops import stats
from mlops.predlog import FEATURE_PREFIX
from mlops.rollout.observe import Reference, auc, calibration_error, observe, observe_replay
from mlops.rollout.simulator import SimulatedService, SimulatorConfig, TrafficSimulator, run_window
from mlops.routing import Mode, RouteTable

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _log(
    n: int,
    variant: str,
    version: int,
    *,
    seed: int,
    role: str = "primary",
    start: int = 0,
    errors: int = 0,
    shift: float = 0.0,
) -> pd.DataFrame:
    """``n`` prediction-log rows of one variant with known scores, latencies and features."""
    rng = np.random.default_rng(seed)
    score = np.clip(rng.beta(1, 8, n) + shift, 0, 1)
    status = np.full(n, 200)
    status[:errors] = 500
    return pd.DataFrame(
        {
            "request_id": [f"q{start + i}" for i in range(n)],
            "ts": [T0 + timedelta(seconds=i) for i in range(n)],
            "entity_key": [f"u{(start + i) % 37}" for i in range(n)],
            "variant": variant,
            "role": role,
            "mode": "canary",
            "model_name": "fraud",
            "model_version": version,
            "score": np.where(status == 200, score, np.nan),
            "decision": pd.array(np.where(status == 200, score >= 0.3, None), dtype="boolean"),
            "latency_ms": rng.gamma(4, 2.0, n),
            "status": status.astype(np.int32),
            "error": np.where(status == 200, None, "boom"),
            "features_hash": "h",
            FEATURE_PREFIX + "amount": rng.lognormal(3 + shift * 5, 0.5, n),
            FEATURE_PREFIX + "channel": rng.choice(["pos", "ecommerce"], n),
        }
    )


def _feedback(log: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    p = log["score"].fillna(0.1).to_numpy()
    return pd.DataFrame(
        {
            "request_id": log["request_id"],
            "label": (rng.random(len(log)) < p).astype(np.int64),
            "ts": log["ts"],
        }
    )


def _pairwise_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))


def _loop_ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Training's definition (``mlops.modeling.calibration_error``), written as a loop."""
    order = np.argsort(p, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, bins):
        if len(chunk):
            total += len(chunk) * abs(float(p[chunk].mean()) - float(y[chunk].mean()))
    return total / len(p)


def test_counts_errors_and_latency_of_the_pinned_versions_only() -> None:
    """Each variant counts its own answers, errors, entities and latency percentiles; rows
    of a version other than the pinned one are excluded and reported as foreign."""
    stable = _log(400, "stable", 3, seed=1)
    cand = _log(100, "candidate", 4, seed=2, start=1000, errors=7)
    stray = _log(30, "candidate", 9, seed=3, start=5000)
    obs = observe(pd.concat([stable, cand, stray], ignore_index=True), stable_version=3, candidate_version=4)
    assert (obs.stable.requests, obs.candidate.requests, obs.candidate.errors) == (400, 100, 7)
    assert obs.candidate.error_rate == pytest.approx(0.07)
    assert obs.foreign == (("candidate", 9, 30),)
    assert obs.stable.entities == 37 and obs.candidate.entities == 37
    p50, p95, p99 = np.percentile(cand["latency_ms"], (50, 95, 99))
    assert (
        obs.candidate.latency_p50_ms,
        obs.candidate.latency_p95_ms,
        obs.candidate.latency_p99_ms,
    ) == pytest.approx((p50, p95, p99))
    ok = cand["status"] == 200
    assert obs.candidate.decision_rate == pytest.approx(float(cand.loc[ok, "score"].ge(0.3).mean()))
    assert obs.metric("error_rate") == (pytest.approx(0.07), 100)
    assert obs.metric("latency_p99_ms", "stable")[1] == 400


def test_window_bounds_are_half_open() -> None:
    """Rows at ``since`` count, rows at ``until`` do not."""
    log = _log(100, "stable", 3, seed=1)
    obs = observe(
        log,
        stable_version=3,
        candidate_version=4,
        since=T0 + timedelta(seconds=10),
        until=T0 + timedelta(seconds=30),
    )
    assert obs.stable.requests == 20 and obs.candidate.requests == 0
    assert math.isnan(obs.candidate.latency_p99_ms) and obs.metric("latency_p99_ms") == (
        pytest.approx(math.nan, nan_ok=True),
        0,
    )


def test_quality_metrics_on_labelled_answers_match_their_definitions() -> None:
    """AUC, log loss and calibration error use the answers whose label arrived (the first
    label of a request counts: a later, different one never replaces it) and that did not
    fail, and equal their textbook values."""
    cand = _log(600, "candidate", 4, seed=5, errors=20)
    fb = _feedback(cand, seed=6).iloc[:500]  # the last 100 labels have not arrived
    flipped = fb.iloc[:10].assign(label=1 - fb["label"].iloc[:10])
    obs = observe(cand, pd.concat([fb, flipped], ignore_index=True), stable_version=3, candidate_version=4)
    labels = (
        pd.concat([fb, flipped]).drop_duplicates("request_id", keep="first").set_index("request_id")["label"]
    )
    rows = cand[(cand["status"] == 200) & cand["request_id"].isin(labels.index)]
    y = labels.loc[rows["request_id"]].to_numpy().astype(float)
    p = rows["score"].to_numpy()
    assert obs.candidate.labelled == 480 and obs.candidate.positives == int(y.sum())
    assert obs.candidate.auc == pytest.approx(_pairwise_auc(y, p))
    q = np.clip(p, 1e-7, 1 - 1e-7)
    assert obs.candidate.log_loss == pytest.approx(float(np.mean(-(y * np.log(q) + (1 - y) * np.log(1 - q)))))
    assert obs.candidate.calibration_error == pytest.approx(_loop_ece(y, p))
    assert obs.metric("auc") == (pytest.approx(obs.candidate.auc), 480)


def test_auc_handles_ties_and_single_class() -> None:
    """Tied scores count half; with one class only AUC is undefined (NaN), not 0.5."""
    assert auc(np.array([0, 1, 0, 1.0]), np.array([0.2, 0.2, 0.1, 0.9])) == pytest.approx(0.875)
    assert math.isnan(auc(np.zeros(5), np.linspace(0, 1, 5)))
    assert calibration_error(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == 0


def test_shadow_answers_are_paired_with_the_primary_answer_to_the_same_request() -> None:
    """Agreement and score correlation use the requests answered by both (shadow rows
    joined on request id); failed answers and unmatched shadow rows are left out."""
    primary = _log(300, "stable", 3, seed=7)
    shadow = _log(200, "candidate", 4, seed=8, role="shadow", start=150, errors=5)  # ids q150..q349
    obs = observe(pd.concat([primary, shadow], ignore_index=True), stable_version=3, candidate_version=4)
    both = primary.merge(shadow, on="request_id", suffixes=("_s", "_c"))
    both = both[(both["status_c"] == 200)]
    assert obs.pairs.pairs == len(both) == 145
    assert obs.pairs.agreement == pytest.approx(
        stats.decision_agreement(both["decision_s"].astype(bool), both["decision_c"].astype(bool))
    )
    assert obs.pairs.score_correlation == pytest.approx(stats.pearson(both["score_s"], both["score_c"]))
    assert obs.metric("agreement")[1] == 145


def test_ab_arms_hold_the_primary_metric_per_request_and_entities_per_arm() -> None:
    """The A/B arms condense each primary answer's metric (here per-request log loss on
    labelled answers) into n/mean/variance, and count distinct entities per arm."""
    stable = _log(300, "stable", 3, seed=9)
    cand = _log(200, "candidate", 4, seed=10, start=300)
    log = pd.concat([stable, cand], ignore_index=True)
    fb = _feedback(log, seed=11)
    obs = observe(log, fb, stable_version=3, candidate_version=4, ab_metric="log_loss")
    y = fb.set_index("request_id").loc[cand["request_id"], "label"].to_numpy()
    q = np.clip(cand["score"].to_numpy(), 1e-7, 1 - 1e-7)
    losses = -(y * np.log(q) + (1 - y) * np.log(1 - q))
    assert obs.ab is not None and obs.ab.candidate.n == 200
    assert obs.ab.candidate.mean == pytest.approx(losses.mean()) and obs.ab.candidate.var == pytest.approx(
        losses.var(ddof=1)
    )
    assert (obs.ab.entities_stable, obs.ab.entities_candidate) == (37, 37)
    lat = observe(log, stable_version=3, candidate_version=4, ab_metric="latency_ms").ab
    assert lat.stable.n == 300 and lat.stable.mean == pytest.approx(stable["latency_ms"].mean())
    acc = observe(log, fb, stable_version=3, candidate_version=4, ab_metric="accuracy").ab
    assert 0 <= acc.candidate.mean <= 1


def test_drift_against_the_reference_scores_and_inputs() -> None:
    """Traffic like the training data has PSI near 0; shifted scores and inputs have a
    large PSI and KS, and the worst feature is named. A reference survives JSON."""
    train = _log(5000, "stable", 3, seed=12)
    ref = Reference.build(
        train["score"].to_numpy(),
        train.rename(columns=lambda c: c.removeprefix(FEATURE_PREFIX)),
        numeric=["amount"],
        categorical=["channel"],
    )
    same = _log(3000, "stable", 3, seed=13)
    drifted = _log(3000, "candidate", 4, seed=14, start=10_000, shift=0.3)
    drifted[FEATURE_PREFIX + "channel"] = np.where(
        np.arange(3000) % 3 == 0, "atm", drifted[FEATURE_PREFIX + "channel"]
    )
    log = pd.concat([same, drifted], ignore_index=True)
    obs = observe(log, stable_version=3, candidate_version=4, references={"stable": ref, "candidate": ref})
    assert obs.stable.score_psi < 0.05 and obs.stable.input_psi < 0.05
    assert obs.candidate.score_psi > 0.25 and obs.candidate.score_ks > 0.3
    assert obs.candidate.input_psi > 0.25 and obs.candidate.input_psi_feature in ("amount", "channel")
    assert obs.candidate.input_ks_feature == "amount"  # categorical features have no KS
    assert obs.candidate.score_ks == pytest.approx(
        stats.ks_statistic(train["score"], drifted["score"]), abs=0.01
    )
    again = Reference.from_dict(json.loads(json.dumps(ref.to_dict())))
    obs2 = observe(
        log, stable_version=3, candidate_version=4, references={"stable": again, "candidate": again}
    )
    assert obs2 == obs


def test_replay_observations_compare_both_models_on_the_same_rows() -> None:
    """The offline comparison gives each model's quality on the labelled rows and their
    agreement at their decision thresholds."""
    rng = np.random.default_rng(15)
    y = (rng.random(2000) < 0.1).astype(float)
    s = np.clip(0.1 + 0.5 * y + rng.normal(0, 0.15, 2000), 0, 1)
    c = np.clip(s + rng.normal(0, 0.05, 2000), 0, 1)
    obs = observe_replay(s, c, y, stable_version=3, candidate_version=4, thresholds=(0.4, 0.4))
    assert obs.source == "replay" and obs.pairs.pairs == 2000
    assert obs.pairs.agreement == pytest.approx(float(np.mean((s >= 0.4) == (c >= 0.4))))
    assert obs.stable.auc == pytest.approx(_pairwise_auc(y, s)) and obs.candidate.labelled == 2000
    with pytest.raises(ValueError, match="same rows"):
        observe_replay(s, c[:10], stable_version=3, candidate_version=4)


def test_arrow_backed_frames_read_from_parquet_give_the_same_observations(tmp_path: Path) -> None:
    """The flow reads the log from Parquet (arrow strings, nullable booleans); observing
    that frame gives exactly what observing the in-memory one does."""
    cfg = SimulatorConfig(seed=2, rate_per_s=100)
    sim = TrafficSimulator(cfg, T0)
    service = SimulatedService(cfg, model_name="fraud", stable_version=3, candidate_version=4)
    service.apply(RouteTable(mode=Mode.SHADOW, mirror_pct=50, salt="r"), 3, 4)
    log, fb = run_window(sim, service, 30, 5)
    log.to_parquet(tmp_path / "log.parquet", index=False)
    read = pd.read_parquet(tmp_path / "log.parquet")
    kw = dict(stable_version=3, candidate_version=4, ab_metric="brier")
    assert observe(read, fb, **kw) == observe(log, fb, **kw)
    assert observe(read, fb, **kw).pairs.pairs > 1000
