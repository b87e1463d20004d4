"""Telemetry gate maths: what a stage of a rollout observed, and whether it passes.

Devices report, per update, whether the new model installed and passed its health check,
its single-row latency on the device, and a histogram of its predictions on the device's
own traffic over the bin edges the release carries. A stage is judged on its cohort only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlops.gates import CheckResult, GateResult, Outcome
from mlops.settings import OtaGates


def reference_distribution(p: np.ndarray, bins: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Quantile bin edges of the publisher's predictions (0 and 1 at the ends) and each bin's share."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    inner = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)[1:-1]))
    inner = inner[(inner > 0.0) & (inner < 1.0)]
    edges = np.concatenate([[0.0], inner, [1.0]])
    counts = histogram(p, tuple(edges))
    return tuple(float(e) for e in edges), tuple(float(c) / max(1, sum(counts)) for c in counts)


def histogram(p: np.ndarray, edges: Sequence[float]) -> list[int]:
    """Counts of ``p`` per bin ``[edges[i], edges[i+1])`` (the last bin includes 1)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    idx = np.clip(np.searchsorted(np.asarray(edges[1:-1]), p, side="right"), 0, len(edges) - 2)
    return np.bincount(idx, minlength=len(edges) - 1).astype(int).tolist()


def psi(expected: Sequence[float], observed_counts: Sequence[int], eps: float = 1e-4) -> float:
    """Population stability index of observed counts against expected shares."""
    total = sum(observed_counts)
    if total == 0:
        return math.nan
    e = np.clip(np.asarray(expected, dtype=np.float64), eps, None)
    o = np.clip(np.asarray(observed_counts, dtype=np.float64) / total, eps, None)
    return float(np.sum((o - e) * np.log(o / e)))


def psi_noise(bins: int, n: int, confidence: float = 0.999) -> float:
    """The PSI that sampling alone exceeds with probability ``1 - confidence``, for ``n`` predictions.

    For small deviations PSI ~ sum((o - e)^2 / e), so ``n * PSI`` is approximately
    chi-square with ``bins - 1`` degrees of freedom when nothing has shifted. A first cohort
    of two devices (128 predictions over 10 bins) reaches PSI 0.2 by chance alone, so the
    stage gate never fails a cohort on less evidence than that.
    """
    from scipy.stats import chi2

    return float(chi2.ppf(confidence, bins - 1) / max(n, 1))


@dataclass(frozen=True)
class StageObservation:
    """Telemetry of one stage's cohort for the release being rolled out."""

    stage_percent: float
    targeted: int  # devices in the cohort that needed the release
    reported: int  # ... that reported an outcome for it
    failed: int  # ... whose update failed (health check, bad download)
    serving: int  # ... now serving it
    latency_p99_ms: float | None  # p99 over the serving devices' own p99
    prediction_counts: tuple[int, ...] = ()

    @property
    def predictions(self) -> int:
        """How many predictions the cohort's histograms count in all."""
        return int(sum(self.prediction_counts))


def assess_stage(obs: StageObservation, reference: Sequence[float], gates: OtaGates) -> GateResult:
    """Reporting, failure rate, latency and prediction shift of one stage's cohort."""
    where = f"stage {obs.stage_percent:g}%"
    checks: list[CheckResult] = []
    if obs.targeted == 0:
        return GateResult(
            (CheckResult("reporting", Outcome.INCONCLUSIVE, f"{where}: no device in the cohort yet"),)
        )
    share = obs.reported / obs.targeted
    ok = share >= gates.min_reporting_fraction
    checks.append(
        CheckResult(
            "reporting",
            Outcome.PASS if ok else Outcome.INCONCLUSIVE,
            f"{where}: {obs.reported} of {obs.targeted} devices reported ({share:.0%}, min {gates.min_reporting_fraction:.0%})",
            share,
        )
    )
    if obs.reported:
        rate = obs.failed / obs.reported
        bad = rate > gates.max_failure_rate
        checks.append(
            CheckResult(
                "failure_rate",
                Outcome.FAIL if bad else Outcome.PASS,
                f"{where}: failure rate {rate:.1%} ({obs.failed} of {obs.reported} devices) {'>' if bad else '<='} max {gates.max_failure_rate:.1%}",
                rate,
            )
        )
    if obs.latency_p99_ms is None:
        checks.append(
            CheckResult("latency_p99_ms", Outcome.INCONCLUSIVE, f"{where}: no device serves the release yet")
        )
    else:
        bad = obs.latency_p99_ms > gates.max_latency_p99_ms
        checks.append(
            CheckResult(
                "latency_p99_ms",
                Outcome.FAIL if bad else Outcome.PASS,
                f"{where}: device p99 {obs.latency_p99_ms:.2f} ms {'>' if bad else '<='} max {gates.max_latency_p99_ms:g} ms",
                obs.latency_p99_ms,
            )
        )
    if obs.predictions < gates.min_predictions:
        checks.append(
            CheckResult(
                "prediction_psi",
                Outcome.INCONCLUSIVE,
                f"{where}: {obs.predictions} predictions reported, min {gates.min_predictions} to compare distributions",
            )
        )
    else:
        value = psi(reference, obs.prediction_counts)
        noise = psi_noise(len(reference), obs.predictions)
        limit = max(gates.max_prediction_psi, noise)
        bad = value > limit
        why = (
            f" (sampling noise alone reaches {noise:.3f} at this count)"
            if noise > gates.max_prediction_psi
            else ""
        )
        checks.append(
            CheckResult(
                "prediction_psi",
                Outcome.FAIL if bad else Outcome.PASS,
                f"{where}: prediction PSI {value:.3f} over {obs.predictions} predictions "
                f"{'>' if bad else '<='} max {gates.max_prediction_psi:g}{why}",
                value,
            )
        )
    return GateResult(tuple(checks))


SERVING_EVENTS = frozenset({"installed", "adopted", "restored"})
FAILED_EVENTS = frozenset({"health_failed", "rejected"})


def observe(
    events: Sequence[Mapping[str, Any]], cohort_ids: Sequence[str], version: int, percent: float
) -> StageObservation:
    """A stage's observation from the rollout's device events: the latest event of each cohort device.

    A refusal counts as a failed update: whether the bytes were bad on the way or the device
    refused them, the release did not reach that device.
    """
    members = set(cohort_ids)
    latest: dict[str, Mapping[str, Any]] = {}
    for e in events:
        if e.get("device_id") in members and e.get("release_version") == version:
            latest[e["device_id"]] = e
    serving = [e for e in latest.values() if e["event"] in SERVING_EVENTS]
    failed = sum(1 for e in latest.values() if e["event"] in FAILED_EVENTS)
    p99s = [float(e["latency_p99_ms"]) for e in serving if e.get("latency_p99_ms") is not None]
    counts: list[int] = []
    for e in serving:
        c = list(e.get("prediction_counts") or [])
        counts = c if not counts else [a + b for a, b in zip(counts, c, strict=True)]
    return StageObservation(
        stage_percent=percent,
        targeted=len(members),
        reported=len(latest),
        failed=failed,
        serving=len(serving),
        latency_p99_ms=float(np.percentile(p99s, 99)) if p99s else None,
        prediction_counts=tuple(counts),
    )
