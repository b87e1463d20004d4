"""One tick's measurements of a step's checks: observations in, outcomes with numbers out.

Pure. ``measure_step`` evaluates every check of a step (plus, for steps that route traffic
to the candidate, the implicit ``candidate_traffic`` check, and for the A/B step the
sample-ratio and primary checks) into ``Measurement``s. Counting them against their limits,
and deciding what a tripped check does, is the state machine's job (``machine``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlops.gates import CheckResult, Outcome
from mlops.rollout.abtest import ABVerdict, evaluate_primary, evaluate_srm
from mlops.rollout.observe import CANDIDATE, STABLE, Observations
from mlops.rollout.plan import (
    METRICS,
    ABStep,
    BlueGreenStep,
    CanaryStep,
    GateLimits,
    MetricCheck,
    ShadowStep,
    Step,
)

TRAFFIC_CHECK = "candidate_traffic"


@dataclass(frozen=True)
class Measurement:
    """A check's outcome at one tick (``result``), the limits it is counted against, and
    the numbers behind it: the candidate's and stable's values, the value compared with
    the threshold range (``result.value``: the candidate's own value, or the ratio or
    difference with stable) and the samples it rests on."""

    result: CheckResult
    limits: GateLimits
    metric: str
    samples: int = 0
    candidate: float | None = None
    stable: float | None = None
    min: float | None = None
    max: float | None = None
    ab: ABVerdict | None = None

    @property
    def key(self) -> str:
        """The check's name (its counters are kept under it)."""
        return self.result.metric

    @property
    def outcome(self) -> Outcome:
        """The check's outcome at this tick."""
        return self.result.outcome


def fmt(metric: str, x: float) -> str:
    """A metric value the way reasons print it (latency in ms, the rest to 4 digits)."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.1f}ms" if metric.endswith("_ms") else f"{x:.4g}"


def _samples(kind: str, variant: str) -> str:
    return {
        "requests": f"{variant} requests",
        "labelled": f"labelled {variant} answers",
        "pairs": "paired answers",
    }[kind]


def evaluate_check(check: MetricCheck, obs: Observations) -> Measurement:
    """One metric check against the candidate's (or candidate-vs-stable) value."""
    key, metric = check.key, check.metric
    kind = METRICS[metric][0]
    base = dict(limits=check, metric=metric, min=check.min, max=check.max)

    def out(outcome: Outcome, reason: str, value: float | None = None, **kw: object) -> Measurement:
        return Measurement(CheckResult(key, outcome, f"{key}: {reason}", value), **base, **kw)  # type: ignore[arg-type]

    value, n = obs.metric(metric, CANDIDATE)
    if n < check.min_samples:
        return out(
            Outcome.INCONCLUSIVE,
            f"{n} {_samples(kind, CANDIDATE)} < min_samples {check.min_samples}",
            samples=n,
        )
    if check.min_positives:
        sides = (CANDIDATE, STABLE) if check.relative_to_stable else (CANDIDATE,)
        for side in sides:
            v = obs.variant(side)
            fewest = min(v.positives, v.labelled - v.positives)
            if fewest < check.min_positives:
                return out(
                    Outcome.INCONCLUSIVE,
                    f"{v.positives} positive / {v.labelled - v.positives} negative "
                    f"{side} labels < min_positives {check.min_positives}",
                    samples=n,
                )
    if not math.isfinite(value):
        if kind == "labelled":
            pos = obs.candidate.positives
            return out(Outcome.INCONCLUSIVE, f"undefined on {n} labelled answers ({pos} positive)", samples=n)
        return out(
            Outcome.ERROR, f"not measured on {n} candidate samples (missing reference or column?)", samples=n
        )
    compared, text, stable_value = value, f"candidate {fmt(metric, value)}", None
    if check.relative_to_stable:
        sv, sn = obs.metric(metric, STABLE)
        if sn < check.min_samples:
            return out(
                Outcome.INCONCLUSIVE,
                f"{sn} {_samples(kind, STABLE)} < min_samples {check.min_samples}",
                samples=min(n, sn),
                candidate=value,
            )
        if not math.isfinite(sv):
            status = Outcome.INCONCLUSIVE if kind == "labelled" else Outcome.ERROR
            return out(status, f"stable value undefined on {sn} samples", samples=min(n, sn), candidate=value)
        stable_value = sv
        if check.relative_to_stable == "ratio":
            compared = (1.0 if value == 0 else math.inf) if sv == 0 else value / sv
            text = f"candidate {fmt(metric, value)} / stable {fmt(metric, sv)} = {compared:.2f}x"
        else:
            compared = value - sv
            text = f"candidate {fmt(metric, value)} - stable {fmt(metric, sv)} = {compared:+.4g}"
        n = min(n, sn)

    def bound(x: float) -> str:
        if check.relative_to_stable == "ratio":
            return f"{x:.2f}x"
        return f"{x:+.4g}" if check.relative_to_stable else fmt(metric, x)

    kw = dict(samples=n, candidate=value, stable=stable_value)
    if check.min is not None and compared < check.min:
        return out(Outcome.FAIL, f"{text} < min {bound(check.min)} (n={n})", compared, **kw)
    if check.max is not None and compared > check.max:
        return out(Outcome.FAIL, f"{text} > max {bound(check.max)} (n={n})", compared, **kw)
    lo = bound(check.min) if check.min is not None else "-inf"
    hi = bound(check.max) if check.max is not None else "inf"
    return out(Outcome.PASS, f"{text} within [{lo}, {hi}] (n={n})", compared, **kw)


def traffic_check(step: Step, obs: Observations) -> Measurement:
    """The candidate must have answered ``step.min_samples`` requests before the step may
    complete: a step whose candidate receives no traffic is INCONCLUSIVE, never PASS.

    It is counted like a check whose ``inconclusive_limit`` is the largest among the
    step's counted checks, and trips into ``abort``.
    """
    need = step.min_samples  # type: ignore[union-attr]
    counted = [c.inconclusive_limit for c in step.checks if not c.dry_run]
    if isinstance(step, ABStep):
        counted += [step.primary.inconclusive_limit, step.srm.inconclusive_limit]
    limits = GateLimits(min_samples=need, inconclusive_limit=max(counted, default=0), on_inconclusive="abort")
    n = obs.candidate.requests
    outcome = Outcome.PASS if n >= need else Outcome.INCONCLUSIVE
    sign = ">=" if n >= need else "<"
    reason = f"{TRAFFIC_CHECK}: candidate answered {n} requests {sign} min_samples {need}"
    return Measurement(
        CheckResult(TRAFFIC_CHECK, outcome, reason, float(n)),
        limits,
        TRAFFIC_CHECK,
        samples=n,
        candidate=float(n),
        min=float(need),
    )


def measure_step(step: Step, obs: Observations) -> tuple[Measurement, ...]:
    """Every measurement of ``step`` at this tick."""
    out = [evaluate_check(c, obs) for c in step.checks]
    if isinstance(step, ShadowStep | CanaryStep | ABStep | BlueGreenStep):
        out.append(traffic_check(step, obs))
    if isinstance(step, ABStep):
        outcome, reason, p = evaluate_srm(step.srm, obs.ab, step.candidate_pct)
        ab = obs.ab
        ents = (ab.entities_stable + ab.entities_candidate) if ab else 0
        out.append(
            Measurement(
                CheckResult(step.srm.key, outcome, reason, p),
                step.srm,
                "sample_ratio",
                samples=ents,
                min=step.srm.alpha,
            )
        )
        verdict = evaluate_primary(step.primary, obs.ab)
        out.append(
            Measurement(
                CheckResult(step.primary.key, verdict.outcome, verdict.reason, verdict.improvement),
                step.primary,
                step.primary.metric,
                samples=min(verdict.n_stable, verdict.n_candidate),
                ab=verdict,
            )
        )
    return tuple(out)
