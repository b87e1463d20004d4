"""Gate outcomes and the promotion gate.

A gate never raises for a bad metric: it returns an outcome and a reason with numbers,
and the caller decides what a FAIL means (refuse a promotion, roll back a rollout).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from mlops.settings import MetricGate


class Outcome(StrEnum):
    """Result of evaluating one check."""

    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"
    ERROR = "ERROR"


@dataclass(frozen=True)
class CheckResult:
    """One metric's verdict, with the numbers that led to it."""

    metric: str
    outcome: Outcome
    reason: str
    value: float | None = None


@dataclass(frozen=True)
class GateResult:
    """The verdict of a whole gate: PASS only when every check passed; ``evidence`` says what
    the checks were computed on (evaluation set, each version's metrics)."""

    checks: tuple[CheckResult, ...] = field(default_factory=tuple)
    evidence: tuple[str, ...] = field(default_factory=tuple)

    @property
    def outcome(self) -> Outcome:
        """The worst outcome of the checks (ERROR, then FAIL, then INCONCLUSIVE); PASS when none is worse."""
        order = (Outcome.ERROR, Outcome.FAIL, Outcome.INCONCLUSIVE)
        for worst in order:
            if any(c.outcome is worst for c in self.checks):
                return worst
        return Outcome.PASS

    @property
    def passed(self) -> bool:
        """Whether the gate's outcome is PASS."""
        return self.outcome is Outcome.PASS

    @property
    def reason(self) -> str:
        """The reasons of the checks that did not pass, or of every check when all passed."""
        bad = [c.reason for c in self.checks if c.outcome is not Outcome.PASS]
        return "; ".join(bad) if bad else "; ".join(c.reason for c in self.checks)

    def describe(self) -> str:
        """Outcome, reason and evidence on one line."""
        text = f"{self.outcome.value}: {self.reason}"
        return text + (f" ({'; '.join(self.evidence)})" if self.evidence else "")


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def check_metric(
    gate: MetricGate,
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
) -> CheckResult:
    """Evaluate one metric of a candidate against absolute bounds and the champion."""
    name = gate.metric
    value = candidate.get(name)
    if value is None:
        return CheckResult(name, Outcome.ERROR, f"{name} missing from candidate metrics")
    if not math.isfinite(value):
        return CheckResult(name, Outcome.ERROR, f"{name} is {value}", value)
    if gate.min_value is not None and value < gate.min_value:
        return CheckResult(name, Outcome.FAIL, f"{name} {_fmt(value)} < min {_fmt(gate.min_value)}", value)
    if gate.max_value is not None and value > gate.max_value:
        return CheckResult(name, Outcome.FAIL, f"{name} {_fmt(value)} > max {_fmt(gate.max_value)}", value)
    if gate.max_regression is None or champion is None:
        return CheckResult(name, Outcome.PASS, f"{name} {_fmt(value)} within bounds", value)
    base = champion.get(name)
    if base is None or not math.isfinite(base):
        return CheckResult(name, Outcome.INCONCLUSIVE, f"champion has no usable {name}", value)
    # Regression measured in the direction where bigger is worse.
    regression = (base - value) if gate.higher_is_better else (value - base)
    verdict = f"{name} {_fmt(value)} vs champion {_fmt(base)} (regression {_fmt(regression)}, max {_fmt(gate.max_regression)})"
    if regression > gate.max_regression:
        return CheckResult(name, Outcome.FAIL, verdict, value)
    return CheckResult(name, Outcome.PASS, verdict, value)


def promotion_gate(
    gates: Sequence[MetricGate],
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
) -> GateResult:
    """Every configured metric of ``candidate`` checked against bounds and ``champion``."""
    return GateResult(tuple(check_metric(g, candidate, champion) for g in gates))
